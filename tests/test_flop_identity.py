"""FLOP identities of the fused loss and of KID's selection against the cost model of the benchmarks
(``benchmarks.harness.distill_flops`` / ``linear_flops``, anchors.md), counted exactly by a dispatch-level counter of
every matrix product (``benchmarks/flop_counter.py``; torch's ``FlopCounterMode`` misses the in-place ``addmm_``
the weight gradient accumulates with).

Cost model, N rows, vocabulary V, hidden sizes H_s (student) and H_t (teacher):
- loss forward + backward with the student weight gradient: ``2NV(H_t + 3 H_s)`` (teacher and student logits, input
  gradient, weight gradient), with the input gradient only (frozen lm_head, LoRA): ``2NV(H_t + 2 H_s)``; forward
  alone ``2NV(H_t + H_s)``; ``reduction="none"`` recomputes both products in the backward.
- cross-entropy alone (no teacher): ``6NVH`` / ``4NVH`` / ``2NVH``.
- entropy, argmax and "hard" selection: ``2NVH``; "random" selection: no product.
The GEMM-fused gradient of FKL, RKL and the cross-entropy (backend "triton", design A') adds one student product,
``2NVH_s``: it recomputes the student's tile instead of storing it.
The products are aten calls the counter sees, or (the GEMM-fused kernels) launches whose FLOPs the launchers declare
and the counter records, so these are exact.
"""
from __future__ import annotations

import pytest
import torch

import kidkernels
from benchmarks.flop_counter import MatmulFlopCounter
from benchmarks.harness import distill_flops, linear_flops
from tests.helpers import hidden_and_weight

N, H_S, H_T, V = 37, 24, 40, 1001  # odd sizes: ragged chunks and vocabulary tiles


