"""The one place a Triton kernel is launched from, so that a dry run can list every launch with its cost.

Each launcher in :mod:`kidkernels.ops` calls :func:`launch` with the kernel, its grid, its arguments and what the
launch costs: the floating-point operations of its matrix products and the bytes it moves to and from HBM, counted
from the kernel's own loads and stores (each launcher states how, next to the launch).  Normally :func:`launch` just
launches.  Inside :func:`recording` every launch is appended to the recorder as a :class:`LaunchRecord`; with
``dry_run=True`` nothing is launched at all, so the dispatch code can run on ``meta`` tensors and yield its exact
launch sequence for the roofline model (``benchmarks/roofline.py``), whose estimates are thereby tied to the code.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(frozen=True)
class LaunchRecord:
    """One Triton launch: the kernel's name, the grid, its matmul FLOPs and its HBM bytes (reads plus writes)."""
    kernel: str
    grid: tuple
    flops: int
    hbm_bytes: int
    meta: tuple = ()


@dataclass
class Recorder:
    launches: list
    dry_run: bool


_RECORDER: ContextVar[Recorder | None] = ContextVar("kidkernels_launch_recorder", default=None)


def kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", type(kernel).__name__)


def launch(kernel, grid: tuple, *args, flops: int = 0, hbm_bytes: int = 0, **meta) -> None:
    """``kernel[grid](*args, **meta)``, recorded with its cost inside :func:`recording` (and skipped in a dry run).

    ``flops``: 2 x M x N x K summed over the kernel's matrix products (0 for a kernel without one); ``hbm_bytes``: the
    bytes its loads and stores move, counting each element once (cache reuse within the kernel is assumed, across
    launches none)."""
    recorder = _RECORDER.get()
    if recorder is not None:
        constexprs = tuple(sorted((k, v) for k, v in meta.items() if isinstance(v, (bool, int, float, str))))
        recorder.launches.append(LaunchRecord(kernel_name(kernel), tuple(grid), int(flops), int(hbm_bytes),
                                              constexprs))
        if recorder.dry_run:
            return
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def recording(*, dry_run: bool = False):
    """Collect the :class:`LaunchRecord` of every :func:`launch` in the block into the yielded list."""
    recorder = Recorder([], dry_run)
    token = _RECORDER.set(recorder)
    try:
        yield recorder.launches
    finally:
        _RECORDER.reset(token)


def is_dry_run() -> bool:
    """Whether launches are being recorded without running (dispatch code may then skip value checks)."""
    recorder = _RECORDER.get()
    return recorder is not None and recorder.dry_run
