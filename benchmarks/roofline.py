"""Roofline ESTIMATE of the fused losses and of KID's selection ops, from each implementation's real launch sequence.

    python benchmarks/roofline.py --shape paper [--divergence rkl] [--workspace-mb 512] [--gpu all]
                                  [--sweep-workspace] [--bf16-weight-grad] [--json PATH] [--markdown PATH]

Each implementation's code runs on ``meta`` tensors (nothing is computed, no GPU is needed) in a dry run of
kidkernels' Triton launches, under a dispatch mode that records every aten op (``launch_trace.py``).  Every launch is
priced on its own as ``max(FLOPs / matmul peak, HBM bytes / bandwidth)`` and the launches are summed: no overlap
between launches, no L2 reuse across them, no launch latency, no cost for elementwise arithmetic.  The figures are
estimates, printed and written as such, until the benchmark suite measures them on a GPU.

The matmul floor is the loss's product FLOPs at the bf16 peak: ``2 N V (H_s + H_t)`` forward plus ``2 x 2 N V H_s``
for the student input and weight gradients; for entropy/argmax the student logits product ``2 N V H_s``.

Implementations of the loss (forward + backward with the student's input and weight gradients; the MLE term on):

- ``triton_rows``: today's kidkernels path (cuBLAS float32 logits per row chunk, row-per-program Triton passes);
- ``triton``: the GEMM-fused kernels of issue 11, picked up by the dry run as soon as their launchers exist (until
  then the backend runs the ``triton_rows`` sequence and is reported as not available);
- ``eager``: ``kidkernels.reference`` with ``dtype=torch.float32``, the benchmarks' "eager" provider (its products in
  float32, priced at the float32 rate: PyTorch does not use TF32 for float32 matmuls by default);
- ``eager_bf16_mm``: the same float32 loss on logits from bf16 products (the benchmarks' ``eager_lowp_mm``);
- ``torch_compile``: a LOWER BOUND only, eager's products (Inductor hands aten products to cuBLAS); see
  :data:`COMPILE_NOTE` for why no more is modelled;
- ``liger_chunked`` / ``liger_chunked_gemms``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (chunks of 1,024 rows, as
  the benchmarks run it), traced with ``compiled=False``: an UPPER BOUND, each elementwise op a launch (its default
  ``compiled=True`` has Inductor fuse them per chunk), and its products alone, a LOWER BOUND.  Needs
  ``liger_kernel`` importable (e.g. ``pip install --no-deps --target DIR liger-kernel`` and ``PYTHONPATH=DIR``).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: import the checkout this file belongs to
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.arguments import OneLineParser, output_file_problem  # noqa: E402
from benchmarks.harness import distill_flops, linear_flops  # noqa: E402
from benchmarks.launch_trace import Launch, trace  # noqa: E402

ESTIMATE = "ESTIMATE"

# ---- the machines ---------------------------------------------------------------------------------------------

# Effective bf16/fp16 rate of large products: 800 TFLOP/s, the rate measured for large bf16 GEMMs on an H100
# (/work/shared/notes/anchors.md), 81% of the 989 TFLOP/s dense bf16 of NVIDIA's H100 SXM datasheet.  The H200 has the
# same GH100 compute (989 TFLOP/s dense on its datasheet), so the same rate.
BF16_TFLOPS = 800.0
# float32 products without TF32 (PyTorch's default for float32 matmuls): 67 TFLOP/s on the datasheets, scaled by the
# same 800/989 efficiency.
FP32_TFLOPS = 67.0 * 800.0 / 989.0


@dataclass(frozen=True)
class Gpu:
    key: str
    name: str
    bandwidth_tb_s: float  # HBM, TB/s (10^12 bytes per second)
    bf16_tflops: float = BF16_TFLOPS
    fp32_tflops: float = FP32_TFLOPS
    source: str = ""

    def floor_seconds(self, flops: int) -> float:
        """The matmul floor: ``flops`` of bf16 products at the bf16 rate."""
        return flops / (self.bf16_tflops * 1e12)

    def seconds(self, launch: Launch) -> float:
        """``max(FLOPs / peak, bytes / bandwidth)``; the peak of float32 products is the float32 rate."""
        peak = self.fp32_tflops if launch.matmul_dtype in ("f32", "f64") else self.bf16_tflops
        return max(launch.flops / (peak * 1e12), launch.hbm_bytes / (self.bandwidth_tb_s * 1e12))


GPUS = {
    "h100": Gpu("h100", "H100 SXM", 3.35, source="NVIDIA H100 SXM datasheet: 3.35 TB/s HBM3, 989 TFLOP/s dense bf16, "
                "67 TFLOP/s fp32"),
    "h200": Gpu("h200", "H200 SXM", 4.8, source="NVIDIA H200 SXM datasheet: 4.8 TB/s HBM3e, same compute as H100 SXM"),
}

COMPILE_NOTE = (
    "torch.compile is modelled as a lower bound only (its products, which Inductor leaves to cuBLAS, as in eager): "
    "which elementwise and reduction ops Inductor fuses into each generated kernel, and what its partitioner saves or "
    "recomputes for the backward, are decided by Inductor's scheduler and code generator for a CUDA target, which do "
    "not run without a GPU here; any figure for them would be a guess, not a trace of its code.")

# ---- the problem ----------------------------------------------------------------------------------------------

PAPER_SHAPE = (2048, 1024, 4096, 151_936)  # N, H_s, H_t, V: KID's setting (batch 16 x 128 answer tokens, Qwen1.5)
WORKSPACE_SWEEP_MIB = (64, 128, 256, 384, 512, 768, 1024)
DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
LIGER_BETA = {"fkl": 0.0, "rkl": 1.0, "jsd": 0.5}  # Liger's generalized JSD: beta 0 forward KL, 1 reverse KL


@dataclass(frozen=True)
class Problem:
    n: int
    h_s: int
    h_t: int
    v: int
    divergence: str = "rkl"
    workspace_bytes: int | None = None  # None: each backend's default, as the public API chooses it
    weight_grad_fp32: bool = True
    dtype: torch.dtype = torch.bfloat16

    @property
    def dims(self) -> dict[str, int]:
        return {"N": self.n, "H_s": self.h_s, "H_t": self.h_t, "V": self.v}

    def loss_floor_flops(self) -> int:
        return distill_flops(self.n, self.v, self.h_s, self.h_t, "fwd_bwd")

    def selection_floor_flops(self) -> int:
        return linear_flops(self.n, self.v, self.h_s)


@dataclass
class MetaInputs:
    """Meta tensors of one call: the student's require gradients, the teacher's do not."""
    x_s: torch.Tensor
    W_s: torch.Tensor
    x_t: torch.Tensor
    W_t: torch.Tensor
    target: torch.Tensor

    @classmethod
    def of(cls, p: Problem) -> MetaInputs:
        def empty(*shape, dtype=p.dtype, grad=False):
            return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_(grad)

        return cls(empty(p.n, p.h_s, grad=True), empty(p.v, p.h_s, grad=True), empty(p.n, p.h_t),
                   empty(p.v, p.h_t), empty(p.n, dtype=torch.int64))

    @property
    def names(self) -> dict[str, torch.Tensor]:
        return dict(vars(self))


class Unavailable(Exception):
    """An implementation that cannot be traced here (the reason is reported)."""


# ---- the implementations --------------------------------------------------------------------------------------

def _workspace(p: Problem, backend: str, op: str) -> int:
    """The workspace of a kidkernels call: the one asked for, else the library's default for ``backend`` and ``op``
    (as ``kidkernels.loss`` and ``kidkernels.selection`` choose it)."""
    from kidkernels.ops.workspace import DEFAULT_WORKSPACE_BYTES, FUSED_LOSS_WORKSPACE_BYTES, workspace_budget

    default = FUSED_LOSS_WORKSPACE_BYTES if (backend, op) == ("triton", "loss") else DEFAULT_WORKSPACE_BYTES
    return p.workspace_bytes if p.workspace_bytes is not None else workspace_budget(None, default=default)


def _kidkernels_loss(backend: str):
    def run(p: Problem, t: MetaInputs) -> None:
        # The registered op, as the public API calls it (resolve_backend, which refuses meta tensors, is bypassed by
        # naming the backend); only the loss is kept, as the API does, so the backward may hand out its buffers.
        loss = torch.ops.kidkernels.linear_distill(
            xs=t.x_s, ws=t.W_s, bs=None, xt=t.x_t, wt=t.W_t, bt=None, target=t.target, normalizer=None,
            normalizer_value=None, divergence=p.divergence, beta=0.5, temperature=1.0, kd_weight=1.0, mle_weight=1.0,
            ignore_index=-100, vocab=p.v, reduction="mean", backend=backend,
            workspace_bytes=_workspace(p, backend, "loss"), weight_grad_fp32=p.weight_grad_fp32, grad_input=True,
            grad_weight=True, grad_bias=False)[0]
        loss.backward()
    return run


def _kidkernels_selection(backend: str, statistic: str):
    def run(p: Problem, t: MetaInputs) -> None:
        if statistic == "entropy":
            torch.ops.kidkernels.linear_entropy(t.x_s.detach(), t.W_s.detach(), None, 1.0, backend,
                                                _workspace(p, backend, "selection"))
        else:
            torch.ops.kidkernels.linear_argmax(t.x_s.detach(), t.W_s.detach(), None, backend,
                                               _workspace(p, backend, "selection"))
    return run


def _counted_rows(p: Problem):
    """The host read of the eager reference's "mean": the number of counted rows (every row counts here)."""
    def answer(func, args):
        return p.n if not args[0].dtype.is_floating_point and args[0].dtype != torch.bool else None
    return answer


