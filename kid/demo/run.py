"""``kid demo``: the whole pipeline, offline, in minutes on a CPU.

1. Load the shipped Spider slice (:mod:`kid.demo.slice`) and train a tokenizer on its training split.
2. Build a small teacher and a smaller student of a real Hugging Face architecture (Qwen2, as Qwen1.5) from config,
   with random weights: nothing is downloaded.
3. Fine-tune the teacher with ``sft``, then distill a fresh student (same initial weights each time) with each
   method (default ``sft``, ``rkd``, ``kid``, ``gkd``) through :func:`kid.training.run_training`.
4. Generate SQL for the held-out questions (greedy) and score execution accuracy with the real evaluator.
5. Print a table (method, EX with counts and a 95% interval, training wall and CPU time, ratios to SFT), write
   ``demo_report.json`` and ``loss_curves.png`` to the output directory.

The models start from random weights, so every weight is trained (LoRA needs a pretrained base; real runs use
it by default).  The numbers are whatever the run gives: tiny models trained for a few minutes reach low accuracy,
and at 64 questions a difference of a few questions is noise (the table says so, with Wilson intervals).  The
training-time ratios are the part that carries over to real models, and a busy machine distorts wall time: the
table gives three ratios to SFT, of wall time, of process CPU time (which contention inflates far less once OpenMP
threads wait passively: ``kid demo`` sets ``OMP_WAIT_POLICY=PASSIVE`` unless it is set) and the
median over optimizer steps of the step-by-step ratio (both runs see the same batches in the same order) with its
10th-90th percentile spread, and warns when the machine was busy or the ratios disagree.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..console import say
from ..files import atomic_open, atomic_write_json

DEFAULT_METHODS = ("sft", "rkd", "kid", "gkd")


@dataclass(frozen=True)
class DemoModel:
    """Qwen2 dimensions of a demo model."""
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int

    def build(self, vocab: int, max_positions: int, seed: int):
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(vocab_size=vocab, hidden_size=self.hidden, num_hidden_layers=self.layers,
                             num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                             intermediate_size=self.intermediate, max_position_embeddings=max_positions,
                             tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa")
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(config)


@dataclass(frozen=True)
class DemoScale:
    """Sizes and step counts of one demo scale."""
    name: str
    teacher: DemoModel
    student: DemoModel
    vocab_size: int
    teacher_steps: int
    student_steps: int
    batch_size: int
    micro_batch_size: int
    learning_rate: float
    max_input_tokens: int
    max_output_tokens: int
    heldout_limit: int | None
    gkd_max_new_tokens: int


SCALES = {
    # Two CPU cores, <= 10 minutes for the whole pipeline (teacher + four students + five evaluations).
    "cpu": DemoScale("cpu", teacher=DemoModel(128, 2, 4, 2, 384), student=DemoModel(64, 2, 4, 2, 192),
                     vocab_size=1024, teacher_steps=500, student_steps=200, batch_size=16, micro_batch_size=16,
                     learning_rate=3e-3, max_input_tokens=256, max_output_tokens=80, heldout_limit=None,
                     gkd_max_new_tokens=48),
    # The plumbing only (tests): a few steps, a few held-out questions.
    "smoke": DemoScale("smoke", teacher=DemoModel(32, 1, 2, 1, 64), student=DemoModel(16, 1, 2, 1, 32),
                       vocab_size=512, teacher_steps=2, student_steps=2, batch_size=4, micro_batch_size=2,
                       learning_rate=3e-3, max_input_tokens=128, max_output_tokens=32, heldout_limit=6,
                       gkd_max_new_tokens=8),
    # A GPU: wider, deeper models and longer training (still minutes).
    "gpu": DemoScale("gpu", teacher=DemoModel(768, 8, 12, 4, 2048), student=DemoModel(384, 4, 6, 2, 1024),
                     vocab_size=2048, teacher_steps=1500, student_steps=1000, batch_size=16, micro_batch_size=16,
                     learning_rate=5e-4, max_input_tokens=512, max_output_tokens=128, heldout_limit=None,
                     gkd_max_new_tokens=96),
}


def _train(name, out_dir: Path, scale: DemoScale, method_options: dict, *, model, teacher, tokenizer, dataset,
           seed: int, progress: bool, steps: int, sft_report: str | None = None) -> dict:
    from ..config import MethodConfig
    from ..training import TrainConfig, run_training

    config = TrainConfig(output_dir=str(out_dir / name), lora=False, batch_size=scale.batch_size,
                         micro_batch_size=scale.micro_batch_size, max_steps=steps, learning_rate=scale.learning_rate,
                         warmup_ratio=0.05, lr_scheduler="cosine", logging_steps=max(1, steps // 20),
                         save_steps=10**9, max_input_tokens=scale.max_input_tokens,
                         max_output_tokens=scale.max_output_tokens, seed=seed, progress=progress,
                         sft_report=sft_report, dtype="float32", teacher_dtype="float32",
                         group_by_length=True,  # batches of similar lengths: less padding
                         overwrite_output_dir=True)  # the demo's own sub-directory (kid demo checked its output)
    report = run_training(config, MethodConfig(**method_options), student=model, teacher=teacher,
                          tokenizer=tokenizer, train_dataset=dataset, write_final=False)
    trainer = report.pop("_trainer")
    clock = trainer.kid_clock
    report["step_wall_s"] = [round(t, 6) for t in clock.steps_wall]  # for the paired step-time ratios
    report["step_cpu_s"] = [round(t, 6) for t in clock.steps_cpu]
    return report


def _score(model, tokenizer, heldout, scale: DemoScale, progress: bool) -> dict:
    from ..evaluation.scoring import evaluate_predictions
    from ..generation import generate_sql

    predictions = generate_sql(model, tokenizer, heldout["prompt"], questions=heldout["prompt_question"],
                               batch_size=32, max_new_tokens=scale.max_output_tokens,
                               max_input_tokens=scale.max_input_tokens, progress=progress)
    from .slice import demo_slice_paths

    db_dir = demo_slice_paths().db_dir
    report = evaluate_predictions(predictions, heldout["query"], heldout["db_id"], db_dir,
                                  hardness=heldout["hardness"], timeout_s=10.0, num_workers=2, progress=progress)
    correct = sum(1 for r in report.examples if r.correct)
    return {"ex": correct / len(predictions), "correct": correct, "total": len(predictions),
            "by_hardness": report.breakdowns.get("hardness"), "predictions": predictions}


def run_demo(out_dir: str | Path = "kid_demo", *, scale: str = "cpu", methods=DEFAULT_METHODS, seed: int = 0,
             progress: bool = True) -> dict:
    """Run the demo (module docstring); returns the report written to ``out_dir/demo_report.json``.

    A signal (SIGINT / SIGTERM) stops the run in progress after its current step; the demo then stops too and
    returns ``{"interrupted": "<signal name>", ...}`` without a table.
    """
    from ..models import eval_mode
    from ..run_report import library_versions
    from ..training import tokenize_dataset
    from .slice import load_demo_splits
    from .tokenizer import train_demo_tokenizer

    if scale not in SCALES:
        raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
    from ..config import METHODS

    methods = list(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {methods}")
    if "sft" not in methods:
        methods.insert(0, "sft")  # the reference of the training-time ratios
    methods.sort(key=lambda m: m != "sft")
    s = SCALES[scale]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    load_start = _load_average()

    train, heldout = load_demo_splits()
    if s.heldout_limit:
        # heldout.json is grouped by database: a seeded sample keeps every database represented.
        heldout = heldout.shuffle(seed=seed).select(range(min(s.heldout_limit, len(heldout))))
    tokenizer = train_demo_tokenizer(list(train["prompt"]) + list(train["target"]), vocab_size=s.vocab_size)
    dataset = tokenize_dataset(train, tokenizer, max_input_tokens=s.max_input_tokens,
                               max_output_tokens=s.max_output_tokens, progress=progress)
    max_positions = s.max_input_tokens + s.max_output_tokens + 8
    vocab = len(tokenizer)
    say(f"kid demo ({scale}): {len(train)} training and {len(heldout)} held-out questions on "
        f"{len(set(train['db_id']))} databases; tokenizer of {vocab} tokens")

    rows: dict[str, dict] = {}
    # 1. The teacher: fine-tuned with SFT from random weights.
    teacher = s.teacher.build(vocab, max_positions, seed)
    teacher_run = _train("teacher_sft", out, s, {"method": "sft"}, model=teacher, teacher=None,
                         tokenizer=tokenizer, dataset=dataset, seed=seed, progress=progress, steps=s.teacher_steps)
    if teacher_run["interrupted"]:
        return _interrupted(out, teacher_run)
    teacher.eval().requires_grad_(False)
    with eval_mode(teacher):
        rows["teacher (sft)"] = {"run": teacher_run, **_score(teacher, tokenizer, heldout, s, progress)}
    say(f"teacher: EX {rows['teacher (sft)']['correct']}/{rows['teacher (sft)']['total']}")

    # 2. Students, each from the same initial weights.
    sft_report_path = None
    for method in methods:
        options = {"method": method}
        if method == "gkd":
            options["max_new_tokens"] = s.gkd_max_new_tokens
        student = s.student.build(vocab, max_positions, seed + 1)
        run = _train(method, out, s, options, model=student, teacher=None if method == "sft" else teacher,
                     tokenizer=tokenizer, dataset=dataset, seed=seed, progress=progress, steps=s.student_steps,
                     sft_report=sft_report_path)
        if run["interrupted"]:
            return _interrupted(out, run)
        if method == "sft":
            sft_report_path = str(out / "sft" / "run_report.json")
        with eval_mode(student):
            rows[method] = {"run": run, **_score(student, tokenizer, heldout, s, progress)}
        say(f"{method}: EX {rows[method]['correct']}/{rows[method]['total']}, training {run['train_runtime_s']:.1f} s "
            f"wall, {run['cpu_time_s']:.1f} s CPU")
        del student

    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
               "load_average_end": _load_average(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    report = _report(rows, s, seed, time.perf_counter() - started, time.process_time() - cpu_started, len(train),
                     len(heldout), vocab, machine)
    report["versions"] = library_versions()
    atomic_write_json(out / "demo_report.json", report)
    plot_loss_curves({name: row["run"]["log_history"] for name, row in rows.items()}, out / "loss_curves.png")
    say(format_table(report))
    say(f"report: {out / 'demo_report.json'}; loss curves: {out / 'loss_curves.png'}")
    return report


def _interrupted(out: Path, run: dict) -> dict:
    name = Path(run["train_config"]["output_dir"]).name
    say(f"kid demo: interrupted by {run['signal']} while training {name} (its checkpoint and report are in "
        f"{out / name}); no table", file=None)
    return {"interrupted": run["signal"], "run": name}


def _load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``correct / total``."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    x = q * (len(s) - 1)
    lo = int(math.floor(x))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (x - lo)


def paired_step_ratio(steps: list[float], reference: list[float]) -> dict | None:
    """Median and 10th-90th percentiles over steps of ``steps[i] / reference[i]`` (the same batches in the same
    order, so the ratio at each step compares the same work; its spread is the timing noise).  The first step
    (warm-up, allocator) is left out when there are others."""
    n = min(len(steps), len(reference))
    pairs = [(a, b) for a, b in zip(steps[:n], reference[:n]) if b > 0]
    if len(pairs) > 1:
        pairs = pairs[1:]
    if not pairs:
        return None
    ratios = [a / b for a, b in pairs]
    return {"median": round(_percentile(ratios, 0.5), 3), "p10": round(_percentile(ratios, 0.1), 3),
            "p90": round(_percentile(ratios, 0.9), 3), "steps": len(ratios)}


def _report(rows, s: DemoScale, seed, wall_s, cpu_s, n_train, n_heldout, vocab, machine) -> dict:
    sft = rows["sft"]["run"] if "sft" in rows else None
    table = []
    for name, row in rows.items():
        run = row["run"]
        student = name != "teacher (sft)"
        low, high = wilson_interval(row["correct"], row["total"])
        entry = {"method": name, "ex": row["ex"], "correct": row["correct"], "total": row["total"],
                 "ex_interval_95": [round(low, 4), round(high, 4)],
                 "train_runtime_s": run["train_runtime_s"], "cpu_time_s": run["cpu_time_s"],
                 "steps": run["global_steps"], "final_loss": run["final_loss"],
                 "time_vs_sft": None, "cpu_time_vs_sft": None, "step_time_vs_sft": None}
        if sft is not None and student:
            entry["time_vs_sft"] = round(run["train_runtime_s"] / sft["train_runtime_s"], 3)
            if sft.get("cpu_time_s"):
                entry["cpu_time_vs_sft"] = round(run["cpu_time_s"] / sft["cpu_time_s"], 3)
            entry["step_time_vs_sft"] = paired_step_ratio(run["step_wall_s"], sft["step_wall_s"])
        table.append(entry)
    cpus = machine.get("cpus") or 1
    loads = [x for x in (machine.get("load_average_start"), machine.get("load_average_end")) if x is not None]
    busy = bool(loads) and max(loads) > cpus
    disagree = [row["method"] for row in table if row["time_vs_sft"] and row["cpu_time_vs_sft"]
                and abs(row["time_vs_sft"] / row["cpu_time_vs_sft"] - 1) > 0.15]
    return {
        "scale": asdict(s), "seed": seed, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "train_examples": n_train, "heldout_examples": n_heldout, "vocab_size": vocab,
        "wall_time_s": round(wall_s, 1), "cpu_time_s": round(cpu_s, 1), "machine": machine,
        "machine_busy": busy, "wall_and_cpu_ratios_disagree": disagree, "table": table,
        "runs": rows,
    }


def _ratio(value) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def format_table(report: dict) -> str:
    """The demo's result table, with what its numbers can and cannot say."""
    lines = [f"{'method':<14} {'EX':>6} {'95% interval':>13}  {'wall s':>7} {'CPU s':>7}   "
             f"{'vs SFT: wall':>12} {'CPU':>6}  {'per step (p10-p90)':>21}"]
    for row in report["table"]:
        low, high = row.get("ex_interval_95") or wilson_interval(row["correct"], row["total"])
        step = row.get("step_time_vs_sft")
        step_text = f"{step['median']:.2f}x ({step['p10']:.2f}-{step['p90']:.2f})" if step else "-"
        cpu = row.get("cpu_time_s")
        interval = f"{100 * low:>5.1f}-{100 * high:<5.1f}%"
        lines.append(f"{row['method']:<14} {row['correct']:>3}/{row['total']:<3} {interval}  "
                     f"{row['train_runtime_s']:>7.1f} {cpu if cpu is not None else float('nan'):>7.1f}   "
                     f"{_ratio(row['time_vs_sft']):>12} {_ratio(row.get('cpu_time_vs_sft')):>6}  {step_text:>21}")
    total = report["table"][0]["total"] if report["table"] else 0
    lines.append(f"EX: {total} held-out questions, models trained for minutes from random weights.  At this scale "
                 "accuracy is noise: the intervals overlap, and a few questions either way mean nothing.  The demo "
                 "shows the pipeline and the training-time ratios, not which method is more accurate.")
    machine = report.get("machine") or {}
    loads = [machine.get("load_average_start"), machine.get("load_average_end")]
    passive = (machine.get("omp_wait_policy") or "").upper() == "PASSIVE"
    lines.append("Time vs SFT: wall = training wall time / SFT's; CPU = this process's CPU time / SFT's ("
                 + ("OpenMP threads wait passively, so other processes inflate it far less than wall time"
                    if passive else "OpenMP threads spin while they wait: contention inflates it too")
                 + "); per step = median over optimizer steps of the step's wall time / SFT's at "
                 "the same step (same batches), 10th-90th percentile in brackets.  Load average "
                 f"{' -> '.join(str(x) for x in loads if x is not None) or 'unknown'} on {machine.get('cpus')} CPUs.")
    if report.get("machine_busy") or report.get("wall_and_cpu_ratios_disagree"):
        lines.append("WARNING: the machine was busy (load above its CPU count) or wall and CPU ratios disagree by more "
                     "than 15%: the wall-time ratios are not reliable here; read the CPU column.")
    return "\n".join(lines)


def plot_loss_curves(histories: dict[str, list[dict]], path: str | Path) -> None:
    """Total loss and its MLE part per logged step, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in histories.items():
        logged = [h for h in history if "loss" in h]
        steps = [h["step"] for h in logged]
        axes[0].plot(steps, [h["loss"] for h in logged], label=name)
        axes[1].plot(steps, [h.get("mle", float("nan")) for h in logged], label=name)
    for ax, title in zip(axes, ("training loss (kd + mle)", "MLE part (gold tokens)")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
