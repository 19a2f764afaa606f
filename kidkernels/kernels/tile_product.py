"""The tile product of the GEMM-fused kernels: one ``[BLOCK_M, BLOCK_N]`` float32 tile of ``x @ w.T``.

Every fused kernel (selection, the loss forward, its gradient) is a grid of programs, one per (row block, vocabulary
block) of the logits ``x @ w.T`` (x ``[rows, K]``, w ``[V, K]``, both unit stride along K).  Each program forms its
tile in a float32 accumulator that never leaves registers and hands it to its epilogue; nothing of ``rows x V`` size
is written unless the epilogue chooses to.

:func:`swizzled_tile` orders the programs so that consecutive ones share a vocabulary block: the weight is the large
operand (V x K, hundreds of MB to GB) and the rows of a chunk are few, so ``GROUP_M`` row blocks read each block of
weight rows while it sits in L2 (a group of ``GROUP_M`` row blocks walks the vocabulary together).

:func:`tile_logits` accumulates ``tl.dot`` over K in float32.  Out-of-range rows and columns of a ragged edge
tile are read at wrapped-around indices (``% n_rows``, ``% n_cols``: valid memory, no masks in the inner loop) and
come out as finite garbage that the caller's epilogue masks; K is masked only when it is not a multiple of
``BLOCK_K``.  (Triton 3.9 removed block pointers; tensor descriptors need 16-byte aligned row strides, which a small
model's hidden size need not have: plain pointers work for every shape.)  ``DOT_FP32`` upcasts the operands before
the dot: Triton 3.9's interpreter multiplies bfloat16 operands as raw bit patterns, so under the interpreter bf16
tiles are upcast (the GPU multiplies bf16 on the tensor cores, accumulating in float32).  ``INPUT_PRECISION`` is
"ieee" for float32 operands (no TF32: the logits of a float32 model are float32 products, as cuBLAS forms them by
default).
"""
import triton
import triton.language as tl


@triton.jit
def swizzled_tile(pid, num_row_blocks, num_col_blocks, GROUP_M: tl.constexpr):
    """``(row_block, col_block)`` of program ``pid``: groups of ``GROUP_M`` row blocks, row block fastest within a
    group, so that the programs running together read the same block of weight rows."""
    per_group = GROUP_M * num_col_blocks
    group = pid // per_group
    first_row_block = group * GROUP_M
    group_rows = tl.minimum(num_row_blocks - first_row_block, GROUP_M)
    in_group = pid % per_group
    return first_row_block + in_group % group_rows, in_group // group_rows


@triton.jit
def tile_logits(x_ptr, x_row_stride, w_ptr, w_row_stride, n_rows, n_cols, K, row0, col0,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """float32 ``[BLOCK_M, BLOCK_N]`` tile ``x[row0:row0+BLOCK_M] @ w[col0:col0+BLOCK_N].T`` (x ``[n_rows, K]``, w
    ``[n_cols, K]``, unit stride along K); rows at or beyond ``n_rows`` and columns at or beyond ``n_cols`` hold
    garbage (finite) that the caller must mask.  ``EVEN_K``: K is a multiple of ``BLOCK_K``."""
    rows = (row0 + tl.arange(0, BLOCK_M)) % n_rows
    cols = (col0 + tl.arange(0, BLOCK_N)) % n_cols
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * x_row_stride + ks[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * w_row_stride + ks[:, None]  # the transpose: [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            x = tl.load(x_ptrs, mask=ks[None, :] < K - k0, other=0.0)
            w = tl.load(w_ptrs, mask=ks[:, None] < K - k0, other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    return acc
