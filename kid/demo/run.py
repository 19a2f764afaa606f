"""``kid demo``: the whole pipeline, offline, in minutes on a CPU.

1. Load the shipped Spider slice (:mod:`kid.demo.slice`) and train a tokenizer on its training split.
2. Build a small teacher and a smaller student of a real Hugging Face architecture (Qwen2, as Qwen1.5) from config,
   with random weights: nothing is downloaded.
3. Fine-tune the teacher with ``sft``, then distill a fresh student (same initial weights each time) with each
   method (default ``sft``, ``rkd``, ``kid``, ``gkd``) through :func:`kid.training.run_training`.
4. Generate SQL for the held-out questions (greedy) and score execution accuracy with the real evaluator.
5. Print a table (method, EX with counts, training time and its ratio to SFT), write ``demo_report.json`` and
   ``loss_curves.png`` to the output directory.

The models start from random weights, so every weight is trained (LoRA needs a pretrained base; real runs use
it by default).  The numbers are whatever the run gives: tiny models trained for a few minutes reach low accuracy,
and the ratio of training times is the part that carries over to real models.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

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
    import dataclasses

    from transformers import TrainingArguments

    from ..config import MethodConfig
    from ..training import TrainConfig, run_training, training_arguments

    config = TrainConfig(output_dir=str(out_dir / name), lora=False, batch_size=scale.batch_size,
                         micro_batch_size=scale.micro_batch_size, max_steps=steps, learning_rate=scale.learning_rate,
                         warmup_ratio=0.05, lr_scheduler="cosine", logging_steps=max(1, steps // 20),
                         save_steps=10**9, max_input_tokens=scale.max_input_tokens,
                         max_output_tokens=scale.max_output_tokens, seed=seed, progress=progress,
                         sft_report=sft_report, dtype="float32", teacher_dtype="float32")
    # Batches of similar lengths: less padding (transformers 5: train_sampling_strategy; 4.x: group_by_length).
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    grouping = ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in fields
                else {"group_by_length": True})
    report = run_training(config, MethodConfig(**method_options), student=model, teacher=teacher,
                          tokenizer=tokenizer, train_dataset=dataset, write_final=False,
                          training_args=training_arguments(config, **grouping))
    report.pop("_trainer")
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
    """Run the demo (module docstring); returns the report written to ``out_dir/demo_report.json``."""
    from ..models import eval_mode
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
    started = time.perf_counter()

    train, heldout = load_demo_splits()
    if s.heldout_limit:
        # heldout.json is grouped by database: a seeded sample keeps every database represented.
        heldout = heldout.shuffle(seed=seed).select(range(min(s.heldout_limit, len(heldout))))
    tokenizer = train_demo_tokenizer(list(train["prompt"]) + list(train["target"]), vocab_size=s.vocab_size)
    dataset = tokenize_dataset(train, tokenizer, max_input_tokens=s.max_input_tokens,
                               max_output_tokens=s.max_output_tokens, progress=progress)
    max_positions = s.max_input_tokens + s.max_output_tokens + 8
    vocab = len(tokenizer)
    print(f"kid demo ({scale}): {len(train)} training and {len(heldout)} held-out questions on "
          f"{len(set(train['db_id']))} databases; tokenizer of {vocab} tokens", flush=True)

    rows: dict[str, dict] = {}
    # 1. The teacher: fine-tuned with SFT from random weights.
    teacher = s.teacher.build(vocab, max_positions, seed)
    teacher_run = _train("teacher_sft", out, s, {"method": "sft"}, model=teacher, teacher=None,
                         tokenizer=tokenizer, dataset=dataset, seed=seed, progress=progress, steps=s.teacher_steps)
    teacher.eval().requires_grad_(False)
    with eval_mode(teacher):
        rows["teacher (sft)"] = {"run": teacher_run, **_score(teacher, tokenizer, heldout, s, progress)}
    print(f"teacher: EX {rows['teacher (sft)']['ex']:.3f}", flush=True)

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
        if method == "sft":
            sft_report_path = str(out / "sft" / "run_report.json")
        with eval_mode(student):
            rows[method] = {"run": run, **_score(student, tokenizer, heldout, s, progress)}
        print(f"{method}: EX {rows[method]['ex']:.3f}, training {run['train_runtime_s']:.1f} s", flush=True)
        del student

    report = _report(rows, s, seed, time.perf_counter() - started, len(train), len(heldout), vocab)
    with open(out / "demo_report.json", "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    plot_loss_curves({name: row["run"]["log_history"] for name, row in rows.items()}, out / "loss_curves.png")
    print(format_table(report))
    print(f"report: {out / 'demo_report.json'}; loss curves: {out / 'loss_curves.png'}")
    return report


def _report(rows, s: DemoScale, seed, wall_s, n_train, n_heldout, vocab) -> dict:
    sft_time = rows["sft"]["run"]["train_runtime_s"] if "sft" in rows else None
    table = []
    for name, row in rows.items():
        runtime = row["run"]["train_runtime_s"]
        table.append({"method": name, "ex": row["ex"], "correct": row["correct"], "total": row["total"],
                      "train_runtime_s": runtime, "steps": row["run"]["global_steps"],
                      "time_vs_sft": round(runtime / sft_time, 3) if sft_time and name != "teacher (sft)" else None,
                      "final_loss": row["run"]["final_loss"]})
    return {
        "scale": asdict(s), "seed": seed, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "train_examples": n_train, "heldout_examples": n_heldout, "vocab_size": vocab,
        "wall_time_s": round(wall_s, 1), "table": table,
        "runs": rows,
    }


def format_table(report: dict) -> str:
    lines = [f"{'method':<15} {'EX':>7} {'correct':>10} {'train s':>9} {'vs SFT':>7}"]
    for row in report["table"]:
        ratio = f"{row['time_vs_sft']:.2f}x" if row["time_vs_sft"] is not None else "-"
        lines.append(f"{row['method']:<15} {row['ex']:>7.3f} {row['correct']:>4}/{row['total']:<5} "
                     f"{row['train_runtime_s']:>9.1f} {ratio:>7}")
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
