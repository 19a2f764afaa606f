"""The chunked pure-PyTorch backend: the same row statistics and gradients as the Triton kernels, in torch ops.

Each function takes one chunk of logits (``[rows, V]``) and fills the rows of the statistics array exactly as the
kernels do, so the dispatch layer can call either backend.  Temporaries are a handful of ``[rows, V]`` tensors in the
compute dtype; :data:`TEMPORARIES_PER_ELEMENT` tells the chunk sizer how many.
"""
from __future__ import annotations

import torch

from .config import CE, CENTER, KD, LSE_CE, LSE_STUDENT, LSE_TEACHER, DistillConfig
from .gemm import compute_dtype

# Peak number of [rows, V] compute-dtype temporaries alive at once in these functions (incl. the logits upcasts).
TEMPORARIES_PER_ELEMENT = 6


def _tempered(logits, cfg: DistillConfig):
    x = logits.to(compute_dtype(logits.dtype))
    return x if cfg.temperature == 1.0 else x * cfg.inv_temp


def _log_probs(student, teacher, stats, cfg: DistillConfig):
    """``(logq, logp)`` of the tempered logits, or ``(None, None)`` without a teacher (no divergence to form)."""
    if not cfg.has_teacher:
        return None, None
    logq = _tempered(student, cfg) - stats[LSE_STUDENT][:, None]
    logp = _tempered(teacher, cfg) - stats[LSE_TEACHER][:, None]
    return logq, logp


def _log_mixture(logp, logq, cfg: DistillConfig):
    return torch.logaddexp(logp + cfg.log_beta, logq + cfg.log_one_minus_beta)


def _row_dot(a, b):
    """sum_j a_ij b_ij per row.  (Not bmm: its float32 CPU accumulation over 32k terms costs 1e-5 relative error;
    the pairwise summation of ``sum`` stays near 1e-7.)"""
    return (a * b).sum(-1)


def _counted(target, cfg: DistillConfig) -> torch.Tensor | None:
    """Bool ``[rows]`` of rows that count, or None when every row does (no target)."""
    return (target != cfg.ignore_index) if cfg.has_target else None


def _forward(student, teacher, target, stats, cfg: DistillConfig):
    """Fill the statistics; return the log-probabilities ``(logq, logp)`` for a gradient that follows (``(None,
    None)`` without a teacher: then KD and CENTER are 0 and LSE_TEACHER is not written, as in the kernels)."""
    a = _tempered(student, cfg)
    stats[LSE_STUDENT] = torch.logsumexp(a, dim=-1)
    s = student.to(compute_dtype(student.dtype))
    stats[LSE_CE] = torch.logsumexp(s, dim=-1) if cfg.separate_ce_lse else stats[LSE_STUDENT]
    if cfg.has_teacher:
        kd, center, logq, logp = _divergence(a, student, _tempered(teacher, cfg), teacher, stats, cfg)
    else:
        kd = center = torch.zeros_like(stats[LSE_STUDENT])
        logq = logp = None
    ce = torch.zeros_like(kd)
    counted = _counted(target, cfg)
    if counted is not None:
        kd = torch.where(counted, kd, 0.0)
        if cfg.computes_ce:
            in_range = (target >= 0) & (target < s.shape[1])
            s_tgt = s.gather(1, target.clamp(0, s.shape[1] - 1)[:, None]).squeeze(1)
            ce = torch.where(counted, torch.where(in_range, stats[LSE_CE] - s_tgt, float("nan")), 0.0)
    stats[KD] = kd
    stats[CE] = ce
    stats[CENTER] = center
    return logq, logp


