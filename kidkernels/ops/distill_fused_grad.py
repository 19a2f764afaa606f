"""Launcher of the GEMM-fused gradient of the distillation loss for one row chunk (design A').

:func:`write_grad_fused` takes what the fused forward leaves for a chunk of ``R`` rows (the complete row statistics
and the teacher's float32 tile of logits) with the student's hidden states and lm_head, and writes d(loss)/d(student
logits) ``[R, V]`` in the input dtype, ready for the dX and dW products.  Two launches: the tile kernel (the student
tile recomputed, K = H_s) and the fix-up of each counted row's TOP element from the per-(row, vocabulary block)
partial sums (``[R, cdiv(V, BLOCK_N)]`` float32, the only allocation, with ``[R]`` more for the top column's
chain-rule factor under a student softcap).  Each model's logit scale and softcap (``cfg.student_transform``,
``cfg.teacher_transform``) are applied in the tile kernel's epilogue; the teacher tile stays raw.  No value is read
on the host, so a dry run (:func:`.launches.recording` with ``dry_run=True``) works on ``meta`` tensors.
"""
from __future__ import annotations

import torch
import triton

from ..kernels.distill_fused_grad import distill_fused_grad_kernel, distill_fused_top_kernel
from . import fused_tiles, launches
from .config import DistillConfig
from .distill_triton import transform_args

# Statistics rows the tile kernel reads per row: MAX/LOGZ of the student, TOP; with a teacher MAX/LOGZ of the
# teacher and the two centers; LSE_CE when the MLE term has its own normaliser.
_STUDENT_STATS, _TEACHER_STATS = 3, 4
# The fix-up kernel: rows per program, and partial sums per row it adds per step.
TOP_BLOCK_ROWS = 16
TOP_BLOCK_PARTIALS = 128


def grad_tile_config(device: torch.device, cfg: DistillConfig | None = None) -> fused_tiles.TileConfig:
    """:data:`fused_tiles.LOSS_GRAD` (:data:`fused_tiles.LOSS_GRAD_SOFTCAP` when either model of ``cfg`` has a
    softcap) on CUDA and on ``meta`` tensors (a dry run records the GPU launches), :data:`fused_tiles.INTERPRETER` on
    CPU tensors."""
    capped = cfg is not None and cfg.capped
    return fused_tiles.tile_config(fused_tiles.LOSS_GRAD_SOFTCAP if capped else fused_tiles.LOSS_GRAD, device)


def _check_layout(name: str, tensor, ndim: int) -> None:
    if tensor is not None and (tensor.dim() != ndim or (tensor.shape[-1] > 1 and tensor.stride(-1) != 1)):
        raise ValueError(f"{name} must be {ndim}-D with unit stride along its last dimension, got shape "
                         f"{tuple(tensor.shape)} and strides {tensor.stride()}")


