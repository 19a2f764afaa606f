"""MEASURED peak GPU memory and time of ``kid train`` optimizer steps at the paper's shapes, next to the fake-tensor
estimate of the same step (:mod:`benchmarks.estimate_memory`).  Needs CUDA.

    python -m benchmarks.measure_step [--json FILE [--overwrite]] [--configs kid-mb4,kid-mb16-ckpt,...] [--no-estimate]

Qwen1.5-7B-shaped teacher and Qwen1.5-0.5B-shaped student built from their configs with random weights (bf16, SDPA,
LoRA r=64 on the student), batch 16 x (1,024 + 128) tokens, the step of :mod:`benchmarks.train_step` (the same code
the estimate runs on fake tensors).  The SFT configurations run without the teacher in GPU memory, as ``kid
train`` never loads one for SFT and as the estimate counts them: it waits in host memory while they run
(:func:`models_for`), and is built only if some configuration needs it.  Each configuration runs one step to warm
up (Triton compilation and autotuning, the optimizer state), then one measured step:
``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()`` (allocated bytes, the quantity the
estimate counts; reserved bytes are reported too) and its wall time with a synchronisation at each end.  A
configuration that runs out of memory is recorded as ``oom``; the others still run.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .arguments import OneLineParser, output_file_problem
from .fake_memory import default_dtype
from .model_presets import hf_config
from .train_step import (
    StepModels,
    StepPlan,
    allocate_optimizer_state,
    make_batches,
    make_optimizer,
    run_step,
)

GiB = 2 ** 30


@dataclass(frozen=True)
class MeasuredConfig:
    name: str
    method: str
    micro_batch_size: int
    gradient_checkpointing: bool = False
    implementation: str = "kidkernels"
    options: dict = field(default_factory=dict)

    def plan(self) -> StepPlan:
        return StepPlan(method=self.method, method_options=dict(self.options), micro_batch_size=self.micro_batch_size,
                        gradient_checkpointing=self.gradient_checkpointing, implementation=self.implementation)


# In order of value: the paper's KID step with micro-batching, its eager twin, the other settings.
CONFIGS = {c.name: c for c in (
    MeasuredConfig("kid-mb4", "kid", 4),
    MeasuredConfig("kid-mb4-eager", "kid", 4, implementation="eager"),
    MeasuredConfig("kid-mb16-ckpt", "kid", 16, gradient_checkpointing=True),
    MeasuredConfig("sft-mb4", "sft", 4),
    MeasuredConfig("rkd-mb4", "rkd", 4),
    MeasuredConfig("kid-hard-mb4", "kid", 4, options={"strategy": "hard"}),
    MeasuredConfig("kid-mb4-ckpt", "kid", 4, gradient_checkpointing=True),
    MeasuredConfig("gkd-mb4", "gkd", 4),
)}


def _real_causal_lm(name: str, dtype: torch.dtype, device, *, lora=None, train: bool = True):
    from transformers import AutoModelForCausalLM

    config = hf_config(name)
    config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if lora is not None:
        from kid.models import apply_lora

        model = apply_lora(model, lora)
    return model.train() if train else model.eval().requires_grad_(False)


def build_models(plans: StepPlan | Sequence[StepPlan], device) -> StepModels:
    """The student (LoRA as planned) and, only when one of ``plans`` needs it, the frozen teacher, on ``device``;
    the vocabulary is the heads' shared rows (:meth:`StepModels.shared_vocab`, the trainer's rule)."""
    plans = [plans] if isinstance(plans, StepPlan) else list(plans)
    first = plans[0]
    student = _real_causal_lm(first.student, first.student_weight_dtype, device, lora=first.lora_options())
    teacher = None
    if any(p.method_config().needs_teacher for p in plans):
        teacher = _real_causal_lm(first.teacher, getattr(torch, first.teacher_dtype), device, train=False)
    return StepModels.of(student, teacher)


def models_for(plan: StepPlan, models: StepModels, device) -> StepModels:
    """The models ``plan``'s step holds in device memory.  A method without a teacher (SFT) runs with the teacher
    moved to host memory (``kid train`` never loads one for SFT, and the estimate does not count one), and with
    the student's whole vocabulary; the others with the teacher on ``device`` (moved back if it was away)."""
    teacher = models.teacher
    needs = plan.method_config().needs_teacher
    if teacher is None:
        if needs:
            raise ValueError(f"method {plan.method!r} needs a teacher; build_models was given no plan that needs one")
        return models
    home = torch.device(device)
    where = next(teacher.parameters()).device
    if needs:
        if where.type != home.type:
            teacher.to(home)
        return models
    if where.type != "cpu":
        teacher.to("cpu")
        if home.type == "cuda":
            torch.cuda.empty_cache()
    return StepModels.of(models.student, None)


def _set_checkpointing(model, enabled: bool) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if enabled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()


