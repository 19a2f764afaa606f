"""Public API of the distillation losses and of the cross-entropy alone: validation, defaults and documentation.

Definitions (T the temperature, rows whose target equals ``ignore_index`` count nowhere)::

    p = softmax(z_teacher / T)               q = softmax(z_student / T)
    z = softcap * tanh(logit_scale * logits / softcap)  (each model's own; z = logits by default)
    "fkl"  KL(p || q)                        "rkl"  KL(q || p)
    "jsd"  beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q  (formed in log space);
           beta = 0 is KL(p || q) and beta = 1 is KL(q || p), TRL's convention (beta weights the teacher)
    "tvd"  0.5 sum |p - q|                   (zero subgradient where p == q)
    MLE    cross-entropy of the *untempered* student z against ``target``
    row loss = kd_weight * divergence + mle_weight * MLE

Columns whose weighting probability is 0 (``-inf`` logits, e.g. a masked vocabulary) contribute exactly 0 (0 log 0 =
0); a divergence that is truly infinite (FKL where q = 0 but p > 0, RKL where p = 0 but q > 0) is ``inf``, not NaN.

:func:`fused_linear_cross_entropy` is the MLE term alone (supervised fine-tuning): the same kernels with the teacher
compiled out, so no teacher matmul and no divergence are computed.

Logits, softmax and divergence math run in float32 (float64 for float64 inputs); logits are never rounded to the
input dtype.  Gradients come back in the input dtype and reach only the student tensors.  Every function here calls
one op registered with ``torch.library`` (:mod:`.ops.custom_ops`), so ``torch.compile(fullgraph=True)`` of a caller
compiles without graph breaks, with or without ``torch.autocast``.
"""
from __future__ import annotations

import torch
from torch import nn

from . import _validation as check
from ._backend import resolve_backend
from .ops import custom_ops  # noqa: F401  (registers the ops)
from .ops.config import DistillConfig
from .ops.workspace import DEFAULT_WORKSPACE_BYTES, FUSED_LOSS_WORKSPACE_BYTES, workspace_budget

__all__ = ["fused_linear_distill_loss", "FusedLinearDistillLoss", "distill_loss", "fused_linear_cross_entropy",
           "FusedLinearCrossEntropyLoss"]

_OPTIONS_DOC = """
    target: ``[N]`` (or the inputs' leading shape) integer ids of the token each row must predict, already shifted.
        Rows equal to ``ignore_index`` count in neither term nor in the mean.  ``None``: every row counts, and
        ``mle_weight`` must be 0.
    divergence: "fkl", "rkl" (default), "jsd" or "tvd".
    beta: mixture weight of "jsd" (the teacher's), in [0, 1]: 0 is forward KL and 1 reverse KL exactly (TRL's
        generalized JSD convention; the mixture form itself tends to 0 at both ends, like beta KL(p||q) and
        (1 - beta) KL(q||p)).  Default 0.5.
    temperature: T > 0 applied to both models' logits in the divergence (not in the MLE term). Default 1.
    kd_weight, mle_weight: weights of the divergence and of the MLE term. Defaults 1 and 0.
    ignore_index: target value of rows to skip. Default -100.
    reduction: "mean" (default): sum over counted rows divided by ``normalizer`` if given, else by the number of
        counted rows (no counted row gives 0, never NaN); "sum"; "none": the ``[N]`` row losses, 0 on ignored rows.
    normalizer: number or 0-d tensor dividing the sum for "mean", e.g. the count of target tokens over all
        micro-batches of a gradient-accumulation step.
    return_parts: also return ``kd`` and ``mle``: the divergence and the cross-entropy, detached, reduced like the
        loss (so ``loss = kd_weight * kd + mle_weight * mle``; ``mle`` is 0 without a target).
    shared_vocab: use only the first ``shared_vocab`` vocabulary entries of both models, for a teacher (or student)
        whose head is padded to more rows than the tokenizer has (Qwen: 152,064 vs 151,936 rows, same tokenizer).
        Both are softmaxed over those entries only, so the teacher is renormalised over them (padding rows carry
        almost no probability).  Views, no copies; the student's gradient is 0 beyond them.  Without it,
        vocabularies of different sizes are an error.
    backend: "triton", "triton_rows", "torch" or "auto" (default: ``KIDKERNELS_BACKEND``, else auto: Triton on CUDA,
        and on CPU under ``TRITON_INTERPRET=1``; PyTorch otherwise and for float64).  "triton_rows" is the previous
        Triton path (cuBLAS logits, then row-per-program passes), kept as a reference for the benchmarks.
    workspace_bytes: bound on the chunk buffers of logits (default 1 GiB on "triton", the GEMM-fused kernels, where
        fewer chunks re-read the float32 weight-gradient accumulator fewer times; 512 MiB on the other backends; or
        ``KIDKERNELS_WORKSPACE_MB``).
    student_logit_scale, teacher_logit_scale: a model's multiplier of its logits (Cohere's ``logit_scale``; TRL and
        Hugging Face configs also call it ``output_multiplier``, ``lm_head_multiplier`` or ``1 / logits_scaling``),
        a finite number > 0.  Default 1.
    student_softcap, teacher_softcap: a model's final-logit softcapping (Gemma 2/3's ``final_logit_softcapping``):
        its logits become ``softcap * tanh(logits / softcap)``, after the scale and before the temperature (TRL's
        order), in float32, with gradients through the tanh.  A finite number > 0, or None (default): off.
"""


