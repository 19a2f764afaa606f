"""Per-element divergence math shared by the forward (value) and backward (gradient) kernels.

With tempered logits ``a = s / T`` (student) and ``b = t / T`` (teacher), ``logq = a - lse(a)``, ``logp = b - lse(b)``,
every divergence is a sum over the vocabulary of a per-element term, and its gradient with respect to ``a`` has the
softmax-Jacobian form ``dD/da_j = q_j (g_j - sum_k q_k g_k)`` with ``g_j = dD/dq_j``.  Each gradient below is written
in a form whose row constant (the *center*, see ``stats_layout.py``) carries no large constant that the elements would
have to cancel in float32:

- FKL  KL(p||q): dD/da = q - p (no center).  Value in one pass (``online_softmax.online_kl_update``).
- RKL  KL(q||p): g = logq - logp + 1, and the log-sum-exps cancel: dD/da = q ((a - b) - E_q[a - b]), with E_q[a - b]
  held as the offset of the two maxima plus the mean deviation from it (CENTER_2 and CENTER).  One pass.
- JSD  beta KL(p||m) + (1-beta) KL(q||m), m = beta p + (1-beta) q.  dD/dq = (1-beta)(logq - logm) (the terms through
  m cancel), and logq - logm = d - log(1-beta) with d = log((1-beta) q / m) = -softplus(log(beta p / ((1-beta) q)));
  the constant cancels: dD/da = (1-beta) q (d - E_q[d]).  d is accurate where p << q (d ~ -beta p / ((1-beta) q)),
  where the textbook logq - logm would lose it under the float32 rounding of logq and logm.
- TVD  0.5 sum |p - q|, g = 0.5 sign(q - p) (sign(0) = 0: the zero subgradient at exact ties).  With A the q-mass
  where q < p and B the q-mass where q > p, each plus half the q-mass where q == p: dD/da = q A where q > p, -q B
  where q < p, q (A - B) / 2 at ties, all free of the cancellation of q (0.5 - 0.5 (B - A)).

Zero probabilities: a column whose weighting probability is 0 (a ``-inf`` logit, in either model, e.g. a masked or
padded vocabulary) contributes exactly 0 to the value, the center and the gradient (0 log 0 = 0); where the
divergence is truly infinite (FKL with q = 0 where p > 0, RKL with p = 0 where q > 0) the value is ``+inf``.

The dispatch layer maps "jsd" with beta 0 and 1 to FKL and RKL, so ``log(beta)`` and ``log(1 - beta)`` are finite here.
"""
import triton
import triton.language as tl

FKL = tl.constexpr(0)
RKL = tl.constexpr(1)
JSD = tl.constexpr(2)
TVD = tl.constexpr(3)


@triton.jit
def log1p_small(y):
    """log(1 + y) for 0 <= y <= 1, accurate to a few ulps even where 1 + y rounds to 1 (then it is y): the quotient
    corrects for the rounding of 1 + y (Goldberg's method; no libdevice needed, so the interpreter runs it too)."""
    u = 1.0 + y
    rounded = u - 1.0
    return tl.where(rounded == 0.0, y, tl.log(u) * (y / tl.where(rounded == 0.0, 1.0, rounded)))


@triton.jit
def softplus(x):
    """log(1 + exp(x)), accurate for very negative x (where it is exp(x)); +inf at +inf, 0 at -inf."""
    return tl.maximum(x, 0.0) + log1p_small(tl.exp(-tl.abs(x)))


@triton.jit
def log_mixture(logp, logq, log_beta, log_one_minus_beta):
    """log(beta p + (1 - beta) q) from the log-probabilities, never forming p or q (-inf where p = q = 0)."""
    u = logp + log_beta
    w = logq + log_one_minus_beta
    top = tl.maximum(u, w)
    ref = tl.where(top > float("-inf"), top, 0.0)
    return ref + tl.log(tl.exp(u - ref) + tl.exp(w - ref))


@triton.jit
def jsd_log_ratio(logq, logp, log_beta, log_one_minus_beta):
    """d = log((1 - beta) q / m) <= 0 (see the module docstring); NaN where q = 0 (callers weight it by q)."""
    return -softplus((log_beta - log_one_minus_beta) + (logp - logq))


@triton.jit
def divergence_terms(logq, logp, q, p, beta, log_beta, log_one_minus_beta, DIVERGENCE: tl.constexpr):
    """Per-element ``(value, center, center_2)`` terms of the two-pass divergences (JSD and TVD) for one tile; lanes
    outside the row must be masked by the caller."""
    if DIVERGENCE == JSD:
        logm = log_mixture(logp, logq, log_beta, log_one_minus_beta)
        value = beta * tl.where(p > 0, p * (logp - logm), 0.0) + \
            (1.0 - beta) * tl.where(q > 0, q * (logq - logm), 0.0)
        center = tl.where(q > 0, q * jsd_log_ratio(logq, logp, log_beta, log_one_minus_beta), 0.0)
        center_2 = tl.zeros_like(value)
    else:
        value = 0.5 * tl.abs(p - q)
        half_tie = tl.where(q == p, 0.5 * q, 0.0)
        center = tl.where(q < p, q, half_tie)
        center_2 = tl.where(q > p, q, half_tie)
    return value, center, center_2


@triton.jit
def divergence_grad(a, b, logq, logp, q, center, center_2, beta, log_beta, log_one_minus_beta,
                    DIVERGENCE: tl.constexpr):
    """dD/da for one tile, given the row's centers; ``a``, ``b`` the tempered logits, ``q = exp(logq)``."""
    if DIVERGENCE == FKL:
        grad = q - tl.exp(logp)
    elif DIVERGENCE == RKL:  # center + center_2 = E_q[a - b], kept apart: center_2 is the offset m_a - m_b
        grad = tl.where(q > 0, q * (((a - b) - center_2) - center), 0.0)
    elif DIVERGENCE == JSD:
        d = jsd_log_ratio(logq, logp, log_beta, log_one_minus_beta)
        grad = tl.where(q > 0, (1.0 - beta) * q * (d - center), 0.0)
    else:
        p = tl.exp(logp)
        grad = q * tl.where(q > p, center, tl.where(q < p, -center_2, 0.5 * (center - center_2)))
    return grad
