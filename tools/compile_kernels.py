"""Compile every kidkernels Triton kernel for a CUDA target without a GPU (Triton's ahead-of-time path).

The Triton interpreter, which runs the kernels on CPU tensors in the tests, accepts code that the compiler rejects;
this compiles each kernel variant (dtype x constexpr flags) to a cubin for the given architecture, so compile errors
surface on a machine with no GPU.  It needs the CUDA tools that the ``triton`` wheel bundles (ptxas), not a GPU.

    python tools/compile_kernels.py [--arch 90] [--quick]

``--quick`` compiles one representative variant per kernel and dtype (used by the test suite): the distillation
kernels with a teacher (JSD: the statistics, value and gradient kernels) in bfloat16 and without one (the
cross-entropy alone, ``HAS_TEACHER=False``) in float32, so that both code paths are compiled.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, stated (silences a 3.9 warning)
os.environ.pop("TRITON_INTERPRET", None)  # must precede the kernels' import: @triton.jit reads it at decoration

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from kidkernels.kernels.distill_backward import distill_grad_kernel  # noqa: E402
from kidkernels.kernels.distill_forward import distill_stats_kernel, distill_value_kernel  # noqa: E402
from kidkernels.kernels.entropy_argmax import row_argmax_kernel, row_entropy_kernel  # noqa: E402

BLOCK_V = 4096


def _row_pair(ptr_type):
    return dict(s_ptr=ptr_type, s_row_stride="i64", t_ptr=ptr_type, t_row_stride="i64")


# --quick: which teacher flag each dtype's distillation kernels are compiled with (one variant per kernel and dtype).
QUICK_HAS_TEACHER = {"*fp32": False, "*bf16": True}


def _distill_variants(ptr: str, has_teacher: bool, quick: bool):
    """The distillation kernels' variants for logits of pointer type ``ptr``, with or without a teacher."""
    if has_teacher:
        separate_flags = [True] if quick else [False, True]
        divergences = [2] if quick else range(4)
        flags = [(True, True)] if quick else [(False, False), (True, False), (True, True)]
    else:  # the cross-entropy alone: a target and the MLE term, T == 1, no divergence (DIVERGENCE is not read)
        separate_flags, divergences, flags = [False], [0], [(True, True)]
    common = dict(target_ptr="*i64", stats_ptr="*fp32", stat_stride="i64")
    scalars = dict(V="i32", inv_temp="fp32", beta="fp32", log_beta="fp32", log_one_minus_beta="fp32")
    for separate, div, has_target in itertools.product(separate_flags, divergences, sorted({f[0] for f in flags})):
        sig = dict(_row_pair(ptr), **common, V="i32", inv_temp="fp32", ignore_index="i32",
                   DIVERGENCE="constexpr", HAS_TEACHER="constexpr", HAS_TARGET="constexpr",
                   SEPARATE_CE_LSE="constexpr", BLOCK_V="constexpr")
        yield "distill_stats", distill_stats_kernel, sig, dict(DIVERGENCE=div, HAS_TEACHER=has_teacher,
                                                               HAS_TARGET=has_target, SEPARATE_CE_LSE=separate,
                                                               BLOCK_V=BLOCK_V)
    if has_teacher:
        for div, has_target in itertools.product([d for d in divergences if d >= 2], [True] if quick else
                                                 [False, True]):
            sig = dict(_row_pair(ptr), **common, **scalars, ignore_index="i32", DIVERGENCE="constexpr",
                       HAS_TARGET="constexpr", BLOCK_V="constexpr")
            yield "distill_value", distill_value_kernel, sig, dict(DIVERGENCE=div, HAS_TARGET=has_target,
                                                                   BLOCK_V=BLOCK_V)
    for separate, div, (has_target, has_mle) in itertools.product(separate_flags, divergences, flags):
        for has_weight in ([True] if quick else [False, True]):
            sig = dict(_row_pair(ptr), **common, row_weight_ptr="*fp32", row_weight_stride="i64",
                       grad_ptr=ptr, grad_row_stride="i64", **scalars, kd_scale="fp32", mle_weight="fp32",
                       ignore_index="i32", DIVERGENCE="constexpr", HAS_TARGET="constexpr", HAS_MLE="constexpr",
                       HAS_ROW_WEIGHT="constexpr", HAS_TEACHER="constexpr", SEPARATE_CE_LSE="constexpr",
                       BLOCK_V="constexpr")
            yield "distill_grad", distill_grad_kernel, sig, dict(
                DIVERGENCE=div, HAS_TARGET=has_target, HAS_MLE=has_mle, HAS_ROW_WEIGHT=has_weight,
                HAS_TEACHER=has_teacher, SEPARATE_CE_LSE=separate, BLOCK_V=BLOCK_V)


def variants(quick: bool):
    """Yield ``(name, kernel, signature, constexprs)`` for every compiled variant."""
    dtypes = ["*fp32", "*bf16"] if quick else ["*fp32", "*bf16", "*fp16"]
    for ptr in dtypes:
        for has_teacher in ([QUICK_HAS_TEACHER[ptr]] if quick else [True, False]):
            yield from _distill_variants(ptr, has_teacher, quick)
        sig = dict(logits_ptr=ptr, row_stride="i64", entropy_ptr="*fp32", V="i32", inv_temp="fp32",
                   BLOCK_V="constexpr")
        yield "row_entropy", row_entropy_kernel, sig, dict(BLOCK_V=BLOCK_V)
        sig = dict(logits_ptr=ptr, row_stride="i64", argmax_ptr="*i64", V="i32", BLOCK_V="constexpr")
        yield "row_argmax", row_argmax_kernel, sig, dict(BLOCK_V=BLOCK_V)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for Hopper")
    parser.add_argument("--quick", action="store_true", help="one representative variant per kernel and dtype")
    args = parser.parse_args(argv)
    target = GPUTarget("cuda", args.arch, 32)
    start, count = time.perf_counter(), 0
    for name, kernel, signature, constexprs in variants(args.quick):
        try:
            triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target,
                           options={"num_warps": 8})
        except Exception as exc:  # report which variant failed, then fail
            print(f"FAILED {name} {signature} {constexprs}: {exc}", file=sys.stderr)
            return 1
        count += 1
    print(f"compiled {count} kernel variants for sm_{args.arch} with triton {triton.__version__} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
