"""Online-softmax building blocks shared by every vocabulary-wide kernel.

A row of logits is read one tile of ``BLOCK_V`` columns at a time; these helpers fold a tile into running scalars so
that no kernel ever needs the whole row in registers.  Masked lanes must carry ``-inf`` logits (``other=-inf`` in the
load) for :func:`online_lse_update`, :func:`online_kl_update` and :func:`online_argmax_update`;
:func:`online_entropy_update` takes the mask (and ignores masked lanes whatever they hold).

The running state of a log-sum-exp is ``(m, z)`` with ``m`` the largest logit seen and ``z = sum(exp(x - m))``, so
``logsumexp = m + log(z)``.  A tile is reduced to its own state and merged into the running one (:func:`merge_lse`):
the sum with the smaller maximum is rescaled by ``exp(m_small - m_large)``.  The one-pass KL state holds both models'
log-sum-exp states and ``s = sum exp(x - m_x) ((x - y) - (m_x - m_y))`` (:func:`merge_kl`).  The merges are what a
kernel that splits a row over several programs (or fuses the matmul) combines its partial states with.
"""
import triton
import triton.language as tl


@triton.jit
def finite_ref(m):
    """A finite shift for a running maximum: ``m`` itself, or 0 while every logit seen is ``-inf``."""
    return tl.where(m > float("-inf"), m, 0.0)


@triton.jit
def merge_lse(m1, z1, m2, z2):
    """Merge two log-sum-exp states ``(m, z)`` (``z = sum exp(x - m)``, ``(-inf, 0)`` for no finite logit).

    Each old sum is rescaled by ``exp(m_i - m)`` with ``m = max(m1, m2)`` replaced by 0 while both are ``-inf``, so no
    ``-inf - -inf`` is ever formed: a state at ``-inf`` has ``z = 0`` and rescales to 0.
    """
    m = tl.maximum(m1, m2)
    ref = finite_ref(m)
    return m, z1 * tl.exp(m1 - ref) + z2 * tl.exp(m2 - ref)


@triton.jit
def online_lse_update(m, z, x):
    """Fold tile ``x`` (masked lanes ``-inf``) into the running max ``m`` and rescaled sum ``z``."""
    m_tile = tl.max(x, axis=0)
    z_tile = tl.sum(tl.exp(x - finite_ref(m_tile)), axis=0)
    return merge_lse(m, z, m_tile, z_tile)


@triton.jit
def finish_lse(m, z):
    """log-sum-exp from the running state."""
    return m + tl.log(z)


@triton.jit
def kl_offset(m_x, m_y):
    """The reference offset ``m_x - m_y`` of the one-pass KL state (finite stand-ins for ``-inf`` maxima)."""
    return finite_ref(m_x) - finite_ref(m_y)


@triton.jit
def rescale_kl_sum(s, scale):
    """``s * scale`` for a part of the one-pass KL sum, with ``+inf`` kept ``+inf``: a part is infinite when it holds a
    column of positive weight where the other model's logit is ``-inf``, and its true scale ``exp(m_i - m)`` is
    positive even where it underflows to 0 (a later tile's maximum more than ~103 above), so ``inf * 0`` is ``inf``,
    never NaN."""
    return s * tl.where(s == float("inf"), 1.0, scale)


@triton.jit
def merge_kl(mx1, zx1, my1, zy1, s1, mx2, zx2, my2, zy2, s2):
    """Merge two one-pass KL states ``(m_x, z_x, m_y, z_y, s)``: the log-sum-exp states of the weighting logits ``x``
    and of the other logits ``y``, and ``s = sum exp(x - m_x) ((x - y) - (m_x - m_y))``.

    ``s`` is referenced to the difference of the maxima, so that a constant offset between the two models' logits
    (common: different models, different logit levels) never enters the sum, only the small per-element deviations
    from it; re-referencing a part to the merged maxima adds ``z_i ((m_xi - m_x) - (m_yi - m_y))``, a difference of
    maxima, not of large sums.
    """
    mx = tl.maximum(mx1, mx2)
    my = tl.maximum(my1, my2)
    rx, ry = finite_ref(mx), finite_ref(my)
    scale1 = tl.exp(mx1 - rx)
    scale2 = tl.exp(mx2 - rx)
    # z == 0 (a part with no finite x yet) contributes 0 whatever its offsets.
    shift1 = tl.where(zx1 > 0, zx1 * ((finite_ref(mx1) - rx) - (finite_ref(my1) - ry)), 0.0)
    shift2 = tl.where(zx2 > 0, zx2 * ((finite_ref(mx2) - rx) - (finite_ref(my2) - ry)), 0.0)
    _, zy = merge_lse(my1, zy1, my2, zy2)
    return mx, zx1 * scale1 + zx2 * scale2, my, zy, rescale_kl_sum(s1 + shift1, scale1) + \
        rescale_kl_sum(s2 + shift2, scale2)


@triton.jit
def online_kl_update(mx, zx, my, zy, s, x, y):
    """Fold tile ``(x, y)`` (masked lanes ``-inf`` in both) into the one-pass state of ``KL(softmax(x) ||
    softmax(y))`` (:func:`merge_kl`, :func:`finish_kl`), which holds both log-sum-exps as well.

    A lane with ``x = -inf`` (weight 0: masked lanes, a masked vocabulary) contributes nothing, even where ``y`` is
    ``-inf`` too (0 log 0 = 0); a lane with ``x`` finite and ``y = -inf`` makes the KL ``+inf``, as it is, even where
    its weight ``exp(x - m_x)`` underflows in float32 (its probability is positive all the same).
    """
    mx_tile = tl.max(x, axis=0)
    my_tile = tl.max(y, axis=0)
    e = tl.exp(x - finite_ref(mx_tile))
    weighted = x > float("-inf")
    unbounded = weighted & (y == float("-inf"))
    # x - y is formed only where both are finite (elsewhere both may be -inf); e is 0 on unweighted lanes.
    finite = weighted & (unbounded == 0)
    deviation = (tl.where(finite, x, 0.0) - tl.where(finite, y, 0.0)) - kl_offset(mx_tile, my_tile)
    s_tile = tl.sum(tl.where(unbounded, float("inf"), e * deviation), axis=0)
    zy_tile = tl.sum(tl.exp(y - finite_ref(my_tile)), axis=0)
    return merge_kl(mx, zx, my, zy, s, mx_tile, tl.sum(e, axis=0), my_tile, zy_tile, s_tile)


@triton.jit
def finish_kl(zx, zy, s):
    """``KL(softmax(x) || softmax(y)) = E[x - y] - (lse(x) - lse(y)) = s / z_x - (log z_x - log z_y)``: the offset
    ``m_x - m_y`` cancels exactly, so nothing of the size of the logits is subtracted (a per-element two-pass form
    subtracts log-sum-exps rounded at that size)."""
    return s / zx - (tl.log(zx) - tl.log(zy))


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
    ref = finite_ref(m_new)
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
