"""Launchers of the Triton distillation kernels for one chunk of logits (the Triton twin of ``distill_torch``).

Each kernel is launched from exactly one place here.  Passes over the chunk (logits read from memory per row):
FKL, RKL and the cross-entropy alone, one statistics pass; JSD and TVD, a second (value) pass; the gradient, one more,
which also writes the gradient.  Ignored rows are read by none of them (only their gradient row is written, as zeros).

Every launch goes through :func:`.launches.launch` with the HBM bytes the kernel moves (no matrix product: 0 FLOPs),
each element counted once (``tests/test_roofline.py`` checks the counts against the addresses the kernels touch under
the interpreter).  The launchers cannot see which targets are ``ignore_index`` without a host synchronisation, so they
count every row as swept: an ignored row moves less (its statistics or its zero gradient row only).
"""
from __future__ import annotations

from ..kernels.distill_backward import distill_grad_kernel
from ..kernels.distill_forward import distill_stats_kernel, distill_value_kernel
from . import tiles
from .config import DistillConfig
from .launches import launch

# The kernels allocate nothing besides the statistics and the gradient they are given.
TEMPORARIES_PER_ELEMENT = 0


def _or(tensor, fallback):
    # Triton needs a tensor for every pointer argument; an unused one is never read (HAS_TARGET=False,
    # HAS_TEACHER=False, HAS_ROW_WEIGHT=False).
    return tensor if tensor is not None else fallback


def _teacher_args(student, teacher):
    """Pointer and row stride of the teacher logits; the student's pointer stands in when there is no teacher."""
    return (teacher, teacher.stride(0)) if teacher is not None else (student, 0)


def _sweep_bytes(student, teacher) -> int:
    """One read of every element of the student (and teacher) logits chunk, each in its own dtype."""
    rows, vocab = student.shape
    return rows * vocab * (student.element_size() + (teacher.element_size() if teacher is not None else 0))


def _target_bytes(target, rows: int) -> int:
    """The row's target id, read once per row (the target column of the logits is read by the sweep anyway)."""
    return rows * target.element_size() if target is not None else 0


def _stats_written_by_stats_pass(cfg: DistillConfig) -> int:
    """Statistics rows the stats pass writes for a counted row: MAX_STUDENT, LOGZ_STUDENT, LSE_CE, TOP and CE; then
    MAX_TEACHER and LOGZ_TEACHER with a teacher; and KD, CENTER, CENTER_2 where one pass gives the value (an ignored
    row writes all ``NUM_STATS`` as 0, but skips the sweep)."""
    teacher = 2 if cfg.has_teacher else 0
    return 5 + teacher + (3 if cfg.one_pass else 0)


def transform_args(cfg: DistillConfig) -> dict:
    """The logit-transform arguments every kernel takes (see ``kernels/logit_transform.py``), by keyword."""
    s, t = cfg.student_transform, cfg.teacher_transform
    return dict(s_scale=s.scale, s_softcap=s.softcap_value, t_scale=t.scale, t_softcap=t.softcap_value,
                S_HAS_SCALE=s.has_scale, S_HAS_SOFTCAP=s.has_softcap, T_HAS_SCALE=t.has_scale,
                T_HAS_SOFTCAP=t.has_softcap)