def _eager_loss(p: Problem, t: MetaInputs) -> None:
    from kidkernels.reference import reference_fused_linear_distill_loss

    reference_fused_linear_distill_loss(t.x_s, t.W_s, t.x_t, t.W_t, t.target, divergence=p.divergence, beta=0.5,
                                        kd_weight=1.0, mle_weight=1.0, dtype=torch.float32).backward()


def _eager_bf16_mm_loss(p: Problem, t: MetaInputs) -> None:
    from benchmarks.providers import _lowp_logits_distill_loss

    _lowp_logits_distill_loss(t.x_s, t.W_s, t.x_t, t.W_t, t.target, divergence=p.divergence, beta=0.5,
                              temperature=1.0, kd_weight=1.0, mle_weight=1.0).backward()


def _liger_loss(p: Problem, t: MetaInputs) -> None:
    if importlib.util.find_spec("liger_kernel") is None:
        raise Unavailable("liger_kernel is not importable (pip install --no-deps --target DIR liger-kernel, then "
                          "PYTHONPATH=DIR)")
    if p.divergence not in LIGER_BETA:
        raise Unavailable(f"Liger's chunked loss has no {p.divergence!r} (FKL, RKL and JSD only)")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, beta=LIGER_BETA[p.divergence],
                                   ignore_index=-100, temperature=1.0, compiled=False, chunk_size=1024)
    loss(t.x_s, t.W_s, t.x_t, t.W_t, t.target).backward()


