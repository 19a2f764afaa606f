"""Launchers of the Triton distillation kernels for one chunk of logits (the Triton twin of ``distill_torch``).

Each kernel is launched from exactly one place here.  Passes over the chunk (logits read from memory per row):
FKL, RKL and the cross-entropy alone, one statistics pass; JSD and TVD, a second (value) pass; the gradient, one more,
which also writes the gradient.  Ignored rows are read by none of them (only their gradient row is written, as zeros).
"""
from __future__ import annotations

from ..kernels.distill_backward import distill_grad_kernel
from ..kernels.distill_forward import distill_stats_kernel, distill_value_kernel
from . import tiles
from .config import DistillConfig

# The kernels allocate nothing besides the statistics and the gradient they are given.
TEMPORARIES_PER_ELEMENT = 0


def _or(tensor, fallback):
    # Triton needs a tensor for every pointer argument; an unused one is never read (HAS_TARGET=False,
    # HAS_TEACHER=False, HAS_ROW_WEIGHT=False).
    return tensor if tensor is not None else fallback


def _teacher_args(student, teacher):
    """Pointer and row stride of the teacher logits; the student's pointer stands in when there is no teacher."""
    return (teacher, teacher.stride(0)) if teacher is not None else (student, 0)


def fill_stats(student, teacher, target, stats, cfg: DistillConfig) -> None:
    """Fill every statistics row (see ``kernels/stats_layout.py``) for logits ``[rows, V]`` (unit stride along V).
    ``teacher`` is None exactly when ``cfg.has_teacher`` is False."""
    rows, vocab = student.shape
    if rows == 0:
        return
    block = tiles.block_v(vocab)
    distill_stats_kernel[(rows,)](
        student, student.stride(0), *_teacher_args(student, teacher), _or(target, stats), stats, stats.stride(0),
        vocab, cfg.inv_temp, cfg.ignore_index,
        DIVERGENCE=cfg.code, HAS_TEACHER=cfg.has_teacher, HAS_TARGET=cfg.has_target,
        SEPARATE_CE_LSE=cfg.separate_ce_lse, BLOCK_V=block, num_warps=tiles.num_warps(block),
    )
    if cfg.one_pass:
        return
    fill_values(student, teacher, target, stats, cfg)


def fill_values(student, teacher, target, stats, cfg: DistillConfig) -> None:
    """The value pass of JSD and TVD: KD, CENTER and CENTER_2 of every row from the log-sum-exps already in ``stats``
    (written by :func:`fill_stats`, or by the merge of the GEMM-fused forward)."""
    rows, vocab = student.shape
    if rows == 0:
        return
    block = tiles.block_v(vocab)
    distill_value_kernel[(rows,)](
        student, student.stride(0), *_teacher_args(student, teacher), _or(target, stats), stats, stats.stride(0),
        vocab, cfg.inv_temp, cfg.beta, cfg.log_beta, cfg.log_one_minus_beta, cfg.ignore_index,
        DIVERGENCE=cfg.code, HAS_TARGET=cfg.has_target, BLOCK_V=block, num_warps=tiles.num_warps(block, heavy=True),
    )


def write_grad(student, teacher, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    """Write the weighted gradient of the row losses w.r.t. the student logits into ``grad_out`` ``[rows, V]``;
    ``row_weight`` ``[rows]`` (any stride, 0 included) or None for 1."""
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
        HAS_ROW_WEIGHT=row_weight is not None, HAS_TEACHER=cfg.has_teacher, SEPARATE_CE_LSE=cfg.separate_ce_lse,
        BLOCK_V=block, num_warps=tiles.num_warps(block),
    )


def fill_stats_and_grad(student, teacher, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    """:func:`fill_stats` then :func:`write_grad` (the kernels keep no state between passes)."""
    fill_stats(student, teacher, target, stats, cfg)
    write_grad(student, teacher, target, stats, cfg, row_weight, grad_out)
