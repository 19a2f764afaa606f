"""Public API of the distillation losses and of the cross-entropy alone: validation, defaults and documentation.

Definitions (T the temperature, rows whose target equals ``ignore_index`` count nowhere)::

    p = softmax(teacher_logits / T)          q = softmax(student_logits / T)
    "fkl"  KL(p || q)                        "rkl"  KL(q || p)
    "jsd"  beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q  (formed in log space)
    "tvd"  0.5 sum |p - q|                   (zero subgradient where p == q)
    MLE    cross-entropy of the *untempered* student logits against ``target``
    row loss = kd_weight * divergence + mle_weight * MLE

:func:`fused_linear_cross_entropy` is the MLE term alone (supervised fine-tuning): the same kernels with the teacher
compiled out, so no teacher matmul and no divergence are computed.

Logits, softmax and divergence math run in float32 (float64 for float64 inputs); logits are never rounded to the
input dtype.  Gradients come back in the input dtype and reach only the student tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _validation as check
from ._backend import resolve_backend
from .ops.config import DistillConfig
from .ops.distill import DispatchOptions, LinearDistillFunction, LogitsDistillFunction
from .ops.workspace import workspace_budget

__all__ = ["fused_linear_distill_loss", "FusedLinearDistillLoss", "distill_loss", "fused_linear_cross_entropy",
           "FusedLinearCrossEntropyLoss"]

_OPTIONS_DOC = """
    target: ``[N]`` (or the inputs' leading shape) integer ids of the token each row must predict, already shifted.
        Rows equal to ``ignore_index`` count in neither term nor in the mean.  ``None``: every row counts, and
        ``mle_weight`` must be 0.
    divergence: "fkl", "rkl" (default), "jsd" or "tvd".
    beta: mixture weight of "jsd", in (0, 1). Default 0.5.
    temperature: T > 0 applied to both models' logits in the divergence (not in the MLE term). Default 1.
    kd_weight, mle_weight: weights of the divergence and of the MLE term. Defaults 1 and 0.
    ignore_index: target value of rows to skip. Default -100.
    reduction: "mean" (default): sum over counted rows divided by ``normalizer`` if given, else by the number of
        counted rows (no counted row gives 0, never NaN); "sum"; "none": the ``[N]`` row losses, 0 on ignored rows.
    normalizer: number or 0-d tensor dividing the sum for "mean", e.g. the count of target tokens over all
        micro-batches of a gradient-accumulation step.
    return_parts: also return ``kd`` and ``mle``: the divergence and the cross-entropy, detached, reduced like the
        loss (so ``loss = kd_weight * kd + mle_weight * mle``; ``mle`` is 0 without a target).
    backend: "triton", "torch" or "auto" (default: ``KIDKERNELS_BACKEND``, else auto: Triton on CUDA, and on CPU
        under ``TRITON_INTERPRET=1``; PyTorch otherwise and for float64).
    workspace_bytes: bound on the chunk buffers of logits (default 512 MiB or ``KIDKERNELS_WORKSPACE_MB``).
"""


def _config(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, reduction, has_target):
    beta, temperature, kd_weight, mle_weight, ignore_index = check.check_options(
        divergence, beta, temperature, kd_weight, mle_weight, ignore_index, reduction)
    if not has_target and mle_weight != 0.0:
        raise ValueError(f"mle_weight={mle_weight} needs a target; pass target= or set mle_weight=0")
    return DistillConfig(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, has_target)


def _finish(outputs, leading_shape, reduction, return_parts):
    loss, kd, ce = outputs
    if reduction == "none":
        loss, kd, ce = (t.reshape(leading_shape) for t in (loss, kd, ce))
    return (loss, kd, ce) if return_parts else loss


def _hidden_rows(input_name: str, x, weight_name: str, w) -> torch.Tensor:
    """Check one model's hidden states ``[..., H]`` and lm_head weight ``[V, H]``; return the ``[N, H]`` rows."""
    check.check_float_tensor(input_name, x)
    rows = check.flatten_rows(input_name, x)
    check.check_weight(weight_name, w, rows.shape[1], input_name)
    if rows.dtype != w.dtype:
        raise TypeError(f"{input_name} is {rows.dtype} but {weight_name} is {w.dtype}; they must match")
    return rows


def _linear_options(reduction, backend, device, dtype, workspace_bytes, weight_grad_fp32) -> DispatchOptions:
    return DispatchOptions(reduction, resolve_backend(backend, device, dtype), workspace_budget(workspace_bytes),
                           bool(weight_grad_fp32))


def _trained(x, w, b):
    """The trained model's rows, weight and bias as the autograd function takes them."""
    w = w.contiguous()
    if not torch.is_grad_enabled():
        # Inside autograd.Function.forward, needs_input_grad reflects requires_grad, not the caller's grad mode:
        # detach here so that inference (torch.no_grad) never forms the gradients the forward pass would build.
        x, w = x.detach(), w.detach()
        b = b.detach() if b is not None else None
    return x, w, b


def fused_linear_distill_loss(
    student_input: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_input: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    divergence: str = "rkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    mle_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    normalizer=None,
    return_parts: bool = False,
    backend: str | None = None,
    workspace_bytes: int | None = None,
    weight_grad_fp32: bool = False,
):
    """Divergence between teacher and student next-token distributions plus the student's MLE term, computed from
    hidden states and lm_head weights without ever holding the ``[N, V]`` logits.

    student_input: ``[..., H_s]`` student hidden states at the target positions (leading dims are flattened to N).
    student_weight: ``[V, H_s]`` student lm_head weight, same dtype as ``student_input``; student_bias: ``[V]``.
    teacher_input: ``[..., H_t]`` with the same N; teacher_weight ``[V, H_t]``; teacher_bias ``[V]``.  The teacher
        receives no gradient.
    weight_grad_fp32: accumulate the student weight gradient over chunks in float32 (then cast to the weight dtype).

    Returns the loss (a 0-d float32 tensor, or ``[...]`` for "none"), or ``(loss, kd, mle)`` with ``return_parts``.
    Options:
    """
    cfg = _config(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, reduction, target is not None)
    xs = _hidden_rows("student_input", student_input, "student_weight", student_weight)
    leading_shape = tuple(student_input.shape[:-1])
    xt = _hidden_rows("teacher_input", teacher_input, "teacher_weight", teacher_weight)
    if xs.shape[0] != xt.shape[0]:
        raise ValueError(f"student_input has {xs.shape[0]} rows but teacher_input has {xt.shape[0]}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: student_weight has V={student_weight.shape[0]}, "
                         f"teacher_weight has V={teacher_weight.shape[0]}")
    vocab = student_weight.shape[0]
    check.check_bias("student_bias", student_bias, vocab)
    check.check_bias("teacher_bias", teacher_bias, vocab)
    device = check.check_devices(student_input=student_input, student_weight=student_weight,
                                 teacher_input=teacher_input, teacher_weight=teacher_weight, target=target,
                                 student_bias=student_bias, teacher_bias=teacher_bias)
    if target is not None:
        target = check.check_target(target, xs.shape[0], vocab, cfg.ignore_index, leading_shape)
    normalizer = check.check_normalizer(normalizer, device)
    opts = _linear_options(reduction, backend, device, xs.dtype, workspace_bytes, weight_grad_fp32)
    xs, student_weight, student_bias = _trained(xs, student_weight, student_bias)
    outputs = LinearDistillFunction.apply(xs, student_weight, student_bias, xt, teacher_weight.contiguous(),
                                          teacher_bias, target, normalizer, cfg, opts)
    return _finish(outputs, leading_shape, reduction, return_parts)


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    divergence: str = "rkl",
    beta: float = 0.5,
    temperature: float = 1.0,
    kd_weight: float = 1.0,
    mle_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer=None,
    return_parts: bool = False,
    backend: str | None = None,
    workspace_bytes: int | None = None,
):
    """The same loss for callers that already hold logits, computed by the same kernels on the logits in place.

    student_logits, teacher_logits: ``[..., V]`` of any float dtype (each read in its own dtype, math in float32);
    the gradient reaches ``student_logits`` only, in its dtype.  Returns as :func:`fused_linear_distill_loss`.
    Options:
    """
    cfg = _config(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, reduction, target is not None)
    check.check_float_tensor("student_logits", student_logits)
    check.check_float_tensor("teacher_logits", teacher_logits)
    leading_shape = tuple(student_logits.shape[:-1])
    s = check.flatten_rows("student_logits", student_logits)
    t = check.flatten_rows("teacher_logits", teacher_logits)
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"student and teacher vocabularies differ: student_logits has V={s.shape[1]}, "
                         f"teacher_logits has V={t.shape[1]}")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"student_logits has {s.shape[0]} rows but teacher_logits has {t.shape[0]}")
    device = check.check_devices(student_logits=student_logits, teacher_logits=teacher_logits, target=target)
    if target is not None:
        target = check.check_target(target, s.shape[0], s.shape[1], cfg.ignore_index, leading_shape)
    normalizer = check.check_normalizer(normalizer, device)
    dtype = torch.float64 if torch.float64 in (s.dtype, t.dtype) else s.dtype
    opts = DispatchOptions(reduction, resolve_backend(backend, device, dtype), workspace_budget(workspace_bytes))
    outputs = LogitsDistillFunction.apply(s, t, target, normalizer, cfg, opts)
    return _finish(outputs, leading_shape, reduction, return_parts)


