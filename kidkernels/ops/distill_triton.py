"""Launchers of the Triton distillation kernels for one chunk of logits (the Triton twin of ``distill_torch``)."""
from __future__ import annotations

from ..kernels.distill_backward import distill_grad_kernel
from ..kernels.distill_forward import distill_lse_kernel, distill_value_kernel
from . import tiles
from .config import DistillConfig


def _or(tensor, fallback):
    # Triton needs a tensor for every pointer argument; an unused one is never read (HAS_TARGET=False,
    # HAS_TEACHER=False).
    return tensor if tensor is not None else fallback


def _teacher_args(student, teacher):
    """Pointer and row stride of the teacher logits; the student's pointer stands in when there is no teacher."""
    return (teacher, teacher.stride(0)) if teacher is not None else (student, 0)


def stats_and_value(student, teacher, target, stats, cfg: DistillConfig) -> None:
    """Fill the statistics rows for logits ``[rows, V]`` (unit stride along V); see kernels/distill_forward.py.
    ``teacher`` is None exactly when ``cfg.has_teacher`` is False."""
    rows, vocab = student.shape
    if rows == 0:
        return
    block = tiles.block_v(vocab)
    distill_lse_kernel[(rows,)](
        student, student.stride(0), *_teacher_args(student, teacher), stats, stats.stride(0),
        vocab, cfg.inv_temp,
        SEPARATE_CE_LSE=cfg.separate_ce_lse, HAS_TEACHER=cfg.has_teacher, BLOCK_V=block,
        num_warps=tiles.num_warps(block),
    )
    distill_value_kernel[(rows,)](
        student, student.stride(0), *_teacher_args(student, teacher), _or(target, stats), stats, stats.stride(0),
        vocab, cfg.inv_temp, cfg.beta, cfg.log_beta, cfg.log_one_minus_beta, cfg.ignore_index,
        DIVERGENCE=cfg.code, HAS_TARGET=cfg.has_target, HAS_MLE=cfg.computes_ce, HAS_TEACHER=cfg.has_teacher,
        BLOCK_V=block, num_warps=tiles.num_warps(block),
    )


def write_grad(student, teacher, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    """Write the weighted gradient of the row losses w.r.t. the student logits into ``grad_out`` ``[rows, V]``."""
    rows, vocab = student.shape
    if rows == 0:
        return
    block = tiles.block_v(vocab)
    distill_grad_kernel[(rows,)](
        student, student.stride(0), *_teacher_args(student, teacher), _or(target, stats), stats, stats.stride(0),
        _or(row_weight, stats), row_weight.stride(0) if row_weight is not None else 0,
        grad_out, grad_out.stride(0),
        vocab, cfg.inv_temp, cfg.beta, cfg.log_beta, cfg.log_one_minus_beta,
        cfg.kd_weight * cfg.inv_temp, cfg.mle_weight, cfg.ignore_index,
        DIVERGENCE=cfg.code, HAS_TARGET=cfg.has_target, HAS_MLE=cfg.ce_in_grad,
        HAS_ROW_WEIGHT=row_weight is not None, HAS_TEACHER=cfg.has_teacher, BLOCK_V=block,
        num_warps=tiles.num_warps(block),
    )


def stats_value_and_grad(student, teacher, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    """:func:`stats_and_value` then :func:`write_grad` (three passes over the chunk; the kernels keep no state)."""
    stats_and_value(student, teacher, target, stats, cfg)
    write_grad(student, teacher, target, stats, cfg, row_weight, grad_out)
