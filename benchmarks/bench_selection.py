"""KID's masking-stage kernels: ``fused_linear_entropy`` and ``fused_linear_argmax`` (FLOPs ``2NVH``), the
entropy-scored selection ``fused_linear_select(..., "hard")`` (same FLOPs) and ``select_positions(..., "random")``
(no matmul), against eager PyTorch and torch.compile on the same inputs.  Forward only: none has a gradient.
"""
from __future__ import annotations

import pytest

from .harness import CaseInfo, current_dtype, current_scale, linear_flops, run_case
from .providers import PROVIDERS, LinearProblem, SelectProblem, providers_for
from .shapes import LINEAR_SHAPES, SELECT_SHAPES


def _linear_cases():
    for shape in LINEAR_SHAPES[current_scale()]:
        for op in ("entropy", "argmax"):
            for provider in providers_for(op, dtype=current_dtype(), with_compile=shape.compile):
                yield pytest.param(shape, op, provider, id=f"{shape.id}-{op}-{provider}")


def _select_cases():
    for shape in SELECT_SHAPES[current_scale()]:
        for op in ("select_hard", "select_random"):
            for provider in providers_for(op, dtype=current_dtype()):
                yield pytest.param(shape, op, provider, id=f"{shape.id}-{op}-{provider}")


@pytest.mark.parametrize("shape, op, provider", list(_linear_cases()))
def bench_fused_linear_entropy_argmax(benchmark, device, dtype, shape, op, provider):
    problem = LinearProblem.create(shape.n, shape.h, shape.v, device=device, dtype=dtype)
    chosen = PROVIDERS[provider]
    info = CaseInfo(op=op, provider=provider, case=shape.id, pass_="fwd", n=shape.n, v=shape.v, h_s=shape.h,
                    flops=linear_flops(shape.n, shape.v, shape.h), provider_is_compiled=chosen.compiled)
    run_case(benchmark, info, lambda: chosen.build_step(op, problem, device), reset=problem.reset, device=device,
             dtype=dtype, may_fail=chosen.may_fail)


@pytest.mark.parametrize("shape, op, provider", list(_select_cases()))
def bench_select_positions(benchmark, device, dtype, shape, op, provider):
    problem = SelectProblem.create(shape.batch, shape.length, shape.h, shape.v, device=device, dtype=dtype)
    chosen = PROVIDERS[provider]
    n = shape.batch * shape.length
    info = CaseInfo(op=op, provider=provider, case=shape.id, pass_="fwd", n=n, v=shape.v, h_s=shape.h,
                    flops=linear_flops(n, shape.v, shape.h) if op == "select_hard" else None)
    run_case(benchmark, info, lambda: chosen.build_step(op, problem, device), reset=problem.reset, device=device,
             dtype=dtype, may_fail=chosen.may_fail)
