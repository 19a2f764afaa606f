"""The public ops registered with ``torch.library``: one graph for ``torch.compile``, autograd, fake tensors.

Each op is a ``torch.library.custom_op`` (opaque to Dynamo and AOTAutograd, so ``torch.compile(fullgraph=True)`` of a
caller traces it as one node, with or without ``torch.autocast``), with a fake implementation giving its outputs'
shapes and dtypes, and (for the losses) a backward registered with ``register_autograd``:

    kidkernels::linear_distill            hidden states + lm_heads -> (loss, kd, ce, dx, dw, db)
    kidkernels::linear_distill_backward   the "none" reduction's backward (recomputes the logits)
    kidkernels::distill_logits            logits -> (loss, kd, ce, stats)
    kidkernels::distill_logits_backward   the logits gradient
    kidkernels::linear_entropy            entropies of the rows of x @ w.T + b
    kidkernels::linear_argmax             argmaxes of the rows of x @ w.T + b

The loss options travel as scalar arguments; each model's logit scale and softcap (:class:`.config.LogitTransform`)
are the last four, with defaults (identity), so that a caller that does not use them need not name them.
``linear_distill`` returns, for "mean" and "sum", the gradients it formed during the forward pass (already divided by
the mean's denominator; empty ``[0]`` tensors where none is asked for); its first backward hands them out scaled by
the upstream gradient, in place (see :func:`_backward_linear`).

Inside an op, autocast is off (``gemm.without_autocast``): its products keep the dtypes chosen by :mod:`.gemm`.  No op
reads a tensor value on the host, except the range check of a CPU target (there is no device to wait for).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import distill as dispatch
from .config import NUM_STATS, DistillConfig, LogitTransform
from .distill import DispatchOptions, mean_denominator, reduce_rows, weight_grad_dtype
from .gemm import compute_dtype
from .selection import linear_row_statistic

# Op name ("kidkernels::...") -> the Python function behind it (see :func:`python_impl`).
_PYTHON_IMPLS: dict[str, Callable] = {}


def _custom_op(name: str):
    """``torch.library.custom_op(name, mutates_args=())``, remembering the Python function for :func:`python_impl`."""
    def register(fn):
        _PYTHON_IMPLS[name] = fn
        return torch.library.custom_op(name, mutates_args=())(fn)
    return register


def python_impl(func) -> Callable | None:
    """The Python implementation behind a ``kidkernels::`` op overload as a ``TorchDispatchMode`` sees it (None for
    any other op).  A registered op is one node to the dispatcher; a dispatch-level tool that must see the ops inside
    it (an allocation recorder, a FLOP counter, a fake-tensor memory estimate) calls this function with its mode
    still active instead of ``func``."""
    schema = getattr(func, "_schema", None)
    return _PYTHON_IMPLS.get(schema.name) if schema is not None else None


def check_target_range(target: Tensor, vocab: int, ignore_index: int) -> None:
    """Every target is ``ignore_index`` or in ``[0, vocab)``: a ``ValueError`` for a CPU tensor, a device-side
    assertion on CUDA (no host synchronisation).  The kernels also make such a row NaN, so it never passes silently."""
    if target.numel() == 0:
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    message = f"target holds ids outside [0, {vocab}) that are not ignore_index={ignore_index}"
    if target.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(f"{message} (e.g. {int(target[bad][0])})")
    else:
        torch._assert_async(~bad.any(), message)


def _distill_config(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, has_target,
                    has_teacher, transforms=(1.0, None, 1.0, None)) -> DistillConfig:
    """The :class:`DistillConfig` of an op's scalar arguments (already validated by the public API); ``transforms``
    is ``(student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap)``."""
    s_scale, s_softcap, t_scale, t_softcap = transforms
    return DistillConfig(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, has_target,
                         has_teacher=has_teacher, student_logit_scale=s_scale, student_softcap=s_softcap,
                         teacher_logit_scale=t_scale, teacher_softcap=t_softcap)


def _or_empty(tensor: Tensor | None, like: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor if tensor is not None else like.new_empty(0, dtype=dtype)


def _normalizer(normalizer: Tensor | None, normalizer_value: float | None):
    """The normaliser the public API was given (a tensor, a Python float or None) from the op's two arguments."""
    return normalizer if normalizer is not None else normalizer_value


