"""Eager reference of the distillation loss and the cross-entropy: the definitions written plainly, used by the tests
and the benchmarks.

It materialises the full ``[N, V]`` logits, so it is for checking and for comparison only.  ``dtype=torch.float64``
(the default) is the ground truth of the tests; ``dtype=torch.float32`` is the float32-softmax eager loss a user
would write, the benchmarks' "eager" provider.  Gradients come from autograd.
"""
from __future__ import annotations

import torch


def reference_logit_transform(logits, *, logit_scale=1.0, softcap=None):
    """A model's logits after its logit scale and final-logit softcapping, ``softcap * tanh(logit_scale * logits /
    softcap)`` (``logit_scale * logits`` without a softcap), in the logits' dtype; differentiable (autograd's tanh)."""
    z = logits * logit_scale if logit_scale != 1.0 else logits
    return softcap * torch.tanh(z / softcap) if softcap is not None else z


def _weighted_log_ratio(w, log_w, log_other):
    """Per-element ``w (log_w - log_other)`` with ``0 log 0 = 0``: exactly 0 where the weight ``w`` is 0, ``+inf``
    where ``w > 0`` but the other probability is 0.  Both logs are replaced where ``w`` is 0 before the subtraction,
    so autograd never meets ``-inf - -inf`` either (its gradient there is 0, not NaN)."""
    positive = w > 0
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    ratio = torch.where(positive, log_w, zero) - torch.where(positive, log_other, zero)
    return torch.where(positive, w * ratio, zero)


def reference_divergence(student_logits, teacher_logits, *, divergence="rkl", beta=0.5, temperature=1.0):
    """Per-row divergence ``[N]`` between softmax(teacher/T) and softmax(student/T), in the logits' dtype.

    Columns of zero weighting probability (``-inf`` logits) contribute 0; "jsd" at beta 0 and 1 is forward and reverse
    KL (TRL's convention)."""
    logq = torch.log_softmax(student_logits / temperature, dim=-1)
    logp = torch.log_softmax(teacher_logits / temperature, dim=-1)
    if divergence == "jsd" and beta in (0, 1):
        divergence = "fkl" if beta == 0 else "rkl"
    if divergence == "fkl":
        return _weighted_log_ratio(logp.exp(), logp, logq).sum(-1)
    if divergence == "rkl":
        return _weighted_log_ratio(logq.exp(), logq, logp).sum(-1)
    if divergence == "jsd":
        p, q = logp.exp(), logq.exp()
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        either = (p > 0) | (q > 0)  # where both are 0, finite stand-ins keep autograd away from -inf - -inf
        logm = torch.logaddexp(torch.where(either, logp, zero) + torch.log(torch.tensor(beta, dtype=logp.dtype)),
                               torch.where(either, logq, zero) + torch.log1p(torch.tensor(-beta, dtype=logq.dtype)))
        return beta * _weighted_log_ratio(p, logp, logm).sum(-1) + \
            (1 - beta) * _weighted_log_ratio(q, logq, logm).sum(-1)
    if divergence == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence {divergence!r}")


def reference_distill_loss_from_logits(student_logits, teacher_logits, target=None, *, divergence="rkl", beta=0.5,
                                       temperature=1.0, kd_weight=1.0, mle_weight=0.0, ignore_index=-100,
                                       reduction="mean", normalizer=None, return_parts=False,
                                       student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None,
                                       teacher_softcap=None, dtype=torch.float64):
    """Reference of :func:`kidkernels.distill_loss`, computed in ``dtype`` (differentiable w.r.t. the logits).  Each
    model's logits go through its scale and softcap first (:func:`reference_logit_transform`); the divergence reads
    them tempered, the MLE term untempered."""
    s = reference_logit_transform(student_logits.reshape(-1, student_logits.shape[-1]).to(dtype),
                                  logit_scale=student_logit_scale, softcap=student_softcap)
    t = reference_logit_transform(teacher_logits.reshape(-1, teacher_logits.shape[-1]).to(dtype).detach(),
                                  logit_scale=teacher_logit_scale, softcap=teacher_softcap)
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
    out = tuple(_reduce(rows, counted, reduction, normalizer, student_logits.shape[:-1])
                for rows in (loss, kd.detach(), ce.detach()))
    return out if return_parts else out[0]


