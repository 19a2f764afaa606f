"""One full training step per method (``kd_step``): SFT, a teacher forward alone, RKD with Hugging Face logits
(eager), RKD and KID (random and hard selection) through kidkernels.  On a GPU: a Qwen1.5-7B-shaped teacher and a
Qwen1.5-0.5B-shaped student (random weights, bf16, SDPA), batch 16 x (1,024 + 128) tokens; on a CPU: tiny models of
the same architecture.

``memory_before_bytes`` holds both models and the batch, so ``memory_before_bytes + peak_extra_bytes`` is the step's
total peak; ``report.py`` derives from the entries the KID-vs-SFT ratios (time, and memory against SFT + one teacher
forward).
"""
from __future__ import annotations

import pytest

from .harness import CaseInfo, current_scale, run_case
from .kd_step import STEPS, VARIANTS, StepSetup, step_flops
from .shapes import STEP_SHAPES


@pytest.fixture(scope="module", params=STEP_SHAPES[current_scale()], ids=lambda shape: shape.id)
def step_setup(request, device, dtype):
    """Both models and the batch, built once per shape and freed after the module."""
    setup = StepSetup.create(request.param, device=device, dtype=dtype)
    yield setup
    setup.release()


@pytest.mark.parametrize("variant", VARIANTS)
def bench_training_step(benchmark, device, dtype, step_setup, variant):
    shape = step_setup.shape
    provider = "eager" if variant == "rkd_hf_eager" else "kidkernels"
    info = CaseInfo(op="kd_step", provider=variant, case=shape.id, pass_="fwd" if variant == "teacher_forward"
                    else "fwd_bwd", n=step_setup.gold_answer.numel(), v=shape.student.vocab,
                    h_s=shape.student.hidden, h_t=shape.teacher.hidden, flops=step_flops(variant, step_setup),
                    track_largest_tensor=False)
    benchmark.extra_info.update(loss_provider=provider, tokens=step_setup.input_ids.numel(),
                                gradient_checkpointing=shape.gradient_checkpointing)
    step = STEPS[variant]
    run_case(benchmark, info, lambda: (lambda: step(step_setup)), reset=step_setup.reset, device=device,
             dtype=dtype)
