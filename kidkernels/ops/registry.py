"""The backend registry: which module implements one chunk of an op family on a backend.

Both backends of a family expose the same functions (``distill``: ``fill_stats``, ``write_grad``,
``fill_stats_and_grad``, ``TEMPORARIES_PER_ELEMENT``; ``selection``: ``entropy``, ``argmax``,
``TEMPORARIES_PER_ELEMENT``); the Triton modules are imported only when used, so the PyTorch backend runs without
Triton installed.  Selection on "triton" takes no chunk of logits (the GEMM-fused kernels of ``selection_fused``
never form one), so it has no entry here.
"""
from __future__ import annotations

import importlib

_MODULES = {
    ("distill", "triton"): "distill_triton",
    ("distill", "triton_rows"): "distill_triton",
    ("distill", "torch"): "distill_torch",
    ("selection", "triton_rows"): "selection_triton",
    ("selection", "torch"): "selection_torch",
}


def backend_impl(family: str, backend: str):
    """The per-chunk implementation module of op ``family`` ("distill" or "selection") on ``backend`` ("triton" or
    "torch")."""
    try:
        name = _MODULES[family, backend]
    except KeyError:
        raise ValueError(f"no {family!r} implementation for backend {backend!r}") from None
    return importlib.import_module(f"{__package__}.{name}")
