"""GEMM-fused forward of the distillation loss (design A of ``shared/notes/fused-gemm.md``): per-tile partial states.

One program per (row block, vocabulary block) tile of a row chunk, ordered by :func:`.tile_product.swizzled_tile` so
that the ``GROUP_M`` row blocks of a group read each block of weight rows while it sits in L2.  A program forms its
tile of student logits ``s = x_s @ w_s.T + b_s`` (K = H_s) and, with a teacher, of teacher logits
``t = x_t @ w_t.T + b_t`` (K = H_t) in float32 accumulators (:func:`.tile_product.tile_logits`), never rounded, and
its epilogue reduces them along the vocabulary to one partial state per row (``partials_layout.py``):

* the log-sum-exp states of the tempered logits ``a = s / T`` and ``b = t / T``; for FKL and RKL the one-pass KL state
  instead (:func:`.tile_states.tile_kl_state`, the state ``distill_stats_kernel`` folds a row into), which holds both;
* the log-sum-exp state of the untempered ``s`` when T != 1 (``SEPARATE_CE_LSE``: the MLE term's normaliser);
* the argmax state of ``s`` (its largest value and lowest column: the row's TOP column, see ``stats_layout.py``);
* the logit ``s`` of the row's target, by the one program whose block holds it.

``STORE_TEACHER``: the teacher tile is also written, float32 as accumulated (bias added, untempered), into the
workspace ``[rows, V]`` the gradient kernel reads (the teacher's GEMM, K = H_t, is never recomputed).
``STORE_STUDENT`` (JSD and TVD, which need both final log-sum-exps before any per-element term): the student tile too,
for the value and gradient passes of the row kernels.  Only counted rows are written; the others' states and tiles are
never read.

Columns beyond the vocabulary (the ragged last block, whose product reads wrapped-around weight rows) become ``-inf``
before any reduction, as masked lanes must (``tile_states.py``); a ``-inf`` bias entry is a masked column like them.
The product becomes the logits in :func:`loss_logits` (bias, masking: what the tiles store, as the row kernels read
them).  Each model's logit scale and softcap (``S_HAS_*``, ``T_HAS_*``; :mod:`.logit_transform`) are applied right
after its tile is formed and stored, by :func:`transformed_logits`: the stored tiles stay raw (the gradient and value
passes transform them as they read them), the argmax state (TOP) is taken from the raw student logits (an increasing
transform cannot move the maximum), and every other state, the target's logit included, from the transformed ones,
through the temperature, ``a = z_s * inv_temp`` and ``b = z_t * inv_temp``.

Register budget (sm_90a, 8 warps): each float32 accumulator of a 128 x 128 tile is 64 registers per thread; with two
of them and this epilogue, 128 x 128 tiles reach all 255 registers and spill in some variants, so the loss forward
runs 128 x 64 tiles (``fused_tiles.LOSS_FORWARD``; 110-216 registers, none spilled, on Triton 3.6 and 3.9 as
``tools/compile_kernels.py`` reads them).  At most one tile is live through a product's K loop: the teacher's product
runs first; for JSD and TVD its tile is reduced (and stored) before the student's product starts, and only the KLs,
whose one-pass state needs both tiles at once, keep the teacher's tile live through the student's shorter product
(K = H_s) and its epilogue.
"""
import triton
import triton.language as tl

from . import partials_layout as layout
from .divergence import FKL, RKL
from .logit_transform import transform_logits
from .tile_product import swizzled_tile, tile_logits
from .tile_states import tile_argmax_state, tile_kl_state, tile_lse_state

M_STUDENT = tl.constexpr(layout.M_STUDENT)
Z_STUDENT = tl.constexpr(layout.Z_STUDENT)
M_TEACHER = tl.constexpr(layout.M_TEACHER)
Z_TEACHER = tl.constexpr(layout.Z_TEACHER)
KL_SUM = tl.constexpr(layout.KL_SUM)
M_CE = tl.constexpr(layout.M_CE)
Z_CE = tl.constexpr(layout.Z_CE)
BEST = tl.constexpr(layout.BEST)
BEST_INDEX = tl.constexpr(layout.BEST_INDEX)
TARGET_LOGIT = tl.constexpr(layout.TARGET_LOGIT)