def _validated_config(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, reduction,
                      has_target: bool, student_logit_scale=1.0, student_softcap=None, teacher_logit_scale=1.0,
                      teacher_softcap=None) -> DistillConfig:
    """Check the public options (a ``ValueError``/``TypeError`` naming the bad one) and return them as the
    dispatch layer's :class:`DistillConfig`; ``reduction`` is checked but not part of it."""
    beta, temperature, kd_weight, mle_weight, ignore_index = check.check_options(
        divergence, beta, temperature, kd_weight, mle_weight, ignore_index, reduction)
    if not has_target and mle_weight != 0.0:
        raise ValueError(f"mle_weight={mle_weight} needs a target; pass target= or set mle_weight=0")
    s_scale, s_softcap = check.check_logit_transform("student_logit_scale", student_logit_scale, "student_softcap",
                                                     student_softcap)
    t_scale, t_softcap = check.check_logit_transform("teacher_logit_scale", teacher_logit_scale, "teacher_softcap",
                                                     teacher_softcap)
    return DistillConfig(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, has_target,
                         student_logit_scale=s_scale, student_softcap=s_softcap, teacher_logit_scale=t_scale,
                         teacher_softcap=t_softcap)


def _transform_args(cfg: DistillConfig) -> tuple:
    """The four logit-transform arguments of the registered ops."""
    return cfg.student_logit_scale, cfg.student_softcap, cfg.teacher_logit_scale, cfg.teacher_softcap


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
    check.check_vocab(weight_name, w.shape[0])
    if rows.dtype != w.dtype:
        raise TypeError(f"{input_name} is {rows.dtype} but {weight_name} is {w.dtype}; they must match")
    return rows


def _normalizer_args(normalizer):
    """The op's two normaliser arguments: a tensor, or a Python float."""
    if isinstance(normalizer, torch.Tensor):
        return normalizer, None
    return None, normalizer


def _needs_grad(t) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def _weight_grad_fp32(value) -> bool:
    if value is None:
        return True
    if not isinstance(value, bool):
        raise TypeError(f"weight_grad_fp32 must be a bool or None, got {type(value).__name__}")
    return value


