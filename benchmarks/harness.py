"""Shared measurement code of the benchmarks: scale and device choice, warm-up, timing, peak memory, FLOP/s, and how
a provider that cannot run (missing package, out of memory, compile failure) is recorded.

Every case goes through :func:`run_case`, so every entry of the pytest-benchmark JSON carries the same
``extra_info`` keys (:data:`EXTRA_INFO_KEYS`), whatever the op.

Environment variables (all optional):

- ``KIDKERNELS_BENCH_SCALE``: ``gpu`` (the paper's and Liger's shapes), ``cpu`` (small shapes, a few minutes on two
  cores) or ``smoke`` (tiny, seconds: the harness test).  Default ``gpu`` when CUDA is available, else ``cpu``.
- ``KIDKERNELS_BENCH_DEVICE``: ``cuda`` or ``cpu`` (default: CUDA when available).
- ``KIDKERNELS_BENCH_DTYPE``: input dtype (default ``bfloat16`` on CUDA, ``float32`` on CPU).
- ``KIDKERNELS_BENCH_ROUNDS`` / ``KIDKERNELS_BENCH_WARMUP``: timed rounds and warm-up rounds per case.
- ``KIDKERNELS_BENCH_PEAK_TFLOPS``: the matmul peak the floor is computed at (default 800 on CUDA, the bf16 rate
  an H100 reaches on large products; on CPU a float32 matmul measured once per session).
- ``KIDKERNELS_BENCH_NO_COMPILE=1``: record the torch.compile-based providers (``compile``, Liger's chunked
  ``liger_chunked``) as skipped instead of compiling.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import os
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from kidkernels.ops.custom_ops import python_impl

SCALES = ("gpu", "cpu", "smoke")

# The keys every JSON entry's extra_info has (values may be None where they do not apply, e.g. no FLOP count).
EXTRA_INFO_KEYS = (
    "status", "reason", "op", "provider", "case", "pass", "n", "v", "h_s", "h_t", "divergence", "dtype", "device",
    "scale", "flops", "peak_tflops_assumed", "matmul_floor_ms", "time_ms_median", "time_ms_min", "tflops_per_s",
    "x_floor", "memory_before_bytes", "peak_extra_bytes", "peak_extra_mib", "memory_measure", "largest_tensor_bytes",
    "logits_fp32_bytes",
)

CUDA_PEAK_TFLOPS = 800.0  # large bf16 products on an H100 (anchors.md); override with KIDKERNELS_BENCH_PEAK_TFLOPS


class ProviderUnavailable(Exception):
    """Raised by a provider that cannot run this case here (package missing, no CUDA, disabled): a skip."""


# ---- configuration -------------------------------------------------------------------------------------------

def current_device() -> torch.device:
    name = os.environ.get("KIDKERNELS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def current_scale() -> str:
    default = "gpu" if current_device().type == "cuda" else "cpu"
    scale = os.environ.get("KIDKERNELS_BENCH_SCALE", default).strip().lower() or default
    if scale not in SCALES:
        raise ValueError(f"KIDKERNELS_BENCH_SCALE must be one of {SCALES}, got {scale!r}")
    return scale


def current_dtype() -> torch.dtype:
    default = "bfloat16" if current_device().type == "cuda" else "float32"
    return getattr(torch, os.environ.get("KIDKERNELS_BENCH_DTYPE", default))


def rounds_and_warmup() -> tuple[int, int]:
    """Timed rounds and warm-up rounds: enough for a stable median on a GPU, few on a CPU where a case is slow."""
    default_rounds, default_warmup = {"gpu": (10, 3), "cpu": (3, 1), "smoke": (1, 1)}[current_scale()]
    return (int(os.environ.get("KIDKERNELS_BENCH_ROUNDS", default_rounds)),
            int(os.environ.get("KIDKERNELS_BENCH_WARMUP", default_warmup)))


def compile_disabled() -> bool:
    return os.environ.get("KIDKERNELS_BENCH_NO_COMPILE", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=None)
def peak_tflops() -> tuple[float, str]:
    """The matmul rate the floor is computed at, and where it comes from."""
    if os.environ.get("KIDKERNELS_BENCH_PEAK_TFLOPS"):
        return float(os.environ["KIDKERNELS_BENCH_PEAK_TFLOPS"]), "KIDKERNELS_BENCH_PEAK_TFLOPS"
    device = current_device()
    if device.type == "cuda":
        return CUDA_PEAK_TFLOPS, "assumed bf16 H100 rate (anchors.md)"
    # A CPU has no published figure that means anything here: measure this machine's float32 matmul instead.
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024 ** 3 / best / 1e12, "measured float32 1024^3 matmul on this CPU"


# ---- device helpers ------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release_memory(device: torch.device) -> None:
    """Free what the previous case left, so that each case's memory baseline is its own inputs.  Only on CUDA,
    where the baseline is the allocated bytes; on CPU the baseline is the current resident memory, which leftover
    garbage does not distort, and a collection costs a tenth of a second per case."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def is_out_of_memory(error: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


