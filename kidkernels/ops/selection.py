"""Dispatch of KID's masking stage: chunked entropy/argmax from hidden states, and the choice of positions.

* :func:`linear_row_statistic`: on backend "triton" the GEMM-fused kernels (:mod:`.selection_fused`): the logits
  are formed tile by tile in registers and never written; only per-(row, vocabulary block) partial states are, for
  row chunks sized by the workspace budget.  On "triton_rows" and "torch" it runs over row chunks whose float32
  logits fit the workspace budget: for each chunk the logits are formed by a matmul (:func:`.gemm.linear_logits`,
  never rounded to the input dtype) and one per-row pass (``selection_triton`` or ``selection_torch``) turns them
  into the chunk's entropies or argmaxes.  Memory: one chunk of logits (plus the PyTorch backend's temporaries), or
  of partial states, and the O(N) outputs, whatever N is.
* :func:`select_positions_mask` chooses ``k_i = floor(alpha * n_i + 0.5)`` of the valid positions of each row by one
  of four strategies, with torch ops on the device: sorts, cumulative sums and integer arithmetic, no host reads.

Nothing here records autograd history: the statistics are used to choose tokens, never differentiated.
"""
from __future__ import annotations

import torch

from .config import IDENTITY, LogitTransform
from .gemm import compute_dtype, linear_logits, without_autocast
from .registry import backend_impl
from .workspace import chunk_rows

STRATEGIES = ("random", "uniform", "hard", "easy")


@torch.no_grad()
@without_autocast
def linear_row_statistic(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, statistic: str,
                         inv_temp: float, backend: str, workspace_bytes: int,
                         transform: LogitTransform = IDENTITY) -> torch.Tensor:
    """``statistic`` ("entropy" or "argmax") of each row of ``logits = x @ weight.T + bias``.

    x ``[N, H]`` with unit stride along H; weight ``[V, H]`` contiguous, same dtype; bias ``[V]`` or None.
    "entropy": ``[N]`` in :func:`.gemm.compute_dtype` (float32; float64 for float64 inputs), in nats, of
    softmax(z * inv_temp), ``z`` the logits after the model's scale and softcap (``transform``).  "argmax": ``[N]``
    int64 of the raw logits (which the increasing ``transform`` does not move), ties to the lowest index.
    """
    n, vocab = x.shape[0], weight.shape[0]
    if statistic == "entropy":
        out = torch.empty(n, device=x.device, dtype=compute_dtype(x.dtype))
    elif statistic == "argmax":
        out = torch.empty(n, device=x.device, dtype=torch.int64)
    else:
        raise ValueError(f"statistic must be 'entropy' or 'argmax', got {statistic!r}")
    if backend == "triton":
        from . import selection_fused  # imports triton: only when used

        selection_fused.fill_row_statistic(x, weight, bias, statistic, inv_temp, out, workspace_bytes, transform)
        return out
    impl = backend_impl("selection", backend)
    step = chunk_rows(vocab, x.dtype, workspace_bytes, logit_buffers=1, temporaries=impl.TEMPORARIES_PER_ELEMENT)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        logits = linear_logits(x[r0:r1], weight, bias)
        if statistic == "entropy":
            impl.entropy(logits, inv_temp, out[r0:r1], transform)
        else:
            impl.argmax(logits, out[r0:r1])
        del logits
    return out


def selection_counts(valid: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, k)``, int64 ``[B]``: the valid positions of each row and how many to choose, ``floor(alpha * n + 0.5)``.

    The product is formed in float64, the same IEEE operations as Python's ``math.floor(alpha * n + 0.5)``.
    """
    n = valid.sum(dim=1, dtype=torch.int64)
    k = torch.floor(n.to(torch.float64) * alpha + 0.5).to(torch.int64)
    return n, torch.minimum(k, n)


def _first_k_by_key(key: torch.Tensor, valid: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: in each row, the ``k`` valid positions with the smallest ``key``, ties to the earlier position.

    Two stable sorts give the order (valid first, then key ascending, then position): the first by key, the second by
    validity of the key-sorted positions.  Invalid positions so always rank after every valid one, whatever their key
    (NaN and +inf included: ``torch.sort`` puts NaN after every number), and ranks ``< k <= n`` are all valid.
    """
    order = torch.sort(key, dim=1, stable=True).indices
    invalid_in_order = (~valid).gather(1, order).to(torch.uint8)
    order = order.gather(1, torch.sort(invalid_in_order, dim=1, stable=True).indices)
    ranks = torch.arange(valid.shape[1], device=valid.device)
    chosen = torch.zeros_like(valid)
    return chosen.scatter_(1, order, ranks[None, :] < k[:, None])


def _uniform_mask(valid: torch.Tensor, n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, T]``: the valid positions of rank ``floor((2j + 1) n / (2k))``, ``j = 0..k-1``, among the row's valid
    positions (the centres of k equal parts of the row; consecutive picks are ``floor(n/k)`` or ``ceil(n/k)`` apart).

    No sort or scatter is needed: with ``r`` the rank of a valid position, the number of picks at ranks ``<= r`` is
    ``c(r) = #{j : (2j + 1) n < 2k (r + 1)} = floor((2k (r + 1) + n - 1) / (2n))`` (exact in integers), and rank ``r``
    is picked iff ``c(r) > c(r - 1)``.  Since ``k <= n`` the ranks are distinct, so exactly ``k`` are picked.
    """
    rank = valid.cumsum(dim=1) - 1  # int64; only read at valid positions
    n2 = 2 * n.clamp(min=1)[:, None]  # n = 0 rows have no valid position: any divisor will do
    k2 = 2 * k[:, None]
    picks_upto = torch.div(k2 * (rank + 1) + n2 // 2 - 1, n2, rounding_mode="floor")
    picks_before = torch.div(k2 * rank + n2 // 2 - 1, n2, rounding_mode="floor")
    return valid & (picks_upto > picks_before)


def _random_keys(shape, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform float64 keys (53 random bits: ties practically never happen, and are broken by position anyway)
    drawn from ``generator`` on the tensors' device, or from a CPU generator and then copied to the device."""
    if generator is not None and generator.device.type != device.type:
        return torch.rand(shape, generator=generator, dtype=torch.float64).to(device, non_blocking=True)
    return torch.rand(shape, generator=generator, dtype=torch.float64, device=device)


def select_positions_mask(valid: torch.Tensor, alpha: float, strategy: str, scores: torch.Tensor | None,
                          generator: torch.Generator | None) -> torch.Tensor:
    """Bool ``[B, T]`` of chosen positions; ``valid`` bool ``[B, T]``, ``scores`` float ``[B, T]`` for hard/easy."""
    n, k = selection_counts(valid, alpha)
    if strategy == "uniform":
        return _uniform_mask(valid, n, k)
    if strategy == "random":
        key = _random_keys(valid.shape, valid.device, generator)
    elif strategy == "hard":
        key = -scores  # highest score first; NaN stays NaN and so ranks last
    elif strategy == "easy":
        key = scores
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return _first_k_by_key(key, valid, k)