def _upstream_is_one(func, args):
    """Liger's backward asks ``grad_output != 1`` on the host; the upstream gradient of ``.backward()`` is 1."""
    return False if args[0].dtype == torch.bool else None


def _eager_entropy(p: Problem, t: MetaInputs) -> None:
    from kidkernels.reference import reference_fused_linear_entropy

    reference_fused_linear_entropy(t.x_s.detach(), t.W_s.detach(), dtype=torch.float32)


def _eager_argmax(p: Problem, t: MetaInputs) -> None:
    from kidkernels.reference import reference_fused_linear_argmax

    reference_fused_linear_argmax(t.x_s.detach(), t.W_s.detach(), dtype=torch.float32)


@dataclass(frozen=True)
class Implementation:
    key: str
    description: str
    run: Callable[[Problem, MetaInputs], None]
    bound: str = "model"  # "model": the whole launch sequence; "upper bound" / "lower bound"
    answer_host_read: Callable | None = None  # Problem -> callback, for code known to read values on the host
    matmuls_only: bool = False  # keep only the products of the trace (a lower bound)
    same_as: str | None = None  # reported unavailable while its sequence equals that implementation's
    kidkernels: bool = False


LOSS_IMPLEMENTATIONS = (
    Implementation("triton_rows", "kidkernels today: cuBLAS float32 logits per row chunk, then row-per-program "
                   "Triton passes and cuBLAS gradient products", _kidkernels_loss("triton_rows"), kidkernels=True),
    Implementation("triton", "kidkernels' GEMM-fused kernels (issue 11)", _kidkernels_loss("triton"),
                   same_as="triton_rows", kidkernels=True),
    Implementation("eager", "kidkernels.reference, float32 products and softmax (the benchmarks' eager)", _eager_loss,
                   answer_host_read=_counted_rows),
    Implementation("eager_bf16_mm", "float32 reference loss on logits from bf16 products (eager_lowp_mm)",
                   _eager_bf16_mm_loss, answer_host_read=_counted_rows),
    Implementation("torch_compile", "torch.compile of eager: its products only", _eager_loss, bound="lower bound",
                   answer_host_read=_counted_rows, matmuls_only=True),
    Implementation("liger_chunked", "Liger LigerFusedLinearJSDLoss, chunk_size=1024, traced with compiled=False "
                   "(each elementwise op a launch)", _liger_loss, bound="upper bound",
                   answer_host_read=lambda p: _upstream_is_one),
    Implementation("liger_chunked_gemms", "Liger LigerFusedLinearJSDLoss, chunk_size=1024: its products only",
                   _liger_loss, bound="lower bound", answer_host_read=lambda p: _upstream_is_one, matmuls_only=True),
)


