"""GEMM-fused gradient of the distillation loss w.r.t. the student logits (design A' of ``shared/notes/fused-gemm.md``).

One program per (row block, vocabulary block) tile of a row chunk, ordered by :func:`.tile_product.swizzled_tile`.
Each program recomputes its tile of student logits ``x @ w.T + bias`` in a float32 accumulator
(:func:`.tile_product.tile_logits`, K = H_s: cheap), reads the same tile of the teacher's logits that the fused forward
kept (float32, bias added, untempered, exactly as accumulated) and the rows' statistics (``[NUM_STATS, rows]``,
complete: see ``stats_layout.py``), forms each element's gradient with :func:`.distill_grad_terms.distill_logit_grad`
(the row kernel's formula), weights it by the row weight and stores it in the dtype of ``grad_ptr`` (the input dtype,
rounded once) from the epilogue.  Ignored rows (and, without a target, no row) are written as zeros; their
statistics are all 0 and their tile is never used.

The column of the student's largest logit (TOP) is written as minus the sum of the row's other elements, as the row
kernel writes it (the terms sum to 0 over the row; where the student is confident, the per-element formula loses the
small difference ``q_top - p_top``, ``softmax_top - 1`` in float32).  No program holds a whole row, so each writes
the sum of its tile's other elements per row into ``partial_ptr`` ``[rows, num_vocab_blocks]`` float32 and skips the
TOP element of counted rows; :func:`distill_fused_top_kernel` then sums each counted row's partials and writes its TOP
element.

With a logit scale or softcap (``S_HAS_*`` for the student, ``T_HAS_*`` for the teacher; :mod:`.logit_transform`)
the recomputed student tile (bias added) is transformed with its chain-rule factor ``dz/ds``, and the stored teacher
tile (raw: bias added, untempered) is transformed as it is read, as the row kernel reads its logits.  The formula then
gives ``dz``, the gradient with respect to the transformed logits; the stored elements are ``dz * dz/ds``, while the
partial sums, and so the fix-up, stay sums of ``dz`` (it is ``dz`` whose row sums to 0), and TOP is written as
``-sum * dz/ds`` at its own raw logit.  That factor is a constant (the scale) without a softcap; with one, the program
whose tile holds a row's TOP column, which has the raw logit in its accumulator, stores its factor in
``top_slope_ptr`` ``[rows]`` for the fix-up (4 B per row, where recomputing the one dot product ``x[row] . w[TOP]``
in the fix-up would re-read a weight row per row).

``grad_ptr`` may alias ``t_ptr`` (float32 inputs, grad_out written over the teacher tile): each element is stored by
the program that loaded it, after the load it depends on, and the TOP elements of counted rows, which the fix-up
writes later, are never stored by the first kernel.  ``HAS_TEACHER=False`` (the cross-entropy alone) compiles the
teacher out; its pointer is never read.
"""
import triton
import triton.language as tl

from .distill_forward import CENTER, CENTER_2, LOGZ_STUDENT, LOGZ_TEACHER, LSE_CE, MAX_STUDENT, MAX_TEACHER, TOP
from .distill_grad_terms import distill_logit_grad
from .logit_transform import transform_logits, transform_logits_and_slope
from .tile_product import swizzled_tile, tile_logits


@triton.jit
def _row_stat(stats_ptr, stat_stride, which, rows, row_in):
    """One statistic of the tile's rows as a ``[BLOCK_M, 1]`` column (0 beyond the chunk)."""
    return tl.load(stats_ptr + which * stat_stride + rows, mask=row_in, other=0.0)[:, None]


