"""Forward kernels of the distillation loss: one program per row, looping over the vocabulary in tiles.

Row statistics live in a ``[NUM_STATS, rows]`` float32 array laid out as :mod:`.stats_layout` defines.

* :func:`distill_stats_kernel` (every loss): one pass over the row for the log-sum-exps, the column of the student's
  largest logit and the cross-entropy; for FKL and RKL the divergence and its gradient center too, from the one-pass
  state ``s = sum exp(x - m_x) ((x - y) - (m_x - m_y))`` (``KL = s / z_x - log(z_x / z_y)``, see
  ``online_softmax.merge_kl``), as accurate as the per-element two-pass form and more where the two models' logits
  differ by an offset.
* :func:`distill_value_kernel` (JSD and TVD only): a second pass, which needs the final log-sum-exps to form each
  element's mixture or ``|p - q|``, for the divergence and its centers.

Each model's logits are read through its logit scale and softcap (``logit_transform.transform_logits``; the ``S_*``
and ``T_*`` flags compile it out when unused): ``s`` and ``t`` below are the transformed logits, tempered for the
divergence, untempered for the cross-entropy.  TOP is the column of the largest *raw* student logit (the transform is
increasing; a saturated cap could only tie it).

Rows whose target is ``ignore_index`` are not swept: their statistics are written as 0.  ``HAS_TEACHER=False`` (the
cross-entropy alone) compiles the teacher out: its pointer is never read and MAX_TEACHER, LOGZ_TEACHER are not
written.
"""
import triton
import triton.language as tl

from . import stats_layout as layout
from .divergence import FKL, RKL, TVD, divergence_terms
from .logit_transform import transform_logits
from .online_softmax import (
    finish_kl,
    finish_lse,
    kl_offset,
    online_argmax_update,
    online_kl_update,
    online_lse_update,
)

MAX_STUDENT = tl.constexpr(layout.MAX_STUDENT)
LOGZ_STUDENT = tl.constexpr(layout.LOGZ_STUDENT)
MAX_TEACHER = tl.constexpr(layout.MAX_TEACHER)
LOGZ_TEACHER = tl.constexpr(layout.LOGZ_TEACHER)
LSE_CE = tl.constexpr(layout.LSE_CE)
KD = tl.constexpr(layout.KD)
CE = tl.constexpr(layout.CE)
CENTER = tl.constexpr(layout.CENTER)
CENTER_2 = tl.constexpr(layout.CENTER_2)
TOP = tl.constexpr(layout.TOP)
NUM_STATS = tl.constexpr(layout.NUM_STATS)


@triton.jit
def load_log_normalisers(stats_ptr, stat_stride, row, HAS_TEACHER: tl.constexpr):
    """``(max, log z)`` of the student's and of the teacher's tempered logits (``(0, 0)`` without a teacher), so that
    ``log q = (a - max) - log z``."""
    m_s = tl.load(stats_ptr + MAX_STUDENT * stat_stride + row)
    logz_s = tl.load(stats_ptr + LOGZ_STUDENT * stat_stride + row)
    m_t = 0.0
    logz_t = 0.0
    if HAS_TEACHER:
        m_t = tl.load(stats_ptr + MAX_TEACHER * stat_stride + row)
        logz_t = tl.load(stats_ptr + LOGZ_TEACHER * stat_stride + row)
    return m_s, logz_s, m_t, logz_t


