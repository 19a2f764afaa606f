"""kidkernels under TRL's ``DistillationTrainer``, in one line::

    from kidkernels.integrations.trl import patch_distillation_trainer

    patch_distillation_trainer()          # every DistillationTrainer from here on computes its loss with kidkernels
    trainer = DistillationTrainer(...)
    trainer.train()

TRL (1.16) computes the generalized JSD of on-policy distillation with ``trl.trainer.distillation_trainer.
_chunked_divergence_loss``, a chunked PyTorch function that forms the student's and the teacher's logits tile by tile,
once per pass (twice for JSD), and again in the backward.  :func:`patch_distillation_trainer` replaces it, where the
trainer looks it up, with :func:`chunked_divergence_loss`: the same signature and the same three results, computed by
:func:`kidkernels.fused_linear_distill_loss` (one pass over the vocabulary that also forms the gradients) and
:func:`kidkernels.fused_linear_entropy`.  It returns a handle that undoes the patch (also a context manager).

Importing this module imports neither trl nor transformers; :func:`patch_distillation_trainer` imports trl and checks
that the function it replaces is there with the signature this module was written against, naming the installed
version when it is not.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import numbers
import warnings

import torch

import kidkernels
from kidkernels._backend import BACKENDS

__all__ = ["patch_distillation_trainer", "chunked_divergence_loss", "DistillationTrainerPatch", "TRL_FUNCTION"]

# The function patched, and its parameters (name, default) as of trl 1.16.0.
TRL_MODULE = "trl.trainer.distillation_trainer"
TRL_FUNCTION = "_chunked_divergence_loss"
_EMPTY = inspect.Parameter.empty
TRL_PARAMETERS = (
    ("student_hidden_states", _EMPTY), ("teacher_hidden_states", _EMPTY), ("student_lm_head_weight", _EMPTY),
    ("teacher_lm_head_weight", _EMPTY), ("completion_mask", _EMPTY), ("beta", _EMPTY), ("num_items_in_batch", None),
    ("student_lm_head_bias", None), ("teacher_lm_head_bias", None), ("student_logit_scale", 1.0),
    ("teacher_logit_scale", 1.0), ("student_final_logit_softcapping", None),
    ("teacher_final_logit_softcapping", None), ("temperature", 1.0),
)


def _is_positive_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 < float(value) < math.inf


def supports(student_logit_scale=1.0, teacher_logit_scale=1.0, student_final_logit_softcapping=None,
             teacher_final_logit_softcapping=None) -> bool:
    """Whether kidkernels takes these logit options: scales finite and > 0, softcaps None or finite and > 0 (what
    every model config TRL reads them from holds).  TRL's own function takes any float (a scale of 0 or below, a
    softcap of 0 dividing by zero); :func:`patch_distillation_trainer` hands such calls to it."""
    return (_is_positive_number(student_logit_scale) and _is_positive_number(teacher_logit_scale)
            and all(c is None or _is_positive_number(c)
                    for c in (student_final_logit_softcapping, teacher_final_logit_softcapping)))


def _full_head(weight, bias, dtype):
    """The lm_head as plain tensors: a DTensor weight (FSDP2, ``Shard(0)`` or ``Replicate``) gathered once with
    ``full_tensor()`` and cast to the hidden states' dtype, its bias gathered too, as TRL does (one all-gather each,
    whose backward reduce-scatters the gradient)."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            weight = weight.full_tensor().to(dtype)
        if isinstance(bias, DTensor):
            bias = bias.full_tensor()
    return weight, bias


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype TRL projects in: the autocast dtype under autocast, else the hidden states'."""
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


