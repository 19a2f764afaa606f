"""Matrix products for the fused losses, with float32 results that are never rounded to the inputs' dtype.

The logits of a low-precision model must reach the softmax in float32 (rounding them to bfloat16 first costs 4-23%
gradient error).  On CUDA, ``torch.mm(..., out_dtype=torch.float32)`` has cuBLAS accumulate and write float32
directly.  Where that overload is missing (CPU, older PyTorch) the product is formed block by block over the vocabulary
from float32 copies of one block of weight rows at a time, so the extra memory stays bounded by ``block_bytes``.

Callers often run under ``torch.autocast`` (e.g. a Trainer's bf16 mixed precision), which would silently turn these
products into bfloat16 ones: :func:`without_autocast` switches it off around every entry point that multiplies.
"""
from __future__ import annotations

import contextlib
import functools

import torch

# Upper bound on the float32 copy of one block of weight rows in the fallback path.
UPCAST_BLOCK_BYTES = 64 << 20


def without_autocast(fn):
    """Run ``fn`` with autocast off on CPU and CUDA, so that its matrix products keep the dtypes chosen here."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for device_type in ("cpu", "cuda"):
                if torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            return fn(*args, **kwargs)
    return wrapper


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype logits and softmax math use for inputs of ``dtype``: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def _mm_out_dtype_supported(device_type: str, dtype: torch.dtype) -> bool:
    if device_type != "cuda":
        return False
    try:
        a = torch.zeros(16, 16, device=device_type, dtype=dtype)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _vocab_block(hidden: int) -> int:
    return max(1, UPCAST_BLOCK_BYTES // (4 * max(hidden, 1)))


def linear_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` as a new ``[rows, V]`` tensor in :func:`compute_dtype` of ``x``.

    x: ``[rows, H]``; weight: ``[V, H]`` of the same dtype as ``x``; bias: ``[V]`` of any floating dtype, or None.
    """
    out_dtype = compute_dtype(x.dtype)
    if x.dtype == out_dtype:
        out = x @ weight.t()
    elif _mm_out_dtype_supported(x.device.type, x.dtype):
        out = torch.mm(x, weight.t(), out_dtype=out_dtype)
    else:
        out = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=out_dtype)
        x_up = x.to(out_dtype)
        step = _vocab_block(weight.shape[1])
        for v0 in range(0, weight.shape[0], step):
            torch.mm(x_up, weight[v0:v0 + step].to(out_dtype).t(), out=out[:, v0:v0 + step])
    if bias is not None:
        out += bias.to(out_dtype)
    return out


def accumulate_weight_grad_fp32(acc: torch.Tensor, grad_logits: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += grad_logits.T @ x`` with ``acc`` float32 ``[V, H]``, one block of vocabulary rows at a time."""
    step = _vocab_block(x.shape[1])
    fast = _mm_out_dtype_supported(x.device.type, x.dtype) and grad_logits.dtype == x.dtype
    x_up = None if fast or x.dtype == acc.dtype else x.to(acc.dtype)
    for v0 in range(0, grad_logits.shape[1], step):
        block = grad_logits[:, v0:v0 + step].t()
        if fast:
            acc[v0:v0 + step] += torch.mm(block, x, out_dtype=acc.dtype)
        elif x_up is None:
            acc[v0:v0 + step].addmm_(block.to(acc.dtype), x)
        else:
            acc[v0:v0 + step].addmm_(block.to(acc.dtype), x_up)
