"""Backward kernel of the distillation loss: d(row loss)/d(student logits), one program per row.

    ds_j = w * ( kd_weight / T * dD/da_j + mle_weight * (softmax(s)_j - [j == target]) )

with ``w`` the row's weight (the upstream gradient for ``reduction="none"``, 1 otherwise) and 0 on ignored rows, so
every element of the gradient row is written, ignored rows included.  The gradient is stored in the dtype of
``grad_ptr`` (the student's input dtype, ready for the gradient matmuls); it may alias the student logits when
those are float32, since each element is read before it is overwritten by the same lane.  ``HAS_TEACHER=False``
(the cross-entropy alone) compiles the divergence term out and never reads the teacher pointer.
"""
import triton
import triton.language as tl

from .distill_forward import CENTER, LSE_CE, LSE_STUDENT, LSE_TEACHER
from .divergence import divergence_grad


@triton.jit
def distill_grad_kernel(
    s_ptr, s_row_stride, t_ptr, t_row_stride, target_ptr, stats_ptr, stat_stride,
    row_weight_ptr, row_weight_stride, grad_ptr, grad_row_stride,
    V, inv_temp, beta, log_beta, log_one_minus_beta, kd_scale, mle_weight, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_MLE: tl.constexpr,
    HAS_ROW_WEIGHT: tl.constexpr, HAS_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_row_stride
    t_row = t_ptr + row * t_row_stride
    g_row = grad_ptr + row * grad_row_stride
    if HAS_TEACHER:
        lse_s = tl.load(stats_ptr + LSE_STUDENT * stat_stride + row)
        lse_t = tl.load(stats_ptr + LSE_TEACHER * stat_stride + row)
        center = tl.load(stats_ptr + CENTER * stat_stride + row)
    lse_ce = tl.load(stats_ptr + LSE_CE * stat_stride + row)
    w = 1.0
    if HAS_ROW_WEIGHT:
        w = tl.load(row_weight_ptr + row * row_weight_stride).to(tl.float32)
    tgt = -1
    if HAS_TARGET:
        tgt = tl.load(target_ptr + row)
        w = tl.where(tgt != ignore_index, w, 0.0)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_TEACHER:
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            logq = s * inv_temp - lse_s
            logp = t * inv_temp - lse_t
            g = kd_scale * divergence_grad(logq, logp, center, beta, log_beta, log_one_minus_beta, DIVERGENCE)
        else:
            g = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_MLE:
            g += mle_weight * (tl.exp(s - lse_ce) - tl.where(cols == tgt, 1.0, 0.0))
        tl.store(g_row + cols, (w * g).to(grad_ptr.dtype.element_ty), mask=mask)
