"""TEMPORARY stand-in for ``kidkernels.ops.distill_fused_grad.write_grad_fused`` (the GEMM-fused gradient, design
A', written on another branch): remove this file and its install in ``conftest.py`` when that module is merged.

Same signature and contract as the real launcher; it forms the student's float32 logits of the chunk with a matmul
(what the real kernel recomputes tile by tile in registers) and runs the row kernel's gradient
(:func:`kidkernels.ops.distill_triton.write_grad`) on them and the teacher's stored tile, so that the fused forward's
dispatch can be tested end to end.  In a dry run (``launches.recording(dry_run=True)``, meta tensors) it does nothing.
"""
from __future__ import annotations

import sys
import types

MODULE = "kidkernels.ops.distill_fused_grad"


def write_grad_fused(x, ws, bs, teacher_tile, target, stats, cfg, row_weight, grad_out) -> None:
    from kidkernels.ops import distill_triton, launches
    from kidkernels.ops.gemm import linear_logits

    if (teacher_tile is None) == cfg.has_teacher:
        raise ValueError("teacher_tile must be given exactly when cfg.has_teacher is True")
    if tuple(grad_out.shape) != (x.shape[0], ws.shape[0]):
        raise ValueError(f"grad_out must be [{x.shape[0]}, {ws.shape[0]}], got {tuple(grad_out.shape)}")
    if launches.is_dry_run() or x.shape[0] == 0:
        return
    student = linear_logits(x, ws, bs)
    distill_triton.write_grad(student, teacher_tile, target, stats, cfg, row_weight, grad_out)


def install() -> bool:
    """Register the stand-in as ``kidkernels.ops.distill_fused_grad`` unless the real module exists; True if it did."""
    import importlib.util

    if MODULE in sys.modules or importlib.util.find_spec(MODULE) is not None:
        return False
    module = types.ModuleType(MODULE)
    module.write_grad_fused = write_grad_fused
    module.__doc__ = __doc__
    sys.modules[MODULE] = module
    return True