def _inputs(dtype, *, weight_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ws, _ = hidden_and_weight(N, H_S, V, logit_std=3.0, dtype=dtype, generator=g)
    xt, wt, _ = hidden_and_weight(N, H_T, V, logit_std=4.0, dtype=dtype, generator=g)
    target = torch.randint(0, V, (N,), generator=g)
    target[::5] = -100  # ignored rows still cost their products
    return xs.requires_grad_(), ws.requires_grad_(weight_grad), xt, wt, target


def _count(fn) -> MatmulFlopCounter:
    with MatmulFlopCounter() as counter:
        fn()
    return counter


def test_counter_counts_every_product_variant():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    acc = torch.zeros(8, 4)
    mm = 2 * 8 * 16 * 4
    cases = {
        "mm": lambda: a @ b,
        "mm.out": lambda: torch.mm(a, b, out=acc),
        "addmm": lambda: torch.addmm(acc, a, b),
        "addmm_": lambda: acc.addmm_(a, b),
        "bmm": lambda: torch.bmm(a[None].expand(3, -1, -1), b[None].expand(3, -1, -1)),
        "baddbmm_": lambda: acc[None].expand(3, -1, -1).clone().baddbmm_(a[None].expand(3, -1, -1),
                                                                            b[None].expand(3, -1, -1)),
        "addbmm": lambda: torch.addbmm(acc, a[None].expand(3, -1, -1), b[None].expand(3, -1, -1)),
        "mv": lambda: a @ b[:, 0],
        "addmv_": lambda: acc[:, 0].clone().addmv_(a, b[:, 0]),
        "dot": lambda: torch.dot(b[:, 0], b[:, 1]),
        "linear": lambda: torch.nn.functional.linear(a, b.t()),
    }
    expected = {"mm": mm, "mm.out": mm, "addmm": mm, "addmm_": mm, "bmm": 3 * mm, "baddbmm_": 3 * mm,
                "addbmm": 3 * mm, "mv": 2 * 8 * 16, "addmv_": 2 * 8 * 16, "dot": 2 * 16, "linear": mm}
    for name, fn in cases.items():
        assert _count(fn).total == expected[name], name
    # mm(..., out_dtype=) exists for CUDA (and meta) only: count it on fake tensors.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, y = torch.empty(8, 16, dtype=torch.bfloat16), torch.empty(16, 4, dtype=torch.bfloat16)
        counter = _count(lambda: torch.mm(x, y, out_dtype=torch.float32))
    assert counter.total == mm and "aten.mm.dtype" in counter.by_op


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("workspace_rows", [None, 5])
def test_fused_loss_forward_backward_equals_the_cost_model(backend, dtype, workspace_rows):
    xs, ws, xt, wt, target = _inputs(dtype)
    workspace = None if workspace_rows is None else 4 * V * 2 * workspace_rows

    def step():
        kidkernels.fused_linear_distill_loss(xs, ws, xt, wt, target, mle_weight=1.0, backend=backend,
                                             workspace_bytes=workspace).backward()

    useful = distill_flops(N, V, H_S, H_T, "fwd_bwd")
    assert useful == 2 * N * V * (H_T + 3 * H_S)
    assert _count(step).total == useful + _recomputed_student(backend)
    assert xs.grad is not None and ws.grad is not None


def _recomputed_student(backend: str) -> int:
    """The GEMM-fused gradient (A', backend "triton") recomputes the student's logits tile by tile rather than keep
    them: one more student product, 2 N V H_s, in every gradient of FKL, RKL (the default) and the cross-entropy."""
    return 2 * N * V * H_S if backend == "triton" else 0


def test_fused_loss_without_weight_gradient_forward_alone_and_recomputing_backward(backend):
    xs, ws, xt, wt, target = _inputs(torch.float32, weight_grad=False)
    frozen_head = _count(lambda: kidkernels.fused_linear_distill_loss(
        xs, ws, xt, wt, target, mle_weight=1.0, backend=backend).backward())
    assert frozen_head.total == 2 * N * V * (H_T + 2 * H_S) + _recomputed_student(backend)  # LoRA: a frozen head
    with torch.no_grad():
        forward = _count(lambda: kidkernels.fused_linear_distill_loss(xs, ws, xt, wt, target, backend=backend))
    assert forward.total == distill_flops(N, V, H_S, H_T, "fwd")
    ws.requires_grad_(True)
    none = _count(lambda: kidkernels.fused_linear_distill_loss(
        xs, ws, xt, wt, target, mle_weight=1.0, reduction="none", backend=backend).sum().backward())
    # Both products again in the backward.
    assert none.total == 2 * N * V * (2 * H_T + 4 * H_S) + _recomputed_student(backend)


def test_cross_entropy_alone_has_no_teacher_product(backend):
    xs, ws, _, _, target = _inputs(torch.float32)
    counter = _count(lambda: kidkernels.fused_linear_cross_entropy(xs, ws, target, backend=backend).backward())
    assert counter.total == 3 * linear_flops(N, V, H_S) + _recomputed_student(backend)


def test_selection_equals_the_cost_model(backend):
    batch, length = 3, 13
    g = torch.Generator().manual_seed(1)
    hidden, weight, _ = hidden_and_weight(batch * length, H_S, V, logit_std=3.0, generator=g)
    hidden = hidden.reshape(batch, length, H_S)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[:, -1] = False
    rows = batch * length
    for name, fn in {
        "entropy": lambda: kidkernels.fused_linear_entropy(hidden, weight, backend=backend),
        "argmax": lambda: kidkernels.fused_linear_argmax(hidden, weight, backend=backend),
        "hard": lambda: kidkernels.fused_linear_select(hidden, weight, valid, 0.2, "hard", backend=backend),
    }.items():
        assert _count(fn).total == linear_flops(rows, V, H_S), name
    random = _count(lambda: kidkernels.select_positions(valid, 0.2, "random", generator=g))
    assert random.total == 0
    uniform = _count(lambda: kidkernels.fused_linear_select(hidden, weight, valid, 0.2, "uniform", backend=backend))
    assert uniform.total == 0