def _zero3_gather(*params):
    """TRL's DeepSpeed ZeRO-3 gather of the lm_head parameters for a direct access (a null context without ZeRO-3).
    kidkernels forms the gradients during the forward, so the forward is the only access."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:
        return contextlib.nullcontext()
    return maybe_gather_lm_head_ctx(*params)


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
    *,
    backend: str | None = None,
    workspace_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's ``_chunked_divergence_loss`` computed by kidkernels: ``(loss, entropy_sum, n_valid)``.

    student_hidden_states ``[B, K, H_s]``, teacher_hidden_states ``[B, K, H_t]`` (H_s and H_t may differ), the lm_head
    weights ``[V, H_s]`` and ``[V, H_t]`` (plain tensors or DTensors) and biases ``[V]``; completion_mask ``[B, K]``,
    nonzero where a position counts.  For each counted position, with ``z = softcap * tanh(scale * logits / softcap)``
    (each model's scale and softcap; ``scale * logits`` without a softcap) and ``p = softmax(z_teacher / T)``,
    ``q = softmax(z_student / T)``, the divergence is TRL's generalized JSD: ``beta KL(p || m) + (1 - beta) KL(q || m)``
    with ``m = beta p + (1 - beta) q``; ``beta = 0`` forward KL(p || q), ``beta = 1`` reverse KL(q || p), exactly.  No
    ``T^2`` factor (TRL has none).

    Returns, as TRL does: the loss, the sum of the divergences divided by ``num_items_in_batch`` when given (a number
    or a tensor, moved to the loss's device; gradient-accumulation-correct), else by the number of counted positions
    (at least 1: a fully masked batch gives 0); the sum over counted positions of the student's entropy of ``q``
    (tempered, in nats; float32, no gradient); and the number of counted positions (int64 tensor).  The gradient reaches
    the student's hidden states, weight and bias, in their dtypes; the teacher gets none.

    How: the counted positions are gathered first (as TRL does on GPUs; the boolean index reads their count on the
    host), then :func:`kidkernels.fused_linear_distill_loss` (reduction "sum", divergence "jsd") forms the loss and its
    gradients in one pass over the vocabulary, and :func:`kidkernels.fused_linear_entropy` the entropies: a second,
    gradient-free pass over the student's lm_head (one more ``2 N V H_s`` matmul, no ``[N, V]`` tensor), since the
    fused loss does not keep the student's entropy.  Under autocast both models project in the autocast dtype, as in
    TRL; a float32 weight is then cast once to that dtype (its gradient comes back through the cast, rounded once to
    it).  ``backend`` and ``workspace_bytes`` are kidkernels' (see :func:`kidkernels.fused_linear_distill_loss`).
    """
    s_dtype, t_dtype = _compute_dtype(student_hidden_states), _compute_dtype(teacher_hidden_states)
    student_weight, student_bias = _full_head(student_lm_head_weight, student_lm_head_bias, student_hidden_states.dtype)
    teacher_weight, teacher_bias = _full_head(teacher_lm_head_weight, teacher_lm_head_bias, teacher_hidden_states.dtype)
    valid = completion_mask.reshape(-1) != 0
    n_valid = valid.sum()
    h_s = student_hidden_states.reshape(-1, student_hidden_states.size(-1))[valid].to(s_dtype)
    h_t = teacher_hidden_states.reshape(-1, teacher_hidden_states.size(-1))[valid].to(t_dtype)
    options = dict(backend=backend, workspace_bytes=workspace_bytes)
    with _zero3_gather(student_weight, student_bias), _zero3_gather(teacher_weight, teacher_bias):
        student_weight, teacher_weight = student_weight.to(s_dtype), teacher_weight.to(t_dtype)
        loss = kidkernels.fused_linear_distill_loss(
            h_s, student_weight, h_t, teacher_weight, divergence="jsd", beta=beta, temperature=temperature,
            reduction="sum", student_bias=student_bias, teacher_bias=teacher_bias,
            student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
            student_softcap=student_final_logit_softcapping, teacher_softcap=teacher_final_logit_softcapping,
            **options)
        with torch.no_grad():
            entropy_sum = kidkernels.fused_linear_entropy(
                h_s, student_weight, student_bias, temperature=temperature, logit_scale=student_logit_scale,
                softcap=student_final_logit_softcapping, **options).sum()
    if num_items_in_batch is None:
        loss = loss / n_valid.clamp(min=1)
    else:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss, entropy_sum, n_valid


def _installed_trl():
    """``(module, version)`` of the installed TRL's distillation trainer; ImportError naming the need otherwise."""
    try:
        import trl
    except ImportError as exc:
        raise ImportError("kidkernels.integrations.trl patches TRL's DistillationTrainer: pip install 'trl>=1.16'"
                          ) from exc
    version = getattr(trl, "__version__", "unknown")
    try:
        module = importlib.import_module(TRL_MODULE)
    except ImportError as exc:
        raise RuntimeError(f"trl {version} has no {TRL_MODULE} (DistillationTrainer): kidkernels.integrations.trl "
                           "was written against trl 1.16") from exc
    return module, version