def _backward_row_weight(ctx, grad_loss: Tensor, target, normalizer, n: int, dtype: torch.dtype,
                         has_teacher: bool) -> Tensor:
    """A backward's row weight ``[n]`` in ``dtype``: each row's upstream gradient for "none"; for "mean" and "sum" the
    upstream scalar over the forward's denominator (none for "sum"), broadcast over the rows (stride 0)."""
    scale = grad_loss.to(dtype)
    if ctx.reduction == "none":
        return scale.contiguous()
    cfg = _distill_config(*ctx.options[:6], target is not None, has_teacher)
    denom = mean_denominator(cfg, ctx.reduction, target, _normalizer(normalizer, ctx.normalizer_value), n, dtype,
                             scale.device)
    return (scale if denom is None else scale / denom).expand(n)


# ---- hidden states and lm_heads ---------------------------------------------------------------------------------

@_custom_op("kidkernels::linear_distill")
def linear_distill(
    xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Optional[Tensor], wt: Optional[Tensor], bt: Optional[Tensor],
    target: Optional[Tensor], normalizer: Optional[Tensor], normalizer_value: Optional[float],
    divergence: str, beta: float, temperature: float, kd_weight: float, mle_weight: float, ignore_index: int,
    vocab: int, reduction: str, backend: str, workspace_bytes: int, weight_grad_fp32: bool,
    grad_input: bool, grad_weight: bool, grad_bias: bool,
    student_logit_scale: float = 1.0, student_softcap: Optional[float] = None, teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The loss from hidden states: ``(loss, kd, ce, dx, dw, db)``; ``xt``, ``wt``, ``bt`` None for the
    cross-entropy alone.  Shapes as :func:`.distill.linear_distill_chunks`; dx, dw, db are formed only for "mean" and
    "sum" and when their flag is set (else ``[0]``)."""
    cfg = _distill_config(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, target is not None,
                          xt is not None, (student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap))
    opts = DispatchOptions(reduction, backend, workspace_bytes, weight_grad_fp32)
    if target is not None:
        check_target_range(target, vocab, ignore_index)
    n, cdt = xs.shape[0], compute_dtype(xs.dtype)
    eager = reduction != "none"
    denom = mean_denominator(cfg, reduction, target, _normalizer(normalizer, normalizer_value), n, cdt, xs.device)
    row_weight = dispatch.eager_row_weight(denom, n, cdt, xs.device) if eager else None
    stats, dx, dw, db = dispatch.linear_distill_chunks(
        xs, ws, bs, xt, wt, bt, target, cfg, opts, vocab=vocab, grad_input=eager and grad_input,
        grad_weight=eager and grad_weight, grad_bias=eager and grad_bias and bs is not None, row_weight=row_weight)
    loss, kd, ce = reduce_rows(stats, cfg, reduction, denom)
    dw = _or_empty(dw, ws, weight_grad_dtype(ws.dtype, weight_grad_fp32))
    return loss, kd, ce, _or_empty(dx, xs, xs.dtype), dw, _or_empty(db, ws, cdt)


@linear_distill.register_fake
def _(xs, ws, bs, xt, wt, bt, target, normalizer, normalizer_value, divergence, beta, temperature, kd_weight,
      mle_weight, ignore_index, vocab, reduction, backend, workspace_bytes, weight_grad_fp32, grad_input,
      grad_weight, grad_bias, student_logit_scale=1.0, student_softcap=None, teacher_logit_scale=1.0,
      teacher_softcap=None):
    cdt = compute_dtype(xs.dtype)
    shape = (xs.shape[0],) if reduction == "none" else ()
    eager = reduction != "none"
    wdt = weight_grad_dtype(ws.dtype, weight_grad_fp32)
    dx = torch.empty_like(xs) if eager and grad_input else xs.new_empty(0)
    dw = ws.new_empty(ws.shape, dtype=wdt) if eager and grad_weight else ws.new_empty(0, dtype=wdt)
    db = ws.new_empty(ws.shape[0], dtype=cdt) if eager and grad_bias and bs is not None else ws.new_empty(0, dtype=cdt)
    return xs.new_empty(shape, dtype=cdt), xs.new_empty(shape, dtype=cdt), xs.new_empty(shape, dtype=cdt), dx, dw, db


@_custom_op("kidkernels::linear_distill_backward")
def linear_distill_backward(
    xs: Tensor, ws: Tensor, bs: Optional[Tensor], xt: Optional[Tensor], wt: Optional[Tensor], bt: Optional[Tensor],
    target: Optional[Tensor], row_weight: Tensor,
    divergence: str, beta: float, temperature: float, kd_weight: float, mle_weight: float, ignore_index: int,
    vocab: int, backend: str, workspace_bytes: int, weight_grad_fp32: bool,
    grad_input: bool, grad_weight: bool, grad_bias: bool,
    student_logit_scale: float = 1.0, student_softcap: Optional[float] = None, teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum_i row_weight_i * row_loss_i`` (the "none" reduction's backward, which recomputes the logits),
    in the dtypes of ``xs``, ``ws`` and ``bs`` (``[0]`` where not asked for)."""
    cfg = _distill_config(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, target is not None,
                          xt is not None, (student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap))
    opts = DispatchOptions("none", backend, workspace_bytes, weight_grad_fp32)
    grad_bias = grad_bias and bs is not None
    _, dx, dw, db = dispatch.linear_distill_chunks(
        xs, ws, bs, xt, wt, bt, target, cfg, opts, vocab=vocab, grad_input=grad_input, grad_weight=grad_weight,
        grad_bias=grad_bias, row_weight=row_weight.to(compute_dtype(xs.dtype)).contiguous())
    return (_or_empty(dx, xs, xs.dtype), dw.to(ws.dtype) if dw is not None else ws.new_empty(0),
            db.to(bs.dtype) if db is not None else ws.new_empty(0))


@linear_distill_backward.register_fake
def _(xs, ws, bs, xt, wt, bt, target, row_weight, divergence, beta, temperature, kd_weight, mle_weight, ignore_index,
      vocab, backend, workspace_bytes, weight_grad_fp32, grad_input, grad_weight, grad_bias, student_logit_scale=1.0,
      student_softcap=None, teacher_logit_scale=1.0, teacher_softcap=None):
    return (torch.empty_like(xs) if grad_input else xs.new_empty(0),
            torch.empty_like(ws) if grad_weight else ws.new_empty(0),
            torch.empty_like(bs) if grad_bias and bs is not None else ws.new_empty(0))


def _plain_eager(*tensors) -> bool:
    """Whether this runs eagerly: outside ``torch.compile`` and outside any graph tracer (AOTAutograd, ``make_fx``,
    ``opcheck``: a proxy mode, functional tensors), where the backward may hand out buffers it owns.  A tracer gets
    the functional backward: a traced graph may not mutate what its forward saved.  Fake tensors alone (a memory
    estimate under ``FakeTensorMode``) run as eager code does."""
    from torch._subclasses.functional_tensor import FunctionalTensor
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if torch.compiler.is_compiling() or get_proxy_mode() is not None:
        return False
    return not any(t is not None and (isinstance(t, FunctionalTensor) or torch._is_functional_tensor(t))
                   for t in tensors)


def _setup_linear(ctx, inputs, output):
    """Save what the backward needs.  "mean"/"sum" in eager: the forward-pass gradients are held (not saved) for the
    first backward to hand out, and the inputs are saved (references, no copies) for any later backward to recompute
    from (see :func:`_backward_linear`).  Traced: the forward-pass gradients are saved and scaled functionally.
    "none": the inputs, to recompute with the per-row upstream gradient."""
    (xs, ws, bs, xt, wt, bt, target, normalizer, normalizer_value, divergence, beta, temperature, kd_weight,
     mle_weight, ignore_index, vocab, reduction, backend, workspace_bytes, weight_grad_fp32, grad_input,
     grad_weight, grad_bias, *transforms) = inputs
    _loss, kd, ce, dx, dw, db = output
    ctx.set_materialize_grads(False)  # no zero tensors (weight-sized for dw) for the outputs without a gradient
    ctx.mark_non_differentiable(kd, ce, dx, dw, db)
    ctx.options = (divergence, beta, temperature, kd_weight, mle_weight, ignore_index, vocab, backend,
                   workspace_bytes, weight_grad_fp32)
    ctx.transforms = tuple(transforms)  # the logit scales and softcaps (all four: the op's call gives them all)
    ctx.flags = (grad_input, grad_weight, grad_bias and bs is not None)
    ctx.dtypes = (xs.dtype, ws.dtype, bs.dtype if bs is not None else None)
    ctx.reduction, ctx.normalizer_value = reduction, normalizer_value
    ctx.traced = not _plain_eager(xs, dx, dw, db)
    ctx.unclaimed = None
    if reduction != "none" and ctx.traced:
        ctx.save_for_backward(dx, dw, db)
        return
    if reduction != "none":
        # Not saved tensors: the first backward takes them out of ctx and gives them away as the gradients.
        ctx.unclaimed = (dx, dw, db)
    ctx.save_for_backward(xs, ws, bs, xt, wt, bt, target, normalizer)


def _hand_out(buffers, dtypes, scale):
    """The forward-pass gradients times the upstream ``scale``, in ``dtypes``, from buffers nothing else holds: a buffer
    already in its gradient's dtype is scaled in place and becomes the gradient (no new weight-sized tensor); a
    float32 accumulator of a low-precision weight or bias is scaled into a new tensor of that dtype (its one rounding)
    and then freed."""
    out = []
    for buffer, dtype in zip(buffers, dtypes):
        if buffer is None:
            out.append(None)
        elif buffer.dtype == dtype:
            out.append(buffer.mul_(scale))
        else:
            out.append(torch.mul(buffer, scale, out=torch.empty(buffer.shape, device=buffer.device, dtype=dtype)))
    return out


def _backward_linear(ctx, grad_loss, *_):
    """Gradients of the loss w.r.t. ``xs``, ``ws``, ``bs`` (None for the other 24 inputs).

    "mean"/"sum", eager: the first backward hands out the gradients formed in the forward pass, scaled by the upstream
    gradient in place (:func:`_hand_out`), and lets go of them: they are the caller's from then on (a ``.grad`` that
    is clipped, zeroed or accumulated into changes nothing here).  A later backward through the same graph
    (``retain_graph=True``) recomputes them from the saved inputs with row weight ``upstream / denominator``, as the
    "none" reduction always does: exact whatever the first upstream gradient was (0 included).  Traced
    (``torch.compile``): the saved gradients times the upstream gradient, functionally (the compiler plans buffers).
    """
    grad_input, grad_weight, grad_bias = ctx.flags
    tail = (None,) * (20 + len(ctx.transforms))
    if grad_loss is None:
        return (None, None, None) + tail
    x_dtype, w_dtype, b_dtype = ctx.dtypes
    eager = ctx.reduction != "none"
    scale = grad_loss.to(compute_dtype(x_dtype))
    if eager and ctx.traced:
        dx, dw, db = ctx.saved_tensors
        buffers = (dx if grad_input else None, dw if grad_weight else None, db if grad_bias else None)
        return tuple(None if b is None else (b * scale).to(d) for b, d in zip(buffers, ctx.dtypes)) + tail
    if eager and ctx.unclaimed is not None:
        (dx, dw, db), ctx.unclaimed = ctx.unclaimed, None
        buffers = (dx if grad_input else None, dw if grad_weight else None, db if grad_bias else None)
        return tuple(_hand_out(buffers, (x_dtype, w_dtype, b_dtype), scale)) + tail
    xs, ws, bs, xt, wt, bt, target, normalizer = ctx.saved_tensors
    # "none", or a second backward of "mean"/"sum": recomputed with the upstream gradient as row weight
    row_weight = _backward_row_weight(ctx, grad_loss, target, normalizer, xs.shape[0], scale.dtype, xt is not None)
    gx, gw, gb = torch.ops.kidkernels.linear_distill_backward(
        xs, ws, bs, xt, wt, bt, target, row_weight, *ctx.options, grad_input, grad_weight, grad_bias, *ctx.transforms)
    return (gx if grad_input else None, gw if grad_weight else None, gb if grad_bias else None) + tail


linear_distill.register_autograd(_backward_linear, setup_context=_setup_linear)


# ---- logits the caller holds ------------------------------------------------------------------------------------

@_custom_op("kidkernels::distill_logits")
def distill_logits(
    student: Tensor, teacher: Tensor, target: Optional[Tensor], normalizer: Optional[Tensor],
    normalizer_value: Optional[float], divergence: str, beta: float, temperature: float, kd_weight: float,
    mle_weight: float, ignore_index: int, vocab: int, reduction: str, backend: str, workspace_bytes: int,
    student_logit_scale: float = 1.0, student_softcap: Optional[float] = None, teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss from logits ``[N, V_s]`` and ``[N, V_t]`` (the first ``vocab`` columns): ``(loss, kd, ce, stats)``."""
    cfg = _distill_config(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, target is not None,
                          True, (student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap))
    opts = DispatchOptions(reduction, backend, workspace_bytes)
    if target is not None:
        check_target_range(target, vocab, ignore_index)
    stats = dispatch.logits_distill_chunks(student, teacher, target, cfg, opts, vocab=vocab)
    denom = mean_denominator(cfg, reduction, target, _normalizer(normalizer, normalizer_value), student.shape[0],
                             stats.dtype, student.device)
    loss, kd, ce = reduce_rows(stats, cfg, reduction, denom)
    return loss, kd, ce, stats


@distill_logits.register_fake
def _(student, teacher, target, normalizer, normalizer_value, divergence, beta, temperature, kd_weight, mle_weight,
      ignore_index, vocab, reduction, backend, workspace_bytes, student_logit_scale=1.0, student_softcap=None,
      teacher_logit_scale=1.0, teacher_softcap=None):
    cdt = compute_dtype(student.dtype)
    shape = (student.shape[0],) if reduction == "none" else ()
    return (*(student.new_empty(shape, dtype=cdt) for _ in range(3)),
            student.new_empty((NUM_STATS, student.shape[0]), dtype=cdt))


@_custom_op("kidkernels::distill_logits_backward")
def distill_logits_backward(
    student: Tensor, teacher: Tensor, target: Optional[Tensor], stats: Tensor, row_weight: Tensor,
    divergence: str, beta: float, temperature: float, kd_weight: float, mle_weight: float, ignore_index: int,
    vocab: int, backend: str, workspace_bytes: int,
    student_logit_scale: float = 1.0, student_softcap: Optional[float] = None, teacher_logit_scale: float = 1.0,
    teacher_softcap: Optional[float] = None,
) -> Tensor:
    """The gradient ``[N, V_s]`` (student dtype) of ``sum_i row_weight_i * row_loss_i`` w.r.t. the student logits."""
    cfg = _distill_config(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, target is not None,
                          True, (student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap))
    grad = torch.empty_like(student)
    dispatch.logits_distill_chunks(student, teacher, target, cfg, DispatchOptions("none", backend, workspace_bytes),
                                   vocab=vocab, stats=stats, row_weight=row_weight, grad_out=grad)
    return grad


@distill_logits_backward.register_fake
def _(student, teacher, target, stats, row_weight, divergence, beta, temperature, kd_weight, mle_weight,
      ignore_index, vocab, backend, workspace_bytes, student_logit_scale=1.0, student_softcap=None,
      teacher_logit_scale=1.0, teacher_softcap=None):
    return torch.empty_like(student)


def _setup_logits(ctx, inputs, output):
    (student, teacher, target, normalizer, normalizer_value, divergence, beta, temperature, kd_weight, mle_weight,
     ignore_index, vocab, reduction, backend, workspace_bytes, *transforms) = inputs
    _loss, kd, ce, stats = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(kd, ce, stats)
    ctx.options = (divergence, beta, temperature, kd_weight, mle_weight, ignore_index, vocab, backend,
                   workspace_bytes, *transforms)
    ctx.n_inputs = len(inputs)
    ctx.reduction, ctx.normalizer_value = reduction, normalizer_value
    ctx.save_for_backward(student, teacher, target, stats, normalizer)


def _backward_logits(ctx, grad_loss, *_):
    tail = (None,) * (ctx.n_inputs - 1)
    if grad_loss is None:
        return (None,) + tail
    student, teacher, target, stats, normalizer = ctx.saved_tensors
    row_weight = _backward_row_weight(ctx, grad_loss, target, normalizer, student.shape[0], stats.dtype, True)
    grad = torch.ops.kidkernels.distill_logits_backward(student, teacher, target, stats, row_weight, *ctx.options)
    return (grad,) + tail


distill_logits.register_autograd(_backward_logits, setup_context=_setup_logits)


# ---- KID's masking stage ----------------------------------------------------------------------------------------

@_custom_op("kidkernels::linear_entropy")
def linear_entropy(x: Tensor, weight: Tensor, bias: Optional[Tensor], inv_temp: float, backend: str,
                   workspace_bytes: int, logit_scale: float = 1.0, softcap: Optional[float] = None) -> Tensor:
    """``[N]`` entropies (compute dtype) of softmax(z * inv_temp), ``z = softcap * tanh(logit_scale * (x @ weight.T +
    bias) / softcap)`` (without a softcap: ``logit_scale * (x @ weight.T + bias)``)."""
    return linear_row_statistic(x, weight, bias, statistic="entropy", inv_temp=inv_temp, backend=backend,
                                workspace_bytes=workspace_bytes, transform=LogitTransform(logit_scale, softcap))


@linear_entropy.register_fake
def _(x, weight, bias, inv_temp, backend, workspace_bytes, logit_scale=1.0, softcap=None):
    return x.new_empty(x.shape[0], dtype=compute_dtype(x.dtype))


@_custom_op("kidkernels::linear_argmax")
def linear_argmax(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: str, workspace_bytes: int) -> Tensor:
    """``[N]`` int64 argmaxes of the rows of x @ weight.T + bias."""
    return linear_row_statistic(x, weight, bias, statistic="argmax", inv_temp=1.0, backend=backend,
                                workspace_bytes=workspace_bytes)


@linear_argmax.register_fake
def _(x, weight, bias, backend, workspace_bytes):
    return x.new_empty(x.shape[0], dtype=torch.int64)
