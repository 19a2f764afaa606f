"""The chunked pure-PyTorch backend of the entropy and argmax statistics: the kernels' results, in torch ops.

Each function takes one chunk of logits (``[rows, V]``) the dispatch layer owns and may overwrite it;
:data:`TEMPORARIES_PER_ELEMENT` tells the chunk sizer how many more ``[rows, V]`` compute-dtype tensors they allocate.
"""
from __future__ import annotations

import torch

from .config import IDENTITY, LogitTransform
from .logit_transform import transform_logits

# Peak number of [rows, V] compute-dtype temporaries alive at once besides the logits chunk (log-probs, probs).
TEMPORARIES_PER_ELEMENT = 2


def entropy(logits: torch.Tensor, inv_temp: float, out: torch.Tensor, transform: LogitTransform = IDENTITY) -> None:
    """Fill ``out`` (``[rows]``) with the entropies in nats of softmax(z * inv_temp), ``z`` the ``transform``-ed
    float32/float64 ``logits`` ``[rows, V]``, which may be overwritten."""
    logits = transform_logits(logits, transform)
    if inv_temp != 1.0:
        logits.mul_(inv_temp)
    logp = torch.log_softmax(logits, dim=1)
    p = logp.exp()
    # H = -sum p log p.  A -inf logit has p = 0: clamping its log-prob to the most negative finite value makes its
    # term 0 * finite = 0 instead of 0 * inf = nan.
    logp.clamp_(min=torch.finfo(logp.dtype).min)
    p.mul_(logp)
    out.copy_(p.sum(dim=1).neg_())


def argmax(logits: torch.Tensor, out: torch.Tensor) -> None:
    """Fill ``out`` (int64 ``[rows]``) with ``torch.argmax`` of each row of ``logits`` (ties and NaN as torch)."""
    out.copy_(torch.argmax(logits, dim=1))
