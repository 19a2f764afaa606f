"""Fused linear distillation loss (``kidkernels.fused_linear_distill_loss``): every divergence with the MLE term,
forward+backward and forward alone, against eager PyTorch, torch.compile and Liger-Kernel on the same inputs.

FLOPs (anchors.md cost model): forward+backward ``2NV(H_t + 3 H_s)``, forward ``2NV(H_t + H_s)``.
"""
from __future__ import annotations

import pytest

from .harness import CaseInfo, current_dtype, current_scale, distill_flops, run_case
from .providers import PROVIDERS, DistillProblem, providers_for
from .shapes import DISTILL_SHAPES

PASSES = ("fwd_bwd", "fwd")


def _cases():
    for shape in DISTILL_SHAPES[current_scale()]:
        for divergence in shape.divergences:
            for pass_ in PASSES:
                for provider in providers_for("distill", divergence, dtype=current_dtype(),
                                              with_compile=shape.compiles(divergence)):
                    yield pytest.param(shape, divergence, pass_, provider,
                                       id=f"{shape.id}-{divergence}-{pass_}-{provider}")


@pytest.mark.parametrize("shape, divergence, pass_, provider", list(_cases()))
def bench_fused_linear_distill_loss(benchmark, device, dtype, shape, divergence, pass_, provider):
    problem = DistillProblem.create(shape.n, shape.h_s, shape.h_t, shape.v, divergence,
                                    with_grad=pass_ == "fwd_bwd", device=device, dtype=dtype)
    chosen = PROVIDERS[provider]
    info = CaseInfo(op="distill", provider=provider, case=shape.id, pass_=pass_, n=shape.n, v=shape.v,
                    h_s=shape.h_s, h_t=shape.h_t, divergence=divergence,
                    flops=distill_flops(shape.n, shape.v, shape.h_s, shape.h_t, pass_),
                    provider_is_compiled=chosen.compiled)
    benchmark.extra_info["includes_mle"] = chosen.includes_mle
    run_case(benchmark, info, lambda: chosen.build_step("distill", problem, device), reset=problem.reset,
             device=device, dtype=dtype, may_fail=chosen.may_fail)
