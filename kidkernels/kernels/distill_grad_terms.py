"""The per-element gradient of the distillation loss w.r.t. the student logits: the one formula that every gradient
kernel (the row kernel :func:`.distill_backward.distill_grad_kernel`, the GEMM-fused
:func:`.distill_fused_grad.distill_fused_grad_kernel`) applies to its tile.

    ds_j = kd_scale * dD/da_j + mle_weight * (softmax(s)_j - [j == target])

with ``s`` the untempered student logits, ``a = s / T``, ``b = t / T``, ``kd_scale = kd_weight / T`` and ``dD/da``
from :func:`.divergence.divergence_grad`.  The row weight, the mask of ignored rows and the column of the student's
largest logit (written by the callers as minus the sum of the row's other elements) are the callers' business.

Works on a row tile (``[BLOCK_V]``, the row's statistics scalars) and on a 2-D tile (``[BLOCK_M, BLOCK_N]``, the
statistics as ``[BLOCK_M, 1]`` columns broadcast along the vocabulary) alike.
"""
import triton
import triton.language as tl

from .divergence import divergence_grad


@triton.jit
def distill_logit_grad(s, t, is_target, m_s, logz_s, m_t, logz_t, lse_c, center, center_2,
                       inv_temp, beta, log_beta, log_one_minus_beta, kd_scale, mle_weight,
                       DIVERGENCE: tl.constexpr, HAS_TEACHER: tl.constexpr, HAS_MLE: tl.constexpr,
                       SEPARATE_CE_LSE: tl.constexpr):
    """float32 gradient of one tile from the float32 student logits ``s`` and teacher logits ``t`` (untempered; ``t``
    is not read without a teacher), ``is_target`` (the one-hot of the target, a boolean tile) and the row statistics
    (see ``stats_layout.py``: ``log q = (a - m_s) - logz_s``, ``log p = (b - m_t) - logz_t``, ``lse_c`` the MLE
    term's log-sum-exp of ``s``).  At T = 1 the MLE term's softmax is the divergence's q: one exponential, not two."""
    a = s * inv_temp
    logq = (a - m_s) - logz_s
    q = tl.exp(logq)
    g = tl.zeros_like(a)
    if HAS_TEACHER:
        b = t * inv_temp
        g = kd_scale * divergence_grad(a, b, logq, (b - m_t) - logz_t, q, center, center_2, beta, log_beta,
                                       log_one_minus_beta, DIVERGENCE)
    if HAS_MLE:
        softmax = q
        if SEPARATE_CE_LSE:
            softmax = tl.exp(s - lse_c)
        g += mle_weight * (softmax - tl.where(is_target, 1.0, 0.0))
    return g
