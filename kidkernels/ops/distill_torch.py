"""The chunked pure-PyTorch backend: the same row statistics and gradients as the Triton kernels, in torch ops.

Each function takes one chunk of logits (``[rows, V]``) and fills the rows of the statistics array exactly as the
kernels do (the same formulas: see ``kernels/divergence.py``), so the dispatch layer can call either backend.
Temporaries are a handful of ``[rows, V]`` tensors in the compute dtype; :data:`TEMPORARIES_PER_ELEMENT` tells the
chunk sizer how many.  Each model's logits are read through its logit scale and softcap (``cfg.*_transform``,
:mod:`.logit_transform`) first; the student's gradient is formed with respect to the transformed logits and multiplied
by ``dz/dx`` column by column at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import (
    CE,
    CENTER,
    CENTER_2,
    KD,
    LOGZ_STUDENT,
    LOGZ_TEACHER,
    LSE_CE,
    MAX_STUDENT,
    MAX_TEACHER,
    TOP,
    DistillConfig,
)
from .gemm import compute_dtype
from .logit_transform import transform_logits, transform_slope

# Peak number of [rows, V] compute-dtype temporaries alive at once in these functions (incl. the logits upcasts).
TEMPORARIES_PER_ELEMENT = 8


def _transformed(logits, transform):
    """The model's logits after its scale and softcap (``cfg.*_transform``), in the compute dtype."""
    return transform_logits(logits.to(compute_dtype(logits.dtype)), transform)


def _tempered(logits, cfg: DistillConfig):
    """``z / T`` for transformed logits ``z`` in the compute dtype (``z`` itself at T = 1)."""
    return logits if cfg.temperature == 1.0 else logits * cfg.inv_temp


def _row_sum(x):
    """sum_j x_ij per row.  (Pairwise summation: a float32 dot product through bmm over 32k terms costs 1e-5
    relative error, this stays near 1e-7.)"""
    return x.sum(-1)


def _counted(target, cfg: DistillConfig) -> torch.Tensor | None:
    """Bool ``[rows]`` of rows that count, or None when every row does (no target)."""
    return (target != cfg.ignore_index) if cfg.has_target else None


def _log_softmax(x, stats, max_row: int, logz_row: int):
    """``(x - max) - log z`` from the statistics (see ``kernels/stats_layout.py``: accurate near the maximum)."""
    return (x - stats[max_row][:, None]).sub_(stats[logz_row][:, None])


def _fill_lse(x, stats, max_row: int, logz_row: int) -> None:
    m = x.amax(dim=-1)
    stats[max_row] = m
    stats[logz_row] = (x - m[:, None]).exp_().sum(-1).log_()


def _log_probs(a, b, stats):
    """``(a, b, logq, logp, q)`` of the tempered logits ``a`` (student) and ``b`` (teacher) from the statistics."""
    logq = _log_softmax(a, stats, MAX_STUDENT, LOGZ_STUDENT)
    logp = _log_softmax(b, stats, MAX_TEACHER, LOGZ_TEACHER)
    return a, b, logq, logp, logq.exp()


def _jsd_log_ratio(logq, logp, cfg: DistillConfig):
    """d = log((1 - beta) q / m) = -softplus(log(beta p / ((1 - beta) q))) (NaN where q == 0)."""
    return F.softplus((cfg.log_beta - cfg.log_one_minus_beta) + (logp - logq)).neg_()


def _kl_referenced(x, y):
    """``(KL(softmax(x) || softmax(y)), E[(x - y) - c], c)``, each ``[rows]``, for ``x``, ``y`` ``[rows, V]`` in the
    compute dtype, with ``c = max(x) - max(y)`` per row: the kernels'
    one-pass form (``online_softmax.merge_kl``), in which an offset between the two models' logits never enters a
    sum: ``KL = E[(x - y) - c] - (log z_x - log z_y)``, ``z`` the sums of ``exp(logits - max)``.

    As in the kernels (``online_softmax.online_kl_update``): a column with ``x = -inf`` adds 0 (0 log 0 = 0), one with
    ``x`` finite and ``y = -inf`` makes the row ``+inf`` even where ``exp(x - max)`` underflows in float32."""
    mx, my = x.amax(dim=-1, keepdim=True), y.amax(dim=-1, keepdim=True)
    ex = (x - mx).exp()
    zx, zy = _row_sum(ex), _row_sum((y - my).exp())
    offset = mx - my
    weighted = x > float("-inf")
    unbounded = weighted & (y == float("-inf"))
    finite = weighted & ~unbounded
    deviation = torch.where(finite, x, 0.0) - torch.where(finite, y, 0.0) - offset
    terms = torch.where(unbounded, float("inf"), torch.where(weighted, ex * deviation, 0.0))
    mean_deviation = _row_sum(terms) / zx
    return mean_deviation - (zx.log() - zy.log()), mean_deviation, offset.squeeze(-1)