def selection_implementations(statistic: str) -> tuple[Implementation, ...]:
    eager = _eager_entropy if statistic == "entropy" else _eager_argmax
    return (
        Implementation("triton_rows", f"kidkernels today: cuBLAS float32 logits per chunk, a row-per-program "
                       f"{statistic} pass", _kidkernels_selection("triton_rows", statistic), kidkernels=True),
        Implementation("triton", "kidkernels' GEMM-fused kernel (issue 11)", _kidkernels_selection("triton", statistic),
                       same_as="triton_rows", kidkernels=True),
        Implementation("eager", f"kidkernels.reference {statistic}, float32 logits", eager),
    )


# ---- tracing and pricing --------------------------------------------------------------------------------------

@dataclass
class Result:
    impl: Implementation
    launches: list[Launch] = field(default_factory=list)
    host_reads: list[str] = field(default_factory=list)
    unavailable: str | None = None
    failed: bool = False  # the trace raised: a bug, not a missing package

    @property
    def status(self) -> str:
        return "failed" if self.failed else "ok" if self.ok else "not available"

    @property
    def ok(self) -> bool:
        return self.unavailable is None

    def seconds(self, gpu: Gpu) -> float:
        return sum(gpu.seconds(launch) for launch in self.launches)

    def groups(self) -> list[dict]:
        """The launches grouped by label, in order of first appearance: count, FLOPs, bytes, est. seconds per GPU."""
        groups: dict[str, dict] = {}
        for launch in self.launches:
            g = groups.setdefault(launch.label, dict(label=launch.label, source=launch.source, count=0, flops=0,
                                                     hbm_bytes=0, est_s={k: 0.0 for k in GPUS}))
            g["count"] += 1
            g["flops"] += launch.flops
            g["hbm_bytes"] += launch.hbm_bytes
            for key, gpu in GPUS.items():
                g["est_s"][key] += gpu.seconds(launch)
        return list(groups.values())