def _reduce(rows, counted, reduction, normalizer, shape):
    """Row losses (0 on rows that do not count) reduced as the public API does: "none" reshaped to ``shape``,
    "sum", or "mean" over ``normalizer`` when given, else over the counted rows (at least 1)."""
    if reduction == "none":
        return rows.reshape(shape)
    if reduction == "sum":
        denom = 1.0
    elif normalizer is not None:
        denom = float(normalizer)
    else:
        denom = max(int(counted.sum()), 1)
    return rows.sum() / denom


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


def reference_fused_linear_cross_entropy(input, weight, target, *, bias=None, ignore_index=-100, reduction="mean",
                                         normalizer=None, logit_scale=1.0, softcap=None, dtype=torch.float64):
    """Reference of :func:`kidkernels.fused_linear_cross_entropy`: full logits in ``dtype``, then PyTorch's own
    ``cross_entropy`` per row (0 on ignored rows), reduced as the public API does (no counted row gives 0, not NaN).

    Differentiable w.r.t. ``input``, ``weight`` and ``bias`` (their gradients come back in ``dtype``).
    """
    logits = reference_logit_transform(reference_linear_logits(input, weight, bias, dtype=dtype),
                                       logit_scale=logit_scale, softcap=softcap)
    tgt = target.reshape(-1)
    rows = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt, ignore_index=ignore_index,
                                             reduction="none")
    return _reduce(rows, tgt != ignore_index, reduction, normalizer, input.shape[:-1])


# ---- KID's masking stage: entropy, argmax and position selection ----------------------------------------------

def reference_entropy(logits, *, temperature=1.0, logit_scale=1.0, softcap=None, dtype=torch.float64):
    """Entropy (nats) of softmax(z / T) per row, ``z`` the logits after the scale and softcap, in ``dtype``:
    ``-sum p log p`` with ``0 log 0 = 0``."""
    z = reference_logit_transform(logits.to(dtype), logit_scale=logit_scale, softcap=softcap)
    logp = torch.log_softmax(z / temperature, dim=-1)
    p = logp.exp()
    return -torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)


def reference_linear_logits(input, weight, bias=None, *, dtype=torch.float64):
    """``input @ weight.T + bias`` in ``dtype``, ``[..., V]`` (the full logits: for checking only)."""
    logits = input.to(dtype) @ weight.to(dtype).t()
    return logits + bias.to(dtype) if bias is not None else logits


def reference_fused_linear_entropy(input, weight, bias=None, *, temperature=1.0, logit_scale=1.0, softcap=None,
                                   dtype=torch.float64):
    """Reference of :func:`kidkernels.fused_linear_entropy`: full logits in ``dtype``, then the entropy."""
    return reference_entropy(reference_linear_logits(input, weight, bias, dtype=dtype), temperature=temperature,
                             logit_scale=logit_scale, softcap=softcap, dtype=dtype)


def reference_fused_linear_argmax(input, weight, bias=None, *, dtype=torch.float64):
    """Reference of :func:`kidkernels.fused_linear_argmax`: ``torch.argmax`` (ties to the lowest index) of the
    logits formed in ``dtype``."""
    return torch.argmax(reference_linear_logits(input, weight, bias, dtype=dtype), dim=-1)


def reference_select_positions(valid, alpha, strategy, scores=None):
    """Reference of :func:`kidkernels.select_positions` for the deterministic strategies, one row at a time in
    Python: ``k = floor(alpha * n + 0.5)``; "uniform" picks the valid positions of rank ``(2j + 1) * n // (2k)``;
    "hard"/"easy" sort the valid positions by (-score, position) / (score, position), NaN scores last.
    ("random" has no reference: its tests check counts, validity, reproducibility and frequencies.)"""
    import math

    valid_rows = valid.cpu().tolist()
    score_rows = scores.double().cpu().tolist() if scores is not None else None
    out = torch.zeros(valid.shape, dtype=torch.bool)
    for i, row in enumerate(valid_rows):
        positions = [t for t, v in enumerate(row) if v]
        n = len(positions)
        k = min(n, math.floor(alpha * n + 0.5))
        if k == 0:
            continue
        if strategy == "uniform":
            picked = [positions[(2 * j + 1) * n // (2 * k)] for j in range(k)]
        elif strategy in ("hard", "easy"):
            sign = -1.0 if strategy == "hard" else 1.0

            def order(t, sign=sign, s=score_rows[i]):
                return (math.isnan(s[t]), sign * s[t] if not math.isnan(s[t]) else 0.0, t)

            picked = sorted(positions, key=order)[:k]
        else:
            raise ValueError(f"no reference for strategy {strategy!r}")
        out[i, picked] = True
    return out.to(valid.device)
