"""Compile the GEMM-fused gradient kernels (``kernels/distill_fused_grad.py``) for a CUDA target without a GPU and
report registers, spills and shared memory, until the dispatch calls them and ``tools/compile_kernels.py`` records
them from the public ops.

The launches are those of :func:`kidkernels.ops.distill_fused_grad.write_grad_fused` at the hot shape (bfloat16
hidden states and lm_head, V = 151,936, H_s = 1,024, a chunk of 423 or 512 rows, the float32 teacher tile, a bfloat16
gradient), on ``meta`` tensors (the launcher then picks the GPU tile configuration, ``fused_tiles.LOSS_GRAD``),
intercepted and specialised by ``compile_kernels``' own recorder and compiled with its ``compile_all``.  Meta tensors
have address 0, so every pointer carries the 16-byte alignment hint; the recorder also sees a chunk of statistics,
target and row weight that starts unaligned (as a chunk of the whole batch's statistics does).

    python tools/compile_fused_grad.py [--arch 90] [--json PATH] [--quick]

:func:`scenarios` and :func:`record` are what ``compile_kernels`` can call to add these variants to its own list.
Exit status 0 when every variant compiled without spills, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
for path in (str(TOOLS.parent), str(TOOLS)):
    if path not in sys.path:
        sys.path.insert(0, path)

import compile_kernels  # noqa: E402  (the tool next to this one)

HOT_VOCAB = compile_kernels.QWEN_VOCAB
HOT_HIDDEN = 1_024  # the paper's student (Qwen-0.5B class)
HOT_ROWS = (423, 512)  # the chunk of a 368-512 MiB workspace, and a multiple of 16


def scenarios(quick: bool = False) -> list[dict]:
    """Keyword sets of :func:`launch_one`: FKL, RKL and the cross-entropy alone (the targets of A') with and without
    the MLE term, at T = 1 and 2, with a broadcast ("mean") and a per-row ("none") row weight, a bias; JSD and TVD
    too; float16 and float32 operands (not hot); both models softcapped, or scaled.  ``quick``: FKL/RKL + MLE, the
    cross-entropy, RKL + MLE at T = 2 with per-row weights, and RKL + MLE with both models softcapped (Gemma's 30)."""
    out = [dict(divergence="rkl", mle_weight=0.5), dict(divergence="fkl", mle_weight=0.5), dict(divergence="ce"),
           dict(divergence="rkl", mle_weight=0.5, temperature=2.0, row_weight="rows"),
           dict(divergence="rkl", mle_weight=0.5, softcap=30.0)]
    if quick:
        return out
    out += [dict(divergence="rkl"), dict(divergence="rkl", mle_weight=0.5, bias=True),
            dict(divergence="jsd", mle_weight=0.5), dict(divergence="tvd", mle_weight=0.5),
            dict(divergence="rkl", mle_weight=0.5, rows=HOT_ROWS[1]),
            dict(divergence="rkl", mle_weight=0.5, unaligned=True),
            dict(divergence="rkl", mle_weight=0.5, dtype="float16"),
            dict(divergence="rkl", mle_weight=0.5, dtype="float32"),
            dict(divergence="fkl", mle_weight=0.5, softcap=30.0), dict(divergence="ce", softcap=30.0),
            dict(divergence="rkl", mle_weight=0.5, logit_scale=0.5),
            dict(divergence="rkl", mle_weight=0.5, temperature=2.0, row_weight="rows", bias=True, softcap=30.0),
            dict(divergence="jsd", mle_weight=0.5, temperature=2.0, softcap=30.0)]
    return out


def launch_one(*, divergence="rkl", mle_weight=0.0, temperature=1.0, bias=False, row_weight="mean",
               rows=HOT_ROWS[0], unaligned=False, dtype="bfloat16", softcap=None, logit_scale=1.0) -> None:
    """One call of ``write_grad_fused`` on meta tensors at the hot shape."""
    import torch

    from kidkernels.ops.config import NUM_STATS, DistillConfig
    from kidkernels.ops.distill_fused_grad import write_grad_fused

    dt = getattr(torch, dtype)
    meta = dict(device="meta")
    if divergence == "ce":
        cfg = DistillConfig.cross_entropy(-100, logit_scale, softcap)
    else:  # both models' logits transformed alike
        cfg = DistillConfig(divergence, 0.5, temperature, 1.0, mle_weight, -100, True,
                            student_logit_scale=logit_scale, student_softcap=softcap,
                            teacher_logit_scale=logit_scale, teacher_softcap=softcap)
    # A chunk of the whole batch's statistics (and target, row weight) starts at an arbitrary row.
    skip = 1 if unaligned else 0
    stats = torch.empty(NUM_STATS, rows + 16, **meta)[:, skip:skip + rows]
    target = torch.empty(rows + 16, dtype=torch.int64, **meta)[skip:skip + rows]
    weight = torch.empty(1, **meta).expand(rows) if row_weight == "mean" else \
        torch.empty(rows + 16, **meta)[skip:skip + rows]
    write_grad_fused(torch.empty(rows, HOT_HIDDEN, dtype=dt, **meta),
                     torch.empty(HOT_VOCAB, HOT_HIDDEN, dtype=dt, **meta),
                     torch.empty(HOT_VOCAB, dtype=dt, **meta) if bias else None,
                     torch.empty(rows, HOT_VOCAB, **meta) if cfg.has_teacher else None, target, stats, cfg, weight,
                     torch.empty(rows, HOT_VOCAB, dtype=dt, **meta))


def record(arch: int = 90, quick: bool = False) -> list:
    """The distinct variants (``compile_kernels.Variant``; bfloat16 ones hot) of the fused gradient's launches."""
    compile_kernels._import_all_kidkernels()
    recorder = compile_kernels.Recorder(arch)
    with compile_kernels.recording(recorder):
        for kw in scenarios(quick):
            recorder.scenario = compile_kernels.Scenario(
                "write_grad_fused " + " ".join(f"{k}={v}" for k, v in kw.items()), "fused_grad",
                kw.get("dtype", "bfloat16"), HOT_VOCAB)
            launch_one(**kw)
    return list(recorder.variants.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    compile_kernels.prepare_process()
    import triton

    start = time.perf_counter()
    variants = record(args.arch, args.quick)
    results = compile_kernels.compile_all(variants, args.arch,
                                          progress=lambda msg: print(f"compiling {msg}", file=sys.stderr, flush=True))
    problems = compile_kernels.check(results, "any")
    print(compile_kernels.format_table(results))
    print(f"compiled {sum(r.error is None for r in results)} of {len(variants)} variants for sm_{args.arch} with "
          f"triton {triton.__version__} in {time.perf_counter() - start:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "arch": args.arch,
                                               "variants": [r.as_dict() for r in results],
                                               "problems": problems}, indent=1) + "\n")
    for p in problems:
        print(f"FAILED {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
