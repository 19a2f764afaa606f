"""A short, self-contained example: reverse KL + MLE from hidden states, kidkernels next to eager PyTorch.

    python -m kidkernels.example [--rows 1024] [--vocab 32000] [--device cpu|cuda]

Each provider runs in its own subprocess so that its peak memory is its own: on CUDA the peak of
``torch.cuda.max_memory_allocated`` above the inputs, on CPU the growth of the process's peak resident memory.
Prints the loss, the forward+backward time and the peak memory of each.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _inputs(args, device):
    g = torch.Generator().manual_seed(0)
    dtype = getattr(torch, args.dtype)
    xs = torch.randn(args.rows, args.student_hidden, generator=g)
    ws = torch.randn(args.vocab, args.student_hidden, generator=g) * (3.0 / args.student_hidden ** 0.5)
    xt = torch.randn(args.rows, args.teacher_hidden, generator=g)
    wt = torch.randn(args.vocab, args.teacher_hidden, generator=g) * (4.0 / args.teacher_hidden ** 0.5)
    target = torch.randint(0, args.vocab, (args.rows,), generator=g)
    to = dict(device=device, dtype=dtype)
    return (xs.to(**to).requires_grad_(), ws.to(**to).requires_grad_(), xt.to(**to), wt.to(**to),
            target.to(device))


def _run_provider(args) -> dict:
    import kidkernels
    from kidkernels.reference import reference_fused_linear_distill_loss

    device = torch.device(args.device)
    xs, ws, xt, wt, target = _inputs(args, device)
    options = dict(divergence="rkl", mle_weight=1.0)
    if args.provider == "kidkernels":
        def step():
            return kidkernels.fused_linear_distill_loss(xs, ws, xt, wt, target, **options)
    else:
        def step():
            return reference_fused_linear_distill_loss(xs, ws, xt, wt, target, dtype=torch.float32, **options)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss_bytes()
    loss = step()  # warm-up (compilation, allocator); its memory counts in the peak
    loss.backward()
    sync()
    times = []
    for _ in range(args.repeats):
        xs.grad = ws.grad = None
        sync()
        start = time.perf_counter()
        loss = step()
        loss.backward()
        sync()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_rss_bytes()) - base
    return dict(provider=args.provider, loss=float(loss), seconds=min(times), peak_bytes=max(peak, 0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="tokens N (default 1024)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary V (default 32000)")
    parser.add_argument("--student-hidden", type=int, default=256)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--provider", choices=["kidkernels", "eager"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.provider:
        print(json.dumps(_run_provider(args)))
        return 0
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    print(f"reverse KL + MLE, forward+backward: N={args.rows}, H_s={args.student_hidden}, "
          f"H_t={args.teacher_hidden}, V={args.vocab}, {args.dtype} on {args.device}")
    print(f"{'provider':<12}{'loss':>12}{'time (ms)':>12}{'peak extra memory':>20}")
    results = []
    for provider in ("kidkernels", "eager"):
        proc = subprocess.run([sys.executable, "-m", "kidkernels.example", *forwarded, "--provider", provider],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{provider:<12} failed:\n{proc.stderr[-2000:]}")
            return 1
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{provider:<12}{r['loss']:>12.6f}{r['seconds'] * 1e3:>12.1f}{r['peak_bytes'] / 2**20:>16.1f} MiB")
    full = args.rows * args.vocab * 4 / 2**20
    print(f"(one fp32 [N, V] logits tensor is {full:.1f} MiB; "
          f"loss difference {abs(results[0]['loss'] - results[1]['loss']):.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
