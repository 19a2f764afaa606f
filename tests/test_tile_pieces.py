"""The shared pieces of the GEMM-fused kernels (kernels/tile_product.py, kernels/tile_states.py), each through a
tiny test kernel under the Triton interpreter, against float64."""
import pytest
import torch

from tests.conftest import DEVICE

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from kidkernels.kernels.online_softmax import finish_entropy, finish_kl, merge_kl  # noqa: E402
from kidkernels.kernels.tile_product import swizzled_tile, tile_logits  # noqa: E402
from kidkernels.kernels.tile_states import (  # noqa: E402
    merge_argmax,
    merge_entropy,
    tile_argmax_state,
    tile_entropy_state,
    tile_kl_state,
)


@triton.jit
def _product_kernel(x, x_stride, w, w_stride, out, out_stride, visits, N, V, K, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                    DOT_FP32: tl.constexpr):
    row_block, col_block = swizzled_tile(tl.program_id(0), tl.cdiv(N, BLOCK_M), tl.cdiv(V, BLOCK_N), GROUP_M)
    acc = tile_logits(x, x_stride, w, w_stride, N, V, K, row_block * BLOCK_M, col_block * BLOCK_N,
                      BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, DOT_FP32, "ieee")
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows < N)[:, None] & (cols < V)[None, :]
    tl.store(out + rows[:, None].to(tl.int64) * out_stride + cols[None, :], acc, mask=inside)
    tl.atomic_add(visits + row_block * tl.cdiv(V, BLOCK_N) + col_block, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [45, 48])
@pytest.mark.parametrize("group_m", [1, 2, 4])
def test_tile_product_every_tile_once(dtype, k, group_m):
    """Ragged N and V, K a multiple of BLOCK_K or not, every GROUP_M: each tile visited exactly once, each logit
    written and within float32 accumulation error of float64 (bf16 upcast for the interpreter's dot)."""
    if DEVICE != "cpu":
        pytest.skip("interpreter test")
    torch.manual_seed(0)
    n, v, bm, bn, bk = 37, 101, 16, 32, 16
    x = torch.randn(n, k).to(dtype)
    w = torch.randn(v, k).to(dtype)
    out = torch.full((n, v), float("nan"))
    blocks = triton.cdiv(n, bm) * triton.cdiv(v, bn)
    visits = torch.zeros(blocks, dtype=torch.int32)
    _product_kernel[(blocks,)](x, x.stride(0), w, w.stride(0), out, out.stride(0), visits, n, v, k, bm, bn, bk,
                               group_m, k % bk == 0, dtype == torch.bfloat16)
    assert visits.eq(1).all()
    assert not out.isnan().any()
    ref = x.double() @ w.double().T
    assert (out.double() - ref).abs().max().item() < 1e-5 * k ** 0.5 * 4


@triton.jit
def _states_kernel(x_ptr, y_ptr, out, V, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, REVERSED: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    z = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
    zx = tl.zeros([BLOCK_M], tl.float32)
    my = tl.full([BLOCK_M], float("-inf"), tl.float32)
    zy = tl.zeros([BLOCK_M], tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    index = tl.zeros([BLOCK_M], tl.int32)
    for v0 in range(0, V, BLOCK_N):
        cols = v0 + tl.arange(0, BLOCK_N)
        mask = (cols < V)[None, :] & (rows >= 0)[:, None]
        x = tl.load(x_ptr + rows[:, None] * V + cols[None, :], mask=mask, other=float("-inf"))
        y = tl.load(y_ptr + rows[:, None] * V + cols[None, :], mask=mask, other=float("-inf"))
        m2, z2, acc2 = tile_entropy_state(x, mask)
        mx2, zx2, my2, zy2, s2 = tile_kl_state(x, y)
        best2, index2 = tile_argmax_state(x, cols)
        if REVERSED:  # the merges of entropy and argmax states must not depend on the order
            m, z, acc = merge_entropy(m2, z2, acc2, m, z, acc)
            best, index = merge_argmax(best2, index2, best, index)
        else:
            m, z, acc = merge_entropy(m, z, acc, m2, z2, acc2)
            best, index = merge_argmax(best, index, best2, index2)
        mx, zx, my, zy, s = merge_kl(mx, zx, my, zy, s, mx2, zx2, my2, zy2, s2)
    tl.store(out + rows, finish_entropy(z, acc))
    tl.store(out + BLOCK_M + rows, finish_kl(zx, zy, s))
    tl.store(out + 2 * BLOCK_M + rows, index.to(tl.float32))


@pytest.mark.parametrize("reversed_merge", [False, True])
def test_tile_states_merge_to_row_results(reversed_merge):
    """Entropy, one-pass KL and argmax from per-tile states merged across ragged tiles, rows of spread 0.1 to 50,
    -inf columns (one, and a whole tile), a tie across tiles (lowest index) and NaNs (the first wins)."""
    if DEVICE != "cpu":
        pytest.skip("interpreter test")
    torch.manual_seed(1)
    bm, v, bn = 8, 203, 32
    x = torch.randn(bm, v) * torch.tensor([0.1, 1, 5, 20, 50, 1, 1, 1])[:, None]
    y = x + torch.randn(bm, v)
    x[5, 7] = float("-inf")
    x[5, 96:160] = float("-inf")
    x[6, 10] = x[6, 150] = x[6].max() + 3
    x[7, 170] = float("nan")
    x[7, 40] = float("nan")
    out = torch.zeros(3 * bm)
    _states_kernel[(1,)](x, y, out, v, bm, bn, reversed_merge)
    xd, yd = x[:7].double(), y[:7].double()
    logp = torch.log_softmax(xd, 1)
    p = logp.exp()
    zero = torch.zeros_like(logp)
    entropy = -(p * torch.where(p > 0, logp, zero)).sum(1)
    kl = (p * torch.where(p > 0, logp - torch.log_softmax(yd, 1), zero)).sum(1)
    assert (out[:7].double() - entropy).abs().max() < 1e-5
    assert (out[bm:bm + 7].double() - kl).abs().max() < 1e-5
    assert out[2 * bm:].long().tolist() == torch.argmax(x, 1).tolist()