@triton.jit
def counted_rows(target_ptr, rows, row_in, ignore_index, HAS_TARGET: tl.constexpr):
    """``(counted, target)`` of the rows of a tile: in the chunk and, with a target, not ``ignore_index``."""
    tgt = tl.full(rows.shape, -1, tl.int64)
    counted = row_in
    if HAS_TARGET:
        tgt = tl.load(target_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
        counted = row_in & (tgt != ignore_index)
    return counted, tgt


@triton.jit
def distill_fused_grad_kernel(
    x_ptr, x_row_stride, w_ptr, w_row_stride, bias_ptr, t_ptr, t_row_stride, target_ptr, stats_ptr, stat_stride,
    row_weight_ptr, row_weight_stride, grad_ptr, grad_row_stride, partial_ptr, partial_row_stride, top_slope_ptr,
    R, V, K, inv_temp, beta, log_beta, log_one_minus_beta, kd_scale, mle_weight, ignore_index,
    s_scale, s_softcap, t_scale, t_softcap,
    DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_MLE: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr,
    HAS_TEACHER: tl.constexpr, HAS_BIAS: tl.constexpr, SEPARATE_CE_LSE: tl.constexpr, S_HAS_SCALE: tl.constexpr,
    S_HAS_SOFTCAP: tl.constexpr, T_HAS_SCALE: tl.constexpr, T_HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Gradient tile ``grad[rows, cols]`` of x ``[R, K]``, w ``[V, K]`` (unit stride along K), bias ``[V]``, teacher
    ``[R, V]`` float32 (unit stride along V), target ``[R]`` int64, stats ``[NUM_STATS, R]`` float32, row weight
    ``[R]``; writes ``partial[rows, col_block]`` (the tile's sum of each row's gradient elements with respect to the
    transformed logits, other than TOP) and, with a softcap, ``top_slope[row]`` for the rows whose TOP is in the
    tile."""
    row_block, col_block = swizzled_tile(tl.program_id(0), tl.cdiv(R, BLOCK_M), tl.cdiv(V, BLOCK_N), GROUP_M)
    row0 = row_block * BLOCK_M
    col0 = col_block * BLOCK_N
    s = tile_logits(x_ptr, x_row_stride, w_ptr, w_row_stride, R, V, K, row0, col0,
                    BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_FP32, INPUT_PRECISION)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    # The tiles of the teacher and of the gradient addressed by 32-bit offsets from their corner (BLOCK_M times a row
    # stride is below 2**31: fewer live 64-bit values in the epilogue).
    tile_offsets = tl.arange(0, BLOCK_M)[:, None] * t_row_stride + tl.arange(0, BLOCK_N)[None, :]
    row_in = rows < R
    col_in = cols < V
    inside = row_in[:, None] & col_in[None, :]
    if HAS_BIAS:
        s += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    s, slope = transform_logits_and_slope(s, s_scale, s_softcap, S_HAS_SCALE, S_HAS_SOFTCAP)
    counted, tgt = counted_rows(target_ptr, rows, row_in, ignore_index, HAS_TARGET)
    t = s  # not read without a teacher
    center = 0.0
    center_2 = 0.0
    m_t = 0.0
    logz_t = 0.0
    if HAS_TEACHER:
        t = transform_logits(tl.load(t_ptr + row0.to(tl.int64) * t_row_stride + col0 + tile_offsets, mask=inside,
                                     other=0.0), t_scale, t_softcap, T_HAS_SCALE, T_HAS_SOFTCAP)
        m_t = _row_stat(stats_ptr, stat_stride, MAX_TEACHER, rows, row_in)
        logz_t = _row_stat(stats_ptr, stat_stride, LOGZ_TEACHER, rows, row_in)
        center = _row_stat(stats_ptr, stat_stride, CENTER, rows, row_in)
        center_2 = _row_stat(stats_ptr, stat_stride, CENTER_2, rows, row_in)
    lse_c = 0.0
    if SEPARATE_CE_LSE:
        lse_c = _row_stat(stats_ptr, stat_stride, LSE_CE, rows, row_in)
    g = distill_logit_grad(s, t, cols[None, :] == tgt[:, None],
                           _row_stat(stats_ptr, stat_stride, MAX_STUDENT, rows, row_in),
                           _row_stat(stats_ptr, stat_stride, LOGZ_STUDENT, rows, row_in),
                           m_t, logz_t, lse_c, center, center_2, inv_temp, beta, log_beta, log_one_minus_beta,
                           kd_scale, mle_weight, DIVERGENCE, HAS_TEACHER, HAS_MLE, SEPARATE_CE_LSE)
    if HAS_ROW_WEIGHT:
        g = g * tl.load(row_weight_ptr + rows * row_weight_stride, mask=row_in, other=0.0).to(tl.float32)[:, None]
    top = tl.load(stats_ptr + TOP * stat_stride + rows, mask=row_in, other=0.0).to(tl.int32)
    at_top = cols[None, :] == top[:, None]
    # Ignored rows are 0 everywhere (their statistics are 0: the formula's value there is meaningless).
    g = tl.where(counted[:, None], g, 0.0)
    rest = inside & ((at_top & counted[:, None]) == 0)
    stored = g
    if S_HAS_SCALE or S_HAS_SOFTCAP:
        stored = g * slope
    g_offsets = tl.arange(0, BLOCK_M)[:, None] * grad_row_stride + tl.arange(0, BLOCK_N)[None, :]
    tl.store(grad_ptr + row0.to(tl.int64) * grad_row_stride + col0 + g_offsets, stored.to(grad_ptr.dtype.element_ty),
             mask=rest)
    tl.store(partial_ptr + rows.to(tl.int64) * partial_row_stride + col_block,
             tl.sum(tl.where(rest, g, 0.0), axis=1), mask=row_in)
    if S_HAS_SOFTCAP:
        top_here = row_in & (top >= col0) & (top < col0 + BLOCK_N)
        tl.store(top_slope_ptr + rows, tl.sum(tl.where(at_top, slope, 0.0), axis=1), mask=top_here)


@triton.jit
def distill_fused_top_kernel(
    partial_ptr, partial_row_stride, top_slope_ptr, target_ptr, stats_ptr, stat_stride, grad_ptr, grad_row_stride,
    R, num_blocks, ignore_index, s_scale,
    HAS_TARGET: tl.constexpr, S_HAS_SCALE: tl.constexpr, S_HAS_SOFTCAP: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """``grad[row, TOP] = -sum(partial[row, :]) * dz/ds(TOP)`` for the counted rows of one block of ``BLOCK_R`` rows
    (the factor: ``top_slope[row]`` with a softcap, ``s_scale`` with a scale alone, else 1)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_in = rows < R
    counted, _ = counted_rows(target_ptr, rows, row_in, ignore_index, HAS_TARGET)
    row_base = partial_ptr + rows.to(tl.int64)[:, None] * partial_row_stride
    total = tl.zeros([BLOCK_R], dtype=tl.float32)
    for b0 in range(0, num_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        part = tl.load(row_base + blocks[None, :], mask=counted[:, None] & (blocks < num_blocks)[None, :], other=0.0)
        total += tl.sum(part, axis=1)
    if S_HAS_SOFTCAP:
        total = total * tl.load(top_slope_ptr + rows, mask=counted, other=0.0)
    elif S_HAS_SCALE:
        total = total * s_scale
    top = tl.load(stats_ptr + TOP * stat_stride + rows, mask=row_in, other=0.0).to(tl.int64)
    tl.store(grad_ptr + rows.to(tl.int64) * grad_row_stride + top, (-total).to(grad_ptr.dtype.element_ty),
             mask=counted)
