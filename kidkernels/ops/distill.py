"""Autograd functions and chunked dispatch of the distillation loss.

Two entry points share the per-chunk backends (``distill_triton`` and ``distill_torch``):

* :class:`LinearDistillFunction` takes hidden states and lm_head weights.  Rows are processed in chunks whose float32
  logits fit the workspace budget; for each chunk the student and teacher logits are formed by a matmul (no teacher
  tensors and ``cfg.has_teacher`` False: the cross-entropy alone, with no teacher matmul at all), the kernels
  compute the row statistics and, when a gradient is needed, write d(loss)/d(student logits) into a chunk-sized
  buffer that two more matmuls turn into the input and weight gradients.  For ``reduction`` "mean" and "sum" the
  gradients are formed during the forward pass (the upstream gradient is then a scalar that scales them), so the
  logits are computed once; for "none" the backward pass recomputes them with the per-row upstream gradient.
* :class:`LogitsDistillFunction` takes logits the caller already holds and runs the same kernels on them in place:
  the forward pass keeps O(N) row statistics, the backward pass writes the logits gradient directly.

Nothing here reads a tensor value on the host: counts, normalisers and scales stay on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import CE, KD, NUM_STATS, DistillConfig
from .gemm import accumulate_weight_grad_fp32, compute_dtype, linear_logits, without_autocast
from .workspace import element_size, rows_per_chunk


def backend_impl(name: str):
    """The per-chunk implementation module of backend ``name`` ("triton" or "torch")."""
    if name == "triton":
        from . import distill_triton as impl
    else:
        from . import distill_torch as impl
    return impl


@dataclass(frozen=True)
class DispatchOptions:
    reduction: str
    backend: str
    workspace_bytes: int
    weight_grad_fp32: bool = False


def _chunk_bytes_per_row(vocab: int, in_dtype: torch.dtype, backend: str, with_grad: bool,
                         with_teacher: bool = True) -> int:
    cdt = element_size(compute_dtype(in_dtype))
    per_elem = (2 if with_teacher else 1) * cdt  # student (and teacher) logits
    if with_grad and compute_dtype(in_dtype) != in_dtype:
        per_elem += element_size(in_dtype)  # gradient in the input dtype, for the gradient matmuls
    if backend == "torch":
        from .distill_torch import TEMPORARIES_PER_ELEMENT

        per_elem += TEMPORARIES_PER_ELEMENT * cdt
    return vocab * per_elem


@without_autocast
def linear_distill_chunks(
    xs, ws, bs, xt, wt, bt, target, cfg: DistillConfig, opts: DispatchOptions, *,
    grad_input: bool = False, grad_weight: bool = False, grad_bias: bool = False, row_weight=None,
):
    """Run the loss over row chunks of hidden states; return ``(stats, dx, dw, db)``.

    xs ``[N, H_s]``, ws ``[V, H_s]``, bs ``[V]`` or None; xt ``[N, H_t]``, wt ``[V, H_t]``, bt ``[V]`` or None
    (all three None when ``cfg.has_teacher`` is False); target ``[N]`` int64 or None.  ``stats`` is the
    ``[NUM_STATS, N]`` float32 (float64 for float64 inputs) array of row statistics.  The gradients (None unless
    requested) are those of ``sum_i row_weight_i * row_loss_i`` (``row_weight`` None means 1): dx ``[N, H_s]`` in the
    input dtype, dw ``[V, H_s]`` in float32 when ``opts.weight_grad_fp32`` else the weight dtype, db ``[V]`` in the
    compute dtype.
    """
    n, vocab = xs.shape[0], ws.shape[0]
    impl = backend_impl(opts.backend)
    cdt = compute_dtype(xs.dtype)
    with_grad = grad_input or grad_weight or grad_bias
    stats = torch.empty(NUM_STATS, n, device=xs.device, dtype=cdt)
    dx = torch.empty_like(xs) if grad_input else None
    dw = torch.zeros(ws.shape, device=ws.device, dtype=torch.float32 if opts.weight_grad_fp32 else ws.dtype) \
        if grad_weight else None
    db = torch.zeros(vocab, device=ws.device, dtype=cdt) if grad_bias else None
    if (xt is None) == cfg.has_teacher:
        raise ValueError("the teacher tensors must be given exactly when cfg.has_teacher is True")
    step = rows_per_chunk(_chunk_bytes_per_row(vocab, xs.dtype, opts.backend, with_grad, cfg.has_teacher),
                          opts.workspace_bytes)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        x_chunk = xs[r0:r1]
        tgt = target[r0:r1] if target is not None else None
        chunk_stats = stats[:, r0:r1]
        student = linear_logits(x_chunk, ws, bs)
        teacher = linear_logits(xt[r0:r1], wt, bt) if cfg.has_teacher else None
        if not with_grad:
            impl.stats_and_value(student, teacher, tgt, chunk_stats, cfg)
        else:
            # float32 inputs: the gradient overwrites the student logits it is computed from, element by element.
            grad = student if student.dtype == xs.dtype else torch.empty(r1 - r0, vocab, device=xs.device,
                                                                        dtype=xs.dtype)
            weight_chunk = row_weight[r0:r1] if row_weight is not None else None
            impl.stats_value_and_grad(student, teacher, tgt, chunk_stats, cfg, weight_chunk, grad)
            del teacher
            if grad_input:
                torch.mm(grad, ws, out=dx[r0:r1])
            if grad_weight:
                if dw.dtype == grad.dtype:
                    dw.addmm_(grad.t(), x_chunk)
                else:
                    accumulate_weight_grad_fp32(dw, grad, x_chunk)
            if grad_bias:
                db += grad.sum(0, dtype=cdt)
            del grad
        del student
    return stats, dx, dw, db


def reduce_rows(stats, cfg: DistillConfig, reduction: str, target, normalizer):
    """``(loss, kd, ce, denominator)`` from the row statistics; the denominator (a Python float or a 0-d tensor) is
    None unless reduction is "mean".

    The denominator of "mean" is ``normalizer`` when given, else the number of counted rows; a zero denominator is
    replaced by 1, so that a call with no counted row gives 0 (every row sum is 0) and never NaN.
    """
    kd_rows, ce_rows = stats[KD], stats[CE]
    loss_rows = cfg.kd_weight * kd_rows
    if cfg.ce_in_grad:
        loss_rows = loss_rows + cfg.mle_weight * ce_rows
    if reduction == "none":
        return loss_rows, kd_rows, ce_rows, None
    loss, kd, ce = loss_rows.sum(), kd_rows.sum(), ce_rows.sum()
    if reduction == "sum":
        return loss, kd, ce, None
    # A Python number stays one (no host-to-device copy); a count or a tensor normaliser stays on the device.
    if isinstance(normalizer, float):
        denom = normalizer
    elif normalizer is not None:
        denom = normalizer.to(device=loss.device, dtype=loss.dtype)
    elif target is not None:
        denom = (target != cfg.ignore_index).sum().to(loss.dtype)
    else:
        denom = float(max(stats.shape[1], 1))
    if isinstance(denom, torch.Tensor):
        denom = torch.where(denom > 0, denom, torch.ones_like(denom))
    return loss / denom, kd / denom, ce / denom, denom


def _upstream_scale(grad_loss, dtype, denom):
    """The upstream gradient in the compute dtype, divided by the "mean" denominator when there is one."""
    scale = grad_loss.to(dtype)
    return scale / denom if denom is not None else scale


class LinearDistillFunction(torch.autograd.Function):
    """Distillation loss from hidden states and lm_head weights; gradients reach the student tensors only."""

    @staticmethod
    def forward(ctx, xs, ws, bs, xt, wt, bt, target, normalizer, cfg: DistillConfig, opts: DispatchOptions):
        need = tuple(ctx.needs_input_grad[:3])
        eager = any(need) and opts.reduction != "none"
        stats, dx, dw, db = linear_distill_chunks(
            xs, ws, bs, xt, wt, bt, target, cfg, opts,
            grad_input=eager and need[0], grad_weight=eager and need[1], grad_bias=eager and need[2] and bs is not None,
        )
        loss, kd, ce, denom = reduce_rows(stats, cfg, opts.reduction, target, normalizer)
        ctx.cfg, ctx.opts, ctx.eager, ctx.need = cfg, opts, eager, need
        ctx.dtypes = (ws.dtype, bs.dtype if bs is not None else None)
        ctx.denom = denom if not isinstance(denom, torch.Tensor) else None
        if eager:
            ctx.save_for_backward(dx, dw, db, denom if isinstance(denom, torch.Tensor) else None)
        elif any(need):
            ctx.save_for_backward(xs, ws, bs, xt, wt, bt, target)
        kd, ce = kd.detach(), ce.detach()
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        w_dtype, b_dtype = ctx.dtypes
        if ctx.eager:
            dx, dw, db, denom = ctx.saved_tensors
            scale = _upstream_scale(grad_loss, compute_dtype(w_dtype), denom if denom is not None else ctx.denom)
        else:
            xs, ws, bs, xt, wt, bt, target = ctx.saved_tensors
            _, dx, dw, db = linear_distill_chunks(
                xs, ws, bs, xt, wt, bt, target, ctx.cfg, ctx.opts,
                grad_input=ctx.need[0], grad_weight=ctx.need[1], grad_bias=ctx.need[2] and bs is not None,
                row_weight=_upstream_scale(grad_loss, compute_dtype(xs.dtype), None).contiguous(),
            )
            scale = None

        def scaled(g, dtype):
            if g is None:
                return None
            if scale is not None:
                g = g * scale  # a 0-d float32 factor: the product keeps g's dtype
            return g.to(dtype)

        return (scaled(dx, dx.dtype if dx is not None else None), scaled(dw, w_dtype), scaled(db, b_dtype),
                None, None, None, None, None, None, None)


def logits_distill_chunks(student, teacher, target, cfg: DistillConfig, opts: DispatchOptions, *,
                          stats=None, row_weight=None, grad_out=None):
    """Row statistics of logits the caller holds, and with ``grad_out`` the weighted logits gradient.

    With ``stats`` given (from the forward pass) only the gradient is written.  The Triton kernels read the logits
    where they are, in their dtype; the PyTorch backend works through row chunks that fit the workspace budget.
    """
    n, vocab = student.shape
    impl = backend_impl(opts.backend)
    compute = stats is None
    if compute:
        stats = torch.empty(NUM_STATS, n, device=student.device, dtype=compute_dtype(student.dtype))
    step = max(n, 1) if opts.backend == "triton" else rows_per_chunk(
        _chunk_bytes_per_row(vocab, student.dtype, opts.backend, False), opts.workspace_bytes)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        tgt = target[r0:r1] if target is not None else None
        if compute:
            impl.stats_and_value(student[r0:r1], teacher[r0:r1], tgt, stats[:, r0:r1], cfg)
        if grad_out is not None:
            impl.write_grad(student[r0:r1], teacher[r0:r1], tgt, stats[:, r0:r1], cfg, row_weight[r0:r1],
                            grad_out[r0:r1])
    return stats


class LogitsDistillFunction(torch.autograd.Function):
    """Distillation loss from logits ``[N, V]``; the gradient reaches the student logits only."""

    @staticmethod
    def forward(ctx, student, teacher, target, normalizer, cfg: DistillConfig, opts: DispatchOptions):
        stats = logits_distill_chunks(student, teacher, target, cfg, opts)
        loss, kd, ce, denom = reduce_rows(stats, cfg, opts.reduction, target, normalizer)
        ctx.cfg, ctx.opts = cfg, opts
        ctx.denom = denom if not isinstance(denom, torch.Tensor) else None
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(student, teacher, target, stats, denom if isinstance(denom, torch.Tensor) else None)
        kd, ce = kd.detach(), ce.detach()
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        student, teacher, target, stats, denom = ctx.saved_tensors
        scale = _upstream_scale(grad_loss, stats.dtype, denom if denom is not None else ctx.denom)
        row_weight = scale.expand(student.shape[0]) if scale.dim() == 0 else scale.contiguous()
        grad = torch.empty_like(student)
        logits_distill_chunks(student, teacher, target, ctx.cfg, ctx.opts, stats=stats, row_weight=row_weight,
                              grad_out=grad)
        return grad, None, None, None, None, None