def _check_signature(function, version: str) -> None:
    """RuntimeError naming the TRL version when ``function``'s parameters differ from :data:`TRL_PARAMETERS`."""
    try:
        parameters = list(inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        parameters = None
    found = None if parameters is None else tuple((p.name, p.default) for p in parameters)
    if found != TRL_PARAMETERS:
        expected = ", ".join(name if default is _EMPTY else f"{name}={default!r}" for name, default in TRL_PARAMETERS)
        got = "unreadable" if found is None else ", ".join(
            name if default is _EMPTY else f"{name}={default!r}" for name, default in found)
        raise RuntimeError(
            f"trl {version}: {TRL_MODULE}.{TRL_FUNCTION} has changed its signature, so kidkernels cannot stand in for "
            f"it safely (expected ({expected}); found ({got})); kidkernels.integrations.trl was written against "
            "trl 1.16")


class DistillationTrainerPatch:
    """The handle :func:`patch_distillation_trainer` returns: :meth:`undo` (or leaving a ``with`` block) puts back the
    function that was there before; :attr:`active` tells whether the patch is in place."""

    def __init__(self, module, previous, installed, trl_version: str):
        self._module, self._previous, self._installed = module, previous, installed
        self.trl_version = trl_version
        self._undone = False

    @property
    def active(self) -> bool:
        return not self._undone and getattr(self._module, TRL_FUNCTION) is self._installed

    def undo(self) -> None:
        """Restore the previous function (idempotent).  RuntimeError if something replaced ours since: undo the later
        patch first."""
        if self._undone:
            return
        if getattr(self._module, TRL_FUNCTION) is not self._installed:
            raise RuntimeError(f"{TRL_MODULE}.{TRL_FUNCTION} was replaced again after kidkernels patched it; undo "
                               "that later patch first")
        setattr(self._module, TRL_FUNCTION, self._previous)
        self._undone = True

    def __enter__(self) -> DistillationTrainerPatch:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()

    def __repr__(self) -> str:
        state = "active" if self.active else "undone" if self._undone else "superseded"
        return f"<kidkernels patch of {TRL_MODULE}.{TRL_FUNCTION} (trl {self.trl_version}), {state}>"


def patch_distillation_trainer(*, backend: str | None = None,
                               workspace_bytes: int | None = None) -> DistillationTrainerPatch:
    """Make TRL's ``DistillationTrainer`` compute its loss with kidkernels; returns the handle that undoes it.

    Replaces ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (the name the trainer calls) with a
    function of the same signature and results (:func:`chunked_divergence_loss`, with ``backend`` and
    ``workspace_bytes`` bound).  Calls whose logit scale is not a finite number > 0 or whose softcap is not None or a
    finite number > 0 go to the function that was there before (with a warning, once).  Patches made in turn are
    undone in the reverse order (``with`` blocks nest).

    Raises ImportError without trl, RuntimeError naming the installed trl version when the function is missing or its
    signature differs from trl 1.16's, ValueError for an unknown ``backend``.
    """
    if backend is not None and str(backend).strip().lower() not in BACKENDS:
        raise ValueError(f"backend= must be one of {BACKENDS}, got {backend!r}")
    module, version = _installed_trl()
    previous = getattr(module, TRL_FUNCTION, None)
    if previous is None:
        raise RuntimeError(f"trl {version}: {TRL_MODULE} has no {TRL_FUNCTION}; kidkernels.integrations.trl was "
                           "written against trl 1.16, whose DistillationTrainer computes its loss there")
    _check_signature(previous, version)
    warned = []

    def _chunked_divergence_loss(student_hidden_states, teacher_hidden_states, student_lm_head_weight,
                                 teacher_lm_head_weight, completion_mask, beta, num_items_in_batch=None,
                                 student_lm_head_bias=None, teacher_lm_head_bias=None, student_logit_scale=1.0,
                                 teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                                 teacher_final_logit_softcapping=None, temperature=1.0):
        args = (student_hidden_states, teacher_hidden_states, student_lm_head_weight, teacher_lm_head_weight,
                completion_mask, beta, num_items_in_batch, student_lm_head_bias, teacher_lm_head_bias,
                student_logit_scale, teacher_logit_scale, student_final_logit_softcapping,
                teacher_final_logit_softcapping, temperature)
        if not supports(student_logit_scale, teacher_logit_scale, student_final_logit_softcapping,
                        teacher_final_logit_softcapping):
            if not warned:
                warnings.warn("kidkernels takes logit scales and softcaps that are finite and > 0; this call "
                              f"(scales {student_logit_scale}, {teacher_logit_scale}; softcaps "
                              f"{student_final_logit_softcapping}, {teacher_final_logit_softcapping}) runs TRL's own "
                              f"{TRL_FUNCTION}", stacklevel=2)
                warned.append(True)
            return previous(*args)
        return chunked_divergence_loss(*args, backend=backend, workspace_bytes=workspace_bytes)

    _chunked_divergence_loss.__doc__ = chunked_divergence_loss.__doc__
    _chunked_divergence_loss.__kidkernels__ = True
    setattr(module, TRL_FUNCTION, _chunked_divergence_loss)
    return DistillationTrainerPatch(module, previous, _chunked_divergence_loss, version)
