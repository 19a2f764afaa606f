"""Merge of the GEMM-fused loss forward: each row's partial states over the vocabulary blocks -> its row statistics.

The partials of :func:`.distill_fused_forward.distill_fused_forward_kernel` (``partials_layout.py``: one plane per
quantity, vocabulary block major, rows contiguous) are read as ``[BLOCK_R, BLOCK_B]`` slabs (consecutive rows in
consecutive memory: coalesced) and merged into each row's running state with the online softmax's merge functions:
``merge_lse`` and ``merge_kl`` re-reference every block's state to the slab's maxima (a merge with an empty state
there, elementwise over the slab), after which merging is adding (``tl.sum``), and the argmax takes the first block
that holds the slab's maximum (``tile_argmax_state`` over the blocks: a block's columns all lie below the next
block's).  Each state is rescaled once per slab, by one exponential, in parallel over the slab; the result is that of
merging the blocks one by one, up to float32 rounding (exactly, for the argmax).  A ``tl.reduce`` with the merges as
its combine function would give the same, but the Triton interpreter runs such a reduction element by element in
Python (3.5 s for the KL merge of 13 rows over 32 blocks, against 0.15 s for this form), and on the GPU it rescales a
state once per level of its tree.  Lanes past the last block load empty states: ``(-inf, 0)`` for a log-sum-exp,
``(-inf, 0, -inf, 0, 0)`` for the one-pass KL state, ``-inf`` for the argmax (which then picks the slab's first
block: a row of ``-inf`` logits gets column 0, as the row kernel gives).

The statistics are written exactly as :func:`.distill_forward.distill_stats_kernel` writes them (``stats_layout.py``):
MAX/LOGZ of both models, LSE_CE, TOP and CE for every counted row; KD, CENTER and CENTER_2 for FKL, RKL and the
cross-entropy alone (JSD and TVD get theirs from the value pass over the stored tiles); every statistic 0 on ignored
rows; CE NaN for a target outside the vocabulary (caught earlier by validation; never silently 0).
"""
import triton
import triton.language as tl

from .distill_forward import (
    CE,
    CENTER,
    CENTER_2,
    KD,
    LOGZ_STUDENT,
    LOGZ_TEACHER,
    LSE_CE,
    MAX_STUDENT,
    MAX_TEACHER,
    NUM_STATS,
    TOP,
)
from .distill_fused_forward import (
    BEST,
    BEST_INDEX,
    KL_SUM,
    M_CE,
    M_STUDENT,
    M_TEACHER,
    TARGET_LOGIT,
    Z_CE,
    Z_STUDENT,
    Z_TEACHER,
)
from .divergence import FKL, RKL
from .online_softmax import finish_kl, finish_lse, kl_offset, merge_kl, merge_lse
from .stats_layout import MAX_VOCAB
from .tile_states import merge_argmax, tile_argmax_state

# The argmax merge's identity index: above every column (vocabularies are below 2**24 columns, exact in float32).
NO_INDEX = tl.constexpr(MAX_VOCAB)


@triton.jit
def _merge_lse_slab(m, z, slab_m, slab_z):
    """The running log-sum-exp states ``[BLOCK_R]`` merged with a slab's ``[BLOCK_R, BLOCK_B]``: each block's state is
    re-referenced to the slab's maximum (``merge_lse`` with an empty state there), then the sums are added."""
    top = tl.max(slab_m, axis=1)
    _, z_ref = merge_lse(slab_m, slab_z, top[:, None], 0.0)
    return merge_lse(m, z, top, tl.sum(z_ref, axis=1))


