"""One training run, end to end: :class:`TrainConfig` -> data, student (LoRA), teacher, :class:`DistillTrainer`,
checkpoints, the final model and a JSON run report.  ``kid train`` and ``kid demo`` both call :func:`run_training`.

Interruption: SIGINT / SIGTERM ask the Trainer to finish the current optimizer step, save a checkpoint and stop;
``resume=True`` (``kid train --resume``) continues from the newest checkpoint in ``output_dir``.  A second SIGINT
interrupts at once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import MethodConfig

REPORT_NAME = "run_report.json"


@dataclass
class TrainConfig:
    """Everything a run needs besides the method options (:class:`kid.config.MethodConfig`).

    student, teacher: model directories or Hub names (``teacher`` unused by "sft"); teacher_adapter: a LoRA
        adapter directory from an earlier ``sft`` run of the teacher, merged into it.
    data_file, db_dir, tables_file, data_format: the training data (see :func:`kid.data.load_dataset_by_name`).
    output_dir: checkpoints, the final model (``output_dir/final``) and ``run_report.json``.
    lora: train LoRA adapters (rank ``lora_r``, alpha ``lora_alpha``; paper: 64 / 32) instead of every weight.
    batch_size: sequences per optimizer step over all micro-batches and processes (paper: 16);
        micro_batch_size: per process and forward pass (``batch_size`` must be a multiple of
        ``micro_batch_size x processes``; the rest is gradient accumulation).
    epochs (paper: 8), max_steps (overrides epochs when > 0), learning_rate (paper: 2e-4), warmup_ratio,
        lr_scheduler, weight_decay, max_grad_norm.
    max_input_tokens, max_output_tokens: prompt and SQL budgets (paper: 1024 / 128).
    dtype: "auto" (bfloat16 on a GPU, float32 on CPU), "bfloat16", "float32"; teacher_dtype likewise.
    gradient_checkpointing: recompute the student's layers in backward (less memory, ~30% more time).
    fsdp: shard the student over the processes with FSDP2 (torchrun / accelerate launch, one GPU each; the decoder
        layers are the units) instead of replicating it with DDP; the frozen teacher stays whole on every process.
        Needs GPUs: accelerate shards only on accelerators.
    attn_implementation: None: flash-attention 2 when installed, else SDPA.
    logging_steps, save_steps, save_total_limit, seed, resume: as in ``transformers.TrainingArguments``;
        ``resume``: True (newest checkpoint in output_dir) or a checkpoint path.
    sft_report: a ``run_report.json`` of an SFT run on the same data: the report then gives the training time
        relative to it (the paper's "Latency").
    progress: tqdm progress bars.
    """

    student: str = ""
    teacher: str | None = None
    teacher_adapter: str | None = None
    data_file: str = ""
    db_dir: str = ""
    tables_file: str | None = None
    data_format: str = "spider"
    output_dir: str = "kid_run"
    lora: bool = True
    lora_r: int = 64
    lora_alpha: int = 32
    lora_dropout: float = 0.05
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
    resume: Any = None
    sft_report: str | None = None
    progress: bool = True
    limit: int | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("batch_size and micro_batch_size must be >= 1")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if self.max_input_tokens < 1 or self.max_output_tokens < 1:
            raise ValueError("max_input_tokens and max_output_tokens must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def split_options(values: Mapping[str, Any]) -> tuple[TrainConfig, MethodConfig]:
    """A flat mapping (YAML file merged with command-line flags) -> (TrainConfig, MethodConfig); unknown keys are
    an error naming them."""
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - train_fields - {f.name for f in dataclasses.fields(MethodConfig)})
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}")
    train = TrainConfig(**{k: v for k, v in values.items() if k in train_fields})
    return train, MethodConfig.from_mapping({k: v for k, v in values.items() if k not in train_fields})


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
        return dataset.map(encode, remove_columns=dataset.column_names, desc="tokenizing")
    finally:
        if was_enabled:
            datasets_logging.enable_progress_bar()


class _StopOnSignal:
    """SIGINT/SIGTERM -> save a checkpoint at the end of the current step and stop (a second SIGINT: at once)."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        def handler(signum, _frame):
            if self.requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self.requested = True
            # os.write, not print: a signal can land while print holds stdout's lock.
            os.write(2, f"\nkid: signal {signum}: saving a checkpoint after this step, then stopping "
                        "(resume with --resume)\n".encode())

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        return False

    def callback(self):
        from transformers import TrainerCallback

        stopper = self

        class StopCallback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                requested = stopper.requested
                if args.world_size > 1:
                    # Every process must stop after the same step (or they deadlock in the next all-reduce): agree
                    # at logging steps, where the Trainer synchronises anyway, not after every step.
                    if state.global_step % max(args.logging_steps, 1) and state.global_step < state.max_steps:
                        return control
                    import torch.distributed as dist

                    flag = torch.tensor([float(requested)], device=args.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    requested = bool(flag.item())
                    stopper.requested = requested
                if requested:
                    control.should_save = True
                    control.should_training_stop = True
                return control

        return StopCallback()


def training_arguments(config: TrainConfig, *, world_size: int = 1, bf16: bool = False, **overrides):
    """``transformers.TrainingArguments`` for a run (gradient accumulation from batch_size / micro_batch_size)."""
    from transformers import TrainingArguments

    per_step = config.micro_batch_size * world_size
    if config.batch_size % per_step:
        raise ValueError(f"batch_size {config.batch_size} is not a multiple of micro_batch_size x processes "
                         f"({config.micro_batch_size} x {world_size})")
    kwargs = dict(
        output_dir=config.output_dir, per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.batch_size // per_step, num_train_epochs=config.epochs,
        max_steps=config.max_steps, learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        logging_steps=config.logging_steps, save_steps=config.save_steps, save_total_limit=config.save_total_limit,
        seed=config.seed, bf16=bf16,
        remove_unused_columns=False, report_to="none", disable_tqdm=not config.progress,
        # The default NaN/inf filter reads every micro-batch's loss on the host: a synchronisation per micro-batch.
        logging_nan_inf_filter=False,
        dataloader_num_workers=0, save_only_model=False, use_cpu=not torch.cuda.is_available(),
        label_names=["answer_labels"],
        # DDP would broadcast the module buffers (a causal LM's only ones are constants such as RoPE frequencies)
        # at every forward through it: a collective per forward.  The on-policy methods draw per process how many
        # student forwards a micro-batch takes (GKD: one for a gold batch, two for a generated one), so the
        # processes would call different numbers of collectives and deadlock.
        ddp_broadcast_buffers=False,
        # Every trainable parameter (LoRA adapters, or every weight) is used by every student pass, so DDP need not
        # walk the graph after each forward looking for unused ones.
        ddp_find_unused_parameters=False,
    )
    # transformers 5 folds warmup_ratio into a fractional warmup_steps; 4.x has warmup_ratio.
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kwargs["warmup_ratio" if "warmup_ratio" in fields else "warmup_steps"] = config.warmup_ratio
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    kwargs[checkpointing] = config.gradient_checkpointing
    kwargs[checkpointing + "_kwargs"] = {"use_reentrant": False} if config.gradient_checkpointing else None
    if config.fsdp:
        fsdp_config = {"version": 2}
        if config.gradient_checkpointing:  # FSDP's own checkpointing: the Trainer's would all-gather twice
            fsdp_config["activation_checkpointing"] = True
            kwargs[checkpointing], kwargs[checkpointing + "_kwargs"] = False, None
        kwargs.update(fsdp=True, fsdp_config=fsdp_config)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def run_training(config: TrainConfig, method: MethodConfig, *, student=None, teacher=None, tokenizer=None,
                 train_dataset=None, training_args=None, write_final: bool = True) -> dict:
    """Train one student; returns the run report (also written to ``output_dir/run_report.json``).

    student / teacher / tokenizer / train_dataset: objects to use instead of loading ``config.student`` etc. (the
    demo and the tests build models from config); ``train_dataset`` may be a :mod:`kid.data` dataset (tokenized
    here) or already have ``input_ids`` / ``labels``.  training_args: a ready ``TrainingArguments``.
    """
    from transformers import AutoTokenizer

    from .batching import DistillCollator
    from .models import (
        LoraOptions,
        apply_lora,
        default_mask_token,
        load_causal_lm,
        prepare_teacher,
        resolve_dtype,
        token_id,
    )
    from .trainer import DistillTrainer

    if method.teacher_outputs is not None:  # a missing or unfinished directory is named before any model loads
        from .teacher_outputs import finished_meta

        finished_meta(method.teacher_outputs)
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        if not config.student:
            raise ValueError("no student: set student (a model directory or Hub name)")
        tokenizer = AutoTokenizer.from_pretrained(config.student)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if train_dataset is None:
        from .data.loaders import load_dataset_by_name

        train_dataset = load_dataset_by_name(config.data_format, config.data_file, config.db_dir,
                                             config.tables_file, limit=config.limit)
    if "input_ids" not in train_dataset.column_names:
        train_dataset = tokenize_dataset(train_dataset, tokenizer, max_input_tokens=config.max_input_tokens,
                                         max_output_tokens=config.max_output_tokens, progress=config.progress)
    if len(train_dataset) == 0:
        raise ValueError("the training data is empty")

    # LoRA: bf16 base weights on a GPU, the adapters in float32 (peft).  Every weight trained: float32 master
    # weights with bf16 autocast, since AdamW on bf16 weights would lose small updates.
    on_gpu = torch.cuda.is_available()
    if config.fsdp and not on_gpu:
        # accelerate would silently fall back to DDP on CPU processes
        raise ValueError("fsdp needs GPUs (accelerate shards only on accelerators); on CPU, run without --fsdp (DDP)")
    autocast_bf16 = not config.lora and config.dtype == "auto" and on_gpu and torch.cuda.is_bf16_supported()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = training_args or training_arguments(config, world_size=world_size, bf16=autocast_bf16)
    device = args.device  # this process's device (torchrun: one GPU per rank)
    if student is None:
        dtype = torch.float32 if autocast_bf16 else resolve_dtype(config.dtype, device)
        student = load_causal_lm(config.student, dtype=dtype, attn_implementation=config.attn_implementation)
    if config.lora:
        student = apply_lora(student, LoraOptions(config.lora_r, config.lora_alpha, config.lora_dropout))
    if method.needs_teacher:
        teacher_dtype = resolve_dtype(config.teacher_dtype, device)
        if teacher is None:
            if not config.teacher:
                raise ValueError(f"method {method.method!r} needs a teacher: set teacher")
            teacher = load_causal_lm(config.teacher, dtype=teacher_dtype,
                                     attn_implementation=config.attn_implementation)
        teacher = prepare_teacher(teacher, adapter=config.teacher_adapter, device=device, dtype=teacher_dtype)
    else:
        teacher = None
    mask_id = None
    if method.method == "kid":
        mask_id = token_id(tokenizer, method.mask_token or default_mask_token(tokenizer))

    collator = DistillCollator(tokenizer.pad_token_id, with_prompts=method.generates)
    stopper = _StopOnSignal()
    trainer = DistillTrainer(model=student, args=args, train_dataset=train_dataset, data_collator=collator,
                             processing_class=tokenizer, method_config=method, teacher=teacher,
                             mask_token_id=mask_id, callbacks=[stopper.callback()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    resume = config.resume
    if resume is True or (isinstance(resume, str) and resume.lower() == "true"):
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(out_dir))
        if resume is None:
            raise ValueError(f"--resume: no checkpoint in {out_dir}")
    started = time.perf_counter()
    with stopper:
        result = trainer.train(resume_from_checkpoint=resume or None)
    wall = time.perf_counter() - started
    if write_final and not stopper.requested:
        trainer.save_model(str(out_dir / "final"))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(out_dir / "final"))
    report = build_report(trainer, config, method, result.metrics, wall, interrupted=stopper.requested)
    if trainer.is_world_process_zero():
        write_json(out_dir / REPORT_NAME, report)
    report["_trainer"] = trainer  # for callers in the same process; not serialised
    return report


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


def build_report(trainer, config: TrainConfig, method: MethodConfig, metrics: dict, wall_s: float, *,
                 interrupted: bool = False) -> dict:
    """The run report: settings, training time (and relative to ``config.sft_report``), throughput, peak memory,
    the log history (loss, kd, mle per logging step)."""
    history = [dict(h) for h in trainer.state.log_history]
    steps = [h for h in history if "loss" in h]
    report = {
        "method": method.method,
        "method_config": method.to_dict(),
        "train_config": config.to_dict(),
        "train_runtime_s": metrics.get("train_runtime"),
        "wall_time_s": round(wall_s, 3),
        "global_steps": trainer.state.global_step,
        "interrupted": interrupted,
        "final_loss": steps[-1]["loss"] if steps else None,
        "tokens_per_s": _mean([h["tokens_per_s"] for h in steps if "tokens_per_s" in h]),
        "step_time_s": _mean([h["step_time_s"] for h in steps if "step_time_s" in h]),
        "peak_gpu_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 3)
                                if torch.cuda.is_available() else None),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "log_history": history,
    }
    report.update(trainer.report_fields() if hasattr(trainer, "report_fields") else {})  # generation vs training
    if config.sft_report:
        with open(config.sft_report, encoding="utf-8") as f:
            sft = json.load(f)
        if sft.get("train_runtime_s"):
            report["latency_vs_sft"] = round(report["train_runtime_s"] / sft["train_runtime_s"], 3)
    return report


def _mean(values):
    return round(sum(values) / len(values), 4) if values else None


def write_json(path, payload) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in payload.items() if not k.startswith("_")}, f, indent=2, default=str)
    os.replace(tmp, path)
