"""The MLE term alone (``kidkernels.fused_linear_cross_entropy``: supervised fine-tuning, and KD's MLE term on a
second pass), forward+backward and forward, against eager PyTorch, Hugging Face's way (bf16 logits upcast),
torch.compile, PyTorch's own ``torch.nn.functional.linear_cross_entropy``, Liger-Kernel's fused linear
cross-entropy and Apple's Cut Cross-Entropy, on the same inputs.  Peers that are missing here are recorded as
skipped with the reason.

FLOPs (anchors.md cost model): forward+backward with the weight gradient ``6NVH``, forward ``2NVH``.
"""
from __future__ import annotations

import pytest

from .harness import CaseInfo, current_dtype, current_scale, linear_flops, run_case
from .providers import PROVIDERS, CrossEntropyProblem, providers_for
from .shapes import LINEAR_SHAPES

PASSES = ("fwd_bwd", "fwd")


def _cases():
    for shape in LINEAR_SHAPES[current_scale()]:
        for pass_ in PASSES:
            for provider in providers_for("cross_entropy", dtype=current_dtype(), with_compile=shape.compile):
                yield pytest.param(shape, pass_, provider, id=f"{shape.id}-ce-{pass_}-{provider}")


@pytest.mark.parametrize("shape, pass_, provider", list(_cases()))
def bench_fused_linear_cross_entropy(benchmark, device, dtype, shape, pass_, provider):
    problem = CrossEntropyProblem.create(shape.n, shape.h, shape.v, with_grad=pass_ == "fwd_bwd", device=device,
                                         dtype=dtype)
    chosen = PROVIDERS[provider]
    flops = linear_flops(shape.n, shape.v, shape.h) * (3 if pass_ == "fwd_bwd" else 1)
    info = CaseInfo(op="cross_entropy", provider=provider, case=shape.id, pass_=pass_, n=shape.n, v=shape.v,
                    h_s=shape.h, flops=flops, provider_is_compiled=chosen.compiled)
    run_case(benchmark, info, lambda: chosen.build_step("cross_entropy", problem, device), reset=problem.reset,
             device=device, dtype=dtype, may_fail=chosen.may_fail)