def measure(config: MeasuredConfig, models: StepModels, device) -> dict:
    from .harness import is_out_of_memory

    plan = config.plan()
    out = {"name": config.name, "plan": plan.describe()}
    models = models_for(plan, models, device)
    out["teacher_resident"] = models.teacher is not None
    _set_checkpointing(models.student, plan.gradient_checkpointing)
    batches = optimizer = None
    try:
        batches = make_batches(plan, models.vocab_size, device)
        optimizer = make_optimizer(models.student)
        allocate_optimizer_state(models.student, optimizer)
        run_step(plan, models, batches, optimizer, label="warm-up step")
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        run_step(plan, models, batches, optimizer)
        torch.cuda.synchronize(device)
        out.update(status="ok", step_s=time.perf_counter() - start, memory_before_bytes=before,
                   peak_bytes=torch.cuda.max_memory_allocated(device),
                   peak_reserved_bytes=torch.cuda.max_memory_reserved(device))
    except Exception as error:  # noqa: BLE001 -- an out-of-memory configuration is a result
        if not is_out_of_memory(error):
            raise
        out.update(status="oom", reason=f"{type(error).__name__}: {str(error)[:300]}")
    finally:
        del batches, optimizer
        models.student.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
    return out


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def committed_estimates(results_dir: Path = RESULTS_DIR) -> tuple[str | None, list[dict]]:
    """The newest committed ``estimate-paper-*.json`` (its name and its results), or ``(None, [])``."""
    paths = sorted(results_dir.glob("estimate-paper-*.json"))
    if not paths:
        return None, []
    return paths[-1].name, json.loads(paths[-1].read_text()).get("results", [])


def _plan_key(plan: dict) -> dict:
    return {k: v for k, v in plan.items() if k != "method_config"}


def add_committed_estimate(result: dict, source: str | None, estimates: list[dict]) -> None:
    """The committed estimate of the same step, if the paper table has it (cheap; a fresh one may replace it)."""
    key = _plan_key(result["plan"])
    match = next((e for e in estimates if _plan_key(e["plan"]) == key), None)
    if match is not None:
        result["estimate_peak_bytes"] = match["peak_bytes"]
        result["estimate_source"] = f"committed {source} (transformers {match['versions'].get('transformers')})"
        if result.get("status") == "ok":
            result["measured_over_estimate"] = result["peak_bytes"] / match["peak_bytes"]


def add_estimate(result: dict, config: MeasuredConfig) -> None:
    from .estimate_memory import estimate_step

    try:
        estimate = estimate_step(config.plan())
    except Exception as error:  # noqa: BLE001 -- the measurement stands without it
        result["estimate_error"] = f"{type(error).__name__}: {str(error)[:300]}"
        return
    result["estimate_peak_bytes"] = estimate["peak_bytes"]
    result["estimate_peak_by_label"] = estimate["peak_by_label"]
    result["estimate_source"] = "fresh, on this machine's CPU with its transformers"
    if result.get("status") == "ok":
        result["measured_over_estimate"] = result["peak_bytes"] / estimate["peak_bytes"]


def format_line(r: dict) -> str:
    est = r.get("estimate_peak_bytes")
    est_text = (f"estimate {est / GiB:6.2f} GiB ({r.get('estimate_source', '')})" if est
                else f"estimate: {r.get('estimate_error', 'not run')}")
    if r["status"] != "ok":
        return f"{r['name']:<16} {r['status']}: {r.get('reason', '')[:100]} ({est_text})"
    return (f"{r['name']:<16} measured peak {r['peak_bytes'] / GiB:6.2f} GiB allocated "
            f"({r['peak_reserved_bytes'] / GiB:6.2f} reserved), {est_text}, measured/estimate "
            f"{r.get('measured_over_estimate', float('nan')):.3f}; step {r['step_s']:.2f} s")


def main(argv=None) -> int:
    parser = OneLineParser(prog="python -m benchmarks.measure_step", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results to this JSON file (after each configuration)")
    parser.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, in order (default all: {','.join(CONFIGS)})")
    parser.add_argument("--no-estimate", action="store_true", help="measure only (no fake-tensor estimate)")
    args = parser.parse_args(argv)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        parser.error(f"unknown configs {unknown or args.configs!r}; choose from {list(CONFIGS)}")
    if args.json is not None and (problem := output_file_problem(args.json, overwrite=args.overwrite,
                                                                   flag="--json")):
        parser.error(problem)
    if not torch.cuda.is_available():
        parser.error("no CUDA device: this measures GPU memory (python -m benchmarks.estimate_memory estimates it "
                     "on a CPU)")
    device = torch.device("cuda")
    results = []
    payload = {"kind": "measured_step", "device_name": torch.cuda.get_device_name(device), "results": results}

    def save():
        if args.json is not None:
            args.json.write_text(json.dumps(payload, indent=1) + "\n")

    started = time.perf_counter()
    models = build_models([CONFIGS[n].plan() for n in names], device)
    payload["build_s"] = time.perf_counter() - started
    source, estimates = committed_estimates()
    # Every measurement first, then the fresh estimates (CPU work, seconds each); each result is saved as soon as
    # it exists, so a part cut short keeps what it measured, with the committed estimate beside it.
    for name in names:
        result = measure(CONFIGS[name], models, device)
        add_committed_estimate(result, source, estimates)
        results.append(result)
        save()
        print(format_line(result), flush=True)
    del models
    torch.cuda.empty_cache()
    if not args.no_estimate:
        for result in results:
            add_estimate(result, CONFIGS[result["name"]])
            save()
            print(format_line(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
