"""Per-element divergence math shared by the forward (value) and backward (gradient) kernels.

With student log-probabilities ``logq = a - lse(a)`` and teacher ``logp = b - lse(b)`` (``a``, ``b`` the tempered
logits), every divergence here is a sum over the vocabulary of a per-element term, and its gradient with respect to
the tempered student logits has the softmax-Jacobian form

    dD/da_j = q_j * (g_j - sum_k q_k g_k),     g_j = dD/dq_j,

where the row constant ``sum_k q_k g_k`` (the *center*) must be known before any gradient element is written.
:func:`divergence_terms` returns each element's contribution to the value and to the center;
:func:`divergence_grad` forms ``dD/da_j`` once the center is known.

- FKL  KL(p||q) = sum p (logp - logq);  dD/da = q - p (the center is -1 and folds into the closed form).
- RKL  KL(q||p) = sum q (logq - logp);  g = logq - logp + 1, so dD/da = q (logq - logp - RKL): center = the value.
- JSD  beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q formed in log space as a log-sum-exp of
  ``logp + log(beta)`` and ``logq + log(1-beta)``: finite even where p and q underflow to 0.
  dD/dq_j = (1-beta)(logq_j - logm_j) (the terms through m cancel), so dD/da = (1-beta) q (logq - logm - KL(q||m)).
- TVD  0.5 sum |p - q|;  g = 0.5 sign(q - p) with sign(0) = 0, the zero subgradient at exact ties.
"""
import triton
import triton.language as tl

FKL = tl.constexpr(0)
RKL = tl.constexpr(1)
JSD = tl.constexpr(2)
TVD = tl.constexpr(3)


@triton.jit
def log_mixture(logp, logq, log_beta, log_one_minus_beta):
    """log(beta p + (1 - beta) q) from the log-probabilities, never forming p or q."""
    u = logp + log_beta
    w = logq + log_one_minus_beta
    top = tl.maximum(u, w)
    return top + tl.log(tl.exp(u - top) + tl.exp(w - top))


@triton.jit
def half_sign(x):
    """0.5 * sign(x), exactly 0 at x == 0."""
    return tl.where(x > 0, 0.5, tl.where(x < 0, -0.5, 0.0))


@triton.jit
def divergence_terms(logq, logp, beta, log_beta, log_one_minus_beta, DIVERGENCE: tl.constexpr):
    """Per-element (value term, center term) for one tile; lanes outside the row must be masked by the caller."""
    q = tl.exp(logq)
    p = tl.exp(logp)
    if DIVERGENCE == FKL:
        value = p * (logp - logq)
        center = tl.zeros_like(value)
    elif DIVERGENCE == RKL:
        value = q * (logq - logp)
        center = value
    elif DIVERGENCE == JSD:
        logm = log_mixture(logp, logq, log_beta, log_one_minus_beta)
        center = q * (logq - logm)
        value = beta * (p * (logp - logm)) + (1.0 - beta) * center
    else:
        value = 0.5 * tl.abs(p - q)
        center = q * half_sign(q - p)
    return value, center


@triton.jit
def divergence_grad(logq, logp, center, beta, log_beta, log_one_minus_beta, DIVERGENCE: tl.constexpr):
    """dD/da for one tile, given the row's center (sum of the center terms)."""
    q = tl.exp(logq)
    if DIVERGENCE == FKL:
        grad = q - tl.exp(logp)
    elif DIVERGENCE == RKL:
        grad = q * (logq - logp - center)
    elif DIVERGENCE == JSD:
        logm = log_mixture(logp, logq, log_beta, log_one_minus_beta)
        grad = (1.0 - beta) * q * (logq - logm - center)
    else:
        grad = q * (half_sign(q - tl.exp(logp)) - center)
    return grad
