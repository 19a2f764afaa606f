"""The chunked pure-PyTorch backend of the entropy/argmax statistics: the kernel's results, in torch ops.

:func:`entropy_argmax` takes one chunk of logits (``[rows, V]``) the dispatch layer owns and may overwrite it;
:data:`TEMPORARIES_PER_ELEMENT` tells the chunk sizer how many more ``[rows, V]`` compute-dtype tensors it allocates.
"""
from __future__ import annotations

import torch

# Peak number of [rows, V] compute-dtype temporaries alive at once besides the logits chunk (log-probs, probs).
TEMPORARIES_PER_ELEMENT = 2


def entropy_argmax(logits: torch.Tensor, inv_temp: float, entropy_out: torch.Tensor | None,
                   argmax_out: torch.Tensor | None) -> None:
    """Fill ``entropy_out`` (``[rows]``, entropy in nats of softmax(logits * inv_temp)) and/or ``argmax_out`` (int64
    ``[rows]``, ``torch.argmax`` of the untempered logits: ties and NaN as torch) for float32/float64 ``logits``
    ``[rows, V]``.  The logits are overwritten when the entropy is computed."""
    if argmax_out is not None:
        # Before the tempering below: scaling could merge two near-equal logits into a tie.
        argmax_out.copy_(torch.argmax(logits, dim=1))
    if entropy_out is None:
        return
    if inv_temp != 1.0:
        logits.mul_(inv_temp)
    logp = torch.log_softmax(logits, dim=1)
    p = logp.exp()
    # H = -sum p log p.  A -inf logit has p = 0: clamping its log-prob to the most negative finite value makes its
    # term 0 * finite = 0 instead of 0 * inf = nan.
    logp.clamp_(min=torch.finfo(logp.dtype).min)
    p.mul_(logp)
    entropy_out.copy_(p.sum(dim=1).neg_())