def fill_stats(student, teacher, target, stats, cfg: DistillConfig) -> None:
    """Fill every statistics row (see ``kernels/stats_layout.py``) for logits ``[rows, V]`` (unit stride along V).
    ``teacher`` is None exactly when ``cfg.has_teacher`` is False."""
    rows, vocab = student.shape
    if rows == 0:
        return
    block = tiles.block_v(vocab)
    stat = stats.element_size()
    # Reads: both chunks once, the targets; writes: the statistics rows listed above.
    stats_pass_bytes = (_sweep_bytes(student, teacher) + _target_bytes(target, rows)
                        + rows * stat * _stats_written_by_stats_pass(cfg))
    launch(
        distill_stats_kernel, (rows,),
        student, student.stride(0), *_teacher_args(student, teacher), _or(target, stats), stats, stats.stride(0),
        vocab, cfg.inv_temp, cfg.ignore_index, hbm_bytes=stats_pass_bytes,
        DIVERGENCE=cfg.code, HAS_TEACHER=cfg.has_teacher, HAS_TARGET=cfg.has_target,
        SEPARATE_CE_LSE=cfg.separate_ce_lse, BLOCK_V=block, **transform_args(cfg),
        # Both models' tanh on top of the one-pass KL state spilled 16 B at 8 warps (sm_90a, V = 151,936): 16 warps.
        num_warps=tiles.num_warps(block, heavy=cfg.student_transform.has_softcap and cfg.teacher_transform.has_softcap),
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
    stat = stats.element_size()
    # Reads: both chunks again, the targets and four log-normaliser rows; writes: KD, CENTER and CENTER_2 (every row).
    value_pass_bytes = _sweep_bytes(student, teacher) + _target_bytes(target, rows) + rows * stat * (4 + 3)
    launch(
        distill_value_kernel, (rows,),
        student, student.stride(0), *_teacher_args(student, teacher), _or(target, stats), stats, stats.stride(0),
        vocab, cfg.inv_temp, cfg.beta, cfg.log_beta, cfg.log_one_minus_beta, cfg.ignore_index,
        hbm_bytes=value_pass_bytes,
        DIVERGENCE=cfg.code, HAS_TARGET=cfg.has_target, BLOCK_V=block, num_warps=tiles.num_warps(block, heavy=True),
        **transform_args(cfg),
    )


def write_grad(student, teacher, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    """Write the weighted gradient of the row losses w.r.t. the student logits into ``grad_out`` ``[rows, V]``;
    ``row_weight`` ``[rows]`` (any stride, 0 included) or None for 1."""
    rows, vocab = student.shape
    if rows == 0:
        return
    block = tiles.block_v(vocab)
    # Reads: both chunks once, the targets, the statistics rows MAX_STUDENT, LOGZ_STUDENT, LSE_CE and TOP (plus
    # MAX_TEACHER, LOGZ_TEACHER, CENTER, CENTER_2 with a teacher), the row weights (one element when broadcast, stride
    # 0); writes: the gradient chunk in its dtype (float32 inputs overwrite the student logits: still one write).
    weight_bytes = 0
    if row_weight is not None:
        weight_bytes = (rows if row_weight.stride(0) != 0 else 1) * row_weight.element_size()
    grad_pass_bytes = (_sweep_bytes(student, teacher) + _target_bytes(target, rows)
                       + rows * stats.element_size() * (8 if cfg.has_teacher else 4) + weight_bytes
                       + rows * vocab * grad_out.element_size())
    launch(
        distill_grad_kernel, (rows,),
        student, student.stride(0), *_teacher_args(student, teacher), _or(target, stats), stats, stats.stride(0),
        _or(row_weight, stats), row_weight.stride(0) if row_weight is not None else 0,
        grad_out, grad_out.stride(0),
        vocab, cfg.inv_temp, cfg.beta, cfg.log_beta, cfg.log_one_minus_beta,
        cfg.kd_weight * cfg.inv_temp, cfg.mle_weight, cfg.ignore_index, hbm_bytes=grad_pass_bytes,
        DIVERGENCE=cfg.code, HAS_TARGET=cfg.has_target, HAS_MLE=cfg.ce_in_grad,
        HAS_ROW_WEIGHT=row_weight is not None, HAS_TEACHER=cfg.has_teacher, SEPARATE_CE_LSE=cfg.separate_ce_lse,
        BLOCK_V=block, num_warps=tiles.num_warps(block), **transform_args(cfg),
    )


def fill_stats_and_grad(student, teacher, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    """:func:`fill_stats` then :func:`write_grad` (the kernels keep no state between passes)."""
    fill_stats(student, teacher, target, stats, cfg)
    write_grad(student, teacher, target, stats, cfg, row_weight, grad_out)