@triton.jit
def _merge_kl_slab(mx, zx, my, zy, s, slab_mx, slab_zx, slab_my, slab_zy, slab_s):
    """The running one-pass KL states ``[BLOCK_R]`` merged with a slab's ``[BLOCK_R, BLOCK_B]``, as
    :func:`_merge_lse_slab`: ``merge_kl`` re-references each block's state to the slab's maxima of both models, where
    merging is adding."""
    top_x = tl.max(slab_mx, axis=1)
    top_y = tl.max(slab_my, axis=1)
    _, zx_ref, _, zy_ref, s_ref = merge_kl(slab_mx, slab_zx, slab_my, slab_zy, slab_s, top_x[:, None], 0.0,
                                           top_y[:, None], 0.0, 0.0)
    return merge_kl(mx, zx, my, zy, s, top_x, tl.sum(zx_ref, axis=1), top_y, tl.sum(zy_ref, axis=1),
                    tl.sum(s_ref, axis=1))


@triton.jit
def _merge_argmax_slab(best, index, slab_best, slab_index, blocks):
    """The running argmax states ``[BLOCK_R]`` merged with a slab's: a block's columns all lie below the next block's,
    so the first block holding the slab's maximum (or its first NaN), found by ``tile_argmax_state`` over the blocks,
    holds the lowest column among the slab's ties."""
    slab_top, first = tile_argmax_state(slab_best, blocks)
    at = tl.sum(tl.where(blocks[None, :] == first[:, None], slab_index, 0), axis=1)
    return merge_argmax(best, index, slab_top, at)