def _divergence(a, b, logq, logp, q, stats, cfg: DistillConfig):
    """``(kd, center, center_2)`` per row (see ``kernels/stats_layout.py``); zero-probability columns add 0."""
    divergence = cfg.effective_divergence
    zero = torch.zeros_like(stats[KD])
    if divergence == "fkl":
        kd, _, _ = _kl_referenced(b, a)
        return kd, zero, zero
    if divergence == "rkl":  # the center E_q[a - b] is held as offset (CENTER_2) plus deviation (CENTER)
        return _kl_referenced(a, b)
    p = logp.exp()
    if divergence == "jsd":
        logm = torch.logaddexp(logp + cfg.log_beta, logq + cfg.log_one_minus_beta)
        kd = cfg.beta * _row_sum(torch.where(p > 0, p * (logp - logm), 0.0)) + \
            (1.0 - cfg.beta) * _row_sum(torch.where(q > 0, q * (logq - logm), 0.0))
        del logm
        center = _row_sum(torch.where(q > 0, q * _jsd_log_ratio(logq, logp, cfg), 0.0))
        return kd, center, zero
    kd = 0.5 * _row_sum((p - q).abs())
    half_tie = torch.where(q == p, 0.5 * q, 0.0)
    return kd, _row_sum(torch.where(q < p, q, half_tie)), _row_sum(torch.where(q > p, q, half_tie))


def _forward(student, teacher, target, stats, cfg: DistillConfig):
    """Fill the statistics; return ``(a, b, logq, logp, q)`` for a gradient that follows (None without a teacher:
    then KD and the centers are 0 and the teacher's rows are not written, as in the kernels)."""
    dtype = compute_dtype(student.dtype)
    raw = student.to(dtype)
    # The column of the largest raw logit: the transform is increasing, and a saturated softcap would only tie it.
    stats[TOP] = raw.argmax(dim=-1).to(dtype)
    s = transform_logits(raw, cfg.student_transform)
    del raw
    a = _tempered(s, cfg)
    _fill_lse(a, stats, MAX_STUDENT, LOGZ_STUDENT)
    stats[LSE_CE] = torch.logsumexp(s, dim=-1) if cfg.separate_ce_lse else stats[MAX_STUDENT] + stats[LOGZ_STUDENT]
    terms = None
    if cfg.has_teacher:
        b = _tempered(_transformed(teacher, cfg.teacher_transform), cfg)
        _fill_lse(b, stats, MAX_TEACHER, LOGZ_TEACHER)
        terms = _log_probs(a, b, stats)
        stats[KD], stats[CENTER], stats[CENTER_2] = _divergence(*terms, stats, cfg)
    else:
        stats[KD] = stats[CENTER] = stats[CENTER_2] = 0.0
    stats[CE] = 0.0
    counted = _counted(target, cfg)
    if counted is not None:
        in_range = (target >= 0) & (target < s.shape[1])
        s_tgt = s.gather(1, target.clamp(0, s.shape[1] - 1)[:, None]).squeeze(1)
        # An out-of-range target is caught by validation; should one reach here, the row is NaN, not 0.
        stats[CE] = torch.where(in_range, stats[LSE_CE] - s_tgt, float("nan"))
        stats.masked_fill_(~counted[None, :], 0.0)  # ignored rows: every statistic 0, as the kernels
    return terms


