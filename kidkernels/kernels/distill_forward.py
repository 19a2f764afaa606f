"""Forward kernels of the distillation loss: one program per row, looping over the vocabulary in tiles.

Row statistics live in a ``[NUM_STATS, rows]`` float32 array (``stats``), one row of it per quantity:

    LSE_STUDENT  log-sum-exp of the tempered student logits a = s / T
    LSE_TEACHER  log-sum-exp of the tempered teacher logits b = t / T
    LSE_CE       log-sum-exp of the untempered student logits (the MLE term's normaliser)
    KD           the divergence of the row (0 on ignored rows)
    CE           the cross-entropy of the row (0 on ignored rows, NaN for an out-of-range target)
    CENTER       the row constant of the divergence gradient (see :mod:`.divergence`)

The first kernel needs only the maxima and sums; the second needs the final log-sum-exps to form exact
per-element terms (the one-pass ``E_q[a - b] - lse(a) + lse(b)`` form of a KL cancels catastrophically).

``HAS_TEACHER=False`` (the cross-entropy alone) compiles the teacher out: its pointer is never read, LSE_TEACHER is
not written, KD and CENTER are 0, and the second kernel reads only the target column of each row.
"""
import triton
import triton.language as tl

from .divergence import divergence_terms
from .online_softmax import finish_lse, online_lse_update

LSE_STUDENT = tl.constexpr(0)
LSE_TEACHER = tl.constexpr(1)
LSE_CE = tl.constexpr(2)
KD = tl.constexpr(3)
CE = tl.constexpr(4)
CENTER = tl.constexpr(5)
NUM_STATS = 6


@triton.jit
def distill_lse_kernel(
    s_ptr, s_row_stride, t_ptr, t_row_stride, stats_ptr, stat_stride,
    V, inv_temp,
    SEPARATE_CE_LSE: tl.constexpr, HAS_TEACHER: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Log-sum-exps of one row: tempered student, tempered teacher (``HAS_TEACHER``), and (when T != 1) untempered
    student."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_row_stride
    t_row = t_ptr + row * t_row_stride
    m_s = float("-inf")
    z_s = 0.0
    m_t = float("-inf")
    z_t = 0.0
    m_c = float("-inf")
    z_c = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        m_s, z_s = online_lse_update(m_s, z_s, s * inv_temp)
        if HAS_TEACHER:
            t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_t, z_t = online_lse_update(m_t, z_t, t * inv_temp)
        if SEPARATE_CE_LSE:
            m_c, z_c = online_lse_update(m_c, z_c, s)
    lse_s = finish_lse(m_s, z_s)
    tl.store(stats_ptr + LSE_STUDENT * stat_stride + row, lse_s)
    if HAS_TEACHER:
        tl.store(stats_ptr + LSE_TEACHER * stat_stride + row, finish_lse(m_t, z_t))
    if SEPARATE_CE_LSE:
        tl.store(stats_ptr + LSE_CE * stat_stride + row, finish_lse(m_c, z_c))
    else:
        tl.store(stats_ptr + LSE_CE * stat_stride + row, lse_s)


@triton.jit
def distill_value_kernel(
    s_ptr, s_row_stride, t_ptr, t_row_stride, target_ptr, stats_ptr, stat_stride,
    V, inv_temp, beta, log_beta, log_one_minus_beta, ignore_index,
    DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, HAS_MLE: tl.constexpr, HAS_TEACHER: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Divergence, gradient center and cross-entropy of one row, from the log-sum-exps of the first kernel."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_row_stride
    kd = 0.0
    center = 0.0
    if HAS_TEACHER:
        t_row = t_ptr + row * t_row_stride
        lse_s = tl.load(stats_ptr + LSE_STUDENT * stat_stride + row)
        lse_t = tl.load(stats_ptr + LSE_TEACHER * stat_stride + row)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
            logq = s * inv_temp - lse_s
            logp = t * inv_temp - lse_t
            kd_terms, center_terms = divergence_terms(logq, logp, beta, log_beta, log_one_minus_beta, DIVERGENCE)
            kd += tl.sum(tl.where(mask, kd_terms, 0.0), axis=0)
            center += tl.sum(tl.where(mask, center_terms, 0.0), axis=0)
    ce = 0.0
    if HAS_TARGET:
        tgt = tl.load(target_ptr + row)
        counted = tgt != ignore_index
        kd = tl.where(counted, kd, 0.0)
        if HAS_MLE:
            in_range = (tgt >= 0) & (tgt < V)
            s_tgt = tl.load(s_row + tgt, mask=in_range, other=0.0).to(tl.float32)
            lse_ce = tl.load(stats_ptr + LSE_CE * stat_stride + row)
            # An out-of-range target is caught by validation; should one reach the kernel, the row is NaN, not 0.
            ce = tl.where(counted, tl.where(in_range, lse_ce - s_tgt, float("nan")), 0.0)
    tl.store(stats_ptr + KD * stat_stride + row, kd)
    tl.store(stats_ptr + CE * stat_stride + row, ce)
    tl.store(stats_ptr + CENTER * stat_stride + row, center)
