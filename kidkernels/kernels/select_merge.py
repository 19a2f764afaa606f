"""Selection stage 2: merge each row's partial states over the vocabulary blocks into its entropy or argmax.

The partials of :mod:`.select_tiles` (vocabulary block major, ``block * row_capacity + row``) are read
``[BLOCK_B, BLOCK_R]`` at a time (consecutive rows: coalesced), reduced along the blocks with ``tl.reduce`` and the
states' merge functions, which are commutative and associative (up to float32 rounding for the entropy, exactly for
the argmax), so the reduction tree's order does not matter; each reduced slab is merged into the running state.
Lanes past the last block load the merges' identities: ``(-inf, 0, 0)`` for the entropy, ``(-inf, INT32_MAX)`` for
the argmax (which loses every tie, so a row of ``-inf`` logits still gets column 0, as ``torch.argmax`` gives).
"""
import triton
import triton.language as tl

from .online_softmax import finish_entropy
from .tile_states import merge_argmax, merge_entropy


@triton.jit
def _slab(pid, b0, n_rows, num_blocks, row_capacity, BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    """Offsets ``[BLOCK_B, BLOCK_R]`` of blocks ``b0..`` for this program's rows, and which are inside."""
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    blocks = b0 + tl.arange(0, BLOCK_B)
    inside = (blocks < num_blocks)[:, None] & (rows < n_rows)[None, :]
    return blocks.to(tl.int64)[:, None] * row_capacity + rows[None, :], inside


@triton.jit
def merge_entropy_kernel(part_ptr, plane_stride, row_capacity, entropy_ptr, n_rows, num_blocks,
                         BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    """``entropy[r]`` (float32, nats) for rows ``r`` in ``[0, n_rows)`` from the planes ``m``, ``z``, ``acc`` of
    :func:`.select_tiles.entropy_tiles_kernel`."""
    pid = tl.program_id(0)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    z = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R], tl.float32)
    for b0 in range(0, num_blocks, BLOCK_B):
        offsets, inside = _slab(pid, b0, n_rows, num_blocks, row_capacity, BLOCK_R, BLOCK_B)
        slab_m = tl.load(part_ptr + offsets, mask=inside, other=float("-inf"))
        slab_z = tl.load(part_ptr + plane_stride + offsets, mask=inside, other=0.0)
        slab_acc = tl.load(part_ptr + 2 * plane_stride + offsets, mask=inside, other=0.0)
        slab_m, slab_z, slab_acc = tl.reduce((slab_m, slab_z, slab_acc), 0, merge_entropy)
        m, z, acc = merge_entropy(m, z, acc, slab_m, slab_z, slab_acc)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(entropy_ptr + rows, finish_entropy(z, acc), mask=rows < n_rows)


@triton.jit
def merge_argmax_kernel(best_ptr, index_ptr, row_capacity, argmax_ptr, n_rows, num_blocks,
                        BLOCK_R: tl.constexpr, BLOCK_B: tl.constexpr):
    """``argmax[r]`` (int64) for rows ``r`` in ``[0, n_rows)`` from the partials of
    :func:`.select_tiles.argmax_tiles_kernel`."""
    pid = tl.program_id(0)
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    index = tl.full([BLOCK_R], 2147483647, tl.int32)
    for b0 in range(0, num_blocks, BLOCK_B):
        offsets, inside = _slab(pid, b0, n_rows, num_blocks, row_capacity, BLOCK_R, BLOCK_B)
        slab_best = tl.load(best_ptr + offsets, mask=inside, other=float("-inf"))
        slab_index = tl.load(index_ptr + offsets, mask=inside, other=2147483647)
        slab_best, slab_index = tl.reduce((slab_best, slab_index), 0, merge_argmax)
        best, index = merge_argmax(best, index, slab_best, slab_index)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    tl.store(argmax_ptr + rows, index.to(tl.int64), mask=rows < n_rows)
