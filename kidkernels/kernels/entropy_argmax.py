"""Per-row entropy and argmax of a chunk of logits: one program per row, one pass over the vocabulary in tiles.

The entropy is that of ``softmax(x * inv_temp)``; it is accumulated with :func:`.online_softmax.online_entropy_update`
(running max, rescaled sum and rescaled non-negative ``sum p (m - x)``), so each logit is read once.  The argmax is of
the untempered logits ``x`` (the temperature does not move the maximum, and scaling could only merge near-ties),
with ``torch.argmax``'s rules via :func:`.online_softmax.online_argmax_update`: ties to the lowest column, NaN wins.

Both statistics come from the same loads, so a caller who wants both pays for one read of the logits; constexpr flags
compile out the one that is not wanted.
"""
import triton
import triton.language as tl

from .online_softmax import finish_entropy, online_argmax_update, online_entropy_update


@triton.jit
def row_entropy_argmax_kernel(
    logits_ptr, row_stride, entropy_ptr, argmax_ptr,
    V, inv_temp,
    WITH_ENTROPY: tl.constexpr, WITH_ARGMAX: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Row ``r`` of ``logits`` (``[rows, V]``, any float dtype, unit stride along V) gives ``entropy[r]`` (float32,
    nats, of softmax(logits[r] * inv_temp)) and ``argmax[r]`` (int64); an output whose flag is off is not touched."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    m = float("-inf")
    z = 0.0
    acc = 0.0
    best_val = float("-inf")
    best_idx = 0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if WITH_ENTROPY:
            m, z, acc = online_entropy_update(m, z, acc, x * inv_temp, mask)
        if WITH_ARGMAX:
            best_val, best_idx = online_argmax_update(best_val, best_idx, x, cols)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, finish_entropy(z, acc))
    if WITH_ARGMAX:
        tl.store(argmax_ptr + row, best_idx.to(tl.int64))
