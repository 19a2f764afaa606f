"""Per-row entropy or argmax of a chunk of logits: one program per row, one pass over the vocabulary in tiles.

:func:`row_entropy_kernel`: the entropy of ``softmax(x * inv_temp)``, accumulated with
:func:`.online_softmax.online_entropy_update` (running max, rescaled sum and rescaled non-negative ``sum p (m - x)``),
so each logit is read once, through the model's logit scale and softcap.  :func:`row_argmax_kernel`: the argmax of the
raw logits ``x`` (neither the temperature nor the increasing scale and softcap move the maximum, and applying them
could only merge near-ties), with ``torch.argmax``'s rules via
:func:`.online_softmax.online_argmax_update`: ties to the lowest column, NaN wins.  The public API asks for one or the
other (KID scores positions by entropy, predicts tokens by argmax), never both from the same logits.
"""
import triton
import triton.language as tl

from .logit_transform import transform_logits
from .online_softmax import finish_entropy, online_argmax_update, online_entropy_update


@triton.jit
def row_entropy_kernel(logits_ptr, row_stride, entropy_ptr, V, inv_temp, scale, softcap, HAS_SCALE: tl.constexpr,
                       HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """Row ``r`` of ``logits`` (``[rows, V]``, any float dtype, unit stride along V) gives ``entropy[r]`` (float32,
    nats, of softmax(z * inv_temp)), ``z`` the logits after the model's scale and softcap (``logit_transform.py``;
    the flags compile it out)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    m = float("-inf")
    z = 0.0
    acc = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = transform_logits(tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32), scale, softcap,
                             HAS_SCALE, HAS_SOFTCAP)
        m, z, acc = online_entropy_update(m, z, acc, x * inv_temp, mask)
    tl.store(entropy_ptr + row, finish_entropy(z, acc))


@triton.jit
def row_argmax_kernel(logits_ptr, row_stride, argmax_ptr, V, BLOCK_V: tl.constexpr):
    """Row ``r`` of ``logits`` (``[rows, V]``, unit stride along V) gives ``argmax[r]`` (int64)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    best_val = float("-inf")
    best_idx = 0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        best_val, best_idx = online_argmax_update(best_val, best_idx, x, cols)
    tl.store(argmax_ptr + row, best_idx.to(tl.int64))
