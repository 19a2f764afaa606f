"""The logit scale and final-logit softcapping of a model, per element, for the PyTorch backends (the twin of
``kernels/logit_transform.py``, same formulas).

    z = softcap * tanh(scale * x / softcap)        (softcap None: z = scale * x)

:func:`transform_logits` gives ``z``; :func:`transform_slope` the chain-rule factor ``dz/dx = scale * (1 - tanh^2)``
that turns d(loss)/dz into d(loss)/dx column by column.  ``1 - tanh^2`` is formed as ``4 e / (1 + e)^2`` with
``e = exp(-2 |y| / softcap)``, relatively accurate where the cap saturates.  Inputs are float32 or float64 (the
compute dtype); an identity transform returns its input untouched.
"""
from __future__ import annotations

import torch

from .config import LogitTransform


def transform_logits(x: torch.Tensor, transform: LogitTransform) -> torch.Tensor:
    """``z`` for logits ``x`` in the compute dtype: ``x`` itself for the identity, else a new tensor."""
    if transform.identity:
        return x
    y = x * transform.scale if transform.has_scale else x
    if not transform.has_softcap:
        return y
    return torch.tanh(y / transform.softcap).mul_(transform.softcap)


def transform_slope(x: torch.Tensor, transform: LogitTransform) -> torch.Tensor | None:
    """``dz/dx`` for raw logits ``x`` (a new tensor), or None where it is the constant 1 (the identity)."""
    if transform.identity:
        return None
    if not transform.has_softcap:
        return torch.full_like(x, transform.scale)
    e = (x.abs() * (-2.0 * transform.scale / transform.softcap)).exp_()
    denominator = (e + 1.0).square_()
    return e.mul_(4.0 * transform.scale).div_(denominator)
