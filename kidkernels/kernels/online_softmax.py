"""Online-softmax building blocks shared by every vocabulary-wide kernel.

A row of logits is read one tile of ``BLOCK_V`` columns at a time; these helpers fold a tile into running scalars so
that no kernel ever needs the whole row in registers.  Masked lanes must carry ``-inf`` logits (``other=-inf`` in the
load) for :func:`online_lse_update` and :func:`online_argmax_update`; :func:`online_entropy_update` takes the mask.

The running state of a log-sum-exp is ``(m, z)`` with ``m`` the largest logit seen and ``z = sum(exp(x - m))``, so
``logsumexp = m + log(z)``.  When a tile raises the maximum from ``m`` to ``m'`` the old sum is rescaled by
``exp(m - m')``; starting from ``m = -inf, z = 0`` the first rescale is ``0 * exp(-inf) = 0``, which is exact.
"""
import triton
import triton.language as tl


@triton.jit
def online_lse_update(m, z, x):
    """Fold tile ``x`` (masked lanes ``-inf``) into the running max ``m`` and rescaled sum ``z``."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    z_new = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
    return m_new, z_new


@triton.jit
def finish_lse(m, z):
    """log-sum-exp from the running state."""
    return m + tl.log(z)


@triton.jit
def online_entropy_update(m, z, acc, x, mask):
    """Running state for the entropy of softmax(x): ``(m, z, acc)`` with ``acc = sum(exp(x - m) * (m - x))``.

    Every term of ``acc`` is non-negative, so the entropy ``log(z) + acc / z`` is formed without the cancellation of
    the textbook ``logsumexp - E[x]`` (both of which are close to ``max(x)`` for a peaked distribution).  When the max
    moves from ``m`` to ``m'`` each old term ``exp(x - m) (m - x)`` becomes ``exp(m - m') exp(x - m) ((m - x) + (m' - m))``.
    """
    m_new = tl.maximum(m, tl.max(x, axis=0))
    scale = tl.exp(m - m_new)
    # z == 0 only before the first tile, where m - m_new is -inf: keep that 0 * inf out of the sum.
    shift = tl.where(z > 0, z * (m_new - m), 0.0)
    e = tl.where(mask, tl.exp(x - m_new), 0.0)
    acc_new = scale * (acc + shift) + tl.sum(tl.where(mask, e * (m_new - x), 0.0), axis=0)
    z_new = z * scale + tl.sum(e, axis=0)
    return m_new, z_new, acc_new


@triton.jit
def finish_entropy(z, acc):
    """Entropy (nats) from the running state of :func:`online_entropy_update`."""
    return tl.log(z) + acc / z


@triton.jit
def online_argmax_update(best_val, best_idx, x, cols):
    """Running maximum and its column; ties go to the lowest column, as in ``torch.argmax``.

    Within the tile the lowest column among the maxima is taken explicitly (not relying on a tie rule of
    ``tl.argmax``); across tiles only a strictly larger value replaces the running one, and tiles come in
    increasing column order.
    """
    tile_max = tl.max(x, axis=0)
    big = 2147483647
    tile_idx = tl.min(tl.where(x == tile_max, cols, big), axis=0)
    take = tile_max > best_val
    return tl.where(take, tile_max, best_val), tl.where(take, tile_idx, best_idx)