def fused_linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer=None,
    backend: str | None = None,
    workspace_bytes: int | None = None,
    weight_grad_fp32: bool = False,
):
    """Cross-entropy of ``input @ weight.T + bias`` against ``target`` (supervised fine-tuning), computed from hidden
    states and an lm_head weight without ever holding the ``[N, V]`` logits.

    The MLE term of :func:`fused_linear_distill_loss` alone, by the same kernels with no teacher: the value and the
    gradients equal ``fused_linear_distill_loss(input, weight, t_in, t_w, target, kd_weight=0, mle_weight=1)``
    for any teacher, without the teacher's matmul or log-sum-exp.

    input: ``[..., H]`` hidden states at the target positions (leading dims are flattened to N).
    weight: ``[V, H]`` lm_head weight, same dtype as ``input``; bias: ``[V]`` or None.
    target: ``[N]`` (or the input's leading shape) integer ids, already shifted; rows equal to ``ignore_index``
        (default -100) count nowhere.
    reduction: "mean" (default): sum over counted rows divided by ``normalizer`` if given, else by the number of
        counted rows (no counted row gives 0, never NaN); "sum"; "none": the row losses in the input's leading shape,
        0 on ignored rows.
    normalizer: number or 0-d tensor dividing the sum for "mean", e.g. the count of target tokens over all
        micro-batches of a gradient-accumulation step.
    backend, workspace_bytes: as for :func:`fused_linear_distill_loss`.
    weight_grad_fp32: accumulate the weight gradient over chunks in float32 (then cast to the weight dtype).

    Logits and softmax in float32 (float64 for float64 inputs); gradients reach ``input``, ``weight`` and ``bias`` in
    their dtypes.  Returns the loss: a 0-d float32 tensor (float64 for float64 inputs), or ``[...]`` for "none".
    """
    cfg = DistillConfig.cross_entropy(check.check_ignore_index(ignore_index))
    check.check_reduction(reduction)
    x = _hidden_rows("input", input, "weight", weight)
    leading_shape = tuple(input.shape[:-1])
    vocab = weight.shape[0]
    check.check_bias("bias", bias, vocab)
    device = check.check_devices(input=input, weight=weight, target=target, bias=bias)
    target = check.check_target(target, x.shape[0], vocab, cfg.ignore_index, leading_shape)
    normalizer = check.check_normalizer(normalizer, device)
    opts = _linear_options(reduction, backend, device, x.dtype, workspace_bytes, weight_grad_fp32)
    x, weight, bias = _trained(x, weight, bias)
    outputs = LinearDistillFunction.apply(x, weight, bias, None, None, None, target, normalizer, cfg, opts)
    return _finish(outputs, leading_shape, reduction, False)


