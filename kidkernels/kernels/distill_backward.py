"""Backward kernel of the distillation loss: d(row loss)/d(student logits), one program per row.

    ds_j = w * ( kd_weight / T * dD/da_j + mle_weight * (softmax(s)_j - [j == target]) )

with ``w`` the row's weight (the upstream gradient for ``reduction="none"``, 1 / the mean's denominator for "mean",
1 for "sum").  Every element of the gradient row is written; ignored rows are written as zeros without reading the
logits.  The gradient is stored in the dtype of ``grad_ptr`` (the student's input dtype, ready for the gradient
matmuls); it may alias the student logits when those are float32, since each element is read before it is overwritten
by the same lane.  ``HAS_TEACHER=False`` (the cross-entropy alone) compiles the divergence term out and never reads the
teacher pointer.

The column of the student's largest logit (TOP) is written last, as minus the sum of the row's other elements: every
term sums to 0 over the row, and where the student is confident its largest element is the small difference of terms
close to 1 (``q_top - p_top``, ``softmax_top - 1``, ...) that the per-element formula would lose in float32.  At T = 1
the MLE term's softmax is the divergence's q: one exponential per element, not two.

With a logit scale or softcap (``S_HAS_SCALE``, ``S_HAS_SOFTCAP``) the formula above is the gradient ``dz_j`` with
respect to the *transformed* logits ``z`` (``logit_transform.py``), and the stored gradient is ``dz_j * dz_j/ds_j``.
The factor differs from column to column, so the trick is applied to ``dz`` (whose row sums to 0), not to the stored
values: the other columns' ``dz`` are summed, and TOP gets ``-sum * dz_top/ds_top`` from its own raw logit.
"""
import triton
import triton.language as tl

from .distill_forward import CENTER, CENTER_2, LSE_CE, TOP, load_log_normalisers
from .distill_grad_terms import distill_logit_grad
from .logit_transform import transform_logits, transform_logits_and_slope


@triton.jit
def distill_grad_kernel(
    s_ptr, s_row_stride, t_ptr, t_row_stride, target_ptr, stats_ptr, stat_stride,
    row_weight_ptr, row_weight_stride, grad_ptr, grad_row_stride,
    V, inv_temp, beta, log_beta, log_one_minus_beta, kd_scale, mle_weight, ignore_index,
    s_scale, s_softcap, t_scale, t_softcap,
    DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_MLE: tl.constexpr, HAS_ROW_WEIGHT: tl.constexpr,
    HAS_TEACHER: tl.constexpr, SEPARATE_CE_LSE: tl.constexpr, S_HAS_SCALE: tl.constexpr,
    S_HAS_SOFTCAP: tl.constexpr, T_HAS_SCALE: tl.constexpr, T_HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    g_row = grad_ptr + row * grad_row_stride
    counted = True
    tgt = -1
    if HAS_TARGET:
        tgt = tl.load(target_ptr + row)
        counted = tgt != ignore_index
    if counted:
        s_row = s_ptr + row * s_row_stride
        t_row = t_ptr + row * t_row_stride
        m_s, logz_s, m_t, logz_t = load_log_normalisers(stats_ptr, stat_stride, row, HAS_TEACHER)
        lse_c = tl.load(stats_ptr + LSE_CE * stat_stride + row)
        top = tl.load(stats_ptr + TOP * stat_stride + row).to(tl.int32)
        center = 0.0
        center_2 = 0.0
        if HAS_TEACHER:
            center = tl.load(stats_ptr + CENTER * stat_stride + row)
            center_2 = tl.load(stats_ptr + CENTER_2 * stat_stride + row)
        w = 1.0
        if HAS_ROW_WEIGHT:
            w = tl.load(row_weight_ptr + row * row_weight_stride).to(tl.float32)
        rest = 0.0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            s, slope = transform_logits_and_slope(tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32),
                                                  s_scale, s_softcap, S_HAS_SCALE, S_HAS_SOFTCAP)
            t = s  # not read without a teacher
            if HAS_TEACHER:
                t = transform_logits(tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32), t_scale, t_softcap,
                                     T_HAS_SCALE, T_HAS_SOFTCAP)
            g = w * distill_logit_grad(s, t, cols == tgt, m_s, logz_s, m_t, logz_t, lse_c, center, center_2,
                                       inv_temp, beta, log_beta, log_one_minus_beta, kd_scale, mle_weight,
                                       DIVERGENCE, HAS_TEACHER, HAS_MLE, SEPARATE_CE_LSE)
            rest_lanes = mask & (cols != top)
            tl.store(g_row + cols, (g * slope).to(grad_ptr.dtype.element_ty), mask=rest_lanes)
            rest += tl.sum(tl.where(rest_lanes, g, 0.0), axis=0)
        top_slope = 1.0
        if S_HAS_SCALE or S_HAS_SOFTCAP:
            _, top_slope = transform_logits_and_slope(tl.load(s_row + top).to(tl.float32), s_scale, s_softcap,
                                                      S_HAS_SCALE, S_HAS_SOFTCAP)
        tl.store(g_row + top, (-rest * top_slope).to(grad_ptr.dtype.element_ty))
    else:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            tl.store(g_row + cols, tl.zeros([BLOCK_V], dtype=grad_ptr.dtype.element_ty), mask=cols < V)
