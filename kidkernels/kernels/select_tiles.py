"""Selection stage 1: the lm_head GEMM whose epilogue folds each tile of logits into per-row partial states.

One program per (row block, vocabulary block) tile of ``logits = x @ w.T + bias`` (x ``[rows, K]``, w ``[V, K]``),
in :func:`.tile_product.swizzled_tile` order.  The tile is accumulated in float32 (:func:`.tile_product.tile_logits`)
and never leaves registers: the epilogue adds the bias in float32, reduces the tile along the vocabulary to one state
per row (:mod:`.tile_states`) and stores that state at ``(vocabulary block, row)`` of the partials, which
:mod:`.select_merge` then merges per row.  Nothing of ``rows x V`` size is written.

* :func:`entropy_tiles_kernel`: the entropy state ``(m, z, acc)`` of ``softmax(z * inv_temp)`` over the block's
  columns, ``z`` the logits after the model's scale and softcap (:mod:`.logit_transform`, applied in float32 after
  the bias, before the temperature; the flags compile it out), three float32 planes ``[3, blocks, row_capacity]``.
* :func:`argmax_tiles_kernel`: ``(best value, first column)`` of the raw logits (neither the temperature nor the
  increasing scale and softcap can move the maximum, and applying them could only merge near-ties), with
  ``torch.argmax``'s rules within the block (the lowest column among the maxima, the first NaN if any): float32
  ``[blocks, row_capacity]`` and int32 likewise.

The partials are laid out vocabulary block major, ``(block, row)`` at ``block * row_capacity + row``, so that each
program stores ``BLOCK_M`` consecutive values and the merge reads consecutive rows.
"""
import triton
import triton.language as tl

from .logit_transform import transform_logits
from .tile_product import swizzled_tile, tile_logits
from .tile_states import tile_argmax_state, tile_entropy_state


@triton.jit
def _model_logits_tile(x_ptr, x_row_stride, w_ptr, w_row_stride, bias_ptr, bias_stride, n_rows, V, K,
                       HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr):
    """This program's tile of the model's raw logits (float32 ``[BLOCK_M, BLOCK_N]``, bias added; out-of-range rows
    and columns hold finite garbage), its local row indices, column indices and vocabulary block."""
    row_block, col_block = swizzled_tile(tl.program_id(0), tl.cdiv(n_rows, BLOCK_M), tl.cdiv(V, BLOCK_N), GROUP_M)
    row0 = row_block * BLOCK_M
    col0 = col_block * BLOCK_N
    logits = tile_logits(x_ptr, x_row_stride, w_ptr, w_row_stride, n_rows, V, K, row0, col0,
                         BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_FP32, INPUT_PRECISION)
    cols = col0 + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols.to(tl.int64) * bias_stride, mask=cols < V, other=0.0)
        logits += bias.to(tl.float32)[None, :]
    return logits, row0 + tl.arange(0, BLOCK_M), cols, col_block


@triton.jit
def entropy_tiles_kernel(x_ptr, x_row_stride, w_ptr, w_row_stride, bias_ptr, bias_stride, part_ptr, plane_stride,
                         row_capacity, n_rows, V, K, inv_temp, scale, softcap,
                         HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                         DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Entropy partials of rows ``[0, n_rows)``: planes ``m``, ``z``, ``acc`` (float32) at ``part_ptr + plane *
    plane_stride + block * row_capacity + row``, for ``softmax(z * inv_temp)`` restricted to each block, ``z`` the
    transformed logits."""
    logits, rows, cols, col_block = _model_logits_tile(
        x_ptr, x_row_stride, w_ptr, w_row_stride, bias_ptr, bias_stride, n_rows, V, K,
        HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, DOT_FP32, INPUT_PRECISION)
    # The transform maps the garbage beyond the vocabulary to finite values too: the state's mask drops those lanes
    # (a -inf logit inside the vocabulary becomes -softcap, as in the row kernel and the reference).
    logits = transform_logits(logits, scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    m, z, acc = tile_entropy_state(logits * inv_temp, (cols < V)[None, :])
    offsets = col_block.to(tl.int64) * row_capacity + rows
    stored = rows < n_rows
    tl.store(part_ptr + offsets, m, mask=stored)
    tl.store(part_ptr + plane_stride + offsets, z, mask=stored)
    tl.store(part_ptr + 2 * plane_stride + offsets, acc, mask=stored)


@triton.jit
def argmax_tiles_kernel(x_ptr, x_row_stride, w_ptr, w_row_stride, bias_ptr, bias_stride, best_ptr, index_ptr,
                        row_capacity, n_rows, V, K,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                        DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Argmax partials of rows ``[0, n_rows)``: the block's largest logit (float32, NaN if it holds one) and its
    first column (int32) at ``block * row_capacity + row``."""
    logits, rows, cols, col_block = _model_logits_tile(
        x_ptr, x_row_stride, w_ptr, w_row_stride, bias_ptr, bias_stride, n_rows, V, K,
        HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, DOT_FP32, INPUT_PRECISION)
    best, index = tile_argmax_state(tl.where((cols < V)[None, :], logits, float("-inf")), cols)
    offsets = col_block.to(tl.int64) * row_capacity + rows
    stored = rows < n_rows
    tl.store(best_ptr + offsets, best, mask=stored)
    tl.store(index_ptr + offsets, index, mask=stored)