@triton.jit
def distill_stats_kernel(
    s_ptr, s_row_stride, t_ptr, t_row_stride, target_ptr, stats_ptr, stat_stride,
    V, inv_temp, ignore_index, s_scale, s_softcap, t_scale, t_softcap,
    DIVERGENCE: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_TARGET: tl.constexpr,
    SEPARATE_CE_LSE: tl.constexpr, S_HAS_SCALE: tl.constexpr, S_HAS_SOFTCAP: tl.constexpr,
    T_HAS_SCALE: tl.constexpr, T_HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """MAX_*, LOGZ_*, LSE_CE, TOP and CE of one row; KD, CENTER and CENTER_2 as well for FKL, RKL and the
    cross-entropy alone."""
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * s_row_stride
    t_row = t_ptr + row * t_row_stride
    one_pass = (not HAS_TEACHER) or DIVERGENCE == FKL or DIVERGENCE == RKL
    counted = True
    tgt = 0
    if HAS_TARGET:
        tgt = tl.load(target_ptr + row)
        counted = tgt != ignore_index
    if counted:
        m_s = float("-inf")
        z_s = 0.0
        m_t = float("-inf")
        z_t = 0.0
        m_c = float("-inf")
        z_c = 0.0
        kl = 0.0
        best = float("-inf")
        top = 0
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            raw = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            s = raw
            if S_HAS_SCALE or S_HAS_SOFTCAP:  # lanes outside the row stay -inf (a softcap maps -inf to -softcap)
                s = tl.where(mask, transform_logits(raw, s_scale, s_softcap, S_HAS_SCALE, S_HAS_SOFTCAP), float("-inf"))
            a = s * inv_temp
            if HAS_TEACHER:
                t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
                if T_HAS_SCALE or T_HAS_SOFTCAP:
                    t = tl.where(mask, transform_logits(t, t_scale, t_softcap, T_HAS_SCALE, T_HAS_SOFTCAP),
                                 float("-inf"))
                b = t * inv_temp
                if DIVERGENCE == RKL:
                    m_s, z_s, m_t, z_t, kl = online_kl_update(m_s, z_s, m_t, z_t, kl, a, b)
                elif DIVERGENCE == FKL:
                    m_t, z_t, m_s, z_s, kl = online_kl_update(m_t, z_t, m_s, z_s, kl, b, a)
                else:
                    m_s, z_s = online_lse_update(m_s, z_s, a)
                    m_t, z_t = online_lse_update(m_t, z_t, b)
            else:
                m_s, z_s = online_lse_update(m_s, z_s, a)
            if SEPARATE_CE_LSE:
                m_c, z_c = online_lse_update(m_c, z_c, s)
            best, top = online_argmax_update(best, top, raw, cols)
        lse_c = finish_lse(m_s, z_s)
        if SEPARATE_CE_LSE:
            lse_c = finish_lse(m_c, z_c)
        tl.store(stats_ptr + MAX_STUDENT * stat_stride + row, m_s)
        tl.store(stats_ptr + LOGZ_STUDENT * stat_stride + row, tl.log(z_s))
        tl.store(stats_ptr + LSE_CE * stat_stride + row, lse_c)
        tl.store(stats_ptr + TOP * stat_stride + row, top.to(tl.float32))
        if one_pass:
            kd = 0.0
            center = 0.0
            center_2 = 0.0
            if HAS_TEACHER:
                tl.store(stats_ptr + MAX_TEACHER * stat_stride + row, m_t)
                tl.store(stats_ptr + LOGZ_TEACHER * stat_stride + row, tl.log(z_t))
                if DIVERGENCE == RKL:
                    kd = finish_kl(z_s, z_t, kl)
                    center = kl / z_s  # E_q[a - b] - (m_s - m_t): the gradient's center, split in two
                    center_2 = kl_offset(m_s, m_t)
                else:
                    kd = finish_kl(z_t, z_s, kl)
            tl.store(stats_ptr + KD * stat_stride + row, kd)
            tl.store(stats_ptr + CENTER * stat_stride + row, center)
            tl.store(stats_ptr + CENTER_2 * stat_stride + row, center_2)
        else:
            tl.store(stats_ptr + MAX_TEACHER * stat_stride + row, m_t)
            tl.store(stats_ptr + LOGZ_TEACHER * stat_stride + row, tl.log(z_t))
        ce = 0.0
        if HAS_TARGET:
            in_range = (tgt >= 0) & (tgt < V)
            s_tgt = transform_logits(tl.load(s_row + tgt, mask=in_range, other=0.0).to(tl.float32), s_scale,
                                     s_softcap, S_HAS_SCALE, S_HAS_SOFTCAP)
            # An out-of-range target is caught by validation; should one reach the kernel, the row is NaN, not 0.
            ce = tl.where(in_range, lse_c - s_tgt, float("nan"))
        tl.store(stats_ptr + CE * stat_stride + row, ce)
    else:
        for k in tl.static_range(NUM_STATS):
            tl.store(stats_ptr + k * stat_stride + row, 0.0)


@triton.jit
def distill_value_kernel(
    s_ptr, s_row_stride, t_ptr, t_row_stride, target_ptr, stats_ptr, stat_stride,
    V, inv_temp, beta, log_beta, log_one_minus_beta, ignore_index, s_scale, s_softcap, t_scale, t_softcap,
    DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, S_HAS_SCALE: tl.constexpr, S_HAS_SOFTCAP: tl.constexpr,
    T_HAS_SCALE: tl.constexpr, T_HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """KD, CENTER and CENTER_2 of one row for JSD and TVD, from the log-sum-exps of :func:`distill_stats_kernel`."""
    row = tl.program_id(0).to(tl.int64)
    counted = True
    if HAS_TARGET:
        counted = tl.load(target_ptr + row) != ignore_index
    kd = 0.0
    center = 0.0
    center_2 = 0.0
    if counted:
        s_row = s_ptr + row * s_row_stride
        t_row = t_ptr + row * t_row_stride
        m_s, logz_s, m_t, logz_t = load_log_normalisers(stats_ptr, stat_stride, row, True)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            mask = cols < V
            s = transform_logits(tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32), s_scale, s_softcap,
                                 S_HAS_SCALE, S_HAS_SOFTCAP)
            t = transform_logits(tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32), t_scale, t_softcap,
                                 T_HAS_SCALE, T_HAS_SOFTCAP)
            logq = (s * inv_temp - m_s) - logz_s
            logp = (t * inv_temp - m_t) - logz_t
            value, c1, c2 = divergence_terms(logq, logp, tl.exp(logq), tl.exp(logp), beta, log_beta,
                                             log_one_minus_beta, DIVERGENCE)
            kd += tl.sum(tl.where(mask, value, 0.0), axis=0)
            center += tl.sum(tl.where(mask, c1, 0.0), axis=0)
            if DIVERGENCE == TVD:  # JSD has no second center: no third reduction per tile
                center_2 += tl.sum(tl.where(mask, c2, 0.0), axis=0)
    tl.store(stats_ptr + KD * stat_stride + row, kd)
    tl.store(stats_ptr + CENTER * stat_stride + row, center)
    tl.store(stats_ptr + CENTER_2 * stat_stride + row, center_2)