def record(impl: Implementation, p: Problem) -> Result:
    """The implementation's launch sequence for one call at problem ``p`` (a steady-state call: a first, discarded
    trace pays one-time work such as kidkernels' probes of the float32-output products)."""
    answer = impl.answer_host_read(p) if impl.answer_host_read is not None else None
    try:
        for _ in range(2):
            inputs = MetaInputs.of(p)
            traced = trace(lambda: impl.run(p, inputs), names=inputs.names, dims=p.dims, answer_host_read=answer)
    except Unavailable as exc:
        return Result(impl, unavailable=str(exc))
    except ImportError as exc:
        return Result(impl, unavailable=f"cannot import: {exc}")
    except Exception as exc:  # reported (and the exit status is 1), so that the other implementations still print
        return Result(impl, unavailable=f"{type(exc).__name__}: {exc}", failed=True)
    launches = [launch for launch in traced.launches if launch.flops] if impl.matmuls_only else traced.launches
    return Result(impl, launches, traced.host_reads)


def _signature(result: Result) -> list[tuple]:
    return [(launch.label, launch.flops, launch.hbm_bytes) for launch in result.launches]


def record_all(impls, p: Problem) -> list[Result]:
    results: dict[str, Result] = {}
    for impl in impls:
        result = record(impl, p)
        twin = results.get(impl.same_as) if impl.same_as else None
        if result.ok and twin is not None and twin.ok and _signature(result) == _signature(twin):
            result = Result(impl, unavailable=f"backend {impl.key!r} still runs the launch sequence of "
                            f"{impl.same_as!r}: its launchers have not landed")
        results[impl.key] = result
    return list(results.values())


# ---- reports --------------------------------------------------------------------------------------------------

def _ms(seconds: float) -> float:
    return seconds * 1e3


def result_json(result: Result, floor_flops: int) -> dict:
    out = dict(implementation=result.impl.key, description=result.impl.description, bound=result.impl.bound,
               status=result.status)
    if not result.ok:
        out["reason"] = result.unavailable
        return out
    floor = {k: gpu.floor_seconds(floor_flops) for k, gpu in GPUS.items()}
    out["launches"] = [dict(label=g["label"], source=g["source"], count=g["count"], flops=g["flops"],
                            hbm_bytes=g["hbm_bytes"], est_ms={k: _ms(s) for k, s in g["est_s"].items()})
                       for g in result.groups()]
    out["total"] = dict(launches=len(result.launches), flops=sum(x.flops for x in result.launches),
                        hbm_bytes=sum(x.hbm_bytes for x in result.launches),
                        est_ms={k: _ms(result.seconds(gpu)) for k, gpu in GPUS.items()},
                        x_floor={k: result.seconds(gpu) / floor[k] for k, gpu in GPUS.items()})
    out["host_reads"] = result.host_reads
    return out