@triton.jit
def distill_fused_merge_kernel(
    part_ptr, plane_stride, row_capacity, target_ptr, stats_ptr, stat_stride,
    R, V, num_blocks, block_n, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_TARGET: tl.constexpr, SEPARATE_CE_LSE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """Statistics ``[NUM_STATS, R]`` (``stat_stride`` between quantities) of rows ``pid * BLOCK_R ...`` from the
    partials ``[NUM_PARTIALS, num_blocks, row_capacity]`` of a forward whose vocabulary blocks are ``block_n``
    columns wide; target ``[R]`` int64."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < R
    counted = row_in
    tgt = tl.zeros([BLOCK_R], dtype=tl.int64)
    if HAS_TARGET:
        tgt = tl.load(target_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
        counted = row_in & (tgt != ignore_index)
    one_pass = (not HAS_TEACHER) or DIVERGENCE == FKL or DIVERGENCE == RKL
    m_s = tl.full([BLOCK_R], float("-inf"), tl.float32)
    z_s = tl.zeros([BLOCK_R], tl.float32)
    m_t = tl.full([BLOCK_R], float("-inf"), tl.float32)
    z_t = tl.zeros([BLOCK_R], tl.float32)
    kl = tl.zeros([BLOCK_R], tl.float32)
    m_c = tl.full([BLOCK_R], float("-inf"), tl.float32)
    z_c = tl.zeros([BLOCK_R], tl.float32)
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    top = tl.full([BLOCK_R], NO_INDEX, tl.int32)
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        inside = counted[:, None] & (blocks < num_blocks)[None, :]
        slab = part_ptr + blocks.to(tl.int64)[None, :] * row_capacity + rows[:, None]
        # one quantity's states: tl.load(slab + QUANTITY * plane_stride), the merges' empty state outside
        s_m = tl.load(slab + M_STUDENT * plane_stride, mask=inside, other=float("-inf"))
        s_z = tl.load(slab + Z_STUDENT * plane_stride, mask=inside, other=0.0)
        if HAS_TEACHER:
            t_m = tl.load(slab + M_TEACHER * plane_stride, mask=inside, other=float("-inf"))
            t_z = tl.load(slab + Z_TEACHER * plane_stride, mask=inside, other=0.0)
            if DIVERGENCE == FKL or DIVERGENCE == RKL:
                slab_kl = tl.load(slab + KL_SUM * plane_stride, mask=inside, other=0.0)
                if DIVERGENCE == RKL:  # the one-pass KL state of the weighting model x (the student) and the other y
                    m_s, z_s, m_t, z_t, kl = _merge_kl_slab(m_s, z_s, m_t, z_t, kl, s_m, s_z, t_m, t_z, slab_kl)
                else:  # x the teacher
                    m_t, z_t, m_s, z_s, kl = _merge_kl_slab(m_t, z_t, m_s, z_s, kl, t_m, t_z, s_m, s_z, slab_kl)
            else:
                m_s, z_s = _merge_lse_slab(m_s, z_s, s_m, s_z)
                m_t, z_t = _merge_lse_slab(m_t, z_t, t_m, t_z)
        else:
            m_s, z_s = _merge_lse_slab(m_s, z_s, s_m, s_z)
        if SEPARATE_CE_LSE:
            m_c, z_c = _merge_lse_slab(m_c, z_c, tl.load(slab + M_CE * plane_stride, mask=inside, other=float("-inf")),
                                       tl.load(slab + Z_CE * plane_stride, mask=inside, other=0.0))
        slab_best = tl.load(slab + BEST * plane_stride, mask=inside, other=float("-inf"))
        slab_index = tl.load(slab + BEST_INDEX * plane_stride, mask=inside, other=NO_INDEX).to(tl.int32)
        best, top = _merge_argmax_slab(best, top, slab_best, slab_index, blocks)

    # Rows not counted keep the start states: z = 1 there keeps their (unstored) values free of log(0) and 0 / 0.
    z_s = tl.where(counted, z_s, 1.0)
    z_t = tl.where(counted, z_t, 1.0)
    z_c = tl.where(counted, z_c, 1.0)
    lse_c = finish_lse(m_s, z_s)
    if SEPARATE_CE_LSE:
        lse_c = finish_lse(m_c, z_c)
    tl.store(stats_ptr + MAX_STUDENT * stat_stride + rows, m_s, mask=counted)
    tl.store(stats_ptr + LOGZ_STUDENT * stat_stride + rows, tl.log(z_s), mask=counted)
    tl.store(stats_ptr + LSE_CE * stat_stride + rows, lse_c, mask=counted)
    tl.store(stats_ptr + TOP * stat_stride + rows, top.to(tl.float32), mask=counted)
    if HAS_TEACHER:
        tl.store(stats_ptr + MAX_TEACHER * stat_stride + rows, m_t, mask=counted)
        tl.store(stats_ptr + LOGZ_TEACHER * stat_stride + rows, tl.log(z_t), mask=counted)
    if one_pass:
        kd = tl.zeros([BLOCK_R], tl.float32)
        center = tl.zeros([BLOCK_R], tl.float32)
        center_2 = tl.zeros([BLOCK_R], tl.float32)
        if HAS_TEACHER:
            if DIVERGENCE == RKL:
                kd = finish_kl(z_s, z_t, kl)
                center = kl / z_s  # E_q[a - b] - (m_s - m_t): the gradient's center, split in two
                center_2 = kl_offset(m_s, m_t)
            else:
                kd = finish_kl(z_t, z_s, kl)
        tl.store(stats_ptr + KD * stat_stride + rows, kd, mask=counted)
        tl.store(stats_ptr + CENTER * stat_stride + rows, center, mask=counted)
        tl.store(stats_ptr + CENTER_2 * stat_stride + rows, center_2, mask=counted)
    ce = tl.zeros([BLOCK_R], tl.float32)
    if HAS_TARGET:
        in_range = counted & (tgt >= 0) & (tgt < V)
        # the target's logit, in the slot of the one block that holds it
        s_tgt = tl.load(part_ptr + TARGET_LOGIT * plane_stride + (tgt // block_n) * row_capacity + rows,
                        mask=in_range, other=0.0)
        # An out-of-range target is caught by validation; should one reach the kernel, the row is NaN, not 0.
        ce = tl.where(in_range, lse_c - s_tgt, float("nan"))
    tl.store(stats_ptr + CE * stat_stride + rows, ce, mask=counted)
    ignored = row_in & (counted == 0)
    for k in tl.static_range(NUM_STATS):
        tl.store(stats_ptr + k * stat_stride + rows, tl.zeros([BLOCK_R], tl.float32), mask=ignored)
