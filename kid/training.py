"""One training run, end to end: :class:`TrainConfig` -> checks, data, student (LoRA), teacher,
:class:`~kid.trainer.DistillTrainer`, checkpoints, the final model and a JSON run report.  ``kid train`` and
``kid demo`` both call :func:`run_training`.

Nothing is lost:

* Every option is checked before any data is built (:func:`preflight`): paths, ranges, the teacher, model
  directories, tokenizers, the mask token, the resume checkpoint, the SFT report to compare with.  A mistake is a
  :class:`kid.errors.UsageError` naming the option.
* An output directory that already holds files is refused unless ``resume`` (continue it) or
  ``overwrite_output_dir`` (start over: its checkpoints, final model and report are removed, once the new run has
  loaded its data and models).  ``resume`` from a checkpoint of another directory needs an empty output_dir (that
  run's checkpoints, final model and report would replace what is there); resuming a finished run (its checkpoint
  has every step of ``max_steps``, or the epochs) is refused, exit 2: nothing is trained, the final model stays.
* SIGINT / SIGTERM ask the Trainer to finish the current optimizer step, save a checkpoint and stop; the report is
  written and says which signal (``kid train`` then exits 130 / 143).  A second SIGINT interrupts at once.  Console
  writes that fail (a ``| tee`` that died with the same Ctrl-C) never abort the save (:mod:`kid.console`).
* Checkpoints are written into a staging directory and renamed into place, the final model likewise, reports are
  replaced atomically (:mod:`kid.files`): a crash leaves the previous complete file or directory.
* The report's training time adds up every segment of a resumed run (each checkpoint carries the segments before
  it, ``kid_run_state.json``), and records versions, the git commit, example counts, absolute paths and the device;
  the time relative to an SFT run (``latency_vs_sft``) is given only when the two runs are comparable.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .config import MethodConfig
from .console import say, write_stderr
from .errors import UsageError
from .files import atomic_write_json, replace_directory
from .preflight import Preflight, check_method, load_tokenizer, preflight  # noqa: F401 - Preflight re-exported
from .run_report import build_report, device_info, write_json  # noqa: F401 - write_json re-exported

REPORT_NAME = "run_report.json"
RUN_STATE_NAME = "kid_run_state.json"  # in every checkpoint: the training-time segments up to it
FINAL_NAME = "final"
EVALUATIONS_NAME = "evaluations"  # the execution-accuracy reports, one per evaluation (kid.ex_eval)

# Choices of the enum options (the CLI's argparse choices; checked here too).  Kept free of heavy imports so that
# ``kid --help`` stays fast; tests check them against transformers and kid.data.
# How to continue after a signal stopped a run, as the signal handler says it (kid reproduce sets its own).
RESUME_HINT = "resume with --resume"
DTYPES = ("auto", "float32", "bfloat16", "float16")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
DATA_FORMATS = ("bird", "bird-no-evidence", "spider", "spider-dk", "spider-realistic", "spider-syn")

# The TrainConfig options that are transformers.TrainingArguments fields under another name (or the same one):
# kid.kid_config.KIDConfig takes the Trainer's field, with TrainConfig's default and the kid name as an alias
# (--epochs is --num-train-epochs).  One table, read by KIDConfig, training_arguments and the CLI's help.
TRAINER_EQUIVALENTS = {
    "output_dir": "output_dir", "overwrite_output_dir": "overwrite_output_dir", "epochs": "num_train_epochs",
    "max_steps": "max_steps", "learning_rate": "learning_rate", "warmup_ratio": "warmup_ratio",
    "lr_scheduler": "lr_scheduler_type", "weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm",
    "logging_steps": "logging_steps", "save_steps": "save_steps", "save_total_limit": "save_total_limit",
    "seed": "seed", "micro_batch_size": "per_device_train_batch_size",
    "gradient_checkpointing": "gradient_checkpointing", "fsdp": "fsdp", "group_by_length": "group_by_length",
}

# Trainer settings kid's step relies on (KIDConfig's defaults; training_arguments sets them).
TRAINER_SETTINGS = {
    # the collator reads every column (input_ids, labels, the length, the teacher's answers)
    "remove_unused_columns": False,
    "report_to": "none",
    # The default NaN/inf filter reads every micro-batch's loss on the host: a synchronisation per micro-batch.
    "logging_nan_inf_filter": False,
    "label_names": ["answer_labels"],
    # DDP would broadcast the module buffers (a causal LM's only ones are constants such as RoPE frequencies)
    # at every forward through it: a collective per forward.  The on-policy methods draw how many student forwards
    # a micro-batch takes (GKD: one for a gold batch, two for a generated one), so under DDP the processes could
    # call different numbers of collectives.
    "ddp_broadcast_buffers": False,
    # Every trainable parameter (LoRA adapters, or every weight) is used by every student pass, so DDP need not
    # walk the graph after each forward looking for unused ones.
    "ddp_find_unused_parameters": False,
}


def lr_schedulers() -> tuple[str, ...]:
    """The learning-rate schedules accepted: :data:`LR_SCHEDULERS`, or every ``transformers`` ``SchedulerType``
    once transformers is loaded (a KIDConfig takes any of them)."""
    utils = sys.modules.get("transformers.trainer_utils")
    if utils is not None and hasattr(utils, "SchedulerType"):
        return tuple(dict.fromkeys(LR_SCHEDULERS + tuple(s.value for s in utils.SchedulerType)))
    return LR_SCHEDULERS


@dataclass
class TrainConfig:
    """Everything a run needs besides the method options (:class:`kid.config.MethodConfig`).

    student: student model directory or Hub name.
    teacher: teacher model directory or Hub name (every method but sft); same tokenizer as the student.
    teacher_adapter: LoRA adapter directory of the teacher from an earlier sft run, merged into it.
    data_file: training data json (Spider train_spider.json, BIRD train.json, ...).
    db_dir: the databases, DIR/<db_id>/<db_id>.sqlite; examples without their database are skipped and counted.
    tables_file: tables.json (column comments and foreign keys for the prompts).
    data_format: how to read data_file (see kid.data.LOADERS).
    output_dir: checkpoints (checkpoint-N), the final model (final/) and run_report.json.
    overwrite_output_dir: start over in an output_dir that holds an earlier run (its checkpoints, final model and
        report are removed once the new run has loaded its data and models).
    resume: continue from the newest checkpoint in output_dir (True) or from the given checkpoint directory.
    lora: train LoRA adapters (rank lora_r, alpha lora_alpha; paper: 64 / 32) instead of every weight.
    lora_r, lora_alpha, lora_dropout: LoRA rank, scaling numerator and dropout.
    disable_dropout: turn every dropout of the student and the teacher off for training (TRL's disable_dropout:
        every dropout module's p set to 0, the LoRA adapters' lora_dropout included, and the attention dropout
        too; see kid.models.disable_dropout); off: the models' own dropout (KID's stage and generation run in eval
        mode either way).
    batch_size: sequences per optimizer step over all micro-batches and processes (paper: 16).
    micro_batch_size: sequences per process and forward pass; batch_size must be a multiple of micro_batch_size x
        processes (the rest is gradient accumulation).
    epochs: passes over the data (paper: 8); ignored when max_steps > 0.
    max_steps: optimizer steps to train (-1: from epochs).
    learning_rate: peak learning rate of AdamW (paper: 2e-4).
    warmup_ratio: fraction of the steps with a linear warm-up.
    lr_scheduler: learning-rate schedule after the warm-up (transformers' SchedulerType).
    weight_decay: AdamW weight decay.
    max_grad_norm: gradient-norm clipping (0: none).
    max_input_tokens: prompt budget in tokens (paper: 1024); longer prompts lose schema lines, never the question.
    max_output_tokens: SQL budget in tokens (paper: 128).
    dtype: student weights: auto (bfloat16 on a GPU, float32 on CPU), float32, bfloat16 or float16.
    teacher_dtype: teacher weights, likewise.
    gradient_checkpointing: recompute the student's layers in backward (less memory, about 30% more time).
    fsdp: shard the student over the processes with FSDP2 (torchrun / accelerate launch, one GPU each) instead of
        replicating it with DDP; the frozen teacher stays whole on every process.  GPUs only.
    attn_implementation: attention kernel; default flash_attention_2 when installed on a GPU, else sdpa.
    logging_steps: optimizer steps per log line (loss, kd, mle, step time).
    save_steps: optimizer steps between checkpoints (a signal saves one at once).
    save_total_limit: checkpoints kept (oldest removed first; 0 keeps all).
    seed: random seed (data order, KID's selection, sampling).
    sft_report: run_report.json of an SFT run with the same data and settings: report the training time relative to
        it (the paper's "Latency"); refused when the runs are not comparable.
    progress: progress bars.
    limit: train on the first N examples with a database only.
    group_by_length: batches of examples of similar length (transformers' length-grouped sampler over the tokenized
        prompt + answer length, the ``length`` column): less padding, since CodeS prompts vary widely in length.
    eval_data_file: a dev set (Spider dev.json, BIRD dev.json, ...): execution accuracy (``eval_ex``) of greedy
        decoding on it at every evaluation (``eval_strategy``), or once at the end of training when there is none
        (:class:`kid.ex_eval.ExecutionAccuracyCallback`).
    eval_db_dir: the dev set's databases (default: db_dir).
    eval_tables_file: the dev set's tables.json (default: tables_file).
    eval_data_format: how to read eval_data_file (default: data_format).
    eval_limit: evaluate on a fixed random sample of N examples (seed 0: the same slice in every run) instead of all.
    eval_max_new_tokens: SQL tokens generated per dev question at most (default: max_output_tokens).
    eval_async: score the generated SQL in a background thread while training continues (the loop waits only for
        the generation); False: wait for the score at every evaluation.
    """

    student: str = ""
    teacher: str | None = None
    teacher_adapter: str | None = None
    data_file: str = ""
    db_dir: str = ""
    tables_file: str | None = None
    data_format: str = "spider"
    output_dir: str = "kid_run"
    overwrite_output_dir: bool = False
    resume: bool | str | None = None
    lora: bool = True
    lora_r: int = 64
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    disable_dropout: bool = False
    batch_size: int = 16
    micro_batch_size: int = 4
    epochs: float = 8.0
    max_steps: int = -1
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_input_tokens: int = 1024
    max_output_tokens: int = 128
    dtype: str = "auto"
    teacher_dtype: str = "auto"
    gradient_checkpointing: bool = False
    fsdp: bool = False
    attn_implementation: str | None = None
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    seed: int = 42
    sft_report: str | None = None
    progress: bool = True
    limit: int | None = None
    group_by_length: bool = False
    eval_data_file: str | None = None
    eval_db_dir: str | None = None
    eval_tables_file: str | None = None
    eval_data_format: str | None = None
    eval_limit: int | None = None
    eval_max_new_tokens: int | None = None
    eval_async: bool = True

    def __post_init__(self):
        for name, value in coerce_options(TrainConfig, self.__dict__).items():
            setattr(self, name, value)
            if isinstance(value, float) and not math.isfinite(value):  # nan fails no ">=" check below as True
                raise UsageError(f"{name} must be a finite number, got {value}")
        checks = [
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("micro_batch_size", self.micro_batch_size >= 1, ">= 1"),
            ("max_input_tokens", self.max_input_tokens >= 1, ">= 1"),
            ("max_output_tokens", self.max_output_tokens >= 1, ">= 1"),
            ("lora_r", self.lora_r >= 1, ">= 1"),
            ("lora_alpha", self.lora_alpha > 0, "> 0"),
            ("lora_dropout", 0.0 <= self.lora_dropout < 1.0, "in [0, 1)"),
            ("epochs", self.epochs > 0 or self.max_steps > 0, "> 0 (or set max_steps)"),
            ("max_steps", self.max_steps == -1 or self.max_steps >= 1, "-1 (use epochs) or >= 1"),
            ("learning_rate", self.learning_rate > 0 and math.isfinite(self.learning_rate), "> 0"),
            ("warmup_ratio", 0.0 <= self.warmup_ratio < 1.0, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("max_grad_norm", self.max_grad_norm >= 0, ">= 0"),
            ("logging_steps", self.logging_steps >= 1, ">= 1"),
            ("save_steps", self.save_steps >= 1, ">= 1"),
            ("save_total_limit", self.save_total_limit >= 0, ">= 0 (0 keeps every checkpoint)"),
            ("limit", self.limit is None or self.limit >= 1, ">= 1"),
            ("eval_limit", self.eval_limit is None or self.eval_limit >= 1, ">= 1"),
            ("eval_max_new_tokens", self.eval_max_new_tokens is None or self.eval_max_new_tokens >= 1, ">= 1"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise UsageError(f"{name} must be {rule}, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise UsageError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        for name, choices in (("dtype", DTYPES), ("teacher_dtype", DTYPES), ("lr_scheduler", lr_schedulers()),
                              ("data_format", DATA_FORMATS), ("eval_data_format", DATA_FORMATS),
                              ("attn_implementation", ATTN_IMPLEMENTATIONS)):
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise UsageError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
        if self.resume and self.overwrite_output_dir:
            raise UsageError("resume and overwrite_output_dir contradict each other: continue the run, or start over")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---- option types ------------------------------------------------------------------------------------------------

def field_kind(annotation) -> tuple[str, bool]:
    """(base type name, accepts None) of a dataclass field annotation such as ``"int | None"``; several non-None
    types (``bool | str``) or ``Any`` give ``"Any"``."""
    parts = [p.strip() for p in str(annotation).replace("typing.", "").split("|")]
    optional = "None" in parts or "Any" in parts
    base = [p for p in parts if p != "None"]
    return (base[0] if len(base) == 1 else "Any"), optional


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _coerce(name: str, kind: str, optional: bool, value):
    if value is None:
        if optional:
            return None
        raise UsageError(f"{name}: a value is required, got null")
    what = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}.get(kind)
    if what is None:  # Any: the class checks it
        return value
    bad = UsageError(f"{name}: expected {what}, got {value!r}")
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad
    if isinstance(value, bool):
        raise bad
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if kind == "float":
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if not isinstance(value, str):  # str
        raise bad
    return value


def coerce_options(cls, values: Mapping[str, Any]) -> dict:
    """``values`` (a YAML mapping, flags) converted to the types of ``cls``'s fields (``"8"`` -> 8 for an int
    field, ``"true"`` -> True for a bool one); a value of the wrong type is a :class:`UsageError` naming the field.
    Keys that are not fields are left out."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if cls is TrainConfig and f.name == "resume":
            out[f.name] = _coerce_resume(value)
            continue
        kind, optional = field_kind(f.type)
        out[f.name] = _coerce(f.name, kind, optional, value)
    return out


def _coerce_resume(value):
    if value is None or value is False:
        return None
    if value is True:
        return True
    if isinstance(value, str):
        if value.strip().lower() in _TRUE:
            return True
        if value.strip().lower() in _FALSE or not value.strip():
            return None
        return value
    raise UsageError(f"resume: expected true or a checkpoint directory, got {value!r}")


def split_options(values: Mapping[str, Any]) -> tuple[TrainConfig, MethodConfig]:
    """A flat mapping (YAML file merged with command-line flags) -> (TrainConfig, MethodConfig); unknown keys,
    values of the wrong type and values out of range are :class:`UsageError` s naming the option."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    method_fields = {f.name for f in dataclasses.fields(MethodConfig)}
    unknown = sorted(set(values) - train_fields - method_fields)
    if unknown:
        raise UsageError(f"unknown option(s) {unknown}")
    train = TrainConfig(**{k: v for k, v in values.items() if k in train_fields})
    method_values = {k: v for k, v in values.items() if k not in train_fields}
    method_values.update(coerce_options(MethodConfig, method_values))
    try:
        method = MethodConfig.from_mapping(method_values)
    except UsageError:
        raise
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None
    check_method(method)
    return train, method


# ---- signals and timing --------------------------------------------------------------------------------------------

class _StopOnSignal:
    """SIGINT/SIGTERM -> save a checkpoint at the end of the current step and stop (a second SIGINT: at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @requested.setter
    def requested(self, value: bool) -> None:  # the DDP agreement below sets it
        if value and self.signum is None:
            self.signum = signal.SIGINT
        elif not value:
            self.signum = None

    def __enter__(self):
        def handler(signum, _frame):
            if self.signum is not None:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                return
            self.signum = signum
            # write_stderr: os.write (print could be holding stdout's lock), and a closed stderr is ignored.
            write_stderr(f"\nkid: {signal.Signals(signum).name}: saving a checkpoint after this step, then stopping "
                         f"({RESUME_HINT}; Ctrl-C again to stop at once)\n")

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
        return False

    def callback(self):
        import torch
        from transformers import TrainerCallback

        stopper = self

        class StopCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                signum = stopper.signum or 0
                if args.world_size > 1:
                    # Every process must stop after the same step (or they deadlock in the next all-reduce): agree
                    # at logging steps, where the Trainer synchronises anyway, not after every step.
                    if state.global_step % max(args.logging_steps, 1) and state.global_step < state.max_steps:
                        return control
                    import torch.distributed as dist

                    flag = torch.tensor([float(signum)], device=args.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    signum = int(flag.item())
                    if signum and stopper.signum is None:
                        stopper.signum = signum
                if signum:
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return StopCallback()


def _quantiles(values: list[float]) -> dict | None:
    if not values:
        return None
    s = sorted(values)

    def q(p):
        x = p * (len(s) - 1)
        lo = int(math.floor(x))
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (x - lo)

    return {"n": len(s), "median": round(q(0.5), 6), "p10": round(q(0.1), 6), "p25": round(q(0.25), 6),
            "p75": round(q(0.75), 6), "p90": round(q(0.9), 6), "mean": round(sum(s) / len(s), 6)}


class _RunClock:
    """Times this segment of the run: wall and process CPU time from the start of training, and each optimizer
    step's (on a GPU, without synchronisation, a step's host time is when it was queued; the sum over many steps
    is what counts).  CPU time is this process's, all threads: on a busy machine it grows much less than wall
    time, so ratios of CPU times stay meaningful where wall-time ratios do not."""

    def __init__(self):
        self.started_at = None
        self.t0 = self.c0 = None
        self.first_step = None
        self.steps_wall: list[float] = []
        self.steps_cpu: list[float] = []
        self._step = None
        self.ended = None
        # () -> seconds this segment spent generating (the trainer's count), recorded with the segment
        self.generation_seconds: Callable[[], float] | None = None

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class ClockCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                clock.t0, clock.c0 = time.perf_counter(), time.process_time()
                clock.first_step = state.global_step

            def on_step_begin(self, args, state, control, **kwargs):
                clock._step = (time.perf_counter(), time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                if clock._step is not None:
                    clock.steps_wall.append(time.perf_counter() - clock._step[0])
                    clock.steps_cpu.append(time.process_time() - clock._step[1])
                    clock._step = None

            def on_train_end(self, args, state, control, **kwargs):
                clock.ended = (time.perf_counter(), time.process_time())

        return ClockCallback()

    def segment(self, global_step: int, device: Mapping[str, Any]) -> dict:
        if self.t0 is None:
            return {}
        wall_end, cpu_end = self.ended or (time.perf_counter(), time.process_time())
        return {"started_at": self.started_at, "first_step": self.first_step, "last_step": global_step,
                "train_time_s": round(wall_end - self.t0, 3), "cpu_time_s": round(cpu_end - self.c0, 3),
                "step_time_s": _quantiles(self.steps_wall), "step_cpu_time_s": _quantiles(self.steps_cpu),
                "host": platform.node(), "device": device.get("name"),
                "generation_time_s": round(self.generation_seconds(), 3) if self.generation_seconds else None}


def _run_state_before(checkpoint: str | None) -> tuple[list[dict], bool]:
    """(segments recorded in a checkpoint, whether they are known): the training time before a resume."""
    if checkpoint is None:
        return [], True
    path = Path(checkpoint) / RUN_STATE_NAME
    try:
        segments = json.loads(path.read_text(encoding="utf-8"))["segments"]
        return list(segments), True
    except (OSError, ValueError, KeyError, TypeError):
        return [], False  # a checkpoint from elsewhere: its earlier time is unknown


def _time_split(segments: list[dict], generates: bool) -> dict:
    """Generation vs the rest of training over every segment, over the interval of ``train_runtime_s`` (each
    segment's clock): ``generation_time_s + training_time_s`` is the run's training time.  None where a segment
    before a resume did not record its generation time (a checkpoint of an older kid)."""
    total = sum(s.get("train_time_s") or 0 for s in segments)
    times = [s.get("generation_time_s") for s in segments]
    if any(t is None for t in times) and generates:
        return {"generation_time_s": None, "training_time_s": None, "generation_fraction": None}
    generation = sum(t or 0 for t in times)
    return {"generation_time_s": round(generation, 3), "training_time_s": round(max(total - generation, 0.0), 3),
            "generation_fraction": round(generation / total, 4) if total > 0 else None}


def _atomic_checkpoint_trainer(base):
    """``base`` (a DistillTrainer class) whose checkpoints appear only once complete: the Trainer writes
    ``checkpoint-N`` inside a staging directory, ``kid_run_state.json`` is added, and the directory is renamed into
    the output directory (then old checkpoints are rotated out).  transformers writes checkpoints in place, so a
    crash during a save left a half-written newest checkpoint that ``--resume`` would pick."""

    class RunTrainer(base):
        kid_segments_before: list = []
        kid_clock: _RunClock | None = None
        kid_device: dict = {}

        def _save_checkpoint(self, model, trial):
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

            run_dir = Path(self._get_output_dir(trial=trial))
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            staging = run_dir / f".{name}.staging"
            if self.args.should_save:
                if staging.exists():
                    shutil.rmtree(staging)
                staging.mkdir(parents=True)
            self._kid_barrier()
            self._get_output_dir = lambda trial=None: str(staging)  # where the Trainer puts checkpoint-N
            try:
                super()._save_checkpoint(model, trial)
            except BaseException:
                if self.args.should_save:  # the half-written checkpoint goes; the complete ones stay
                    shutil.rmtree(staging, ignore_errors=True)
                raise
            finally:
                del self._get_output_dir
            self._kid_barrier()
            # The Trainer looked for the best checkpoint in the staging directory: point it at its final place
            # (where rotation keeps it and load_best_model_at_end finds it), in the state the checkpoint records.
            best_step = getattr(self.state, "best_global_step", None)
            if best_step:
                best = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{best_step}"
                if best_step == self.state.global_step or best.is_dir():
                    self.state.best_model_checkpoint = str(best)
                elif str(self.state.best_model_checkpoint or "").startswith(str(staging)):
                    self.state.best_model_checkpoint = None
            if self.args.should_save:
                from transformers.trainer import TRAINER_STATE_NAME

                self.state.save_to_json(str(staging / name / TRAINER_STATE_NAME))
                segments = list(self.kid_segments_before)
                if self.kid_clock is not None:
                    segments.append(self.kid_clock.segment(self.state.global_step, self.kid_device))
                atomic_write_json(staging / name / RUN_STATE_NAME, {"segments": segments})
                replace_directory(staging / name, run_dir / name)
                shutil.rmtree(staging, ignore_errors=True)
                rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
            self._kid_barrier()

        def _kid_barrier(self):
            if self.args.world_size > 1:
                self.accelerator.wait_for_everyone()

        def report_fields(self):
            # the time split of the whole run, over the interval train_runtime_s measures (the segments' clocks)
            if self.kid_clock is None or self.kid_clock.t0 is None:
                return super().report_fields()
            segment = self.kid_clock.segment(self.state.global_step, self.kid_device)
            return _time_split(list(self.kid_segments_before) + [segment], self.method_config.generates)

    RunTrainer.__name__ = RunTrainer.__qualname__ = base.__name__
    return RunTrainer


# ---- the run ---------------------------------------------------------------------------------------------------

def tokenize_dataset(dataset, tokenizer, *, max_input_tokens: int, max_output_tokens: int, progress: bool = True):
    """``input_ids`` / ``labels`` / ``attention_mask`` columns from a :mod:`kid.data` dataset (``prompt``,
    ``target`` and ``prompt_question`` fields)."""
    from datasets.utils import logging as datasets_logging

    from .prompts import tokenize_example

    def encode(example):
        return tokenize_example(tokenizer, example["prompt"], example["target"], max_input_tokens,
                                max_output_tokens, question=example.get("prompt_question"))

    was_enabled = datasets_logging.is_progress_bar_enabled()
    if not progress:
        datasets_logging.disable_progress_bar()
    try:
        encoded = dataset.map(encode, remove_columns=dataset.column_names, desc="tokenizing")
        return add_length_column(encoded)
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


def add_length_column(dataset, name: str = "length"):
    """``dataset`` with a ``length`` column: the tokens of each example (prompt + answer), what the Trainer's
    length-grouped sampler (``group_by_length``) reads instead of measuring every example itself."""
    if name in dataset.column_names:
        return dataset
    return dataset.add_column(name, [len(ids) for ids in dataset["input_ids"]])


def training_arguments(config: TrainConfig, *, world_size: int = 1, bf16: bool = False, **overrides):
    """The Trainer's arguments for a run: a :class:`kid.kid_config.KIDConfig` (a ``TrainingArguments``) with
    ``config``'s options, gradient accumulation from batch_size / (micro_batch_size x ``world_size``), mixed
    precision as ``bf16`` says; ``overrides``: any other field."""
    from .kid_config import KIDConfig

    per_step = config.micro_batch_size * world_size
    if config.batch_size % per_step:
        raise UsageError(f"batch_size {config.batch_size} is not a multiple of micro_batch_size x processes "
                         f"({config.micro_batch_size} x {world_size})")
    overrides.setdefault("gradient_accumulation_steps", config.batch_size // per_step)
    return KIDConfig.from_configs(config, bf16=bf16, **overrides)


def __getattr__(name: str):
    # KIDConfig imports transformers (and torch): loaded on first use, so that kid.training stays light.
    if name == "KIDConfig":
        from .kid_config import KIDConfig

        return KIDConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_kid_config(value) -> bool:
    """Whether ``value`` is a :class:`kid.kid_config.KIDConfig` (without importing transformers to ask)."""
    return type(value).__name__ == "KIDConfig" and hasattr(value, "train_config") and hasattr(value, "method_config")


def _remove_previous_run(out: Path) -> None:
    """--overwrite-output-dir: what an earlier run left (checkpoints, final model, report); other files stay."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not out.is_dir():
        return
    for p in out.iterdir():
        name = p.name
        ours = (name in (FINAL_NAME, REPORT_NAME, EVALUATIONS_NAME) or name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")
                or (name.startswith(f".{PREFIX_CHECKPOINT_DIR}-") and name.endswith(".staging"))
                or name.startswith(f".{FINAL_NAME}.") or name.startswith(f".{REPORT_NAME}."))
        if not ours:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _save_final(trainer, tokenizer, target: Path) -> None:
    """The final model into a staging directory, renamed to ``target`` once complete (every process takes part in
    ``save_model``: FSDP gathers the weights)."""
    staging = target.with_name(f".{target.name}.staging")
    if trainer.is_world_process_zero():
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    if trainer.args.world_size > 1:
        trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(staging))
        replace_directory(staging, target)
    if trainer.args.world_size > 1:
        trainer.accelerator.wait_for_everyone()


def run_training(config, method: MethodConfig | None = None, *, student=None, teacher=None, tokenizer=None,
                 train_dataset=None, training_args=None, write_final: bool = True) -> dict:
    """Train one student; returns the run report (also written to ``output_dir/run_report.json``).

    config: a :class:`TrainConfig` with its :class:`~kid.config.MethodConfig` ``method``, or a
        :class:`kid.kid_config.KIDConfig` alone (``kid train``): its run and method options, and itself as the
        Trainer's arguments.
    student / teacher / tokenizer / train_dataset: objects to use instead of loading ``config.student`` etc. (the
    demo and the tests build models from config); ``train_dataset`` may be a :mod:`kid.data` dataset (tokenized
    here) or already have ``input_ids`` / ``labels``.  training_args: ready Trainer arguments (a ``KIDConfig`` or
    any ``TrainingArguments``) for a TrainConfig.
    With ``config.eval_data_file``, execution accuracy on that dev slice at every evaluation (``eval_strategy``;
    once at the end when there is none; :class:`kid.ex_eval.ExecutionAccuracyCallback`).
    The report's ``status`` is "finished" or "interrupted" (``signal`` names it: a checkpoint of the last step is
    in ``output_dir``); a :class:`UsageError` means nothing was trained.
    """
    if is_kid_config(config):
        if training_args is not None:
            raise TypeError("run_training(KIDConfig): the KIDConfig is the Trainer's arguments; pass no training_args")
        training_args = config
        method = method if method is not None else config.method_config()
        config = config.train_config()
    elif method is None:
        raise TypeError("run_training(TrainConfig, MethodConfig): the method options are missing")
    out = Path(config.output_dir)
    created = not out.exists()
    try:
        return _run_training(config, method, student=student, teacher=teacher, tokenizer=tokenizer,
                             train_dataset=train_dataset, training_args=training_args, write_final=write_final)
    except BaseException:
        # a run that failed before writing anything leaves no empty directory behind
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _run_training(config, method, *, student, teacher, tokenizer, train_dataset, training_args, write_final):
    import torch

    from . import trainer as trainer_module
    from .batching import DistillCollator
    from .models import LoraOptions, apply_lora, default_mask_token, load_causal_lm, prepare_teacher, resolve_dtype
    from .models import token_id as _token_id
    from .preflight import check_trainer_arguments

    checks = preflight(config, method, student=student is None, teacher=teacher is None,
                       data=train_dataset is None)
    # LoRA: bf16 base weights on a GPU, the adapters in float32 (peft).  Every weight trained: float32 master
    # weights with bf16 autocast, since AdamW on bf16 weights would lose small updates.
    on_gpu = torch.cuda.is_available()
    autocast_bf16 = not config.lora and config.dtype == "auto" and on_gpu and torch.cuda.is_bf16_supported()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = training_args or training_arguments(config, world_size=world_size, bf16=autocast_bf16)
    check_trainer_arguments(args, config)  # still before any data is built
    for note in checks.notes:
        say(note, file=sys.stderr)
    out_dir = Path(config.output_dir)
    if tokenizer is None:
        tokenizer = checks.tokenizer if checks.tokenizer is not None else load_tokenizer(config.student, "student")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    examples = dict(checks.census or {})
    if train_dataset is None:
        from .data.loaders import load_dataset_by_name

        train_dataset = load_dataset_by_name(config.data_format, config.data_file, config.db_dir,
                                             config.tables_file, limit=config.limit)
    examples["used"] = len(train_dataset)
    if "input_ids" not in train_dataset.column_names:
        train_dataset = tokenize_dataset(train_dataset, tokenizer, max_input_tokens=config.max_input_tokens,
                                         max_output_tokens=config.max_output_tokens, progress=config.progress)
    elif config.group_by_length or getattr(args, "group_by_length", False) \
            or getattr(args, "train_sampling_strategy", None) == "group_by_length":
        train_dataset = add_length_column(train_dataset, getattr(args, "length_column_name", "length"))
    if len(train_dataset) == 0:
        raise UsageError("the training data is empty")
    ex_eval = None
    if config.eval_data_file:
        ex_eval = execution_accuracy_callback(config, method, output_dir=out_dir)
        examples["eval"] = len(ex_eval.rows)

    device = args.device  # this process's device (torchrun: one GPU per rank)
    if student is None:
        autocast = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False))
        dtype = (torch.float32 if autocast and not config.lora and config.dtype == "auto"
                 else resolve_dtype(config.dtype, device))
        student = load_causal_lm(config.student, dtype=dtype, attn_implementation=config.attn_implementation)
    if config.lora:
        student = apply_lora(student, LoraOptions(config.lora_r, config.lora_alpha, config.lora_dropout))
    if method.needs_teacher:
        teacher_dtype = resolve_dtype(config.teacher_dtype, device)
        if teacher is None:
            if not config.teacher:
                raise UsageError(f"method {method.method!r} needs a teacher: set teacher")
            teacher = load_causal_lm(config.teacher, dtype=teacher_dtype,
                                     attn_implementation=config.attn_implementation)
        teacher = prepare_teacher(teacher, adapter=config.teacher_adapter, device=device, dtype=teacher_dtype)
    else:
        teacher = None
    mask_id = None
    if method.method == "kid":
        from .preflight import check_mask_token

        mask_id = _token_id(tokenizer, method.mask_token or default_mask_token(tokenizer))
        check_mask_token(tokenizer, method.mask_token, student.get_input_embeddings().num_embeddings)  # objects too

    collator = DistillCollator(tokenizer.pad_token_id, with_prompts=method.generates)
    stopper, clock = _StopOnSignal(), _RunClock()
    callbacks = [stopper.callback(), clock.callback()] + ([ex_eval] if ex_eval is not None else [])
    trainer_class = _atomic_checkpoint_trainer(trainer_module.DistillTrainer)
    trainer = trainer_class(model=student, args=args, train_dataset=train_dataset, data_collator=collator,
                            processing_class=tokenizer, method_config=method, teacher=teacher,
                            mask_token_id=mask_id, callbacks=callbacks)
    resume = checks.resume_checkpoint
    before, complete = _run_state_before(resume)
    info = device_info(device)
    trainer.kid_segments_before, trainer.kid_clock, trainer.kid_device = before, clock, info
    clock.generation_seconds = lambda: trainer.generation_seconds  # this segment's (the trainer resets it)
    if config.overwrite_output_dir and trainer.is_world_process_zero():
        _remove_previous_run(out_dir)  # only now: the new run's data and models have loaded
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    with stopper:
        if trainer.is_world_process_zero():
            say(_start_line(config, method, examples, trainer, resume, info), file=sys.stderr)
        result = trainer.train(resume_from_checkpoint=resume)
        finished = trainer.state.global_step >= trainer.state.max_steps
        if ex_eval is not None and finished and args.eval_strategy == "no":
            trainer.evaluate()  # no evaluation during training: execution accuracy of the final model
            ex_eval.settle(trainer)
            ex_eval.close()
        if write_final and finished:
            _save_final(trainer, tokenizer, out_dir / FINAL_NAME)
        report = build_report(trainer, config, method, result.metrics, clock=clock, segments_before=before,
                              time_complete=complete, examples=examples, device=info, resumed_from=resume,
                              signum=None if finished else stopper.signum, sft=checks.sft_report)
        if trainer.is_world_process_zero():
            write_json(out_dir / REPORT_NAME, report)
    report["_trainer"] = trainer  # for callers in the same process; not serialised
    return report


def load_eval_slice(config: TrainConfig):
    """The dev slice of the execution-accuracy evaluation: ``eval_data_file`` (its examples with a database; a
    fixed random sample of ``eval_limit`` of them, seed 0, the same in every run)."""
    from .data.loaders import load_dataset_by_name

    fmt = config.eval_data_format or config.data_format
    return load_dataset_by_name(fmt, config.eval_data_file, config.eval_db_dir or config.db_dir,
                                config.eval_tables_file or config.tables_file, sample=config.eval_limit)


def execution_accuracy_callback(config: TrainConfig, method: MethodConfig, *, output_dir=None):
    """The :class:`kid.ex_eval.ExecutionAccuracyCallback` of a run with ``eval_data_file``."""
    from .ex_eval import ExecutionAccuracyCallback

    fmt = config.eval_data_format or config.data_format
    dev = load_eval_slice(config)
    if len(dev) == 0:
        raise UsageError(f"--eval-data-file {config.eval_data_file}: no example has its database")
    return ExecutionAccuracyCallback(
        dev, config.eval_db_dir or config.db_dir, bird=fmt.startswith("bird"),
        max_new_tokens=config.eval_max_new_tokens or config.max_output_tokens,
        max_input_tokens=config.max_input_tokens, asynchronous=config.eval_async,
        merge_lora=method.merge_lora_for_generation, output_dir=output_dir)


def _start_line(config, method, examples, trainer, resume, info) -> str:
    state = trainer.args
    used = examples.get("used")
    skipped = examples.get("without_database")
    data = f"{used} examples" + (f" ({skipped} without a database, skipped)" if skipped else "")
    steps = f"{state.max_steps} steps" if state.max_steps > 0 else f"{config.epochs:g} epochs"
    teacher = f", teacher {config.teacher}" if method.needs_teacher and config.teacher else ""
    where = f"resuming {resume}" if resume else f"into {config.output_dir}"
    return (f"kid train: {method.method} on {config.student or 'the given student'}{teacher}; {data}; {steps} of "
            f"{config.batch_size} sequences; {info['name']} x{info['world_size']}; {where}")


def close_distributed() -> None:
    """Destroy the default process group if one is up (torchrun: the Trainer's accelerate state created it).

    Call once per process after the last collective, only when training ended normally (a rank that failed may
    leave the others inside a collective, where a collective teardown would hang).  Without it a gloo process
    group's worker threads outlive the interpreter and the process can abort at exit ("terminate called without
    an active exception"), turning a finished run into a failed torchrun.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears down while another still has a collective in flight
        dist.destroy_process_group()