# ---- peak memory ---------------------------------------------------------------------------------------------

def _read_proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def memory_measure_description(device: torch.device) -> str:
    if device.type == "cuda":
        return ("cuda: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus memory_allocated() "
                "before the call (inputs and weights already allocated; the gradients it creates count)")
    return ("cpu: growth of the process's peak resident memory (VmHWM reset through /proc/self/clear_refs) over "
            "its resident memory before the call, glibc mmap threshold fixed at 64 KiB and heap trimmed first; "
            "page-granular, blocks under 64 KiB reused from the heap are not seen")


@functools.lru_cache(maxsize=None)
def glibc_for_memory_tracking():
    """glibc, for making freed CPU tensors leave the resident set; None elsewhere."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 -- glibc only
    except (OSError, AttributeError):
        return None
    # A fixed mmap threshold (M_MMAP_THRESHOLD = -3): blocks of 64 KiB and more are mapped and unmapped on free.
    # glibc's default threshold grows up to 32 MiB after the first large free, after which freed tensors stay in
    # the heap and a later peak would not show in the resident set.
    libc.mallopt(-3, 64 * 1024)
    return libc


def _cpu_peak_tracking_available() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure_peak_memory(step: Callable[[], None], device: torch.device) -> tuple[int | None, int | None]:
    """``(extra, before)``: the peak memory of one call of ``step`` above what was allocated before it, and that
    baseline (see :func:`memory_measure_description`); ``(None, None)`` where the platform gives no counter."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return max(torch.cuda.max_memory_allocated(device) - before, 0), before
    if not _cpu_peak_tracking_available():
        return None, None
    if glibc_for_memory_tracking() is not None:
        glibc_for_memory_tracking().malloc_trim(0)  # return free heap pages, so that the baseline is what is live
    before = _read_proc_status_kib("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as clear_refs:  # "5": reset VmHWM to the current VmRSS (Linux >= 4.0)
        clear_refs.write("5")
    step()
    return max(_read_proc_status_kib("VmHWM") * 1024 - before, 0), before


class LargestTensorTracker:
    """Largest tensor (bytes) produced by any aten op run inside it: on any device, the evidence that a provider
    does or does not allocate a ``[tokens x vocab]`` tensor.  Kernels launched directly (Triton) are not seen, but
    their output buffers are allocated by aten ops and are."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                inner = python_impl(func)
                if inner is not None:  # a kidkernels op: see the tensors its body allocates
                    with self:
                        return inner(*args, **(kwargs or {}))
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        tracker.max_bytes = max(tracker.max_bytes, t.numel() * t.element_size())
                return out

        self.max_bytes = 0
        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


# ---- FLOPs ---------------------------------------------------------------------------------------------------

def distill_flops(n: int, v: int, h_s: int, h_t: int, pass_: str) -> int:
    """Matmul FLOPs of the distillation loss (anchors.md cost model): teacher and student logits forward
    ``2NV(H_t + H_s)``; forward+backward adds the student input and weight gradients, ``2NV(H_t + 3 H_s)``."""
    return 2 * n * v * (h_t + 3 * h_s) if pass_ == "fwd_bwd" else 2 * n * v * (h_t + h_s)


def linear_flops(n: int, v: int, h: int) -> int:
    """Matmul FLOPs of one ``[N, H] x [H, V]`` product (entropy, argmax): ``2NVH``."""
    return 2 * n * v * h


# ---- the case runner -----------------------------------------------------------------------------------------

@dataclass
class CaseInfo:
    """What a case is; becomes the first part of its ``extra_info``."""
    op: str
    provider: str
    case: str
    pass_: str
    n: int
    v: int | None = None
    h_s: int | None = None
    h_t: int | None = None
    divergence: str | None = None
    flops: int | None = None
    track_largest_tensor: bool = True
    provider_is_compiled: bool = False  # a dispatch mode around a compiled function would recompile it

    def as_extra_info(self, device: torch.device, dtype: torch.dtype) -> dict:
        peak, _ = peak_tflops()
        logits_bytes = self.n * self.v * 4 if self.v else None
        return {key: None for key in EXTRA_INFO_KEYS} | {
            "status": "ok", "op": self.op, "provider": self.provider, "case": self.case, "pass": self.pass_,
            "n": self.n, "v": self.v, "h_s": self.h_s, "h_t": self.h_t, "divergence": self.divergence,
            "dtype": str(dtype).removeprefix("torch."), "device": device.type, "scale": current_scale(),
            "flops": self.flops, "peak_tflops_assumed": peak,
            "matmul_floor_ms": self.flops / (peak * 1e12) * 1e3 if self.flops else None,
            "memory_measure": memory_measure_description(device), "logits_fp32_bytes": logits_bytes,
        }


def record_not_run(benchmark, status: str, reason: str) -> None:
    """Record a case that did not run (``status`` "skipped", "oom" or "error") in the JSON, then skip the test.

    pytest-benchmark only writes entries that were timed, so a no-op is timed once to keep the entry: its time is
    meaningless and the report shows the status instead.  The test is then skipped with the reason, so the terminal
    summary (``-ra``) lists it too."""
    benchmark.extra_info["status"] = status
    benchmark.extra_info["reason"] = reason[:500]
    if getattr(benchmark, "_mode", None):
        # Failed inside benchmark.pedantic (e.g. out of memory in a timed round): the fixture refuses a second use
        # and would drop the entry; clear its state so that the placeholder entry is written.
        benchmark._mode, benchmark.has_error = None, False
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    pytest.skip(f"{status}: {reason[:300]}")


def run_case(benchmark, info: CaseInfo, build: Callable[[], Callable[[], None]], *, reset: Callable[[], None],
             device: torch.device, dtype: torch.dtype, may_fail: bool = False) -> None:
    """Build the provider's step, warm it up, measure its peak memory once, time it, and fill ``extra_info``.

    ``build()`` returns ``step``, one forward (and backward) call; ``reset()`` runs before every call outside the
    timing (drops gradients).  Every call is followed by a device synchronisation inside the timed region.
    Out-of-memory anywhere, :class:`ProviderUnavailable`, and (``may_fail``: torch.compile) any exception of the
    provider are recorded with :func:`record_not_run` rather than failing the suite.
    """
    benchmark.extra_info.update(info.as_extra_info(device, dtype))
    rounds, warmup = rounds_and_warmup()
    benchmark.group = f"{info.op}/{info.case}/{info.divergence or '-'}/{info.pass_}"

    def timed_step():
        step()
        synchronize(device)

    def setup():
        reset()
        synchronize(device)

    try:
        step = build()
        start = time.perf_counter()
        for _ in range(max(warmup, 1)):  # at least one: compilation, autotuning and allocator warm-up
            setup()
            timed_step()
        benchmark.extra_info["warmup_s"] = time.perf_counter() - start
        setup()
        peak, before = measure_peak_memory(step, device)
        benchmark.extra_info["memory_before_bytes"] = before
        benchmark.extra_info["peak_extra_bytes"] = peak
        benchmark.extra_info["peak_extra_mib"] = peak / 2 ** 20 if peak is not None else None
        if info.track_largest_tensor and not info.provider_is_compiled:
            setup()
            with LargestTensorTracker() as tracker:
                step()
            synchronize(device)
            benchmark.extra_info["largest_tensor_bytes"] = tracker.max_bytes
        benchmark.pedantic(timed_step, setup=setup, rounds=rounds, warmup_rounds=0, iterations=1)
    except ProviderUnavailable as unavailable:
        _drop(device)
        record_not_run(benchmark, "skipped", str(unavailable))
    except Exception as error:  # noqa: BLE001 -- OOM and compile failures are results, not crashes
        if not (is_out_of_memory(error) or may_fail):
            raise
        _drop(device)
        status = "oom" if is_out_of_memory(error) else "error"
        record_not_run(benchmark, status, f"{type(error).__name__}: {error}")
    else:
        stats = benchmark.stats.stats
        median_s, min_s = stats.median, stats.min
        benchmark.extra_info["time_ms_median"] = median_s * 1e3
        benchmark.extra_info["time_ms_min"] = min_s * 1e3
        if info.flops:
            benchmark.extra_info["tflops_per_s"] = info.flops / median_s / 1e12
            benchmark.extra_info["x_floor"] = median_s * 1e3 / benchmark.extra_info["matmul_floor_ms"]
    finally:
        reset()


def _drop(device: torch.device) -> None:
    with contextlib.suppress(Exception):
        synchronize(device)
    release_memory(device)