def format_result(result: Result, floor_flops: int, gpus: list[Gpu]) -> list[str]:
    impl = result.impl
    bound = "" if impl.bound == "model" else f" [{impl.bound.upper()}]"
    lines = [f"-- {impl.key}{bound}: {impl.description}"]
    if not result.ok:
        return lines + [f"   {result.status}: {result.unavailable}"]
    groups = result.groups()
    total_bytes = sum(g["hbm_bytes"] for g in groups)
    shown = [g for g in groups if g["flops"] or g["hbm_bytes"] >= 1e-4 * total_bytes]
    small = [g for g in groups if g not in shown]
    header = f"   {'launch':<58} {'count':>5} {'TFLOP':>7} {'GB':>7}" + "".join(f" {g.key + ' ms':>9}" for g in gpus)
    lines.append(header)
    for g in shown:
        label = g["label"] if len(g["label"]) <= 58 else g["label"][:55] + "..."
        lines.append(f"   {label:<58} {g['count']:>5} {g['flops'] / 1e12:>7.3f} {g['hbm_bytes'] / 1e9:>7.3f}"
                     + "".join(f" {_ms(g['est_s'][gpu.key]):>9.3f}" for gpu in gpus))
    if small:
        count = sum(g["count"] for g in small)
        nbytes = sum(g["hbm_bytes"] for g in small)
        lines.append(f"   {f'{len(small)} kinds of small launches (each < 0.01% of bytes; JSON)':<58} {count:>5} "
                     f"{0:>7.3f} {nbytes / 1e9:>7.3f}"
                     + "".join(f" {_ms(sum(g['est_s'][gpu.key] for g in small)):>9.3f}" for gpu in gpus))
    flops = sum(x.flops for x in result.launches)
    lines.append(f"   {'total (' + ESTIMATE + ')':<58} {len(result.launches):>5} {flops / 1e12:>7.3f} "
                 f"{total_bytes / 1e9:>7.3f}" + "".join(f" {_ms(result.seconds(gpu)):>9.3f}" for gpu in gpus))
    ratios = ", ".join(f"{gpu.name} {result.seconds(gpu) / gpu.floor_seconds(floor_flops):.2f}x" for gpu in gpus)
    lines.append(f"   {ESTIMATE}: {ratios} the matmul floor")
    if result.host_reads:
        lines.append(f"   host reads (a synchronisation each on a GPU, not priced): {', '.join(result.host_reads)}")
    return lines


def format_summary(title: str, results: list[Result], floor_flops: int, gpus: list[Gpu]) -> list[str]:
    lines = [f"{title} ({ESTIMATE}S)", f"   {'implementation':<22} {'bound':<12} {'launches':>8} {'TFLOP':>7} {'GB':>7}"
             + "".join(f" {g.key + ' ms':>9} {'x floor':>7}" for g in gpus)]
    for r in results:
        if not r.ok:
            lines.append(f"   {r.impl.key:<22} {r.status}")
            continue
        flops, nbytes = sum(x.flops for x in r.launches), sum(x.hbm_bytes for x in r.launches)
        lines.append(f"   {r.impl.key:<22} {r.impl.bound:<12} {len(r.launches):>8} {flops / 1e12:>7.3f} "
                     f"{nbytes / 1e9:>7.3f}" + "".join(f" {_ms(r.seconds(g)):>9.3f} "
                                                       f"{r.seconds(g) / g.floor_seconds(floor_flops):>7.2f}"
                                                       for g in gpus))
    return lines


def sweep(p: Problem, impls, floor_flops: int, gpus: list[Gpu]) -> tuple[list[str], list[dict]]:
    """Est. time and ratio to the floor against the workspace, for each kidkernels implementation."""
    rows, lines = [], []
    kk = [impl for impl in impls if impl.kidkernels]
    lines.append(f"   {'workspace MiB':>13}" + "".join(f" {impl.key + ' ' + g.key:>20}" for impl in kk for g in gpus))
    for mib in WORKSPACE_SWEEP_MIB:
        entry, cells = dict(workspace_mib=mib), []
        for r in record_all(kk, Problem(**{**vars(p), "workspace_bytes": mib << 20})):
            if not r.ok:
                entry[r.impl.key] = dict(status=r.status, reason=r.unavailable)
                cells += ["n/a"] * len(gpus)
                continue
            entry[r.impl.key] = {k: dict(est_ms=_ms(r.seconds(g)), x_floor=r.seconds(g) / g.floor_seconds(floor_flops),
                                         launches=len(r.launches)) for k, g in GPUS.items()}
            cells += [f"{_ms(r.seconds(g)):7.2f} ms {r.seconds(g) / g.floor_seconds(floor_flops):5.2f}x" for g in gpus]
        rows.append(entry)
        lines.append(f"   {mib:>13}" + "".join(f" {c:>20}" for c in cells))
    return lines, rows


