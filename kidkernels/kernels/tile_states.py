"""Per-row partial states of a ``[BLOCK_M, BLOCK_N]`` tile of logits: the epilogue pieces of the GEMM-fused kernels.

A fused kernel holds one tile of logits (rows x one vocabulary block) in registers; these functions reduce it along
the vocabulary (axis 1) to one state per row, exactly as the row kernels' one-dimensional updates in
:mod:`.online_softmax` reduce one tile of a row, so that the merge of the blocks' states (in increasing column order,
or any order for the commutative ones) gives the row kernels' results.  Merges of log-sum-exp and one-pass KL states
are :func:`.online_softmax.merge_lse` and :func:`.online_softmax.merge_kl` (elementwise, so they take these
``[BLOCK_M]`` vectors as they are); the entropy and argmax states have their merges here.

Lanes outside the vocabulary (and rows outside the chunk) must be ``-inf`` in ``x`` and ``y`` for
:func:`tile_lse_state`, :func:`tile_kl_state` and :func:`tile_argmax_state`; :func:`tile_entropy_state` takes the mask.
"""
import triton
import triton.language as tl

from .online_softmax import finite_ref, kl_offset


@triton.jit
def tile_lse_state(x):
    """``(m, z)`` per row: ``m = max(x)``, ``z = sum exp(x - m)`` (``(-inf, 0)`` for a row of ``-inf``)."""
    m = tl.max(x, axis=1)
    return m, tl.sum(tl.exp(x - finite_ref(m)[:, None]), axis=1)


@triton.jit
def tile_kl_state(x, y):
    """``(m_x, z_x, m_y, z_y, s)`` per row, the one-pass state of ``KL(softmax(x) || softmax(y))`` of
    :func:`.online_softmax.online_kl_update` for one tile: ``s = sum exp(x - m_x) ((x - y) - (m_x - m_y))``, ``+inf``
    where a column of positive weight has ``y = -inf``, nothing from columns with ``x = -inf``."""
    mx = tl.max(x, axis=1)
    my = tl.max(y, axis=1)
    e = tl.exp(x - finite_ref(mx)[:, None])
    weighted = x > float("-inf")
    unbounded = weighted & (y == float("-inf"))
    finite = weighted & (unbounded == 0)
    deviation = (tl.where(finite, x, 0.0) - tl.where(finite, y, 0.0)) - kl_offset(mx, my)[:, None]
    s = tl.sum(tl.where(unbounded, float("inf"), e * deviation), axis=1)
    zy = tl.sum(tl.exp(y - finite_ref(my)[:, None]), axis=1)
    return mx, tl.sum(e, axis=1), my, zy, s


@triton.jit
def tile_entropy_state(x, mask):
    """``(m, z, acc)`` per row with ``acc = sum exp(x - m) (m - x) >= 0`` over the lanes of ``mask`` (see
    :func:`.online_softmax.online_entropy_update`); a ``-inf`` logit contributes nothing."""
    m = tl.max(tl.where(mask, x, float("-inf")), axis=1)
    ref = finite_ref(m)[:, None]
    e = tl.where(mask, tl.exp(x - ref), 0.0)
    acc = tl.sum(e * tl.where(e > 0, ref - x, 0.0), axis=1)
    return m, tl.sum(e, axis=1), acc


@triton.jit
def merge_entropy(m1, z1, acc1, m2, z2, acc2):
    """Merge two entropy states: with ``M = max(m1, m2)`` each part is rescaled by ``exp(m_i - M)`` and its terms
    re-referenced, ``acc_i + z_i (M - m_i)``; a part still at ``(-inf, 0, 0)`` contributes nothing."""
    m = tl.maximum(m1, m2)
    ref = finite_ref(m)
    # A part at -inf has z = acc = 0: its shift is replaced by 0, so no -inf * 0 is formed.
    shift1 = tl.where(z1 > 0, ref - m1, 0.0)
    shift2 = tl.where(z2 > 0, ref - m2, 0.0)
    scale1 = tl.exp(m1 - ref)
    scale2 = tl.exp(m2 - ref)
    return m, z1 * scale1 + z2 * scale2, scale1 * (acc1 + z1 * shift1) + scale2 * (acc2 + z2 * shift2)


@triton.jit
def tile_argmax_state(x, cols):
    """``(best, index)`` per row with ``torch.argmax``'s rules within the tile: the lowest column among the maxima,
    the first NaN if there is one.  ``cols``: ``[BLOCK_N]`` column indices; lanes outside must hold ``-inf``."""
    is_nan = x != x
    has_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
    best = tl.max(tl.where(is_nan, float("-inf"), x), axis=1)
    hit = tl.where(has_nan[:, None], is_nan, x == best[:, None])
    index = tl.min(tl.where(hit, cols[None, :], 2147483647), axis=1)
    return tl.where(has_nan, float("nan"), best), index


@triton.jit
def merge_argmax(best1, index1, best2, index2):
    """Merge two argmax states in any order: the larger value wins, a NaN beats every number, and equal values (or
    two NaNs) go to the lower index."""
    nan1 = best1 != best1
    nan2 = best2 != best2
    tie = ((best1 == best2) | (nan1 & nan2)) & (index2 < index1)
    take2 = (nan2 & (nan1 == 0)) | (((nan1 | nan2) == 0) & (best2 > best1)) | tie
    return tl.where(take2, best2, best1), tl.where(take2, index2, index1)
