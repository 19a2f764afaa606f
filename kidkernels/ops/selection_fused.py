"""Dispatch of the GEMM-fused selection (backend "triton"): row chunks, partial-state buffers, the two launches.

For each chunk of rows, :func:`.select_tiles.entropy_tiles_kernel` (or ``argmax_tiles_kernel``) multiplies the
chunk's hidden states by the whole lm_head and leaves one partial state per (row, vocabulary block) of
``SELECTION.block_n`` columns; :func:`.select_merge.merge_entropy_kernel` (``merge_argmax_kernel``) merges each row's
states into its output.  The logits are never written to memory.

Memory beyond the inputs and the ``[N]`` output: the partials of one chunk, :data:`STATE_BYTES` per (row, block),
``rows x ceil(V / block_n)`` of them, sized so that they fit ``workspace_bytes`` (at least one row): at V = 151,936 and
128-column blocks a row's entropy states are 14.2 kB, so the default 512 MiB holds about 37,700 rows and realistic
batches take one chunk.  Nothing is ``N x V``.

Every launch goes through :func:`.launches.launch` with its matmul FLOPs and the HBM bytes of its loads and stores,
and nothing here reads a tensor value, so the dispatch runs on ``meta`` tensors in a dry run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ..kernels.select_merge import merge_argmax_kernel, merge_entropy_kernel
from ..kernels.select_tiles import argmax_tiles_kernel, entropy_tiles_kernel
from . import fused_tiles, launches
from .config import IDENTITY, LogitTransform
from .workspace import rows_per_chunk

# Bytes of one (row, vocabulary block) partial state: entropy (m, z, acc) float32; argmax float32 value, int32 index.
STATE_BYTES = {"entropy": 12, "argmax": 8}


@dataclass(frozen=True)
class MergeConfig:
    block_r: int  # rows per program (consecutive in memory: 16 float32 rows are two whole 32-byte sectors)
    block_b: int  # vocabulary blocks reduced per loop step
    num_warps: int


# Few rows per program, many blocks per step: N = 2,048 rows make 128 programs (about one per SM of an H100), each
# with 24 KiB of loads in flight per step; the merge reads 12 B per (row, block), about 1% of the GEMM's time.
MERGE = MergeConfig(16, 128, 4)
# Under the interpreter: several loop steps over the blocks of a test-sized vocabulary.  Read at every launch.
MERGE_INTERPRETER = MergeConfig(16, 8, 4)


def partial_chunk_rows(n: int, num_blocks: int, statistic: str, budget: int, block_m: int) -> int:
    """Rows per chunk whose partial states fit ``budget`` bytes: at least 1, at most ``n``, a multiple of
    ``block_m`` when at least ``block_m`` fit (every chunk but the last then fills its row blocks)."""
    rows = rows_per_chunk(num_blocks * STATE_BYTES[statistic], budget)
    if rows >= block_m:
        rows -= rows % block_m
    return max(1, min(n, rows))


def fill_row_statistic(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, statistic: str,
                       inv_temp: float, out: torch.Tensor, workspace_bytes: int,
                       transform: LogitTransform = IDENTITY) -> None:
    """Fill ``out`` ``[N]`` (float32 entropies of softmax(z * inv_temp), ``z`` the logits after the model's scale
    and softcap ``transform``; or int64 argmaxes of the raw logits, which the increasing transform does not move;
    contiguous) for ``logits = x @ weight.T + bias``.

    x ``[N, H]`` (float32, float16 or bfloat16) and weight ``[V, H]`` of the same dtype, each with unit stride along
    H (as the public API passes them; copied here otherwise, since the tile product reads rows along H); bias ``[V]``
    of any float dtype and stride, or None.
    """
    x = x if x.stride(1) == 1 else x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    n, hidden = x.shape
    vocab = weight.shape[0]
    if n == 0:
        return
    cfg = fused_tiles.tile_config(fused_tiles.SELECTION, x.device)
    merge = fused_tiles.tile_config(MERGE, x.device, MERGE_INTERPRETER)
    num_blocks = triton.cdiv(vocab, cfg.block_n)
    step = partial_chunk_rows(n, num_blocks, statistic, workspace_bytes, cfg.block_m)
    if statistic == "entropy":
        parts = (torch.empty(3, num_blocks, step, device=x.device, dtype=torch.float32),)
    else:
        parts = (torch.empty(num_blocks, step, device=x.device, dtype=torch.float32),
                 torch.empty(num_blocks, step, device=x.device, dtype=torch.int32))
    for r0 in range(0, n, step):
        rows = min(step, n - r0)
        _launch_tiles(x[r0:r0 + rows], weight, bias, statistic, inv_temp, transform, parts, step, cfg)
        _launch_merge(parts, statistic, step, out[r0:r0 + rows], num_blocks, merge)


def _launch_tiles(x, weight, bias, statistic, inv_temp, transform: LogitTransform, parts, row_capacity,
                  cfg: fused_tiles.TileConfig) -> None:
    rows, hidden = x.shape
    vocab = weight.shape[0]
    num_blocks = triton.cdiv(vocab, cfg.block_n)
    grid = (triton.cdiv(rows, cfg.block_m) * num_blocks,)
    # HBM: x and the weight once each (the programs of a GROUP_M group re-read a weight block from L2), the bias,
    # and the partial states stored.
    hbm_bytes = (rows + vocab) * hidden * x.element_size() + rows * num_blocks * STATE_BYTES[statistic]
    if bias is not None:
        hbm_bytes += vocab * bias.element_size()
    bias_args = (bias, bias.stride(0)) if bias is not None else (x, 0)  # never read without HAS_BIAS
    common = dict(HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  GROUP_M=cfg.group_m, EVEN_K=hidden % cfg.block_k == 0, **fused_tiles.dot_flags(x.dtype, x.device),
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    flops = 2 * rows * vocab * hidden
    if statistic == "entropy":
        (part,) = parts
        launches.launch(entropy_tiles_kernel, grid, x, x.stride(0), weight, weight.stride(0), *bias_args,
                        part, part.stride(0), row_capacity, rows, vocab, hidden, inv_temp, transform.scale,
                        transform.softcap_value, flops=flops, hbm_bytes=hbm_bytes, HAS_SCALE=transform.has_scale,
                        HAS_SOFTCAP=transform.has_softcap, **common)
    else:
        best, index = parts
        launches.launch(argmax_tiles_kernel, grid, x, x.stride(0), weight, weight.stride(0), *bias_args,
                        best, index, row_capacity, rows, vocab, hidden,
                        flops=flops, hbm_bytes=hbm_bytes, **common)


def _launch_merge(parts, statistic, row_capacity, out, num_blocks, merge: MergeConfig) -> None:
    rows = out.shape[0]
    grid = (triton.cdiv(rows, merge.block_r),)
    # HBM: the chunk's partial states read once, the output written.
    hbm_bytes = rows * num_blocks * STATE_BYTES[statistic] + rows * out.element_size()
    meta = dict(BLOCK_R=merge.block_r, BLOCK_B=merge.block_b, num_warps=merge.num_warps)
    if statistic == "entropy":
        (part,) = parts
        launches.launch(merge_entropy_kernel, grid, part, part.stride(0), row_capacity, out, rows, num_blocks,
                        hbm_bytes=hbm_bytes, **meta)
    else:
        best, index = parts
        launches.launch(merge_argmax_kernel, grid, best, index, row_capacity, out, rows, num_blocks,
                        hbm_bytes=hbm_bytes, **meta)