def _divergence(a, student, b, teacher, stats, cfg: DistillConfig):
    """``(kd, center, logq, logp)`` of the tempered logits ``a`` (student) and ``b`` (teacher), LSE_* filled."""
    stats[LSE_TEACHER] = torch.logsumexp(b, dim=-1)
    # a and b are fresh tensors unless they alias the caller's float32 logits (T == 1): only then out of place.
    logq = a - stats[LSE_STUDENT][:, None] if a is student else a.sub_(stats[LSE_STUDENT][:, None])
    logp = b - stats[LSE_TEACHER][:, None] if b is teacher else b.sub_(stats[LSE_TEACHER][:, None])
    if cfg.divergence == "fkl":
        kd = _row_dot(logp.exp(), logp - logq)
        center = torch.zeros_like(kd)
    elif cfg.divergence == "rkl":
        kd = _row_dot(logq.exp(), logq - logp)
        center = kd
    elif cfg.divergence == "jsd":
        logm = _log_mixture(logp, logq, cfg)
        center = _row_dot(logq.exp(), logq - logm)
        kd = cfg.beta * _row_dot(logp.exp(), logp.sub(logm)) + (1.0 - cfg.beta) * center
        del logm
    else:
        diff = logp.exp() - logq.exp()  # p - q
        kd = 0.5 * diff.abs().sum(-1)
        center = _row_dot(logq.exp(), -0.5 * torch.sign(diff))
        del diff
    return kd, center, logq, logp


def _divergence_grad(logq, logp, stats, cfg: DistillConfig):
    """kd_weight / T * dD/da, a new ``[rows, V]`` tensor."""
    center = stats[CENTER][:, None]
    if cfg.divergence == "fkl":
        grad = logq.exp().sub_(logp.exp())
    elif cfg.divergence == "rkl":
        grad = (logq - logp).sub_(center).mul_(logq.exp())
    elif cfg.divergence == "jsd":
        grad = (logq - _log_mixture(logp, logq, cfg)).sub_(center).mul_(logq.exp()).mul_(1.0 - cfg.beta)
    else:
        grad = torch.sign(logq.exp() - logp.exp()).mul_(0.5).sub_(center).mul_(logq.exp())
    return grad.mul_(cfg.kd_weight * cfg.inv_temp)


def _write_grad_from(logq, logp, student, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    dtype = compute_dtype(student.dtype)
    grad = _divergence_grad(logq, logp, stats, cfg) if cfg.has_teacher else None
    if cfg.ce_in_grad:
        softmax = (student.to(dtype) - stats[LSE_CE][:, None]).exp_()
        grad = softmax.mul_(cfg.mle_weight) if grad is None else grad.add_(softmax, alpha=cfg.mle_weight)
        del softmax
        in_range = (target >= 0) & (target < student.shape[1])
        idx = target.clamp(0, student.shape[1] - 1)[:, None]
        grad.scatter_add_(1, idx, torch.where(in_range, -cfg.mle_weight, 0.0).to(dtype)[:, None])
    if grad is None:  # no teacher and mle_weight 0: a loss that is identically 0
        grad_out.zero_()
        return
    weight = torch.ones(student.shape[0], device=student.device, dtype=dtype) if row_weight is None \
        else row_weight.to(dtype)
    counted = _counted(target, cfg)
    if counted is not None:
        weight = torch.where(counted, weight, 0.0)
    grad.mul_(weight[:, None])
    grad_out.copy_(grad)


def stats_and_value(student, teacher, target, stats, cfg: DistillConfig) -> None:
    """Fill LSE_*, KD, CE and CENTER of ``stats[:, rows]`` for logits ``student``, ``teacher`` ``[rows, V]``."""
    _forward(student, teacher, target, stats, cfg)


def write_grad(student, teacher, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    """Write d(row loss)/d(student logits), times ``row_weight`` (``[rows]`` or None for 1), into ``grad_out``."""
    logq, logp = _log_probs(student, teacher, stats, cfg)
    _write_grad_from(logq, logp, student, target, stats, cfg, row_weight, grad_out)


def stats_value_and_grad(student, teacher, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    """:func:`stats_and_value` then :func:`write_grad`, sharing the log-probabilities between the two."""
    logq, logp = _forward(student, teacher, target, stats, cfg)
    _write_grad_from(logq, logp, student, target, stats, cfg, row_weight, grad_out)