def _linear_loss(xs, ws, bs, xt, wt, bt, target, normalizer, cfg: DistillConfig, *, vocab, reduction, backend,
                 workspace_bytes, weight_grad_fp32):
    """Call the registered op on validated tensors; return ``(loss, kd, ce)``."""
    device = xs.device
    ws = ws.contiguous()
    if wt is not None:
        wt = wt.contiguous()
    norm_tensor, norm_value = _normalizer_args(normalizer)
    backend = resolve_backend(backend, device, xs.dtype)
    workspace_bytes = workspace_budget(workspace_bytes, default=FUSED_LOSS_WORKSPACE_BYTES if backend == "triton"
                                       else DEFAULT_WORKSPACE_BYTES)
    loss, kd, ce, *_ = torch.ops.kidkernels.linear_distill(
        xs, ws, bs, xt, wt, bt, target, norm_tensor, norm_value,
        cfg.divergence, cfg.beta, cfg.temperature, cfg.kd_weight, cfg.mle_weight, cfg.ignore_index, vocab,
        reduction, backend, workspace_bytes, _weight_grad_fp32(weight_grad_fp32), _needs_grad(xs), _needs_grad(ws),
        _needs_grad(bs), *_transform_args(cfg))
    return loss, kd, ce


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
    shared_vocab: int | None = None,
    backend: str | None = None,
    workspace_bytes: int | None = None,
    weight_grad_fp32: bool | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
):
    """Divergence between teacher and student next-token distributions plus the student's MLE term, computed from
    hidden states and lm_head weights without ever holding the ``[N, V]`` logits.

    student_input: ``[..., H_s]`` student hidden states at the target positions (leading dims are flattened to N).
    student_weight: ``[V, H_s]`` student lm_head weight, same dtype as ``student_input``; student_bias: ``[V]``.
    teacher_input: ``[..., H_t]`` with the same N; teacher_weight ``[V, H_t]``; teacher_bias ``[V]``.  The teacher
        receives no gradient.  (With ``shared_vocab``, the two weights may have different numbers of rows.)
    weight_grad_fp32: accumulate the student weight gradient across row chunks in float32 and round it to the
        weight's dtype once, at the end (default None: on, which matters for bfloat16/float16 weights; False
        accumulates in the weight's dtype, rounding once per chunk).

    Returns the loss (a 0-d float32 tensor, or ``[...]`` for "none"), or ``(loss, kd, mle)`` with ``return_parts``.
    Options:
    """
    cfg = _validated_config(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, reduction,
                            target is not None, student_logit_scale, student_softcap, teacher_logit_scale,
                            teacher_softcap)
    xs = _hidden_rows("student_input", student_input, "student_weight", student_weight)
    leading_shape = tuple(student_input.shape[:-1])
    xt = _hidden_rows("teacher_input", teacher_input, "teacher_weight", teacher_weight)
    if xs.shape[0] != xt.shape[0]:
        raise ValueError(f"student_input has {xs.shape[0]} rows but teacher_input has {xt.shape[0]}")
    vocab = check.check_shared_vocab(shared_vocab, student_weight.shape[0], teacher_weight.shape[0],
                                     "student_weight", "teacher_weight")
    check.check_bias("student_bias", student_bias, student_weight.shape[0])
    check.check_bias("teacher_bias", teacher_bias, teacher_weight.shape[0])
    check.check_devices(student_input=student_input, student_weight=student_weight,
                        teacher_input=teacher_input, teacher_weight=teacher_weight, target=target,
                        student_bias=student_bias, teacher_bias=teacher_bias)
    if target is not None:
        target = check.check_target(target, xs.shape[0], leading_shape)
    normalizer = check.check_normalizer(normalizer, xs.device)
    outputs = _linear_loss(xs, student_weight, student_bias, xt, teacher_weight, teacher_bias, target, normalizer,
                           cfg, vocab=vocab, reduction=reduction, backend=backend, workspace_bytes=workspace_bytes,
                           weight_grad_fp32=weight_grad_fp32)
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
    shared_vocab: int | None = None,
    backend: str | None = None,
    workspace_bytes: int | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
):
    """The same loss for callers that already hold logits, computed by the same kernels on the logits in place.

    student_logits, teacher_logits: ``[..., V]`` of any float dtype (each read in its own dtype, math in float32);
    the gradient reaches ``student_logits`` only, in its dtype.  With ``shared_vocab`` the last dimensions may differ.
    The logit scales and softcaps apply to the logits given: leave them at their defaults for logits a model already
    scaled and capped (a Hugging Face Gemma's ``outputs.logits``).
    Returns as :func:`fused_linear_distill_loss`.
    Options:
    """
    cfg = _validated_config(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, reduction,
                            target is not None, student_logit_scale, student_softcap, teacher_logit_scale,
                            teacher_softcap)
    check.check_float_tensor("student_logits", student_logits)
    check.check_float_tensor("teacher_logits", teacher_logits)
    leading_shape = tuple(student_logits.shape[:-1])
    s = check.flatten_rows("student_logits", student_logits)
    t = check.flatten_rows("teacher_logits", teacher_logits)
    check.check_vocab("student_logits", s.shape[1])
    check.check_vocab("teacher_logits", t.shape[1])
    vocab = check.check_shared_vocab(shared_vocab, s.shape[1], t.shape[1], "student_logits", "teacher_logits")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"student_logits has {s.shape[0]} rows but teacher_logits has {t.shape[0]}")
    device = check.check_devices(student_logits=student_logits, teacher_logits=teacher_logits, target=target)
    if target is not None:
        target = check.check_target(target, s.shape[0], leading_shape)
    normalizer = check.check_normalizer(normalizer, device)
    dtype = torch.float64 if torch.float64 in (s.dtype, t.dtype) else s.dtype
    norm_tensor, norm_value = _normalizer_args(normalizer)
    loss, kd, ce, _stats = torch.ops.kidkernels.distill_logits(
        s, t, target, norm_tensor, norm_value, cfg.divergence, cfg.beta, cfg.temperature, cfg.kd_weight,
        cfg.mle_weight, cfg.ignore_index, vocab, reduction, resolve_backend(backend, device, dtype),
        workspace_budget(workspace_bytes), *_transform_args(cfg))
    return _finish((loss, kd, ce), leading_shape, reduction, return_parts)


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
    weight_grad_fp32: bool | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
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
    backend, workspace_bytes, weight_grad_fp32: as for :func:`fused_linear_distill_loss`.
    logit_scale, softcap: the model's logit scale and final-logit softcapping, as ``student_logit_scale`` and
        ``student_softcap`` of :func:`fused_linear_distill_loss`: the loss reads
        ``softcap * tanh(logit_scale * logits / softcap)``.  Defaults 1 and None (off).

    Logits and softmax in float32 (float64 for float64 inputs); gradients reach ``input``, ``weight`` and ``bias`` in
    their dtypes.  Returns the loss: a 0-d float32 tensor (float64 for float64 inputs), or ``[...]`` for "none".
    """
    cfg = DistillConfig.cross_entropy(check.check_ignore_index(ignore_index),
                                      *check.check_logit_transform("logit_scale", logit_scale, "softcap", softcap))
    check.check_reduction(reduction)
    x = _hidden_rows("input", input, "weight", weight)
    leading_shape = tuple(input.shape[:-1])
    vocab = weight.shape[0]
    check.check_bias("bias", bias, vocab)
    check.check_devices(input=input, weight=weight, target=target, bias=bias)
    target = check.check_target(target, x.shape[0], leading_shape)
    normalizer = check.check_normalizer(normalizer, x.device)
    outputs = _linear_loss(x, weight, bias, None, None, None, target, normalizer, cfg, vocab=vocab,
                           reduction=reduction, backend=backend, workspace_bytes=workspace_bytes,
                           weight_grad_fp32=weight_grad_fp32)
    return _finish(outputs, leading_shape, reduction, False)


fused_linear_distill_loss.__doc__ += _OPTIONS_DOC
distill_loss.__doc__ += _OPTIONS_DOC


class FusedLinearDistillLoss(nn.Module):
    """Module form of :func:`fused_linear_distill_loss`: options in ``__init__``, tensors in :meth:`forward`."""

    def __init__(self, *, divergence: str = "rkl", beta: float = 0.5, temperature: float = 1.0,
                 kd_weight: float = 1.0, mle_weight: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                 return_parts: bool = False, shared_vocab: int | None = None, backend: str | None = None,
                 workspace_bytes: int | None = None, weight_grad_fp32: bool | None = None,
                 student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
                 student_softcap: float | None = None, teacher_softcap: float | None = None):
        super().__init__()
        check.check_options(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, reduction)
        check.check_logit_transform("student_logit_scale", student_logit_scale, "student_softcap", student_softcap)
        check.check_logit_transform("teacher_logit_scale", teacher_logit_scale, "teacher_softcap", teacher_softcap)
        self.options = dict(divergence=divergence, beta=beta, temperature=temperature, kd_weight=kd_weight,
                            mle_weight=mle_weight, ignore_index=ignore_index, reduction=reduction,
                            return_parts=return_parts, shared_vocab=shared_vocab, backend=backend,
                            workspace_bytes=workspace_bytes, weight_grad_fp32=weight_grad_fp32)
        # Shown by extra_repr only where they differ from the defaults.
        for name, value, default in (("student_logit_scale", student_logit_scale, 1.0),
                                     ("teacher_logit_scale", teacher_logit_scale, 1.0),
                                     ("student_softcap", student_softcap, None),
                                     ("teacher_softcap", teacher_softcap, None)):
            if value != default:
                self.options[name] = value

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
                 workspace_bytes: int | None = None, weight_grad_fp32: bool | None = None,
                 logit_scale: float = 1.0, softcap: float | None = None):
        super().__init__()
        check.check_reduction(reduction)
        check.check_logit_transform("logit_scale", logit_scale, "softcap", softcap)
        self.options = dict(ignore_index=check.check_ignore_index(ignore_index), reduction=reduction,
                            backend=backend, workspace_bytes=workspace_bytes, weight_grad_fp32=weight_grad_fp32)
        if logit_scale != 1.0:
            self.options["logit_scale"] = logit_scale
        if softcap is not None:
            self.options["softcap"] = softcap

    def forward(self, input, weight, target, *, bias=None, normalizer=None):
        return fused_linear_cross_entropy(input, weight, target, bias=bias, normalizer=normalizer, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
