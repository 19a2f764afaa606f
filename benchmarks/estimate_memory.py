"""ESTIMATED peak GPU memory of one ``kid train`` optimizer step, counted on a CPU with fake tensors.

    python -m benchmarks.estimate_memory [--teacher qwen1.5-7b] [--student qwen1.5-0.5b] [--method kid]
        [--batch-size 16] [--micro-batch-size 4] [--seq-len 1152] [--answer-len 128] [--lora | --no-lora]
        [--gradient-checkpointing] [--dtype bfloat16] [--implementation both|kidkernels|eager] [--json FILE]
    python -m benchmarks.estimate_memory --paper-table     # every method at the paper's setting, to results/ + README

The models are built from their configs (presets in :mod:`benchmarks.model_presets`, or any Hugging Face
``config.json`` by path) with fake weights: nothing is allocated, nothing downloaded, and a 7B teacher takes
seconds.  The step is the trainer's own (:mod:`benchmarks.train_step`: for the methods that generate, the step's
rollout through :mod:`kid.rollout`; per micro-batch the terms of ``kid.methods.plan_objective``, each
back-propagated before the next is built, as ``DistillTrainer.training_step`` runs them; clipping, fused AdamW with
its state), run under :func:`benchmarks.fake_memory.cuda_like_execution` so that attention, dropout and kidkernels
take the paths they take on a GPU, with generation stood in for by cached forwards of the final length (values
decide when generation stops; fake tensors have none).  The counted step starts as every step after the first does
(optimizer state allocated, no gradients); it runs the rollout, the first two micro-batches and the update, since
every later micro-batch starts from the same live tensors as the second and repeats its peak exactly
(:func:`benchmarks.train_step.run_step`).  Printed: the peak of allocated memory (what
``torch.cuda.max_memory_allocated`` would report), what was live at the peak by kind, the largest extra memory of
one loss call, and the same step computed without this library (full Hugging Face logits, float32 eager losses)
for comparison.  These are estimates, not measurements;
what they leave out is printed with them (:data:`benchmarks.fake_memory.NOT_MODELLED`).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from .arguments import OneLineParser, output_file_problem
from .fake_memory import NOT_MODELLED, ROUTES, LiveBytesTracker, cuda_like_execution, fake_causal_lm
from .gpu_report import package_version
from .model_presets import PRESETS, UnknownModel, hf_config
from .train_step import (
    IMPLEMENTATIONS,
    METHODS,
    WORST_CASE_OPTIONS,
    StepModels,
    StepPlan,
    allocate_optimizer_state,
    make_batches,
    make_optimizer,
    run_step,
    trainable_parameters,
)

GiB = 2 ** 30
# Micro-batches of the step that are run (see train_step.run_step: the later ones repeat the second's peak).
MICRO_BATCHES_RUN = 2
RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
START_MARKER = "<!-- estimate:start -->"
END_MARKER = "<!-- estimate:end -->"

# What each label of the breakdown holds (bytes live at the peak, by where they were allocated).
LABELS = {
    "weights": "parameters and buffers of both models",
    "gradients": "gradients of the trainable parameters",
    "optimizer state": "AdamW moments and step counters",
    "activations": "allocated by the forward passes and still alive (saved for backward, hidden rows; under "
                   "autocast also the bf16 copies of the weights)",
    "logits": "lm_head outputs: [B, T, V] in the eager step, zero rows with kidkernels",
    "loss workspace": "allocated inside a loss call and still alive (chunk buffers; gradients formed in forward)",
    "selection workspace": "allocated inside KID's entropy / argmax / selection calls",
    "generation": "KV cache and activations of the on-policy methods' generation",
    "backward": "transients of the backward pass (activation gradients, recomputed layers)",
    "optimizer step": "transients of clipping and the update",
}
# The five-way summary of the labels above.
SUMMARY_GROUPS = {
    "weights": ("weights",),
    "optimizer (grads + state)": ("gradients", "optimizer state"),
    "activations (+ logits)": ("activations", "logits"),
    "loss workspace": ("loss workspace", "selection workspace"),
    "transients": ("backward", "optimizer step", "generation"),
}
LOSS_FUNCTIONS = ("fused_linear_distill_loss", "fused_linear_cross_entropy", "distill_loss")
SELECTION_FUNCTIONS = ("fused_linear_entropy", "fused_linear_argmax", "fused_linear_select", "select_positions")
# The paper's setting (anchors.md): batch 16, 1,024 prompt + 128 answer tokens, Qwen1.5-7B teacher, Qwen1.5-0.5B
# student with LoRA rank 64 / alpha 32 on every linear layer, bf16.
PAPER_VARIANTS = (("sft", {}), ("fkd", {}), ("rkd", {}), ("kid", {}), ("kid", {"strategy": "hard"}),
                  ("gkd", {}), ("imitkd", {}), ("fdistill", {}))
PAPER_MICRO_BATCHES = (4, 16)


def versions() -> dict:
    return {name: package_version(name) for name in ("kidkernels", "torch", "transformers", "peft")}


# ---- instrumentation of the step (fake tensors only) ------------------------------------------------------------

def _region_function(function, tracker: LiveBytesTracker, label: str, name: str):
    @functools.wraps(function)
    def wrapped(*args, **kwargs):
        with tracker.region(label, name):
            return function(*args, **kwargs)
    return wrapped


def _module_region(module: torch.nn.Module, tracker: LiveBytesTracker, label: str, name: str) -> list:
    open_regions = []

    def enter(_module, _args):
        region = tracker.region(label, name)
        region.__enter__()
        open_regions.append(region)

    def leave(_module, _args, _output):
        open_regions.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]


def _fake_rollout(tracker: LiveBytesTracker):
    """Stand-ins for the two functions of :mod:`kid.rollout` whose work depends on values (generation stops on
    them), for fake tensors: ``prompt_tokens`` (a prompt's real tokens: the whole row, every batch here being
    unpadded) and ``generate_grouped``, which makes the calls the real one makes (prompts sorted by length, at most
    ``batch_size`` per call, ``num_calls`` if given), each one cached no-grad forward over its prompts +
    ``max_new_tokens`` (the KV cache at its final size) in eval mode with the LoRA adapters merged as the real
    decode has them (:func:`kid.rollout.merged_lora_weights`), and returns answers of ``max_new_tokens`` tokens with
    no EOS (the longest: the worst case)."""
    from kid.models import eval_mode
    from kid.rollout import merged_lora_weights

    def prompt_tokens(batch, row):
        return batch["prompt_input_ids"][row]

    def generate_grouped(model, prompts, *, batch_size=0, num_calls=None, pad_token_id, max_new_tokens,
                         eos_token_id, merge_lora=False, **sampling):
        lm = model
        while isinstance(getattr(lm, "module", None), torch.nn.Module):
            lm = lm.module
        n = len(prompts)
        needed = 0 if n == 0 else (1 if batch_size <= 0 else math.ceil(n / batch_size))
        calls = needed if num_calls is None else num_calls
        order = sorted(range(n), key=lambda i: (prompts[i].numel(), i))
        per_call = math.ceil(n / calls) if calls else 0
        answers = [None] * n
        for c in range(calls):
            real = order[c * per_call:(c + 1) * per_call]
            rows = real or order[-1:]  # a call with no prompt of its own repeats the last one (discarded)
            width = max(prompts[i].numel() for i in rows) + max_new_tokens
            device = prompts[rows[0]].device
            with tracker.region("generation"), torch.no_grad(), eval_mode(lm), \
                    merged_lora_weights(lm, enabled=merge_lora):
                ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
                out = lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
                del out
                generated = torch.randint(0, max(eos_token_id, 1), (len(rows), max_new_tokens), device=device)
            for j, i in enumerate(real):
                answers[i] = generated[j]
        return answers
    return {"prompt_tokens": prompt_tokens, "generate_grouped": generate_grouped}


@contextlib.contextmanager
def instrumented(tracker: LiveBytesTracker, models: StepModels, *, fake: bool = True):
    """Label the loss and selection calls (kidkernels' public functions, as ``kid`` calls them), the lm_heads'
    outputs, the gradients as they are accumulated, and (fake tensors) stand in for generation."""
    import kid.rollout
    import kidkernels
    from kid.models import unwrap

    saved = []
    for names, label in ((LOSS_FUNCTIONS, "loss workspace"), (SELECTION_FUNCTIONS, "selection workspace")):
        for name in names:
            original = getattr(kidkernels, name)
            saved.append((kidkernels, name, original))
            setattr(kidkernels, name, _region_function(original, tracker, label, name))
    if fake:
        for name, stand_in in _fake_rollout(tracker).items():
            saved.append((kid.rollout, name, getattr(kid.rollout, name)))
            setattr(kid.rollout, name, stand_in)
    handles = []
    for role, model in (("student", models.student), ("teacher", models.teacher)):
        if model is not None:
            handles += _module_region(unwrap(model).get_output_embeddings(), tracker, "logits", f"{role} lm_head")
    for param in trainable_parameters(models.student):
        handles.append(param.register_post_accumulate_grad_hook(lambda p: tracker.relabel(p.grad, "gradients")))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


@contextlib.contextmanager
def _workspace_env(workspace_bytes: int | None):
    saved = os.environ.get("KIDKERNELS_WORKSPACE_MB")
    if workspace_bytes is not None:
        os.environ["KIDKERNELS_WORKSPACE_MB"] = repr(workspace_bytes / 2 ** 20)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("KIDKERNELS_WORKSPACE_MB", None)
        else:
            os.environ["KIDKERNELS_WORKSPACE_MB"] = saved


# ---- the estimate -----------------------------------------------------------------------------------------------

def build_fake_models(plan: StepPlan, fake_mode: FakeTensorMode | None) -> StepModels:
    """The plan's student (LoRA if asked) and frozen teacher with fake weights."""
    student = fake_causal_lm(hf_config(plan.student), dtype=plan.student_weight_dtype, fake_mode=fake_mode,
                             lora=plan.lora_options(), gradient_checkpointing=plan.gradient_checkpointing)
    teacher = None
    if plan.method_config().needs_teacher:
        teacher = fake_causal_lm(hf_config(plan.teacher), dtype=getattr(torch, plan.teacher_dtype),
                                 fake_mode=fake_mode, train=False)
    return StepModels.of(student, teacher)


def _model_tensors(model) -> list[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers()) if model is not None else []


def _optimizer_state(optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def estimate_step(plan: StepPlan, *, routes=ROUTES, fake: bool = True) -> dict:
    """Count the memory of one optimizer step of ``plan`` on fake tensors (after the optimizer state exists, as in
    every step but the first); return the estimate, a JSON-able dict (``peak_bytes``, ``peak_by_label``,
    ``peak_where``, ``loss_extra_bytes``, ...).

    routes: which of CUDA's op choices to take (:data:`benchmarks.fake_memory.ROUTES`, all by default: the
    estimate).  fake=False counts a real run on the CPU with the same tracker (uninitialised weights; tiny models
    only), which the tests compare with the fake run.
    """
    started = time.perf_counter()
    fake_mode = FakeTensorMode() if fake else None
    tracker = LiveBytesTracker()
    with cuda_like_execution(routes) as notes, _workspace_env(plan.workspace_bytes):
        models = build_fake_models(plan, fake_mode)
        tracker.register(_model_tensors(models.student) + _model_tensors(models.teacher), "weights")
        weights = tracker.current
        with fake_mode or contextlib.nullcontext(), tracker, instrumented(tracker, models, fake=fake):
            batches = make_batches(plan, models.vocab_size, "cpu")
            optimizer = make_optimizer(models.student)
            with tracker.region("optimizer state"):
                allocate_optimizer_state(models.student, optimizer)
            tracker.reset_peak()
            run_step(plan, models, batches, optimizer, tracker, device_type="cpu", label="step",
                     micro_batches=MICRO_BATCHES_RUN)
    losses = [r for r in tracker.region_records if r.label == "loss workspace"]
    worst = max(losses, key=lambda r: r.extra_bytes, default=None)
    trainable = trainable_parameters(models.student)
    return {
        "kind": "estimate",
        "plan": plan.describe(),
        "peak_bytes": tracker.peak.bytes,
        "peak_where": tracker.peak.where,
        "peak_by_label": {k: v for k, v in tracker.peak.by_label.items() if v},
        "weights_bytes": weights,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "loss_calls": len(losses),
        "generate_calls": sum(r.label == "generation" for r in tracker.region_records),
        "loss_extra_bytes": worst.extra_bytes if worst else 0,
        "loss_extra_call": worst.name if worst else None,
        "largest_tensor_bytes": tracker.largest[0],
        "largest_tensor_label": tracker.largest[1],
        "largest_tensor_bytes_by_label": dict(tracker.largest_by_label),
        "fake_tensors": fake,
        "routes": list(routes),
        "routing_notes": list(notes),
        "not_modelled": list(NOT_MODELLED),
        "versions": versions(),
        "elapsed_s": round(time.perf_counter() - started, 2),
    }


# ---- printing ---------------------------------------------------------------------------------------------------

def _gib(nbytes) -> str:
    return f"{nbytes / GiB:6.2f} GiB"


def summary_groups(by_label: dict) -> dict:
    out = {group: sum(by_label.get(label, 0) for label in labels) for group, labels in SUMMARY_GROUPS.items()}
    known = {label for labels in SUMMARY_GROUPS.values() for label in labels}
    other = sum(v for k, v in by_label.items() if k not in known)
    if other:
        out["other"] = other
    return out


def format_estimate(result: dict, title: str) -> str:
    lines = [f"{title}: ESTIMATED peak allocated GPU memory {result['peak_bytes'] / GiB:.2f} GiB "
             f"({result['peak_bytes'] / 1e9:.1f} GB)", f"  at: {result['peak_where']}",
             "  live at the peak, by kind (estimate):"]
    by_label = result["peak_by_label"]
    for label, meaning in LABELS.items():
        if by_label.get(label):
            lines.append(f"    {label:<20} {_gib(by_label[label])}  {meaning}")
    for label in sorted(set(by_label) - set(LABELS)):
        lines.append(f"    {label:<20} {_gib(by_label[label])}")
    groups = summary_groups(by_label)
    lines.append("  summary: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in groups.items()) + " GiB")
    if result["loss_calls"]:
        lines.append(f"  largest extra memory of one loss call: {result['loss_extra_bytes'] / 2 ** 20:,.1f} MiB "
                     f"({result['loss_extra_call']}, {result['loss_calls']} loss calls in the step)")
    lines.append(f"  largest single tensor allocated in the step: {result['largest_tensor_bytes'] / 2 ** 20:,.1f} MiB "
                 f"({result['largest_tensor_label']})")
    return "\n".join(lines)


def format_plan(plan: StepPlan, result: dict) -> str:
    cfg = result["plan"]["method_config"]
    method = plan.method + (f" ({', '.join(f'{k}={v}' for k, v in plan.method_options.items())})"
                            if plan.method_options else "")
    training = (f"LoRA r={plan.lora_r} alpha={plan.lora_alpha} dropout={plan.lora_dropout} on every linear layer, "
                f"base weights {plan.dtype}, adapters float32" if plan.lora else
                "every weight, float32 master weights, bf16 autocast")
    step = (f"batch {plan.batch_size} x {plan.seq_len} tokens ({plan.prompt_len} prompt + {plan.answer_len} answer) "
            f"in {plan.micro_batches} micro-batches of {plan.micro_batch_size}; gradient checkpointing "
            f"{'on' if plan.gradient_checkpointing else 'off'}; fused AdamW")
    if plan.method in WORST_CASE_OPTIONS:
        calls = cfg.get("generation_batch_size") or plan.batch_size
        step += ("; worst-case draws: " + ", ".join(f"{k}={cfg[k]}" for k in WORST_CASE_OPTIONS[plan.method])
                 + f"; the step's answers generated before its first micro-batch, at most {calls} prompts per "
                 "generate call")
    lines = [f"method {method}; student {plan.student} ({training}; "
             f"{result['trainable_parameters']:,} trainable parameters); "
             + (f"teacher {plan.teacher} ({plan.teacher_dtype}, frozen)" if plan.method != "sft" else "no teacher"),
             step]
    return "\n".join(lines)


def format_report(plan: StepPlan, results: dict) -> str:
    """The printed report of one plan: each implementation's estimate, the comparison, what is not modelled."""
    first = next(iter(results.values()))
    parts = ["ESTIMATE (fake tensors on the CPU, CUDA's op choices; not a measurement)", format_plan(plan, first), ""]
    for implementation, result in results.items():
        title = "with kidkernels" if implementation == "kidkernels" else "without this library (HF logits, eager)"
        parts += [format_estimate(result, title), ""]
    if set(results) == {"kidkernels", "eager"}:
        ours, eager = results["kidkernels"]["peak_bytes"], results["eager"]["peak_bytes"]
        parts.append(f"kidkernels / eager peak: {ours / eager:.2f} ({(eager - ours) / GiB:.2f} GiB less) -- estimate")
    parts.append("Not modelled: " + "; ".join(first["not_modelled"]) + ".")
    notes = sorted({n for r in results.values() for n in r["routing_notes"]})
    if notes:
        parts.append("Routing notes: " + "; ".join(notes) + ".")
    return "\n".join(parts)


# ---- the paper's table ------------------------------------------------------------------------------------------

def paper_plans() -> list[StepPlan]:
    plans = []
    for method, options in PAPER_VARIANTS:
        for micro in PAPER_MICRO_BATCHES:
            for checkpointing in (False, True):
                for implementation in IMPLEMENTATIONS:
                    plans.append(StepPlan(method=method, method_options=dict(options), micro_batch_size=micro,
                                          gradient_checkpointing=checkpointing, implementation=implementation))
    return plans


def _variant_name(plan: dict) -> str:
    strategy = plan["method_options"].get("strategy")
    return plan["method"] + (f" ({strategy})" if strategy else "")


def paper_table_markdown(results: list[dict], *, source: str) -> str:
    """The README / results table: one row per method, micro-batch size and checkpointing setting."""
    rows = {}
    for r in results:
        p = r["plan"]
        rows.setdefault((_variant_name(p), p["micro_batch_size"], p["gradient_checkpointing"]), {})[
            p["implementation"]] = r
    first = results[0]["plan"]
    lines = [
        f"**Estimates, not measurements** (fake tensors on a CPU with CUDA's op choices, `{source}`; "
        f"`python -m benchmarks.estimate_memory --paper-table`).  Peak allocated GPU memory of one optimizer step: "
        f"batch {first['batch_size']} x ({first['seq_len'] - first['answer_len']} + {first['answer_len']}) tokens, "
        f"{first['teacher']} teacher (bf16, frozen), {first['student']} student with LoRA r={first['lora_r']} "
        f"(bf16 base, float32 adapters), fused AdamW.  \"eager\": the same step without this library (full HF logits, "
        "float32 eager losses on the answer rows, HF's own loss for MLE); both run each micro-batch's passes one graph "
        "at a time, as `kid train` does.  On-policy methods: every batch generated (the worst-case draw), the "
        "step's answers (128 tokens each) generated in one call per model before its first micro-batch, as `kid "
        "train` does by default; f-distill's teacher samples during training (the default preset; the paper preset "
        "reads answers generated beforehand).  Not modelled: CUDA context, cuBLAS/attention workspaces, allocator "
        "fragmentation (reserved memory is higher); unpadded batches.  GiB = 2^30 bytes.",
        "",
        "| method | micro-batch | grad. ckpt | kidkernels peak (GiB) | eager peak (GiB) | kidkernels / eager "
        "| activations (GiB) | loss workspace (GiB) | largest loss-call extra (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (variant, micro, ckpt), by_impl in rows.items():
        ours, eager = by_impl.get("kidkernels"), by_impl.get("eager")
        groups = summary_groups(ours["peak_by_label"]) if ours else {}
        lines.append("| " + " | ".join([
            variant, str(micro), "on" if ckpt else "off",
            f"{ours['peak_bytes'] / GiB:.2f}" if ours else "-",
            f"{eager['peak_bytes'] / GiB:.2f}" if eager else "-",
            f"{ours['peak_bytes'] / eager['peak_bytes']:.2f}" if ours and eager else "-",
            f"{groups.get('activations (+ logits)', 0) / GiB:.2f}" if ours else "-",
            f"{groups.get('loss workspace', 0) / GiB:.2f}" if ours else "-",
            f"{ours['loss_extra_bytes'] / 2 ** 20:,.0f}" if ours else "-",
        ]) + " |")
    return "\n".join(lines) + "\n"


def write_between_markers(path: Path, text: str, start: str = START_MARKER, end: str = END_MARKER) -> None:
    content = path.read_text()
    i, j = content.find(start), content.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"{path} has no {start} ... {end} block; add the two markers where the table should go")
    path.write_text(content[:i + len(start)] + "\n" + text + content[j:])


def run_paper_table(results_dir: Path, readme: Path | None, *, overwrite: bool, progress: bool = True) -> list[dict]:
    date = datetime.date.today().isoformat()
    stem = results_dir / f"estimate-paper-{date}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    for path in (json_path, md_path):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    plans = paper_plans()
    results = []
    iterator = plans
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(plans, desc="estimating", unit="step")
    for plan in iterator:
        results.append(estimate_step(plan))
    payload = {"kind": "estimate", "command": "python -m benchmarks.estimate_memory --paper-table", "date": date,
               "machine": "CPU only (fake tensors): no GPU involved", "versions": versions(),
               "not_modelled": list(NOT_MODELLED), "results": results}
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    table = paper_table_markdown(results, source=json_path.name)
    md_path.write_text(f"# Memory estimate at the KID paper's setting ({date})\n\n{table}\nNot modelled: "
                       + "; ".join(NOT_MODELLED) + ".\n")
    if readme is not None:
        write_between_markers(readme, table)
    print(table)
    print(f"wrote {json_path} and {md_path}" + (f"; table in {readme}" if readme else ""))
    return results


# ---- command line -----------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m benchmarks.estimate_memory", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=StepPlan.teacher, help="preset or HF config path (default %(default)s)")
    parser.add_argument("--student", default=StepPlan.student, help="preset or HF config path (default %(default)s)")
    parser.add_argument("--method", default=StepPlan.method, choices=METHODS + ("all",))
    parser.add_argument("--strategy", choices=("random", "uniform", "hard", "easy"), help="KID's selection")
    parser.add_argument("--alpha", type=float, help="KID's masked fraction (default 0.2)")
    parser.add_argument("--mle-input", choices=("imperfect", "gold"), help="KID's MLE input (default imperfect)")
    parser.add_argument("--generation-batch-size", type=int,
                        help="gkd / imitkd / fdistill: at most this many prompts per generate call (default 0: all "
                             "the step's prompts in one call, as kid train does)")
    parser.add_argument("--batch-size", type=int, default=StepPlan.batch_size,
                        help="sequences per optimizer step (default %(default)s)")
    parser.add_argument("--micro-batch-size", type=int, default=StepPlan.micro_batch_size,
                        help="sequences per micro-batch (default %(default)s)")
    parser.add_argument("--seq-len", type=int, default=StepPlan.seq_len,
                        help="tokens per sequence (default 1,024 + 128)")
    parser.add_argument("--answer-len", type=int, default=StepPlan.answer_len,
                        help="answer tokens per sequence (default %(default)s)")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, default=StepPlan.lora,
                        help="LoRA adapters (default) or every weight (--no-lora)")
    parser.add_argument("--lora-r", type=int, default=StepPlan.lora_r)
    parser.add_argument("--lora-alpha", type=int, default=StepPlan.lora_alpha)
    parser.add_argument("--lora-dropout", type=float, default=StepPlan.lora_dropout)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        default=StepPlan.gradient_checkpointing)
    parser.add_argument("--dtype", default=StepPlan.dtype, choices=("bfloat16", "float16", "float32"),
                        help="the student's base weights (ignored by --no-lora: float32 master weights)")
    parser.add_argument("--teacher-dtype", default=StepPlan.teacher_dtype, choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--workspace-mb", type=float, help="kidkernels' workspace budget in MiB, > 0 (default its "
                        "own)")
    parser.add_argument("--implementation", default="both", choices=IMPLEMENTATIONS + ("both",))
    parser.add_argument("--json", type=Path, help="also write the estimate(s) to this JSON file")
    parser.add_argument("--paper-table", action="store_true",
                        help="every method at the paper's setting (micro-batch 4 and 16, checkpointing off and on); "
                             "writes results/estimate-paper-<date>.{json,md} and the README table")
    parser.add_argument("--render-table", type=Path, metavar="JSON",
                        help="rewrite the README's estimate table from a --paper-table JSON (no estimating)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--readme", type=Path, default=README, help="README whose estimate table is rewritten")
    parser.add_argument("--no-readme", action="store_true", help="with --paper-table: leave the README alone")
    parser.add_argument("--overwrite", action="store_true", help="replace result files of the same date")
    parser.add_argument("--list-presets", action="store_true", help="print the model presets and exit")
    return parser


def _plans(args) -> list[StepPlan]:
    options = {k: v for k, v in (("strategy", args.strategy), ("alpha", args.alpha), ("mle_input", args.mle_input))
               if v is not None}
    generation = {} if args.generation_batch_size is None else {"generation_batch_size": args.generation_batch_size}
    methods = METHODS if args.method == "all" else (args.method,)
    implementations = IMPLEMENTATIONS if args.implementation == "both" else (args.implementation,)
    plans = []
    for method in methods:
        for implementation in implementations:
            plans.append(StepPlan(
                student=args.student, teacher=args.teacher, method=method,
                method_options=options if method == "kid" else generation if method in WORST_CASE_OPTIONS else {},
                batch_size=args.batch_size,
                micro_batch_size=args.micro_batch_size, seq_len=args.seq_len, answer_len=args.answer_len,
                lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype,
                teacher_dtype=args.teacher_dtype, implementation=implementation,
                workspace_bytes=_workspace_bytes(args.workspace_mb)))
    return plans


def _workspace_bytes(workspace_mb: float | None) -> int | None:
    if workspace_mb is None:
        return None
    if not (math.isfinite(workspace_mb) and workspace_mb > 0):
        raise ValueError(f"--workspace-mb must be a positive number of MiB, got {workspace_mb}")
    return max(1, int(workspace_mb * 2 ** 20))


def _readme_problem(readme: Path) -> str | None:
    """Why the README's estimate table cannot be rewritten (checked before the slow work), or None."""
    try:
        content = readme.read_text()
    except OSError as error:
        return f"--readme {readme}: {error.strerror or error}"
    i, j = content.find(START_MARKER), content.find(END_MARKER)
    if i < 0 or j < i:
        return f"--readme {readme} has no {START_MARKER} ... {END_MARKER} block (or pass --no-readme)"
    return None


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_presets:
        for name, values in PRESETS.items():
            print(f"{name:<20} {values['model_type']:<6} hidden {values['hidden_size']:>5}, "
                  f"{values['num_hidden_layers']:>2} layers, vocab {values['vocab_size']:,}")
        return 0
    if args.render_table is not None:
        try:
            payload = json.loads(args.render_table.read_text())
        except (OSError, json.JSONDecodeError) as error:
            parser.error(f"cannot read {args.render_table}: {error}")
        if payload.get("kind") != "estimate" or not payload.get("results"):
            parser.error(f"{args.render_table} holds no estimates")
        if not args.no_readme and (problem := _readme_problem(args.readme)):
            parser.error(problem)
        table = paper_table_markdown(payload["results"], source=args.render_table.name)
        print(table)
        if not args.no_readme:
            write_between_markers(args.readme, table)
        return 0
    if args.paper_table:
        if args.results_dir.exists() and not args.results_dir.is_dir():
            parser.error(f"--results-dir {args.results_dir} is not a folder")
        if not args.no_readme and (problem := _readme_problem(args.readme)):
            parser.error(problem)
        try:
            run_paper_table(args.results_dir, None if args.no_readme else args.readme, overwrite=args.overwrite)
        except FileExistsError as error:
            parser.error(str(error))
        return 0
    if args.json is not None and (problem := output_file_problem(args.json, overwrite=args.overwrite,
                                                                   flag="--json")):
        parser.error(problem)
    try:
        plans = _plans(args)
        for model in {args.student, args.teacher if args.method != "sft" else args.student}:
            hf_config(model)  # a bad preset or path fails here, before any slow work
    except (ValueError, UnknownModel) as error:
        parser.error(str(error))
    by_method: dict[str, dict] = {}
    for plan in plans:
        by_method.setdefault(plan.method, {})[plan.implementation] = estimate_step(plan)
    for plan in plans:
        if plan.implementation == next(iter(by_method[plan.method])):
            print(format_report(plan, by_method[plan.method]))
            print()
    if args.json is not None:
        args.json.write_text(json.dumps({"kind": "estimate", "command": "python -m benchmarks.estimate_memory "
                                         + " ".join(sys.argv[1:] if argv is None else argv),
                                         "results": [r for m in by_method.values() for r in m.values()]},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
