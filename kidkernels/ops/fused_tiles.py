"""Tile configurations of the GEMM-fused kernels, and the flags of their tile product for a given input dtype.

A small fixed set, each compiled without register spills for sm_90a on Triton 3.6 and 3.9
(``tools/compile_kernels.py`` checks every variant kidkernels launches).  128 x 128 tiles with K steps of 64 and 8
warps: one float32 accumulator is 64 registers per thread.  The loss forward holds two (student and teacher), and
with its epilogue (one-pass KL state, argmax, target logit, tile store) 128 x 128 tiles use all 255 registers and
spill in some hot variants (a bias, T != 1, no target; odd V spills 200-700 B): it takes 128 x 64 tiles (110-216
registers, no spill in any variant); 128 x 256 tiles with two accumulators spill (see ``shared/notes/fused-gemm.md``).
``GROUP_M`` row blocks walk the vocabulary together, so a block of weight rows is read from HBM once per group.

Under the Triton interpreter (CPU tensors, tests) the tiles are small, so that the ragged edges and the merges of many
vocabulary blocks are exercised at test shapes and the interpreter stays fast.  Tests may replace the module-level
configurations (they are read at every launch).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._backend import triton_interpreter_enabled


@dataclass(frozen=True)
class TileConfig:
    block_m: int  # rows of logits per program
    block_n: int  # vocabulary columns per program
    block_k: int  # hidden-size step of the tile product
    group_m: int  # row blocks that share each block of weight rows (L2 reuse)
    num_warps: int
    num_stages: int


# The GPU configurations, by kernel.
SELECTION = TileConfig(128, 128, 64, 8, 8, 3)
LOSS_FORWARD = TileConfig(128, 64, 64, 8, 8, 3)
LOSS_GRAD = TileConfig(128, 128, 64, 8, 8, 3)
# Every kernel under the interpreter.
INTERPRETER = TileConfig(16, 32, 16, 2, 4, 1)


def tile_config(gpu_config: TileConfig, device: torch.device) -> TileConfig:
    """The configuration a kernel launches with on ``device``: ``gpu_config`` on CUDA, :data:`INTERPRETER` on CPU."""
    return gpu_config if device.type == "cuda" else INTERPRETER


def dot_flags(dtype: torch.dtype) -> dict:
    """``DOT_FP32`` and ``INPUT_PRECISION`` of :func:`kidkernels.kernels.tile_product.tile_logits` for operands of
    ``dtype``: bf16 is upcast only under the interpreter (whose bf16 dot is wrong), float32 is multiplied in IEEE
    float32 (never TF32)."""
    return {
        "DOT_FP32": dtype == torch.bfloat16 and triton_interpreter_enabled(),
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }
