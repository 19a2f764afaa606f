"""Online-softmax building blocks shared by every vocabulary-wide kernel.

A row of logits is read one tile of ``BLOCK_V`` columns at a time; these helpers fold a tile into running scalars so
that no kernel ever needs the whole row in registers.  Masked lanes must carry ``-inf`` logits (``other=-inf`` in the
load) for :func:`online_lse_update` and :func:`online_argmax_update`; :func:`online_entropy_update` takes the mask
(and ignores masked lanes whatever they hold).

The running state of a log-sum-exp is ``(m, z)`` with ``m`` the largest logit seen and ``z = sum(exp(x - m))``, so
``logsumexp = m + log(z)``.  When a tile raises the maximum from ``m`` to ``m'`` the old sum is rescaled by
``exp(m - m')``; starting from ``m = -inf, z = 0`` the first rescale is ``0 * exp(-inf) = 0``, which is exact.
"""
import triton
import triton.language as tl


@triton.jit
def online_lse_update(m, z, x):
    """Fold tile ``x`` (masked lanes ``-inf``) into the running max ``m`` and rescaled sum ``z``.

    The shift is a finite reference (``m_new``, or 0 while every logit seen is ``-inf``, e.g. a first tile masked by a
    ``-inf`` bias), so no lane forms ``-inf - -inf``; while ``m`` is ``-inf`` the old sum is 0 and its rescale is 1.
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    scale = tl.where(m > float("-inf"), tl.exp(m - ref), 1.0)
    z_new = z * scale + tl.sum(tl.exp(x - ref), axis=0)
    return m_new, z_new


@triton.jit
def finish_lse(m, z):
    """log-sum-exp from the running state."""
    return m + tl.log(z)


@triton.jit
def online_entropy_update(m, z, acc, x, mask):
    """Running state for the entropy of softmax(x): ``(m, z, acc)`` with ``acc = sum(exp(x - m) * (m - x))``.

    Every term of ``acc`` is non-negative, so the entropy ``log(z) + acc / z`` is formed without the cancellation of
    the textbook ``logsumexp - E[x]`` (both of which are close to ``max(x)`` for a peaked distribution).  When the
    max moves from ``m`` to ``m'`` each old term ``exp(x - m) (m - x)`` becomes
    ``exp(m - m') exp(x - m) ((m - x) + (m' - m))``.

    Lanes outside ``mask`` are ignored whatever they hold (the maximum is taken over ``mask`` only: a masked lane
    loaded as 0 would otherwise become the shift and underflow ``z`` for a row of very negative logits).  A ``-inf``
    logit in a valid lane has probability 0 and contributes nothing, and tiles whose valid lanes are all ``-inf``
    before any finite logit leave the state at its start ``(-inf, 0, 0)``.
    """
    m_new = tl.maximum(m, tl.max(tl.where(mask, x, float("-inf")), axis=0))
    # Every shift below is by a finite reference, so no lane ever forms inf - inf or 0 * inf: m_new, or 0 while no
    # finite logit has been seen.  The old maximum is replaced by that reference while it is still -inf, where the old
    # state is z = acc = 0 and its rescale does not matter.
    ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    m_old = tl.where(m > float("-inf"), m, ref)
    scale = tl.exp(m_old - ref)
    e = tl.where(mask, tl.exp(x - ref), 0.0)
    # ref - x is +inf for a -inf logit (and anything on a masked lane), where e == 0: that term is 0.
    acc_new = scale * (acc + z * (ref - m_old)) + tl.sum(e * tl.where(e > 0, ref - x, 0.0), axis=0)
    z_new = z * scale + tl.sum(e, axis=0)
    return m_new, z_new, acc_new


@triton.jit
def finish_entropy(z, acc):
    """Entropy (nats) from the running state of :func:`online_entropy_update`."""
    return tl.log(z) + acc / z


@triton.jit
def online_argmax_update(best_val, best_idx, x, cols):
    """Running maximum and its column, with ``torch.argmax``'s rules: ties go to the lowest column, and a NaN counts
    as larger than every number (the first NaN wins).  Start from ``best_val = -inf, best_idx = 0``.

    Within the tile the lowest column among the maxima is taken explicitly (not relying on a tie rule of
    ``tl.argmax``, nor on how ``tl.max`` treats NaN, which differs between the compiler and the interpreter); across
    tiles only a strictly larger value (or a first NaN) replaces the running one, and tiles come in increasing
    column order.  Masked lanes must hold ``-inf``.
    """
    is_nan = x != x
    tile_has_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    tile_max = tl.max(tl.where(is_nan, float("-inf"), x), axis=0)
    hit = tl.where(tile_has_nan, is_nan, x == tile_max)
    big = 2147483647
    tile_idx = tl.min(tl.where(hit, cols, big), axis=0)
    best_is_nan = best_val != best_val
    take = (best_is_nan == 0) & (tile_has_nan | (tile_max > best_val))
    tile_val = tl.where(tile_has_nan, float("nan"), tile_max)
    return tl.where(take, tile_val, best_val), tl.where(take, tile_idx, best_idx)
