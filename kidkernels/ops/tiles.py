"""Launch geometry shared by the row-per-program Triton kernels: vocabulary tile width and warps per program."""
from __future__ import annotations

import triton

# Widest vocabulary tile of one loop step; a row is processed in ceil(V / BLOCK_V) steps.  Read at every launch, so
# tests may lower it to exercise several tiles and a ragged tail under the interpreter.
MAX_BLOCK_V = 4096


def block_v(vocab: int) -> int:
    """Power-of-two tile width for a vocabulary of ``vocab`` columns (at least 16, at most :data:`MAX_BLOCK_V`)."""
    return min(MAX_BLOCK_V, triton.next_power_of_2(max(vocab, 16)))


def num_warps(block: int, *, heavy: bool = False) -> int:
    """Warps per program for a tile of ``block`` columns.  ``heavy``: per-element math with many transcendentals
    (the JSD/TVD value pass: log-mixture, softplus); twice the warps halves the elements each thread holds, which
    keeps that kernel free of register spills on sm_90a at the widest tile (8 warps spill, 16 do not; checked by
    ``tools/compile_kernels.py``)."""
    warps = 8 if block >= 2048 else 4
    return 2 * warps if heavy else warps
