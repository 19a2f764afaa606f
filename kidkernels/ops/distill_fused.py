"""The GEMM-fused distillation loss (backend "triton"): row chunks, workspaces, and the launches of each chunk.

For each chunk of rows:

1. :func:`.distill_fused_forward.distill_fused_forward_kernel` forms the student's (and the teacher's) tiles of logits
   in float32 accumulators, (row block, vocabulary block) at a time, and leaves one partial state per (row, block)
   (``kernels/partials_layout.py``); with a gradient to form it also writes the teacher's tile, float32 as
   accumulated, into a ``[rows, V]`` workspace (design A'); for JSD and TVD both tiles (design A).
2. :func:`.distill_fused_merge.distill_fused_merge_kernel` merges each row's states into its statistics
   (``kernels/stats_layout.py``, exactly as the row kernels write them).
3. JSD and TVD: the row kernels' value pass over the two stored tiles (:func:`.distill_triton.fill_values`).
4. With a gradient: FKL, RKL and the cross-entropy alone call ``write_grad_fused``
   (:mod:`.distill_fused_grad`), which recomputes the student's tile (K = H_s) next to the stored teacher tile and
   writes d(loss)/d(student logits) in the input dtype; JSD and TVD run the row kernels' gradient over the stored
   tiles (:func:`.distill_triton.write_grad`).  Then dX, dW (:func:`.gemm.accumulate_weight_grad`) and db as on the
   other backends.

Without a gradient (evaluation, the "none" reduction's forward) FKL, RKL and the cross-entropy alone store no tile at
all, only the partial states; JSD and TVD store both tiles all the same, since their value needs a second sweep over
both models' logits and recomputing the teacher's would cost its GEMM again.

Byte counts (per logit position, i.e. per (row, vocabulary column), beyond the GEMM operands, at the paper shape
H_s = 1,024, H_t = 4,096, bf16; GEMM FLOPs per position; est. ps per position on an H100 at 800 TFLOP/s and 3.35 TB/s,
each launch ``max(FLOPs / peak, bytes / bandwidth)``; estimates, not measurements)::

    FKL/RKL      launches (FLOPs, bytes)                                       FLOPs    bytes   est. ps
    A'           fwd (2(H_s+H_t), 4: teacher tile)  grad (2 H_s, 4 + 2)        16,384   14      20.5
                 dX (2 H_s, 2)  dW (2 H_s, 2)
    A            fwd (2(H_s+H_t), 8: both tiles)  grad rows (0, 8 + 2)         14,336   22      20.9
                 dX, dW as A'
    JSD/TVD
    A'           fwd (.., 4)  value (2 H_s, 4)  grad (2 H_s, 4 + 2)  dX, dW    18,432   18      23.0
    A            fwd (.., 8)  value rows (0, 8)  grad rows (0, 8 + 2)  dX, dW  14,336   30      23.3
    CE alone
    A'           fwd (2 H_s, 0)  grad (2 H_s, 2)  dX, dW                        8,192    6      10.2
    A            fwd (2 H_s, 4)  grad rows (0, 4 + 2)  dX, dW                   6,144   14       9.5

(the partial states add about 0.6 B per position: up to 9 floats per row per 64-column block, written and read.)  The
fused forward is compute-bound either way (10,240 FLOPs per position against 4-8 B), so what separates the designs is
the workspace they hold, and the gradient: A' holds 4 B (teacher tile) + 2 B (bf16 gradient) per position against A's
10 B, so a given ``workspace_bytes`` takes 1.7x the rows per chunk, and each chunk re-reads both lm_heads (about 1.6
GB at the paper shape) once fewer times; its gradient kernel is a K = H_s GEMM (2.6 ps, compute-bound) where A's row
pass moves 10 B (3.0 ps).  So FKL, RKL and the cross-entropy alone use A'.  (For the cross-entropy alone A' trades 2
H_s FLOPs for 8 B: about even per position, and its workspace is 2 B per position against 6 B.)  JSD and TVD need both
final log-sum-exps before any per-element term, so a second sweep over both tiles (the value) comes before the
gradient: with A' that sweep and the gradient each recompute the student's tile (two more K = H_s products, and the
value's log-mixture and softplus in a GEMM epilogue that already holds the accumulator), for an estimate within 1% of
A's, which reuses the row kernels' value and gradient passes as they are.  So JSD and TVD use A.

Workspace: per row, V x (4 B per stored tile, plus the gradient in the input dtype unless it overwrites a float32
tile), plus the partial states (``NUM_PARTIALS`` floats per vocabulary block), all sized by ``workspace_bytes``
(:func:`fused_chunk_rows`): rows per chunk a multiple of ``BLOCK_M`` wherever one fits, so memory beyond the inputs,
the gradients and the O(N) statistics is bounded whatever N is.  Every launch goes through :func:`.launches.launch`
with its FLOPs and HBM bytes, and nothing here reads a tensor value, so the dispatch runs on ``meta`` tensors in a
dry run (the GPU's tile configuration is recorded there).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton

from ..kernels.distill_fused_forward import distill_fused_forward_kernel
from ..kernels.distill_fused_merge import distill_fused_merge_kernel
from ..kernels.partials_layout import (
    BEST,
    BEST_INDEX,
    KL_SUM,
    M_CE,
    M_STUDENT,
    M_TEACHER,
    NUM_PARTIALS,
    Z_CE,
    Z_STUDENT,
    Z_TEACHER,
)
from . import distill_triton, fused_tiles, launches
from .config import NUM_STATS, DistillConfig
from .gemm import accumulate_weight_grad, compute_dtype
from .workspace import element_size, rows_per_chunk


@dataclass(frozen=True)
class MergeConfig:
    block_r: int  # rows per program (consecutive in memory: 16 float32 rows are one 64-byte run)
    block_b: int  # vocabulary blocks reduced per loop step
    num_warps: int


MERGE = MergeConfig(16, 64, 4)
# Under the interpreter (whose cost is per program and per loop step: each runs the kernel's Python once) the tiles
# grow with the shape, so that a call has at most this many row blocks and vocabulary blocks (fused_tiles.INTERPRETER's
# small tiles at test shapes, ragged edges at every shape), and the merge reduces them in one step at most.  Read at
# every launch: tests lower them to exercise many blocks and merge steps.
MERGE_INTERPRETER = MergeConfig(8, 4, 4)
INTERPRETER_MAX_ROW_BLOCKS = 4
INTERPRETER_MAX_VOCAB_BLOCKS = 4
# Partial-state arrays stay below 2**31 elements (int32 offsets in the kernels).
MAX_PARTIAL_ELEMENTS = (1 << 31) - 1


def geometry(device: torch.device, rows: int, vocab: int,
             cfg: DistillConfig | None = None) -> tuple[fused_tiles.TileConfig, MergeConfig]:
    """The tile configuration of the forward and the merge's for ``rows`` x ``vocab`` logits on ``device``: the GPU's
    on CUDA and on ``meta`` tensors (a dry run records the GPU launches; narrower tiles with a softcap, see
    :func:`forward_gpu_tiles`); on CPU tensors the interpreter's
    (``fused_tiles.INTERPRETER``), widened at large shapes (:data:`INTERPRETER_MAX_VOCAB_BLOCKS`)."""
    tiles = fused_tiles.tile_config(forward_gpu_tiles(cfg), device)
    if tiles is not fused_tiles.INTERPRETER:
        return tiles, MERGE
    block_m = max(tiles.block_m, triton.next_power_of_2(triton.cdiv(rows, INTERPRETER_MAX_ROW_BLOCKS)))
    block_n = max(tiles.block_n, triton.next_power_of_2(triton.cdiv(vocab, INTERPRETER_MAX_VOCAB_BLOCKS)))
    merge = dataclasses.replace(MERGE_INTERPRETER, block_r=max(MERGE_INTERPRETER.block_r, block_m // 2))
    return dataclasses.replace(tiles, block_m=block_m, block_n=block_n), merge


def forward_gpu_tiles(cfg: DistillConfig | None) -> fused_tiles.TileConfig:
    """The forward's GPU tiles: narrower where the epilogue holds a softcap's temporaries, narrower still where it
    also holds both models' tiles (FKL and RKL; see ``fused_tiles``)."""
    if cfg is None or not cfg.capped:
        return fused_tiles.LOSS_FORWARD
    if cfg.has_teacher and cfg.one_pass:
        return fused_tiles.LOSS_FORWARD_KL_SOFTCAP
    return fused_tiles.LOSS_FORWARD_SOFTCAP


def stored_tiles(cfg: DistillConfig, with_grad: bool) -> tuple[bool, bool]:
    """``(student, teacher)``: which float32 tiles the forward stores.  JSD and TVD: both, always (their value pass
    reads them); FKL and RKL: the teacher's, when a gradient is formed; the cross-entropy alone: none."""
    two_pass = not cfg.one_pass
    return two_pass, cfg.has_teacher and (two_pass or with_grad)


def fused_chunk_rows(n: int, vocab: int, in_dtype: torch.dtype, budget: int, *, tiles: int, grad_buffer: bool,
                     num_blocks: int, block_m: int) -> int:
    """Rows per chunk of the fused loss whose buffers fit ``budget`` bytes: per row ``vocab`` x (4 B for each of
    ``tiles`` float32 tiles, plus with ``grad_buffer`` the gradient in ``in_dtype``, unless it overwrites a float32
    tile) and ``NUM_PARTIALS`` float32 states per vocabulary block.  At least 1, at most ``max(n, 1)``, a multiple of
    ``block_m`` when at least ``block_m`` rows fit (every chunk but the last then fills its row blocks)."""
    per_element = 4 * tiles
    if grad_buffer and not (in_dtype == torch.float32 and tiles > 0):
        per_element += element_size(in_dtype)
    partial_row = NUM_PARTIALS * 4 * num_blocks
    rows = rows_per_chunk(vocab * per_element + partial_row, budget)
    rows = min(rows, MAX_PARTIAL_ELEMENTS // (NUM_PARTIALS * num_blocks))
    if rows >= block_m:
        rows -= rows % block_m
    return max(1, min(max(n, 1), rows))


def fused_distill_chunks(xs, ws, bs, xt, wt, bt, target, cfg: DistillConfig, workspace_bytes: int, stats, *,
                         dx=None, dw=None, db=None, row_weight=None) -> None:
    """Fill ``stats`` ``[NUM_STATS, N]`` float32 and the requested gradients of ``sum_i row_weight_i * row_loss_i``.

    xs ``[N, H_s]``, ws ``[V, H_s]``, bs ``[V]`` or None; xt ``[N, H_t]``, wt ``[V, H_t]``, bt ``[V]`` or None (None
    exactly when ``cfg.has_teacher`` is False); float32, float16 or bfloat16, each model's input and weight of one
    dtype; target ``[N]`` int64 or None; row_weight ``[N]`` (any stride) or None for 1.  dx ``[N, H_s]`` (written),
    dw ``[V, H_s]`` and db ``[V]`` (accumulated into), each None when not wanted.
    """
    n, vocab = xs.shape[0], ws.shape[0]
    with_grad = dx is not None or dw is not None or db is not None
    if n == 0:
        return
    xs, ws, bs = _unit_stride(xs), _unit_stride(ws), _unit_stride(bs)
    if cfg.has_teacher:
        xt, wt, bt = _unit_stride(xt), _unit_stride(wt), _unit_stride(bt)
    tiles, merge = geometry(xs.device, n, vocab, cfg)
    num_blocks = triton.cdiv(vocab, tiles.block_n)
    store_student, store_teacher = stored_tiles(cfg, with_grad)
    n_tiles = int(store_student) + int(store_teacher)
    step = fused_chunk_rows(n, vocab, xs.dtype, workspace_bytes, tiles=n_tiles, grad_buffer=with_grad,
                            num_blocks=num_blocks, block_m=tiles.block_m)
    device = xs.device
    partials = torch.empty(NUM_PARTIALS, num_blocks, step, device=device, dtype=torch.float32)
    student_ws = torch.empty(step, vocab, device=device, dtype=torch.float32) if store_student else None
    teacher_ws = torch.empty(step, vocab, device=device, dtype=torch.float32) if store_teacher else None
    grad_ws = None
    if with_grad:
        # float32 inputs: the gradient overwrites a stored tile, element by element after reading it.
        alias = (teacher_ws if store_teacher and not store_student else student_ws) \
            if xs.dtype == torch.float32 else None
        grad_ws = alias if alias is not None else torch.empty(step, vocab, device=device, dtype=xs.dtype)
    cdt = compute_dtype(xs.dtype)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        rows = r1 - r0
        x_chunk = xs[r0:r1]
        tgt = target[r0:r1] if target is not None else None
        chunk_stats = stats[:, r0:r1]
        s_tile = student_ws[:rows] if store_student else None
        t_tile = teacher_ws[:rows] if store_teacher else None
        _launch_forward(x_chunk, ws, bs, xt[r0:r1] if cfg.has_teacher else None, wt, bt, tgt, partials, s_tile,
                        t_tile, cfg, tiles)
        _launch_merge(partials, tgt, chunk_stats, vocab, cfg, tiles, merge)
        if store_student:
            distill_triton.fill_values(s_tile, t_tile, tgt, chunk_stats, cfg)
        if not with_grad:
            continue
        grad = grad_ws[:rows]
        weight_chunk = row_weight[r0:r1] if row_weight is not None else None
        if store_student:
            distill_triton.write_grad(s_tile, t_tile, tgt, chunk_stats, cfg, weight_chunk, grad)
        else:
            from .distill_fused_grad import write_grad_fused

            write_grad_fused(x_chunk, ws, bs, t_tile, tgt, chunk_stats, cfg, weight_chunk, grad)
        if dx is not None:
            torch.mm(grad, ws, out=dx[r0:r1])
        if dw is not None:
            accumulate_weight_grad(dw, grad, x_chunk)
        if db is not None:
            db += grad.sum(0, dtype=cdt)


def _unit_stride(t):
    """``t`` itself when its last dimension has unit stride (what the tile product reads), else a contiguous copy
    (O(rows x H) or O(V x H): never logits-sized)."""
    if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def _planes_written(cfg: DistillConfig) -> int:
    """Partial planes every (counted row, block) writes (the target's logit, one per row, apart)."""
    planes = {BEST, BEST_INDEX, M_STUDENT, Z_STUDENT}
    if cfg.has_teacher:
        planes |= {M_TEACHER, Z_TEACHER}
        if cfg.one_pass:
            planes.add(KL_SUM)
    if cfg.separate_ce_lse:
        planes |= {M_CE, Z_CE}
    return len(planes)


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if t is not None else 0


def _launch_forward(xs, ws, bs, xt, wt, bt, target, partials, s_tile, t_tile, cfg: DistillConfig,
                    tiles: fused_tiles.TileConfig) -> None:
    rows, hidden_s = xs.shape
    vocab = ws.shape[0]
    hidden_t = xt.shape[1] if cfg.has_teacher else 0
    num_blocks = partials.shape[1]
    grid = (triton.cdiv(rows, tiles.block_m) * num_blocks,)
    flops = 2 * rows * vocab * (hidden_s + hidden_t)
    # HBM: each model's hidden rows, weight and bias once (the GROUP_M row blocks of a group re-read a block of
    # weight rows from L2), the target, the partial states and the stored tiles written.
    hbm_bytes = (_nbytes(xs) + _nbytes(ws) + _nbytes(bs) + _nbytes(xt) + _nbytes(wt) + _nbytes(bt) + _nbytes(target)
                 + 4 * rows * (num_blocks * _planes_written(cfg) + (1 if cfg.has_target else 0))
                 + 4 * rows * vocab * ((s_tile is not None) + (t_tile is not None)))
    teacher = (xt, xt.stride(0), wt, wt.stride(0), bt if bt is not None else xt) if cfg.has_teacher else \
        (xs, 0, ws, 0, xs)  # never read without a teacher
    flags = fused_tiles.dot_flags(xs.dtype, xs.device)
    launches.launch(
        distill_fused_forward_kernel, grid,
        xs, xs.stride(0), ws, ws.stride(0), bs if bs is not None else xs, *teacher,
        target if target is not None else partials, partials, partials.stride(0), partials.stride(1),
        s_tile if s_tile is not None else partials, s_tile.stride(0) if s_tile is not None else 0,
        t_tile if t_tile is not None else partials, t_tile.stride(0) if t_tile is not None else 0,
        rows, vocab, hidden_s, max(hidden_t, 1), cfg.inv_temp, cfg.ignore_index, **distill_triton.transform_args(cfg),
        flops=flops, hbm_bytes=hbm_bytes,
        DIVERGENCE=cfg.code, HAS_TEACHER=cfg.has_teacher, HAS_TARGET=cfg.has_target,
        SEPARATE_CE_LSE=cfg.separate_ce_lse, HAS_STUDENT_BIAS=bs is not None, HAS_TEACHER_BIAS=bt is not None,
        STORE_STUDENT=s_tile is not None, STORE_TEACHER=t_tile is not None,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m,
        EVEN_K_S=hidden_s % tiles.block_k == 0, EVEN_K_T=hidden_t % tiles.block_k == 0, **flags,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )


def _launch_merge(partials, target, stats, vocab: int, cfg: DistillConfig, tiles: fused_tiles.TileConfig,
                  merge: MergeConfig) -> None:
    rows = stats.shape[1]
    num_blocks = partials.shape[1]
    # HBM: the partial planes of the chunk read once, the target and its logit, the statistics written.
    hbm_bytes = (4 * rows * (num_blocks * _planes_written(cfg) + (1 if cfg.has_target else 0)) + _nbytes(target)
                 + 4 * NUM_STATS * rows)
    launches.launch(
        distill_fused_merge_kernel, (triton.cdiv(rows, merge.block_r),),
        partials, partials.stride(0), partials.stride(1), target if target is not None else partials,
        stats, stats.stride(0), rows, vocab, num_blocks, tiles.block_n, cfg.ignore_index,
        hbm_bytes=hbm_bytes,
        DIVERGENCE=cfg.code, HAS_TEACHER=cfg.has_teacher, HAS_TARGET=cfg.has_target,
        SEPARATE_CE_LSE=cfg.separate_ce_lse, BLOCK_R=merge.block_r, BLOCK_B=merge.block_b,
        num_warps=merge.num_warps,
    )