def constants_lines(gpus: list[Gpu]) -> list[str]:
    lines = ["constants: each launch max(FLOPs / peak, bytes / bandwidth), launches summed (no overlap, no L2 reuse "
             "across launches, no launch latency, elementwise arithmetic free)"]
    for g in gpus:
        lines.append(f"   {g.name}: {g.bandwidth_tb_s} TB/s; products {g.bf16_tflops:.0f} TFLOP/s bf16/fp16 "
                     f"(effective), {g.fp32_tflops:.1f} TFLOP/s float32 (no TF32). {g.source}")
    lines.append(f"   {BF16_TFLOPS:.0f} TFLOP/s: the rate measured for large bf16 products on an H100 (anchors.md), "
                 "81% of the dense datasheet peak; the float32 rate is the datasheet's 67 TFLOP/s at the same "
                 "efficiency")
    return lines


def section(title: str, floor_flops: int, floor_formula: str, impls, p: Problem,
            gpus: list[Gpu]) -> tuple[list[str], dict, list[Result]]:
    """One op's report: its floor, each implementation's launches, a summary; as text lines and JSON."""
    floors = ", ".join(f"{g.name} {_ms(g.floor_seconds(floor_flops)):.2f} ms" for g in gpus)
    lines = [f"{title} matmul floor: {floor_flops / 1e12:.3f} TFLOP = {floor_formula} at the bf16 peak: {floors}"]
    results = record_all(impls, p)
    for r in results:
        lines += format_result(r, floor_flops, gpus)
    lines += format_summary(f"{title} summary", results, floor_flops, gpus)
    report = dict(floor_flops=floor_flops, floor_est_ms={k: _ms(g.floor_seconds(floor_flops)) for k, g in GPUS.items()},
                  implementations=[result_json(r, floor_flops) for r in results])
    return lines, report, results


# ---- command line ---------------------------------------------------------------------------------------------

def parse_shape(text: str) -> tuple[int, int, int, int]:
    if text.strip().lower() == "paper":
        return PAPER_SHAPE
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"must be 'paper' or N,H_s,H_t,V (four positive integers), got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="roofline.py", description="Roofline ESTIMATE of kidkernels' loss and selection ops "
                           "from each implementation's launch sequence (recorded on meta tensors; no GPU).")
    parser.add_argument("--shape", type=parse_shape, default=PAPER_SHAPE,
                        help="'paper' (N=2048, H_s=1024, H_t=4096, V=151936; the default) or N,H_s,H_t,V")
    parser.add_argument("--divergence", choices=DIVERGENCES, default="rkl", help="default rkl (with the MLE term)")
    parser.add_argument("--workspace-mb", type=float, default=None,
                        help="kidkernels' workspace in MiB (default: the library's for each backend, 1 GiB for the "
                        "fused loss and 512 MiB otherwise, or KIDKERNELS_WORKSPACE_MB)")
    parser.add_argument("--gpu", choices=("h100", "h200", "all"), default="all",
                        help="the GPUs printed (default all; the JSON has both)")
    parser.add_argument("--bf16-weight-grad", action="store_true",
                        help="accumulate the student weight gradient in bf16 (weight_grad_fp32=False; default float32)")
    parser.add_argument("--sweep-workspace", action="store_true",
                        help="also the kidkernels paths at workspaces of "
                             f"{', '.join(map(str, WORKSPACE_SWEEP_MIB))} MiB")
    parser.add_argument("--json", type=Path, help="write the estimate as JSON to this file")
    parser.add_argument("--markdown", type=Path, help="write the printed report to this Markdown file")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --json/--markdown files")
    return parser


