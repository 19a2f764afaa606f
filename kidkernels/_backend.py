"""Choice of compute backend: Triton kernels or the chunked pure-PyTorch path.

Order of precedence: the ``backend=`` argument, then the ``KIDKERNELS_BACKEND`` environment variable, then ``"auto"``:

- CUDA tensors run the Triton kernels ("triton": the matrix products fused with the losses, logits never written to
  memory);
- CPU tensors run the same Triton kernels under the Triton interpreter when ``TRITON_INTERPRET=1`` was set before
  Triton was imported, otherwise the chunked PyTorch path (same math, same memory bound);
- float64 inputs (used to verify gradients with ``torch.autograd.gradcheck``) always take the PyTorch path, since the
  kernels compute in float32 by design.

``"triton_rows"`` is the previous Triton path, kept as a reference for the benchmarks until the fused kernels are
measured on a GPU: cuBLAS writes a chunk of float32 logits, row-per-program Triton passes read it back.  It is chosen
only by name, never by "auto", and has the requirements of "triton".
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "triton_rows", "torch")
TRITON_BACKENDS = ("triton", "triton_rows")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def resolve_backend(requested: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """``"triton"`` or ``"torch"`` for tensors on ``device`` of floating ``dtype``; raises on an impossible request."""
    choice = requested if requested is not None else os.environ.get("KIDKERNELS_BACKEND", "auto")
    choice = str(choice).strip().lower() or "auto"
    if choice not in BACKENDS:
        source = "backend=" if requested is not None else "KIDKERNELS_BACKEND"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {choice!r}")
    on_cuda = device.type == "cuda"
    if choice == "auto":
        if dtype == torch.float64 or not triton_available():
            return "torch"
        if on_cuda or (device.type == "cpu" and triton_interpreter_enabled()):
            return "triton"
        return "torch"
    if choice in TRITON_BACKENDS:
        if not triton_available():
            raise RuntimeError(f"backend {choice!r} was requested but the triton package is not installed")
        if dtype == torch.float64:
            raise ValueError(
                f"backend {choice!r} computes in float32 and does not take float64 inputs; use backend='torch' for "
                "float64 (e.g. gradcheck)"
            )
        if device.type == "cpu" and not triton_interpreter_enabled():
            raise RuntimeError(
                f"backend {choice!r} on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
                "importing triton, or use backend='torch'"
            )
        if not on_cuda and device.type != "cpu":
            raise RuntimeError(f"backend {choice!r} does not run on {device.type} tensors")
    return choice
