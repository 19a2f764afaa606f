"""Matrix products for the fused losses, with float32 results that are never rounded to the inputs' dtype.

The logits of a low-precision model must reach the softmax in float32 (rounding them to bfloat16 first costs 4-23%
gradient error).  On CUDA, ``torch.mm(..., out_dtype=torch.float32)`` has cuBLAS accumulate and write float32
directly, and ``torch.addmm(bias, ..., out_dtype=torch.float32)`` adds the bias in the same product (no second pass
over the logits).  Where those overloads are missing (CPU, older PyTorch) the product is formed block by block over the
vocabulary from float32 copies of one block of weight rows at a time, so the extra memory stays bounded by
``UPCAST_BLOCK_BYTES``.  The weight gradient of low-precision weights accumulates across chunks in a float32 buffer,
updated in place by ``torch.addmm(acc, ..., out_dtype=torch.float32, out=acc)`` where PyTorch has it.

Callers often run under ``torch.autocast`` (e.g. a Trainer's bf16 mixed precision), which would silently turn these
products into bfloat16 ones: :func:`without_autocast` switches it off around every entry point that multiplies (they
run inside the registered ops of :mod:`.custom_ops`, which ``torch.compile`` does not trace).
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
def _probe(device_type: str, dtype: torch.dtype, op: str) -> bool:
    """Whether this PyTorch has the float32-output overload ``op`` for ``dtype`` operands on ``device_type``.

    ``mm``: ``torch.mm(a, b, out_dtype=float32)``.  ``addmm``: ``torch.addmm(c, a, b, out_dtype=float32)`` with a
    float32 ``c`` (a bias row broadcast, or an accumulator updated in place through ``out=c``).  These exist for CUDA
    in recent PyTorch (2.13 has them, not for CPU tensors; older versions require ``c`` in the operands' dtype), so
    each is tried once on a tiny tensor.

    ``meta`` tensors are probed too, and so take CUDA's branch wherever this PyTorch has the overload (its meta kernel
    comes with the CUDA one): the roofline (``benchmarks/roofline.py``) runs the dispatch code on meta tensors in a
    dry run of :mod:`.launches` to record the launch sequence a GPU would run.
    """
    if device_type not in ("cuda", "meta"):
        return False
    try:
        a = torch.zeros(16, 16, device=device_type, dtype=dtype)
        if op == "mm":
            return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        acc = torch.zeros(16, 16, device=device_type, dtype=torch.float32)
        bias = torch.zeros(16, device=device_type, dtype=torch.float32)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return torch.addmm(bias, a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _vocab_block(floats_per_vocab_row: int) -> int:
    """Vocabulary rows per block of the fallback, so that its float32 temporaries (``floats_per_vocab_row`` floats
    for each vocabulary row of the block) stay within ``UPCAST_BLOCK_BYTES``."""
    return max(1, UPCAST_BLOCK_BYTES // (4 * max(floats_per_vocab_row, 1)))


def linear_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` as a new ``[rows, V]`` tensor in :func:`compute_dtype` of ``x``.

    x: ``[rows, H]``; weight: ``[V, H]`` of the same dtype as ``x``; bias: ``[V]`` of any floating dtype, or None.
    The bias is added by the product itself (``addmm``: the GEMM's epilogue on CUDA), never by a second pass over the
    logits, except on an old PyTorch without the float32-output ``addmm``.
    """
    out_dtype = compute_dtype(x.dtype)
    bias = bias.to(out_dtype) if bias is not None else None
    if x.dtype == out_dtype:
        return torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    device = x.device.type
    if bias is not None and _probe(device, x.dtype, "addmm"):
        return torch.addmm(bias, x, weight.t(), out_dtype=out_dtype)
    if _probe(device, x.dtype, "mm"):
        out = torch.mm(x, weight.t(), out_dtype=out_dtype)
        if bias is not None:
            out += bias
        return out
    out = torch.empty(x.shape[0], weight.shape[0], device=x.device, dtype=out_dtype)
    x_up = x.to(out_dtype)
    step = _vocab_block(weight.shape[1])
    for v0 in range(0, weight.shape[0], step):
        block = weight[v0:v0 + step].to(out_dtype).t()
        if bias is not None:
            torch.addmm(bias[v0:v0 + step], x_up, block, out=out[:, v0:v0 + step])
        else:
            torch.mm(x_up, block, out=out[:, v0:v0 + step])
    return out


def accumulate_weight_grad(acc: torch.Tensor, grad_logits: torch.Tensor, x: torch.Tensor) -> None:
    """``acc += grad_logits.T @ x`` for ``acc`` ``[V, H]`` (float32, or the dtype of ``x``), ``grad_logits``
    ``[rows, V]`` and ``x`` ``[rows, H]`` in the input dtype.

    A float32 accumulator for low-precision inputs is updated by one ``addmm(..., out_dtype=float32, out=acc)``
    where PyTorch has it (cuBLAS accumulates in float32 and adds into ``acc``: no temporary); otherwise one block of
    vocabulary rows at a time through a float32 product or a float32 copy of that block of the gradient (a temporary
    of at most ``UPCAST_BLOCK_BYTES`` whatever the number of rows and the hidden size; plus the float32 copy of ``x``,
    ``[rows, H]``).
    """
    if acc.dtype == grad_logits.dtype == x.dtype:
        acc.addmm_(grad_logits.t(), x)
        return
    if _probe(x.device.type, x.dtype, "addmm") and grad_logits.dtype == x.dtype:
        torch.addmm(acc, grad_logits.t(), x, out_dtype=acc.dtype, out=acc)
        return
    fast = _probe(x.device.type, x.dtype, "mm") and grad_logits.dtype == x.dtype
    # Per vocabulary row of a block: its float32 product [H] (fast path), or its float32 copy of the gradient
    # column [rows] (else): bounded in the chunk's rows as well as in H.
    step = _vocab_block(x.shape[1] if fast else grad_logits.shape[0])
    x_up = None if fast or x.dtype == acc.dtype else x.to(acc.dtype)
    for v0 in range(0, grad_logits.shape[1], step):
        block = grad_logits[:, v0:v0 + step].t()
        if fast:
            acc[v0:v0 + step] += torch.mm(block, x, out_dtype=acc.dtype)
        elif x_up is None:
            acc[v0:v0 + step].addmm_(block.to(acc.dtype), x)
        else:
            acc[v0:v0 + step].addmm_(block.to(acc.dtype), x_up)