def run(args, argv: list[str]) -> tuple[str, dict]:
    import os

    n, h_s, h_t, v = args.shape
    workspace = None if args.workspace_mb is None else int(args.workspace_mb * (1 << 20))
    if workspace is None and os.environ.get("KIDKERNELS_WORKSPACE_MB"):
        workspace = int(float(os.environ["KIDKERNELS_WORKSPACE_MB"]) * (1 << 20))
    p = Problem(n, h_s, h_t, v, args.divergence, workspace, not args.bf16_weight_grad)
    gpus = list(GPUS.values()) if args.gpu == "all" else [GPUS[args.gpu]]
    command = " ".join(["python benchmarks/roofline.py", *argv])
    wgrad = "float32" if p.weight_grad_fp32 else "bf16"
    lines = [f"kidkernels roofline: {ESTIMATE} from the code's launch sequences (meta tensors, no GPU ran this)",
             f"command: {command}",
             f"shape: N={n:,} H_s={h_s:,} H_t={h_t:,} V={v:,}, bf16 inputs; loss: {p.divergence.upper()} + MLE "
             f"(kd_weight 1, mle_weight 1, T 1, mean, no ignored rows), forward + backward with the student input and "
             f"weight gradients (dW accumulated in {wgrad}); kidkernels workspace "
             + (f"{workspace / (1 << 20):g} MiB" if workspace is not None else
                "each backend's default (1 GiB for the fused loss, 512 MiB otherwise)"),
             *constants_lines(gpus), ""]
    report = dict(kind="roofline estimate", estimate=True,
                  note="ESTIMATES from each implementation's launch sequence recorded on meta tensors; no GPU ran "
                       "this.",
                  command=command, date=datetime.date.today().isoformat(), torch=torch.__version__,
                  shape=dict(n=n, h_s=h_s, h_t=h_t, v=v), dtype="bfloat16", divergence=p.divergence,
                  loss_options=dict(kd_weight=1.0, mle_weight=1.0, temperature=1.0, reduction="mean",
                                    weight_grad_fp32=p.weight_grad_fp32, ignored_rows=0),
                  workspace_bytes=workspace,
                  gpus={k: dict(name=g.name, bandwidth_tb_s=g.bandwidth_tb_s, bf16_tflops=g.bf16_tflops,
                                fp32_tflops=g.fp32_tflops, source=g.source) for k, g in GPUS.items()},
                  model="each launch max(FLOPs / peak, HBM bytes / bandwidth), launches summed: no overlap, no L2 "
                        "reuse across launches, no launch latency, elementwise arithmetic free",
                  torch_compile_note=COMPILE_NOTE, selection={})
    loss_floor, sel_floor = p.loss_floor_flops(), p.selection_floor_flops()
    text, report["loss"], results = section("LOSS", loss_floor, "2NV(H_s+H_t) + 2*2NV*H_s", LOSS_IMPLEMENTATIONS,
                                            p, gpus)
    lines += text + ["", COMPILE_NOTE]
    for statistic in ("entropy", "argmax"):
        text, report["selection"][statistic], more = section(
            statistic.upper(), sel_floor, "2NV*H_s", selection_implementations(statistic), p, gpus)
        lines += [""] + text
        results += more
    if args.sweep_workspace:
        report["workspace_sweep"] = {}
        for name, impls, floor in (("loss", LOSS_IMPLEMENTATIONS, loss_floor),
                                   ("entropy", selection_implementations("entropy"), sel_floor)):
            text, report["workspace_sweep"][name] = sweep(p, impls, floor, gpus)
            lines += ["", f"WORKSPACE SWEEP, {name} ({ESTIMATE}S: est. ms and x the matmul floor)"] + text
    report["failed"] = sorted({r.impl.key for r in results if r.failed})
    return "\n".join(lines) + "\n", report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workspace_mb is not None and not args.workspace_mb > 0:
        parser.error(f"--workspace-mb must be positive, got {args.workspace_mb:g}")
    for flag, path in (("--json", args.json), ("--markdown", args.markdown)):
        problem = path is not None and output_file_problem(path, overwrite=args.overwrite, flag=flag)
        if problem:
            parser.error(problem)
    text, report = run(args, argv)
    sys.stdout.write(text)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    if args.markdown is not None:
        title = (f"# Roofline {ESTIMATE} ({report['date']}; no device: launch sequences recorded on meta tensors)\n\n"
                 f"Written by `{report['command']}`; every figure below is an estimate, not a measurement.\n\n")
        args.markdown.write_text(title + "```\n" + text + "```\n")
    if report["failed"]:
        sys.stderr.write(f"roofline.py: the trace of {', '.join(report['failed'])} failed (see the report)\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