def _divergence_grad(terms, stats, cfg: DistillConfig):
    """kd_weight / T * dD/da, a new ``[rows, V]`` tensor."""
    a, b, logq, logp, q = terms
    center, center_2 = stats[CENTER][:, None], stats[CENTER_2][:, None]
    divergence = cfg.effective_divergence
    if divergence == "fkl":
        grad = q - logp.exp()
    elif divergence == "rkl":
        grad = torch.where(q > 0, q * (((a - b) - center_2) - center), 0.0)
    elif divergence == "jsd":
        grad = torch.where(q > 0, q * (_jsd_log_ratio(logq, logp, cfg) - center), 0.0).mul_(1.0 - cfg.beta)
    else:
        p = logp.exp()
        grad = q * torch.where(q > p, center, torch.where(q < p, -center_2, 0.5 * (center - center_2)))
    return grad.mul_(cfg.kd_weight * cfg.inv_temp)


def _write_grad_from(terms, student, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    """The gradient with respect to the transformed logits ``z``, then (a logit transform) times ``dz/dx`` per column.
    ``terms`` is let go of as soon as it has been used, before the factor is formed."""
    dtype = compute_dtype(student.dtype)
    grad = _divergence_grad(terms, stats, cfg) if cfg.has_teacher else None
    if cfg.ce_in_grad:
        if not cfg.separate_ce_lse:  # T == 1: the MLE term's softmax is the divergence's q, in the same form
            q = terms[4] if terms is not None else \
                _log_softmax(_transformed(student, cfg.student_transform), stats, MAX_STUDENT, LOGZ_STUDENT).exp_()
            softmax = q * cfg.mle_weight
            del q
        else:
            softmax = (_transformed(student, cfg.student_transform) - stats[LSE_CE][:, None]).exp_() \
                .mul_(cfg.mle_weight)
        grad = softmax if grad is None else grad.add_(softmax)
        del softmax
        in_range = (target >= 0) & (target < student.shape[1])
        idx = target.clamp(0, student.shape[1] - 1)[:, None]
        grad.scatter_add_(1, idx, torch.where(in_range, -cfg.mle_weight, 0.0).to(dtype)[:, None])
    terms = None  # noqa: F841  (its [rows, V] tensors are free from here on)
    if grad is None:  # no teacher and mle_weight 0: a loss that is identically 0
        grad_out.zero_()
        return
    if row_weight is not None:
        grad.mul_(row_weight.to(dtype)[:, None])
    counted = _counted(target, cfg)
    if counted is not None:  # (ignored rows' statistics are 0, so their elements may be inf or NaN until here)
        grad.masked_fill_(~counted[:, None], 0.0)
    # The student's largest column gets minus the sum of the others (every term of d/dz sums to 0 over the row): where
    # the student is confident, its own formula is a small difference of numbers close to 1 (see distill_backward.py).
    top = stats[TOP].to(torch.int64)[:, None]
    grad.scatter_(1, top, 0.0)
    grad.scatter_(1, top, grad.sum(-1, keepdim=True).neg_())
    # d/dx = d/dz * dz/dx, column by column (after the trick: the factors differ between columns)
    slope = transform_slope(student.to(dtype), cfg.student_transform)
    if slope is not None:
        grad.mul_(slope)
    del slope
    grad_out.copy_(grad)


def fill_stats(student, teacher, target, stats, cfg: DistillConfig) -> None:
    """Fill every statistics row of ``stats[:, rows]`` for logits ``student``, ``teacher`` ``[rows, V]``."""
    _forward(student, teacher, target, stats, cfg)


def write_grad(student, teacher, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    """Write d(row loss)/d(student logits), times ``row_weight`` (``[rows]`` or None for 1), into ``grad_out``."""
    _write_grad_from(_log_probs(_tempered(_transformed(student, cfg.student_transform), cfg),
                                _tempered(_transformed(teacher, cfg.teacher_transform), cfg), stats)
                     if cfg.has_teacher else None, student, target, stats, cfg, row_weight, grad_out)


def fill_stats_and_grad(student, teacher, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    """:func:`fill_stats` then :func:`write_grad`, sharing the log-probabilities between the two."""
    _write_grad_from(_forward(student, teacher, target, stats, cfg), student, target, stats, cfg, row_weight,
                     grad_out)
