"""The logit scale and final-logit softcapping of a model, per element, for every Triton kernel that reads logits.

    z = softcap * tanh(scale * x / softcap)        (HAS_SOFTCAP False: z = scale * x; HAS_SCALE False: scale = 1)

applied in float32 to the raw logits ``x`` before the temperature (see ``ops/config.py``, ``LogitTransform``).  A
kernel calls :func:`transform_logits` where it reads a logit, and a gradient kernel :func:`transform_logits_and_slope`,
which also gives the chain-rule factor ``dz/dx = scale * (1 - tanh^2)``: the gradient with respect to the raw logit is
the one with respect to ``z`` times that factor, column by column.  With both flags False these compile to nothing.

Accuracy: ``tanh(r)`` for ``r = |y| / softcap >= 0`` is ``-expm1(-2r) / (2 + expm1(-2r))`` with ``expm1`` by Kahan's
correction of ``exp(x) - 1`` (exact where ``exp`` rounds to 1 or to 0), so the value keeps its relative accuracy
near 0 (where the textbook ``(1 - e) / (1 + e)`` or ``2 sigmoid(2r) - 1`` lose it); ``1 - tanh^2`` is
``4 e / (1 + e)^2`` with ``e = exp(-2r)``, relatively accurate where the cap saturates (``1 - t * t`` would be 0
there).  Only ``exp``, ``log`` and ``where``, so the interpreter runs it as compiled code does.  ``-inf`` maps to
``-softcap`` (slope 0) and NaN stays NaN; callers whose masked lanes must stay ``-inf`` mask after the call.
"""
import triton
import triton.language as tl


@triton.jit
def _softcap_parts(y, softcap):
    """``(tanh(y / softcap), 1 - tanh(y / softcap)^2)``, see the module docstring."""
    r = tl.abs(y) / softcap
    e = tl.exp(-2.0 * r)
    em1 = e - 1.0
    inner = (em1 != 0.0) & (em1 != -1.0)
    # Kahan: expm1(x) = (exp(x) - 1) * x / log(exp(x)); where exp(x) - 1 rounds to 0 it is x, where it rounds to -1
    # (exp(x) < 2^-25), -1.  The correction may overshoot -1 by an ulp: clamped there (NaN passes: not < -1), so that
    # |tanh| <= 1 and |z| <= softcap exactly.
    expm1 = tl.where(inner, em1 * ((-2.0 * r) / tl.log(tl.where(inner, e, 0.5))), tl.where(em1 == 0.0, -2.0 * r, em1))
    expm1 = tl.where(expm1 < -1.0, -1.0, expm1)
    t = -expm1 / (2.0 + expm1)
    one_plus_e = 1.0 + e
    return tl.where(y < 0, -t, t), 4.0 * e / (one_plus_e * one_plus_e)


@triton.jit
def transform_logits(x, scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``z`` of raw float32 logits ``x`` (a tile or a scalar)."""
    y = x
    if HAS_SCALE:
        y = x * scale
    z = y
    if HAS_SOFTCAP:
        t, _ = _softcap_parts(y, softcap)
        z = softcap * t
    return z


@triton.jit
def transform_logits_and_slope(x, scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``(z, dz/dx)`` of raw float32 logits ``x``: the value and the factor the chain rule multiplies
    d(loss)/dz by to give d(loss)/dx (1.0 when both flags are False)."""
    y = x
    slope = 1.0
    if HAS_SCALE:
        y = x * scale
        slope = scale
    z = y
    if HAS_SOFTCAP:
        t, sech2 = _softcap_parts(y, softcap)
        z = softcap * t
        slope = slope * sech2
    return z, slope