def write_grad_fused(x, ws, bs, teacher_tile, target, stats, cfg: DistillConfig, row_weight, grad_out) -> None:
    """Write the weighted gradient of the row losses w.r.t. the student logits ``x @ ws.T + bs`` into ``grad_out``.

    x ``[R, H_s]``, ws ``[V, H_s]`` (bf16/fp16/fp32, unit stride along H_s), bs ``[V]`` or None; teacher_tile
    ``[R, V]`` float32 (the teacher's logits with its bias, untempered; unit stride along V), None exactly when
    ``cfg.has_teacher`` is False; target ``[R]`` int64 or None; stats ``[NUM_STATS, R]`` float32, complete (centers
    included; ignored rows all 0); row_weight ``[R]`` (any stride, 0 included) or None for 1; grad_out ``[R, V]``
    (unit stride along V) in the input dtype, every element written.  For float32 inputs ``grad_out`` may be
    ``teacher_tile`` itself.
    """
    rows, hidden = x.shape
    vocab = ws.shape[0]
    if (teacher_tile is None) == cfg.has_teacher:
        raise ValueError("teacher_tile must be given exactly when cfg.has_teacher is True")
    for name, tensor, ndim in (("x", x, 2), ("ws", ws, 2), ("teacher_tile", teacher_tile, 2),
                               ("grad_out", grad_out, 2)):
        _check_layout(name, tensor, ndim)
    if tuple(grad_out.shape) != (rows, vocab):
        raise ValueError(f"grad_out must be [{rows}, {vocab}], got {tuple(grad_out.shape)}")
    if rows == 0 or vocab == 0:
        return
    tiles = grad_tile_config(x.device, cfg)
    for name, tensor in (("teacher_tile", teacher_tile), ("grad_out", grad_out)):
        if tensor is not None and tiles.block_m * tensor.stride(0) >= 2 ** 31:  # the kernel's 32-bit tile offsets
            raise ValueError(f"{name}'s row stride {tensor.stride(0)} is too large for the fused gradient's tiles")
    num_row_blocks = triton.cdiv(rows, tiles.block_m)
    num_col_blocks = triton.cdiv(vocab, tiles.block_n)
    partial = torch.empty(rows, num_col_blocks, device=x.device, dtype=torch.float32)
    # Under a student softcap the factor dz/ds of each row's TOP column, stored by the program that holds it.
    top_slope = torch.empty(rows, device=x.device, dtype=torch.float32) \
        if cfg.student_transform.has_softcap else None
    teacher, teacher_stride = (teacher_tile, teacher_tile.stride(0)) if cfg.has_teacher else (x, 0)
    weight_stride = row_weight.stride(0) if row_weight is not None else 0
    stat_rows = _STUDENT_STATS + (_TEACHER_STATS if cfg.has_teacher else 0) + (1 if cfg.separate_ce_lse else 0)
    small = (stat_rows * 4 + (target.element_size() if target is not None else 0)) * rows
    if row_weight is not None:
        small += row_weight.element_size() * (rows if weight_stride else 1)
    # HBM bytes of the tile kernel, each element once: the GEMM operands and bias, the teacher tile, the row
    # statistics, target and weight, the gradient and the partial sums written.
    tile_bytes = (x.numel() * x.element_size() + ws.numel() * ws.element_size()
                  + (bs.numel() * bs.element_size() if bs is not None else 0)
                  + (teacher_tile.numel() * teacher_tile.element_size() if cfg.has_teacher else 0)
                  + small + grad_out.numel() * grad_out.element_size() + partial.numel() * 4
                  + (top_slope.numel() * 4 if top_slope is not None else 0))
    flags = fused_tiles.dot_flags(x.dtype, x.device)
    launches.launch(
        distill_fused_grad_kernel, (num_row_blocks * num_col_blocks,),
        x, x.stride(0), ws, ws.stride(0), bs if bs is not None else x, teacher, teacher_stride,
        target if target is not None else stats, stats, stats.stride(0),
        row_weight if row_weight is not None else stats, weight_stride,
        grad_out, grad_out.stride(0), partial, partial.stride(0), top_slope if top_slope is not None else partial,
        rows, vocab, hidden, cfg.inv_temp, cfg.beta, cfg.log_beta, cfg.log_one_minus_beta,
        cfg.kd_weight * cfg.inv_temp, cfg.mle_weight, cfg.ignore_index, **transform_args(cfg),
        flops=2 * rows * vocab * hidden, hbm_bytes=tile_bytes,
        DIVERGENCE=cfg.code, HAS_TARGET=cfg.has_target, HAS_MLE=cfg.ce_in_grad,
        HAS_ROW_WEIGHT=row_weight is not None, HAS_TEACHER=cfg.has_teacher, HAS_BIAS=bs is not None,
        SEPARATE_CE_LSE=cfg.separate_ce_lse,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
        EVEN_K=hidden % tiles.block_k == 0, **flags, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    # The fix-up reads the partial sums, TOP, the target (and the top factor) of each row, and writes one element per
    # counted row.
    top_bytes = partial.numel() * 4 + rows * (4 + (target.element_size() if target is not None else 0)
                                              + grad_out.element_size() + (4 if top_slope is not None else 0))
    student = cfg.student_transform
    launches.launch(
        distill_fused_top_kernel, (triton.cdiv(rows, TOP_BLOCK_ROWS),),
        partial, partial.stride(0), top_slope if top_slope is not None else partial,
        target if target is not None else stats, stats, stats.stride(0),
        grad_out, grad_out.stride(0), rows, num_col_blocks, cfg.ignore_index, student.scale,
        hbm_bytes=top_bytes,
        HAS_TARGET=cfg.has_target, S_HAS_SCALE=student.has_scale, S_HAS_SOFTCAP=student.has_softcap,
        BLOCK_R=TOP_BLOCK_ROWS, BLOCK_B=TOP_BLOCK_PARTIALS, num_warps=4,
    )
