"""Launcher of the Triton entropy/argmax kernel for one chunk of logits (the Triton twin of ``selection_torch``)."""
from __future__ import annotations

import torch

from ..kernels.entropy_argmax import row_entropy_argmax_kernel
from . import tiles


def entropy_argmax(logits: torch.Tensor, inv_temp: float, entropy_out: torch.Tensor | None,
                   argmax_out: torch.Tensor | None) -> None:
    """Fill ``entropy_out`` (float32 ``[rows]``: entropy of softmax(logits * inv_temp)) and/or ``argmax_out`` (int64
    ``[rows]``: argmax of the logits, ties to the lowest index) for ``logits`` ``[rows, V]`` with unit stride along V.

    The logits are only read.  Either output may be None; both outputs must be contiguous.
    """
    rows, vocab = logits.shape
    if rows == 0 or (entropy_out is None and argmax_out is None):
        return
    block = tiles.block_v(vocab)
    # Triton needs a tensor for every pointer argument; an output whose flag is off is never written.
    row_entropy_argmax_kernel[(rows,)](
        logits, logits.stride(0),
        entropy_out if entropy_out is not None else argmax_out,
        argmax_out if argmax_out is not None else entropy_out,
        vocab, inv_temp,
        WITH_ENTROPY=entropy_out is not None, WITH_ARGMAX=argmax_out is not None, BLOCK_V=block,
        num_warps=tiles.num_warps(block),
    )
