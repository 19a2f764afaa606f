"""Launchers of the Triton entropy and argmax kernels for one chunk of logits (the Triton twin of
``selection_torch``).  Each kernel is launched from exactly one place here, through :func:`.launches.launch` with the
HBM bytes it moves (no matrix product: 0 FLOPs): one read of the logits chunk in its dtype and one write of the
``[rows]`` output (``tests/test_roofline.py`` checks them against the addresses the kernels touch)."""
from __future__ import annotations

import torch

from ..kernels.entropy_argmax import row_argmax_kernel, row_entropy_kernel
from . import tiles
from .config import IDENTITY, LogitTransform
from .launches import launch


def _row_pass_bytes(logits: torch.Tensor, out: torch.Tensor) -> int:
    """Every logit of the chunk read once, one output element written per row."""
    rows, vocab = logits.shape
    return rows * vocab * logits.element_size() + rows * out.element_size()


# The kernels allocate nothing besides their outputs.
TEMPORARIES_PER_ELEMENT = 0


def entropy(logits: torch.Tensor, inv_temp: float, out: torch.Tensor, transform: LogitTransform = IDENTITY) -> None:
    """Fill ``out`` (float32 ``[rows]``, contiguous) with the entropies of softmax(z * inv_temp), ``z`` the
    ``transform``-ed ``logits`` ``[rows, V]`` (unit stride along V; only read)."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    block = tiles.block_v(vocab)
    launch(row_entropy_kernel, (rows,), logits, logits.stride(0), out, vocab, inv_temp, transform.scale,
           transform.softcap_value, hbm_bytes=_row_pass_bytes(logits, out), HAS_SCALE=transform.has_scale,
           HAS_SOFTCAP=transform.has_softcap, BLOCK_V=block, num_warps=tiles.num_warps(block))


def argmax(logits: torch.Tensor, out: torch.Tensor) -> None:
    """Fill ``out`` (int64 ``[rows]``, contiguous) with the argmax of each row of ``logits`` ``[rows, V]`` (unit
    stride along V; only read), ties to the lowest index."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    block = tiles.block_v(vocab)
    launch(row_argmax_kernel, (rows,), logits, logits.stride(0), out, vocab, hbm_bytes=_row_pass_bytes(logits, out),
           BLOCK_V=block, num_warps=tiles.num_warps(block))
