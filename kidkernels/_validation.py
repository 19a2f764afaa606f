"""Checks of the public API's arguments: every bad input gets an exception that names the problem.

None of these checks reads a tensor's values: they look at types, shapes, dtypes and devices only, so that a
caller compiled with ``torch.compile`` traces them away.  The range of ``target`` is checked by the registered ops
themselves, first thing (:func:`kidkernels.ops.custom_ops.check_target_range`: eagerly for CPU tensors, with a
device-side assertion on CUDA); the kernels additionally turn an out-of-range target into a NaN row, so it can never
pass silently.
"""
from __future__ import annotations

import math
import numbers

import torch

from .ops.config import DIVERGENCES, MAX_VOCAB, REDUCTIONS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_number(name: str, value, *, low=None, high=None, low_open=True, high_open=True) -> float:
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    value = float(value)
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) a float may be traced as a symbolic float,
    # which math.isfinite cannot take (NaN fails both comparisons).
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return int(ignore_index)


def check_options(divergence, beta, temperature, kd_weight, mle_weight, ignore_index, reduction):
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    check_reduction(reduction)
    beta = check_number("beta", beta, low=0.0, high=1.0, low_open=False, high_open=False)
    temperature = check_number("temperature", temperature, low=0.0)
    kd_weight = check_number("kd_weight", kd_weight)
    mle_weight = check_number("mle_weight", mle_weight)
    return beta, temperature, kd_weight, mle_weight, check_ignore_index(ignore_index)


def check_logit_transform(scale_name: str, scale, softcap_name: str, softcap) -> tuple[float, float | None]:
    """A model's logit scale (a finite number > 0) and final-logit softcap (a finite number > 0, or None: off), as
    floats (see ``ops.config.LogitTransform``)."""
    scale = check_number(scale_name, scale, low=0.0)
    if softcap is not None:
        softcap = check_number(softcap_name, softcap, low=0.0)
    return scale, softcap


def check_float_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def flatten_rows(name: str, t: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` -> ``[N, D]`` (a view when possible), with unit stride along D; N = 0 and D = 0 included
    (``flatten`` of the leading dimensions: ``reshape(-1, 0)`` would be ambiguous)."""
    if t.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions [..., features], got shape {tuple(t.shape)}")
    t = t.flatten(0, -2)
    return t if t.stride(-1) == 1 else t.contiguous()


def check_weight(name: str, w: torch.Tensor, hidden: int, input_name: str) -> None:
    check_float_tensor(name, w)
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [V, H] (nn.Linear layout), got shape {tuple(w.shape)}")
    if w.shape[1] != hidden:
        raise ValueError(f"{name} has hidden size {w.shape[1]} but {input_name} has {hidden} features")


def check_bias(name: str, b, vocab: int) -> None:
    if b is None:
        return
    check_float_tensor(name, b)
    if b.shape != (vocab,):
        raise ValueError(f"{name} must have shape [V] = [{vocab}], got {tuple(b.shape)}")


def check_devices(**tensors) -> torch.device:
    present = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")
    return next(iter(devices))


def check_target(target, rows: int, leading_shape) -> torch.Tensor:
    """Return the target as a contiguous int64 ``[N]`` tensor (its range is checked by the op that reads it)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of token ids, got {type(target).__name__}")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"target must hold integer token ids, got dtype {target.dtype}")
    if target.numel() != rows or (target.dim() > 1 and tuple(target.shape) != tuple(leading_shape)):
        raise ValueError(
            f"target must have one entry per row: shape {tuple(leading_shape)} or [{rows}], got {tuple(target.shape)}"
        )
    return target.reshape(-1).to(torch.int64).contiguous()


def check_vocab(name: str, vocab: int) -> None:
    """A vocabulary size the losses can take: at least 1 (a softmax over no entries is undefined), below
    :data:`MAX_VOCAB`.  ``name`` is the weight (its rows) or the logits (their last dimension)."""
    if vocab < 1:
        raise ValueError(f"{name} has an empty vocabulary (V = 0): a softmax over no entries is undefined, V must be "
                         "at least 1")
    if vocab >= MAX_VOCAB:
        raise ValueError(f"{name} has {vocab} rows; vocabularies of at most {MAX_VOCAB - 1} are supported")


def check_shared_vocab(shared_vocab, student_vocab: int, teacher_vocab: int, student_name: str,
                       teacher_name: str) -> int:
    """The number of leading vocabulary rows both models use: ``shared_vocab``, or (None) the common size, which must
    then be the same for both."""
    if shared_vocab is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"student and teacher vocabularies differ: {student_name} has V={student_vocab}, {teacher_name} has "
                f"V={teacher_vocab}; pass shared_vocab=V to use the first V rows of both (a padded head)")
        return student_vocab
    if isinstance(shared_vocab, bool) or not isinstance(shared_vocab, numbers.Integral):
        raise TypeError(f"shared_vocab must be an int or None, got {type(shared_vocab).__name__}")
    shared_vocab = int(shared_vocab)
    if not 1 <= shared_vocab <= min(student_vocab, teacher_vocab):
        raise ValueError(f"shared_vocab must be in [1, {min(student_vocab, teacher_vocab)}] (the smaller of "
                         f"{student_name}'s V={student_vocab} and {teacher_name}'s V={teacher_vocab}), "
                         f"got {shared_vocab}")
    return shared_vocab


def check_normalizer(normalizer, device):
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1 or normalizer.dim() > 1:
            raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape {tuple(normalizer.shape)}")
        if normalizer.device != device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer is on {normalizer.device} but the inputs are on {device}")
        return normalizer.reshape(())
    return check_number("normalizer", normalizer, low=0.0)
