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
# Two float32 128 x 128 accumulators with the forward's epilogue use all 255 registers and spill in hot variants (a
# bias, T != 1, no target); 128 x 64: 88-216 registers without spills.
LOSS_FORWARD = TileConfig(128, 64, 64, 8, 8, 3)
# A softcap's tanh in the forward's epilogue (sm_90a, bf16, tools/compile_kernels.py): at 128 x 128, JSD/TVD spill
# 312-392 B and the cross-entropy alone 416 B (Triton 3.9); 128 x 64 holds them at 140-188 registers.  FKL and RKL
# keep both models' tiles live: 680-1,392 B at 128 x 128, still 56 B at 128 x 64 (3.9); 64 x 64 tiles with 4 warps
# (one warpgroup) compile at 208-248 registers without spills.
LOSS_FORWARD_SOFTCAP = TileConfig(128, 64, 64, 8, 8, 3)
LOSS_FORWARD_KL_SOFTCAP = TileConfig(64, 64, 64, 8, 4, 3)
# The gradient holds the teacher's tile next to the accumulator: at 128 x 128 it reaches 255 registers and spills on
# sm_90a (Triton 3.6 and 3.9); 128 x 64 compiles at 114-202 registers without spills (tools/compile_fused_grad.py).
LOSS_GRAD = TileConfig(128, 64, 64, 8, 8, 3)
# With a softcap (either model's) the epilogue also holds the student's chain-rule factor and the tanh's temporaries:
# 128 x 64 spills 16-104 B on sm_90a (Triton 3.6 and 3.9); half the columns per program do not.
LOSS_GRAD_SOFTCAP = TileConfig(128, 32, 64, 8, 8, 3)
# Every kernel under the interpreter.
INTERPRETER = TileConfig(16, 32, 16, 2, 4, 1)


def on_interpreter(device: torch.device) -> bool:
    """Whether kernels launched on tensors of ``device`` run under the Triton interpreter: CPU tensors do (the
    backend sends them to Triton only under ``TRITON_INTERPRET=1``); CUDA tensors do not, nor ``meta`` tensors, which
    stand for the GPU launch in a dry run (the roofline, the compile tool)."""
    return device.type == "cpu"


def tile_config(gpu_config, device: torch.device, interpreter_config=INTERPRETER):
    """The configuration a kernel launches with on ``device``: ``interpreter_config`` (default :data:`INTERPRETER`)
    under the interpreter, ``gpu_config`` otherwise.  Any configuration type: a kernel without tiles of logits (a
    merge of partial states) passes its own pair."""
    return interpreter_config if on_interpreter(device) else gpu_config


def dot_flags(dtype: torch.dtype, device: torch.device) -> dict:
    """``DOT_FP32`` and ``INPUT_PRECISION`` of :func:`kidkernels.kernels.tile_product.tile_logits` for operands of
    ``dtype`` on ``device``: bf16 is upcast only under the interpreter (whose bf16 dot is wrong), float32 is
    multiplied in IEEE float32 (never TF32)."""
    return {
        "DOT_FP32": dtype == torch.bfloat16 and on_interpreter(device),
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }
