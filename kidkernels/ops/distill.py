"""Chunked dispatch of the distillation loss: the work behind the registered ops of :mod:`.custom_ops`.

Two entry points share the per-chunk backends (``distill_triton`` and ``distill_torch``, see :mod:`.registry`):

* :func:`linear_distill_chunks` takes hidden states and lm_head weights.  On backend "triton" the matrix products
  are fused with the loss (:mod:`.distill_fused`: logits formed tile by tile in registers, only the teacher's tile
  kept for the gradient).  On "triton_rows" and "torch" rows are processed in chunks whose float32 logits fit the
  workspace budget; for each chunk the student and teacher logits are formed by a matmul (no teacher
  tensors and ``cfg.has_teacher`` False: the cross-entropy alone, with no teacher matmul at all), the kernels
  compute the row statistics and, when a gradient is needed, write d(loss)/d(student logits) into a chunk-sized
  buffer that two more matmuls turn into the input and weight gradients.  For ``reduction`` "mean" and "sum" the
  gradients are formed during the forward pass (already divided by the mean's denominator; the upstream gradient is
  then a scalar that scales them), so the logits are computed once; for "none" the backward pass recomputes them with
  the per-row upstream gradient.
* :func:`logits_distill_chunks` takes logits the caller already holds and runs the same kernels on them in place.

``vocab`` (the shared vocabulary) is the number of leading rows of each weight, or columns of each logits tensor, that
take part: views, never copies; the gradient of the rows or columns beyond it is 0.

Nothing here reads a tensor value on the host: counts, normalisers and scales stay on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._backend import TRITON_BACKENDS
from .config import CE, KD, NUM_STATS, DistillConfig
from .gemm import accumulate_weight_grad, compute_dtype, linear_logits, without_autocast
from .registry import backend_impl
from .workspace import chunk_rows


@dataclass(frozen=True)
class DispatchOptions:
    reduction: str
    backend: str
    workspace_bytes: int
    # Accumulate the weight gradient of low-precision weights in float32 across chunks (rounded once, at the end).
    weight_grad_fp32: bool = True


def weight_grad_dtype(weight_dtype: torch.dtype, weight_grad_fp32: bool) -> torch.dtype:
    """The dtype the weight gradient accumulates in across chunks: float32 for bfloat16/float16 weights unless
    ``weight_grad_fp32`` (:attr:`DispatchOptions.weight_grad_fp32`) is off, else the weight's own dtype."""
    low = weight_dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if low and weight_grad_fp32 else weight_dtype


def mean_denominator(cfg: DistillConfig, reduction: str, target, normalizer, n: int, dtype, device):
    """The divisor of "mean" (None for "none" and "sum"): ``normalizer`` when given (a Python float stays one, a
    tensor stays on the device), else the number of counted rows; a zero count is replaced by 1, so that a call with no
    counted row gives 0 (every row sum is 0) and never NaN."""
    if reduction != "mean":
        return None
    if isinstance(normalizer, float):
        return normalizer
    if normalizer is not None:
        denom = normalizer.to(device=device, dtype=dtype)
    elif target is not None:
        denom = (target != cfg.ignore_index).sum().to(dtype)
    else:
        return float(max(n, 1))
    return torch.where(denom > 0, denom, torch.ones_like(denom))


def eager_row_weight(denom, n: int, dtype, device):
    """The gradients' row weight for the eager ("mean"/"sum") path: ``1 / denom`` broadcast over the rows (stride 0),
    or None (1) for "sum"."""
    if denom is None:
        return None
    inv = torch.full((1,), 1.0 / denom, device=device, dtype=dtype) if isinstance(denom, float) \
        else (1.0 / denom).to(dtype).reshape(1)
    return inv.expand(n)


def reduce_rows(stats, cfg: DistillConfig, reduction: str, denom):
    """``(loss, kd, ce)`` from the row statistics: the row values for "none", their sums for "sum", divided by
    ``denom`` for "mean"."""
    kd_rows, ce_rows = stats[KD], stats[CE]
    loss_rows = cfg.kd_weight * kd_rows
    if cfg.ce_in_grad:
        loss_rows = loss_rows + cfg.mle_weight * ce_rows
    if reduction == "none":
        return loss_rows, kd_rows.clone(), ce_rows.clone()
    loss, kd, ce = loss_rows.sum(), kd_rows.sum(), ce_rows.sum()
    if reduction == "sum":
        return loss, kd, ce
    return loss / denom, kd / denom, ce / denom


@without_autocast
def linear_distill_chunks(
    xs, ws, bs, xt, wt, bt, target, cfg: DistillConfig, opts: DispatchOptions, *, vocab: int | None = None,
    grad_input: bool = False, grad_weight: bool = False, grad_bias: bool = False, row_weight=None,
):
    """Run the loss over row chunks of hidden states; return ``(stats, dx, dw, db)``.

    xs ``[N, H_s]``, ws ``[V_s, H_s]``, bs ``[V_s]`` or None; xt ``[N, H_t]``, wt ``[V_t, H_t]``, bt ``[V_t]`` or
    None (all three None when ``cfg.has_teacher`` is False); target ``[N]`` int64 or None; ``vocab`` the number of
    leading weight rows that take part (default: all; every weight must have at least that many).  ``stats`` is the
    ``[NUM_STATS, N]`` float32 (float64 for float64 inputs) array of row statistics.  The gradients (None unless
    requested) are those of ``sum_i row_weight_i * row_loss_i`` (``row_weight`` None means 1): dx ``[N, H_s]`` in the
    input dtype, dw ``[V_s, H_s]`` in :func:`weight_grad_dtype`, db ``[V_s]`` in the compute dtype.
    """
    n = xs.shape[0]
    vocab = ws.shape[0] if vocab is None else vocab
    impl = backend_impl("distill", opts.backend)
    cdt = compute_dtype(xs.dtype)
    with_grad = grad_input or grad_weight or grad_bias
    stats = torch.empty(NUM_STATS, n, device=xs.device, dtype=cdt)
    dx = torch.empty_like(xs) if grad_input else None
    dw = torch.zeros(ws.shape, device=ws.device, dtype=weight_grad_dtype(ws.dtype, opts.weight_grad_fp32)) \
        if grad_weight else None
    db = torch.zeros(ws.shape[0], device=ws.device, dtype=cdt) if grad_bias else None
    if (xt is None) == cfg.has_teacher:
        raise ValueError("the teacher tensors must be given exactly when cfg.has_teacher is True")
    ws, bs = _leading_rows(ws, bs, vocab)
    if cfg.has_teacher:
        wt, bt = _leading_rows(wt, bt, vocab)
    if opts.backend == "triton":
        from .distill_fused import fused_distill_chunks  # imports triton: only when used

        fused_distill_chunks(xs, ws, bs, xt, wt, bt, target, cfg, opts.workspace_bytes, stats, dx=dx,
                             dw=dw[:vocab] if dw is not None else None, db=db[:vocab] if db is not None else None,
                             row_weight=row_weight)
        return stats, dx, dw, db
    step = chunk_rows(vocab, xs.dtype, opts.workspace_bytes, logit_buffers=2 if cfg.has_teacher else 1,
                      temporaries=impl.TEMPORARIES_PER_ELEMENT, grad_buffer=with_grad)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        x_chunk = xs[r0:r1]
        tgt = target[r0:r1] if target is not None else None
        chunk_stats = stats[:, r0:r1]
        student = linear_logits(x_chunk, ws, bs)
        teacher = linear_logits(xt[r0:r1], wt, bt) if cfg.has_teacher else None
        if not with_grad:
            impl.fill_stats(student, teacher, tgt, chunk_stats, cfg)
        else:
            # float32 inputs: the gradient overwrites the student logits it is computed from, element by element.
            grad = student if student.dtype == xs.dtype else torch.empty(r1 - r0, vocab, device=xs.device,
                                                                        dtype=xs.dtype)
            weight_chunk = row_weight[r0:r1] if row_weight is not None else None
            impl.fill_stats_and_grad(student, teacher, tgt, chunk_stats, cfg, weight_chunk, grad)
            del teacher
            if grad_input:
                torch.mm(grad, ws, out=dx[r0:r1])
            if grad_weight:
                accumulate_weight_grad(dw[:vocab], grad, x_chunk)
            if grad_bias:
                db[:vocab] += grad.sum(0, dtype=cdt)
            del grad
        del student
    return stats, dx, dw, db


def _leading_rows(weight, bias, vocab: int):
    """The first ``vocab`` rows of a weight and its bias: the tensors themselves when they have exactly that many
    (no view, so no slicing op on the autograd path), else views."""
    if weight.shape[0] == vocab:
        return weight, bias
    return weight[:vocab], (bias[:vocab] if bias is not None else None)


def logits_distill_chunks(student, teacher, target, cfg: DistillConfig, opts: DispatchOptions, *,
                          vocab: int | None = None, stats=None, row_weight=None, grad_out=None):
    """Row statistics of logits the caller holds, and with ``grad_out`` the weighted logits gradient.

    student ``[N, V_s]``, teacher ``[N, V_t]`` (unit stride along the vocabulary); the first ``vocab`` columns take
    part (views; default all).  With ``stats`` given (from the forward pass) only the gradient is written, into the
    first ``vocab`` columns of ``grad_out`` ``[N, V_s]`` (the others are zeroed).  The Triton kernels read the logits
    where they are, in their dtype; the PyTorch backend works through row chunks that fit the workspace budget.
    """
    n = student.shape[0]
    vocab = student.shape[1] if vocab is None else vocab
    student, teacher = student[:, :vocab], teacher[:, :vocab]
    impl = backend_impl("distill", opts.backend)
    compute = stats is None
    if compute:
        stats = torch.empty(NUM_STATS, n, device=student.device, dtype=compute_dtype(student.dtype))
    if grad_out is not None and grad_out.shape[1] > vocab:
        grad_out[:, vocab:].zero_()
        grad_out = grad_out[:, :vocab]
    step = max(n, 1) if opts.backend in TRITON_BACKENDS else chunk_rows(
        vocab, student.dtype, opts.workspace_bytes, logit_buffers=0, temporaries=impl.TEMPORARIES_PER_ELEMENT)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        tgt = target[r0:r1] if target is not None else None
        if compute:
            impl.fill_stats(student[r0:r1], teacher[r0:r1], tgt, stats[:, r0:r1], cfg)
        if grad_out is not None:
            impl.write_grad(student[r0:r1], teacher[r0:r1], tgt, stats[:, r0:r1], cfg, row_weight[r0:r1],
                            grad_out[r0:r1])
    return stats
