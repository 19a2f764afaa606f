"""Eager reference of the distillation loss: the definitions written plainly, used by the tests and the benchmarks.

It materialises the full ``[N, V]`` logits, so it is for checking and for comparison only.  ``dtype=torch.float64``
(the default) is the ground truth of the tests; ``dtype=torch.float32`` is the float32-softmax eager loss a user
would write, the benchmarks' "eager" provider.  Gradients come from autograd.
"""
from __future__ import annotations

import torch


def reference_divergence(student_logits, teacher_logits, *, divergence="rkl", beta=0.5, temperature=1.0):
    """Per-row divergence ``[N]`` between softmax(teacher/T) and softmax(student/T), in the logits' dtype."""
    logq = torch.log_softmax(student_logits / temperature, dim=-1)
    logp = torch.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "fkl":
        return (logp.exp() * (logp - logq)).sum(-1)
    if divergence == "rkl":
        return (logq.exp() * (logq - logp)).sum(-1)
    if divergence == "jsd":
        logm = torch.logaddexp(logp + torch.log(torch.tensor(beta, dtype=logp.dtype)),
                               logq + torch.log1p(torch.tensor(-beta, dtype=logq.dtype)))
        return beta * (logp.exp() * (logp - logm)).sum(-1) + (1 - beta) * (logq.exp() * (logq - logm)).sum(-1)
    if divergence == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def reference_distill_loss_from_logits(student_logits, teacher_logits, target=None, *, divergence="rkl", beta=0.5,
                                       temperature=1.0, kd_weight=1.0, mle_weight=0.0, ignore_index=-100,
                                       reduction="mean", normalizer=None, return_parts=False,
                                       dtype=torch.float64):
    """Reference of :func:`kidkernels.distill_loss`, computed in ``dtype`` (differentiable w.r.t. the logits)."""
    s = student_logits.reshape(-1, student_logits.shape[-1]).to(dtype)
    t = teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(dtype).detach()
    kd = reference_divergence(s, t, divergence=divergence, beta=beta, temperature=temperature)
    if target is None:
        counted = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        ce = torch.zeros_like(kd)
    else:
        tgt = target.reshape(-1)
        counted = tgt != ignore_index
        safe = torch.where(counted, tgt, 0)
        ce = torch.logsumexp(s, -1) - s.gather(1, safe[:, None]).squeeze(1)
    zero = torch.zeros_like(kd)
    kd, ce = torch.where(counted, kd, zero), torch.where(counted, ce, zero)
    loss = kd_weight * kd + (mle_weight * ce if target is not None and mle_weight != 0 else 0)
    if reduction == "none":
        shape = student_logits.shape[:-1]
        out = loss.reshape(shape), kd.detach().reshape(shape), ce.detach().reshape(shape)
    else:
        if reduction == "sum":
            denom = 1.0
        elif normalizer is not None:
            denom = float(normalizer)
        else:
            denom = max(int(counted.sum()), 1)
        out = loss.sum() / denom, kd.detach().sum() / denom, ce.detach().sum() / denom
    return out if return_parts else out[0]


def reference_fused_linear_distill_loss(student_input, student_weight, teacher_input, teacher_weight, target=None, *,
                                        student_bias=None, teacher_bias=None, dtype=torch.float64, **options):
    """Reference of :func:`kidkernels.fused_linear_distill_loss`: full logits in ``dtype``, then the loss.

    Differentiable w.r.t. the student tensors (their gradients come back in ``dtype``).
    """
    s = student_input.reshape(-1, student_input.shape[-1]).to(dtype) @ student_weight.to(dtype).t()
    if student_bias is not None:
        s = s + student_bias.to(dtype)
    with torch.no_grad():
        t = teacher_input.reshape(-1, teacher_input.shape[-1]).to(dtype) @ teacher_weight.to(dtype).t()
        if teacher_bias is not None:
            t = t + teacher_bias.to(dtype)
    lead = student_input.shape[:-1]
    return reference_distill_loss_from_logits(s.reshape(*lead, -1), t.reshape(*lead, -1), target, dtype=dtype,
                                              **options)