@triton.jit
def loss_logits(acc, bias_ptr, cols, col_in, HAS_BIAS: tl.constexpr):
    """The untempered logits of a tile from its float32 product ``acc``: the bias added, ``-inf`` at the columns beyond
    the vocabulary (the one place where the product becomes the logits the loss reads)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_in[None, :], acc, float("-inf"))


@triton.jit
def transformed_logits(x, col_in, scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """A model's logits ``z`` of a tile of :func:`loss_logits`: its scale and softcap, and ``-inf`` again at the
    columns beyond the vocabulary (the cap maps ``-inf`` to ``-softcap``; a ``-inf`` bias inside the vocabulary
    becomes ``-softcap``, as in the row kernels and the reference).  A scale alone keeps ``-inf`` as it is."""
    z = x
    if HAS_SOFTCAP:
        z = tl.where(col_in[None, :], transform_logits(x, scale, softcap, HAS_SCALE, HAS_SOFTCAP), float("-inf"))
    elif HAS_SCALE:
        z = x * scale
    return z


@triton.jit
def _model_tile(x_ptr, x_row_stride, w_ptr, w_row_stride, bias_ptr, tile_ptr, tile_row_stride, R, V, K, row0, col0,
                rows, cols, col_in, counted, HAS_BIAS: tl.constexpr, STORE: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """One model's untempered logits of the tile (:func:`loss_logits` of its product); with ``STORE`` also written,
    float32 as accumulated, into the counted rows of the ``[R, V]`` workspace at ``tile_ptr``."""
    logits = loss_logits(tile_logits(x_ptr, x_row_stride, w_ptr, w_row_stride, R, V, K, row0, col0, BLOCK_M, BLOCK_N,
                                     BLOCK_K, EVEN_K, DOT_FP32, INPUT_PRECISION), bias_ptr, cols, col_in, HAS_BIAS)
    if STORE:
        tl.store(tile_ptr + rows[:, None].to(tl.int64) * tile_row_stride + cols[None, :], logits,
                 mask=counted[:, None] & col_in[None, :])
    return logits


@triton.jit
def _store_lse_state(part, plane_stride, m_plane, z_plane, x, counted):
    """The log-sum-exp state of each row of ``x`` into its two partial planes."""
    m, z = tile_lse_state(x)
    tl.store(part + m_plane * plane_stride, m, mask=counted)
    tl.store(part + z_plane * plane_stride, z, mask=counted)


@triton.jit
def distill_fused_forward_kernel(
    xs_ptr, xs_row_stride, ws_ptr, ws_row_stride, bs_ptr, xt_ptr, xt_row_stride, wt_ptr, wt_row_stride, bt_ptr,
    target_ptr, part_ptr, plane_stride, row_capacity, s_tile_ptr, s_tile_row_stride, t_tile_ptr, t_tile_row_stride,
    R, V, K_S, K_T, inv_temp, ignore_index, s_scale, s_softcap, t_scale, t_softcap,
    DIVERGENCE: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_TARGET: tl.constexpr, SEPARATE_CE_LSE: tl.constexpr,
    HAS_STUDENT_BIAS: tl.constexpr, HAS_TEACHER_BIAS: tl.constexpr, STORE_STUDENT: tl.constexpr,
    STORE_TEACHER: tl.constexpr, S_HAS_SCALE: tl.constexpr, S_HAS_SOFTCAP: tl.constexpr, T_HAS_SCALE: tl.constexpr,
    T_HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K_S: tl.constexpr, EVEN_K_T: tl.constexpr, DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """Partial states of one tile.  x_s ``[R, K_S]``, w_s ``[V, K_S]``, x_t ``[R, K_T]``, w_t ``[V, K_T]`` (unit
    stride along K), biases ``[V]`` (unit stride, any float dtype), target ``[R]`` int64; partials float32
    ``[NUM_PARTIALS, num_vocab_blocks, row_capacity]`` (``plane_stride`` between quantities, ``row_capacity`` between
    blocks, rows contiguous); tiles float32 ``[R, V]`` (unit stride along V)."""
    row_block, col_block = swizzled_tile(tl.program_id(0), tl.cdiv(R, BLOCK_M), tl.cdiv(V, BLOCK_N), GROUP_M)
    row0 = row_block * BLOCK_M
    col0 = col_block * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = col0 + tl.arange(0, BLOCK_N)
    row_in = rows < R
    col_in = cols < V
    counted = row_in
    tgt = tl.zeros([BLOCK_M], dtype=tl.int64)
    if HAS_TARGET:
        tgt = tl.load(target_ptr + rows, mask=row_in, other=ignore_index).to(tl.int64)
        counted = row_in & (tgt != ignore_index)
    # This tile's states of each row: one float per quantity, rows contiguous.
    part = part_ptr + col_block.to(tl.int64) * row_capacity + rows
    if HAS_TEACHER:
        # The teacher's tile first (K = H_t, the long product): for JSD and TVD it is done with before the student's
        # product starts; for the KLs it stays live through the student's (K = H_s) and its epilogue.
        t = _model_tile(xt_ptr, xt_row_stride, wt_ptr, wt_row_stride, bt_ptr, t_tile_ptr, t_tile_row_stride, R, V,
                        K_T, row0, col0, rows, cols, col_in, counted, HAS_TEACHER_BIAS, STORE_TEACHER, BLOCK_M,
                        BLOCK_N, BLOCK_K, EVEN_K_T, DOT_FP32, INPUT_PRECISION)
        t = transformed_logits(t, col_in, t_scale, t_softcap, T_HAS_SCALE, T_HAS_SOFTCAP)
        if DIVERGENCE != FKL and DIVERGENCE != RKL:
            _store_lse_state(part, plane_stride, M_TEACHER, Z_TEACHER, t * inv_temp, counted)
    s = _model_tile(xs_ptr, xs_row_stride, ws_ptr, ws_row_stride, bs_ptr, s_tile_ptr, s_tile_row_stride, R, V, K_S,
                    row0, col0, rows, cols, col_in, counted, HAS_STUDENT_BIAS, STORE_STUDENT, BLOCK_M, BLOCK_N,
                    BLOCK_K, EVEN_K_S, DOT_FP32, INPUT_PRECISION)
    best, best_index = tile_argmax_state(s, cols)  # of the raw logits
    tl.store(part + BEST * plane_stride, best, mask=counted)
    tl.store(part + BEST_INDEX * plane_stride, best_index.to(tl.float32), mask=counted)
    s = transformed_logits(s, col_in, s_scale, s_softcap, S_HAS_SCALE, S_HAS_SOFTCAP)
    if HAS_TARGET:
        # the one block that holds a row's target writes its logit, at that block's slot
        here = counted & (tgt >= col0) & (tgt < col0 + BLOCK_N) & (tgt < V)
        s_tgt = tl.sum(tl.where(cols[None, :] == tgt[:, None], s, 0.0), axis=1)
        tl.store(part + TARGET_LOGIT * plane_stride, s_tgt, mask=here)
    if SEPARATE_CE_LSE:
        _store_lse_state(part, plane_stride, M_CE, Z_CE, s, counted)
    a = s * inv_temp
    if HAS_TEACHER and (DIVERGENCE == FKL or DIVERGENCE == RKL):
        b = t * inv_temp
        if DIVERGENCE == RKL:
            m_s, z_s, m_t, z_t, kl = tile_kl_state(a, b)
        else:
            m_t, z_t, m_s, z_s, kl = tile_kl_state(b, a)
        tl.store(part + M_STUDENT * plane_stride, m_s, mask=counted)
        tl.store(part + Z_STUDENT * plane_stride, z_s, mask=counted)
        tl.store(part + M_TEACHER * plane_stride, m_t, mask=counted)
        tl.store(part + Z_TEACHER * plane_stride, z_t, mask=counted)
        tl.store(part + KL_SUM * plane_stride, kl, mask=counted)
    else:
        _store_lse_state(part, plane_stride, M_STUDENT, Z_STUDENT, a, counted)
