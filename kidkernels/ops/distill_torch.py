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
TEMPORARIES_PER_ELEMENT = 7


def _log_probs(student, teacher, stats, cfg: DistillConfig):
    dtype = compute_dtype(student.dtype)
    logq = student.to(dtype) * cfg.inv_temp - stats[LSE_STUDENT].to(dtype)[:, None]
    logp = teacher.to(dtype) * cfg.inv_temp - stats[LSE_TEACHER].to(dtype)[:, None]
    return logq, logp


def _half_sign(x):
    return 0.5 * torch.sign(x)


def _log_mixture(logp, logq, cfg: DistillConfig):
    return torch.logaddexp(logp + cfg.log_beta, logq + cfg.log_one_minus_beta)


def _counted(target, cfg: DistillConfig) -> torch.Tensor | None:
    """Bool ``[rows]`` of rows that count, or None when every row does (no target)."""
    return (target != cfg.ignore_index) if cfg.has_target else None


def stats_and_value(student, teacher, target, stats, cfg: DistillConfig) -> None:
    """Fill LSE_*, KD, CE and CENTER of ``stats[:, rows]`` for logits ``student``, ``teacher`` ``[rows, V]``."""
    dtype = compute_dtype(student.dtype)
    s = student.to(dtype)
    stats[LSE_STUDENT] = torch.logsumexp(s * cfg.inv_temp, dim=-1)
    stats[LSE_TEACHER] = torch.logsumexp(teacher.to(dtype) * cfg.inv_temp, dim=-1)
    stats[LSE_CE] = torch.logsumexp(s, dim=-1) if cfg.separate_ce_lse else stats[LSE_STUDENT]
    logq, logp = _log_probs(student, teacher, stats, cfg)
    q, p = logq.exp(), logp.exp()
    if cfg.divergence == "fkl":
        kd = (p * (logp - logq)).sum(-1)
        center = torch.zeros_like(kd)
    elif cfg.divergence == "rkl":
        kd = (q * (logq - logp)).sum(-1)
        center = kd
    elif cfg.divergence == "jsd":
        logm = _log_mixture(logp, logq, cfg)
        center = (q * (logq - logm)).sum(-1)
        kd = cfg.beta * (p * (logp - logm)).sum(-1) + (1.0 - cfg.beta) * center
    else:
        kd = 0.5 * (p - q).abs().sum(-1)
        center = (q * _half_sign(q - p)).sum(-1)
    ce = torch.zeros_like(kd)
    counted = _counted(target, cfg)
    if counted is not None:
        kd = torch.where(counted, kd, 0.0)
        if cfg.computes_ce:
            in_range = (target >= 0) & (target < s.shape[1])
            s_tgt = s.gather(1, target.clamp(0, s.shape[1] - 1)[:, None]).squeeze(1)
            ce = torch.where(counted, torch.where(in_range, stats[LSE_CE].to(dtype) - s_tgt, float("nan")), 0.0)
    stats[KD] = kd
    stats[CE] = ce
    stats[CENTER] = center


def write_grad(student, teacher, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    """Write d(row loss)/d(student logits), times ``row_weight`` (``[rows]`` or None for 1), into ``grad_out``."""
    dtype = compute_dtype(student.dtype)
    logq, logp = _log_probs(student, teacher, stats, cfg)
    center = stats[CENTER].to(dtype)[:, None]
    q = logq.exp()
    if cfg.divergence == "fkl":
        grad = q - logp.exp()
    elif cfg.divergence == "rkl":
        grad = q * (logq - logp - center)
    elif cfg.divergence == "jsd":
        grad = (1.0 - cfg.beta) * q * (logq - _log_mixture(logp, logq, cfg) - center)
    else:
        grad = q * (_half_sign(q - logp.exp()) - center)
    del logq, logp, q
    grad *= cfg.kd_weight * cfg.inv_temp
    if cfg.ce_in_grad:
        grad += cfg.mle_weight * (student.to(dtype) - stats[LSE_CE].to(dtype)[:, None]).exp()
        in_range = (target >= 0) & (target < student.shape[1])
        idx = target.clamp(0, student.shape[1] - 1)[:, None]
        grad.scatter_add_(1, idx, torch.where(in_range, -cfg.mle_weight, 0.0).to(dtype)[:, None])
    weight = torch.ones(student.shape[0], device=student.device, dtype=dtype) if row_weight is None \
        else row_weight.to(dtype)
    counted = _counted(target, cfg)
    if counted is not None:
        weight = torch.where(counted, weight, 0.0)
    grad *= weight[:, None]
    grad_out.copy_(grad)