fused_linear_distill_loss.__doc__ += _OPTIONS_DOC
distill_loss.__doc__ += _OPTIONS_DOC


class FusedLinearDistillLoss(nn.Module):
    """Module form of :func:`fused_linear_distill_loss`: options in ``__init__``, tensors in :meth:`forward`."""

    def __init__(self, *, divergence: str = "rkl", beta: float = 0.5, temperature: float = 1.0,
                 kd_weight: float = 1.0, mle_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 return_parts: bool = False, backend: str | None = None, workspace_bytes: int | None = None,
                 weight_grad_fp32: bool = False):
        super().__init__()
        check.check_options(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, reduction)
        self.options = dict(divergence=divergence, beta=beta, temperature=temperature, kd_weight=kd_weight,
                            mle_weight=mle_weight, ignore_index=ignore_index, reduction=reduction,
                            return_parts=return_parts, backend=backend, workspace_bytes=workspace_bytes,
                            weight_grad_fp32=weight_grad_fp32)

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, target=None, *,
                student_bias=None, teacher_bias=None, normalizer=None):
        return fused_linear_distill_loss(student_input, student_weight, teacher_input, teacher_weight, target,
                                         student_bias=student_bias, teacher_bias=teacher_bias,
                                         normalizer=normalizer, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)


class FusedLinearCrossEntropyLoss(nn.Module):
    """Module form of :func:`fused_linear_cross_entropy`: options in ``__init__``, tensors in :meth:`forward`."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", backend: str | None = None,
                 workspace_bytes: int | None = None, weight_grad_fp32: bool = False):
        super().__init__()
        check.check_reduction(reduction)
        self.options = dict(ignore_index=check.check_ignore_index(ignore_index), reduction=reduction,
                            backend=backend, workspace_bytes=workspace_bytes, weight_grad_fp32=weight_grad_fp32)

    def forward(self, input, weight, target, *, bias=None, normalizer=None):
        return fused_linear_cross_entropy(input, weight, target, bias=bias, normalizer=normalizer, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
