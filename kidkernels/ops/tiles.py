"""Launch geometry shared by the row-per-program Triton kernels: vocabulary tile width and warps per program."""
from __future__ import annotations

import triton

# Widest vocabulary tile of one loop step; a row is processed in ceil(V / BLOCK_V) steps.  Read at every launch, so
# tests may lower it to exercise several tiles and a ragged tail under the interpreter.
MAX_BLOCK_V = 4096


def block_v(vocab: int) -> int:
    """Power-of-two tile width for a vocabulary of ``vocab`` columns (at least 16, at most :data:`MAX_BLOCK_V`)."""
    return min(MAX_BLOCK_V, triton.next_power_of_2(max(vocab, 16)))


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4
