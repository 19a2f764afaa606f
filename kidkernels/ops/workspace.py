"""The workspace budget: how many rows of logits a chunk may hold, independently of the number of rows N.

The default budget (512 MiB; 1 GiB for the GEMM-fused loss, :data:`FUSED_LOSS_WORKSPACE_BYTES`; or
``KIDKERNELS_WORKSPACE_MB``) bounds every ``[rows, V]`` buffer a loss call allocates
at once: the float32 student and teacher logits of one chunk, the low-precision gradient copy, and for the PyTorch
backend its temporaries.  At V = 151,936 with bfloat16 inputs that is 353 rows per chunk.
"""
from __future__ import annotations

import os

import torch

DEFAULT_WORKSPACE_BYTES = 512 << 20
# The GEMM-fused loss (backend "triton") by default: each chunk re-reads and re-writes the float32 weight-gradient
# accumulator ([V, H_s], 622 MB at the paper's shape), so fewer, larger chunks pay for themselves.  The roofline
# (benchmarks/roofline.py --shape paper --sweep-workspace, an ESTIMATE) puts reverse KL + MLE forward+backward at
# 1.42x the matmul floor of an H100 with 512 MiB and 1.26x with 1 GiB (the bound; 1.20x with bf16 dW).
FUSED_LOSS_WORKSPACE_BYTES = 1 << 30


def workspace_budget(workspace_bytes: int | None = None, *, default: int = DEFAULT_WORKSPACE_BYTES) -> int:
    """The workspace bound of a call: ``workspace_bytes`` when given, else ``KIDKERNELS_WORKSPACE_MB``, else
    ``default``."""
    if workspace_bytes is not None:
        return int(workspace_bytes)
    env = os.environ.get("KIDKERNELS_WORKSPACE_MB")
    if env:
        try:
            mb = float(env)
        except ValueError:
            raise ValueError(f"KIDKERNELS_WORKSPACE_MB must be a number of MiB, got {env!r}") from None
        if not mb > 0:
            raise ValueError(f"KIDKERNELS_WORKSPACE_MB must be positive, got {env!r}")
        return int(mb * (1 << 20))
    return default


def rows_per_chunk(bytes_per_row: int, budget: int) -> int:
    """Largest number of rows whose buffers fit the budget (at least one row)."""
    return max(1, budget // max(1, bytes_per_row))


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def chunk_rows(vocab: int, in_dtype: torch.dtype, budget: int, *, logit_buffers: int, temporaries: int = 0,
               grad_buffer: bool = False) -> int:
    """Rows per chunk of a vocabulary-wide pass whose buffers must fit ``budget`` bytes: the one chunk sizer.

    Per row: ``logit_buffers`` ``[V]`` logits in the compute dtype (float32; float64 for float64 inputs), plus
    ``temporaries`` more of them (the PyTorch backend's), plus with ``grad_buffer`` the gradient in the input dtype
    when that differs from the compute dtype (float32 inputs overwrite their logits with the gradient).
    """
    from .gemm import compute_dtype

    cdt = compute_dtype(in_dtype)
    per_element = (logit_buffers + temporaries) * element_size(cdt)
    if grad_buffer and cdt != in_dtype:
        per_element += element_size(in_dtype)
    return rows_per_chunk(vocab * per_element, budget)
