"""``DistillTrainer``: ``transformers.Trainer`` with a distillation objective from :mod:`kid.methods`.

Checkpointing and resume, gradient accumulation, bf16, gradient checkpointing, logging, progress bars and
multi-process runs (torchrun / accelerate with DDP or FSDP) are the Trainer's; this class supplies the loss and the
step around it:

* One optimizer step at a time.  ``get_batch_samples`` (the Trainer fetches the step's micro-batches before the
  first forward) tags each micro-batch with its step; the step is prepared at its first ``training_step``, after the
  Trainer has restored the RNG state on resume: the normalisers of the whole step, and for the generating methods
  the source draws and one length-grouped ``generate`` per model for all the step's prompts
  (:func:`kid.rollout.rollout_step`), with the student's LoRA adapters merged into a copy of the weights for
  decoding (``MethodConfig.merge_lora_for_generation``).
* One graph at a time.  ``training_step`` plans the micro-batch's objective as terms (:func:`kid.methods.
  plan_objective`) and back-propagates each term before building the next: a two-pass objective (a KD pass over
  generated answers or KID's y-hat, then an MLE pass over the gold batch) holds one student graph's activations at
  a time, not two.  Under DDP every term but the last runs under ``no_sync``: one all-reduce per micro-batch.
* Normalisers: every term is a sum over target tokens divided by a count over all micro-batches of the optimizer
  step and, with ``average_tokens_across_devices`` (the default), all processes: the gold tokens for the MLE term,
  the KD batches' tokens for the KD term (generated answers count their own tokens), or the step's sequences for
  the per-sequence mean (``MethodConfig.normalization``).  Two micro-batches thus accumulate exactly the gradient of
  one batch of twice the size.  DDP and FSDP average gradients over processes, so the loss is multiplied by the
  process count.
* The same collectives on every process: the generating methods' host draws come from a seed without the process
  index, and cover every process's rows (:mod:`kid.rollout`), so whether a micro-batch takes one student pass or
  two, and how often the student generates, is decided identically everywhere.
* Randomness: KID's selection and sampled predictions are seeded from ``(args.seed, process, optimizer step,
  micro-batch)``, the source draws from ``(args.seed, optimizer step)``; ``evaluate()`` uses seeds of its own and
  restores the global RNG when it ends, so an evaluation during training does not change what training draws
  next.  ``generate`` samples from the global
  RNG, which checkpoints save and resume restores: a resumed run draws what an uninterrupted run would.
* Vocabularies: checkpoints of one family may pad their lm_heads to different sizes (Qwen1.5: 151,936 rows for
  0.5B-7B, 152,064 for 14B+); the loss reads the first rows of each head, as many as the smaller has
  (``shared_vocab``: views, no copy; they must cover the tokenizer), and KID draws its predictions from them.
* Metrics (added to each log line): ``kd``, ``mle`` (the parts, averaged over the logging window), ``tokens_per_s``
  (attended input tokens of every student pass that trains -- the KD pass over the generated batch and the MLE
  pass over the gold one for the generating methods -- per second of wall time) and ``step_time_s`` (seconds per
  optimizer step over the logging window: the host waits for the device at logging time anyway, so no extra
  synchronisation); for the generating methods also ``generation_s`` (seconds per optimizer step spent generating)
  and ``gen_len`` (mean generated answer length, tokens); for KID also ``kid_chosen`` (the slots the stage chose,
  per target token: about ``alpha``, less the EOS and padding it never chooses) and ``kid_changed`` (the fraction
  of the chosen slots whose token actually changed, the prediction differing from the gold token: far below 1 for
  a student that already fits y, so fewer than ``alpha`` of the tokens are imperfect; absent from a window without
  a chosen slot), both over the window's micro-batches and processes, counted on the device.
  :meth:`DistillTrainer.report_fields` gives the run's time split (generation vs the rest) for the run report.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, field

import torch
from transformers import Trainer

from .batching import IGNORE_INDEX
from .config import MethodConfig
from .kid_stage import ImperfectBatch
from .methods import DistillContext, LossParts, compute_objective, plan_objective, run_terms
from .models import lm_head_of
from .rollout import StepRollout, rollout_step

# Key of the reference to its optimizer step that get_batch_samples adds to each micro-batch.
STEP_KEY = "_kid_step"


def stable_seed(*parts: int) -> int:
    """A 63-bit seed from integers, the same in every process and every run (unlike ``hash`` of a string)."""
    digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


# Tags that keep the seed streams apart.
_DEVICE_SEEDS, _HOST_SEEDS, _EVAL_SEEDS = 1, 2, 3


class _Step:
    """One optimizer step's micro-batches (as the Trainer's loop holds them) and, once prepared, its device copies,
    normalisers and rollout."""

    def __init__(self, batches: list):
        self.batches = batches
        self.ready = False
        self.device_batches: list[dict] = []
        self.normalizer = None
        self.kd_normalizer = None
        self.num_sequences = None
        self.scale = 1.0
        self.rollout: StepRollout | None = None
        self.global_step = 0


@dataclass
class _MicroBatchRef:
    """What ``get_batch_samples`` adds to each micro-batch: its step and its index in the step."""
    step: _Step = field(repr=False)
    index: int


class DistillTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is the ``method_config`` objective.

    ``DistillTrainer(model, teacher="path" | model, args=KIDConfig(...), train_dataset=..., processing_class=
    tokenizer)`` needs nothing else:

    model: the student (a causal LM, possibly with LoRA adapters), or its directory / Hub name: then loaded in
        ``args.dtype`` with the LoRA adapters of ``args`` (a :class:`kid.kid_config.KIDConfig`; a model object is
        trained as given), its tokenizer the processing class if none is given.
    teacher: the teacher (every method but "sft"), a model or its directory / Hub name (loaded in
        ``args.teacher_dtype``, with ``args.teacher_adapter`` merged in when given); None: ``args.teacher``.  Frozen
        (eval mode, no gradients) and moved to ``args.device``.
    args: a :class:`~kid.kid_config.KIDConfig` (default: ``KIDConfig()``) or any ``TrainingArguments``
        (``remove_unused_columns`` is then turned off: the collator reads every column).  ``args.disable_dropout``
        (a KIDConfig's; default off): every dropout of the student and the teacher off for training (in place), LoRA's
        included (TRL's ``disable_dropout``, :func:`kid.models.disable_dropout`).
    method_config: :class:`kid.config.MethodConfig` (default: ``args.method_config()`` for a KIDConfig, else
        ``MethodConfig()``).  With ``teacher_outputs`` (f-distill), the teacher's answers are read from that directory
        (``kid generate-teacher``) and attached to ``train_dataset``.
    train_dataset / eval_dataset: tokenized (``input_ids`` / ``labels``) or :mod:`kid.data` rows (``prompt`` /
        ``target``: tokenized here with ``args.max_input_tokens`` / ``max_output_tokens``, default 1024 / 128, with
        the ``length`` column ``group_by_length`` reads).
    data_collator: default :class:`kid.batching.DistillCollator` (with the prompts for the methods that generate).
    mask_token_id: KID's mask token (default: ``method_config.mask_token``, else
        :func:`kid.models.default_mask_token` of the processing class).
    eos_token_id, pad_token_id: default to the processing class's (tokenizer's); no pad token: the EOS token.
    callbacks: may hold :class:`kid.ex_eval.ExecutionAccuracyCallback` s (execution accuracy at every evaluation;
        with one, ``eval_strategy`` needs no ``eval_dataset``).
    Other arguments are ``transformers.Trainer``'s.
    """

    # The loss returned by compute_loss is already divided by the step's token count: no further division by the
    # number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, *, method_config: MethodConfig | None = None, teacher=None,
                 mask_token_id: int | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 **kwargs):
        from .batching import DistillCollator
        from .ex_eval import ExecutionAccuracyCallback

        if args is None:
            from .kid_config import KIDConfig

            args = KIDConfig()
        kid_args = hasattr(args, "method_config") and hasattr(args, "train_config")
        if method_config is None:
            method_config = args.method_config() if kid_args else MethodConfig()
        if isinstance(model, (str, os.PathLike)):
            model, loaded = _load_student(str(model), args, with_tokenizer=processing_class is None)
            processing_class = processing_class if processing_class is not None else loaded
        tokenizer = processing_class
        if tokenizer is not None and getattr(tokenizer, "pad_token_id", 0) is None \
                and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        if teacher is None and method_config.needs_teacher and kid_args and getattr(args, "teacher", None):
            teacher = args.teacher
        if isinstance(teacher, (str, os.PathLike)):
            teacher = _load_teacher(str(teacher), args)
        if method_config.method == "kid" and mask_token_id is None and tokenizer is not None:
            from .models import default_mask_token, token_id

            mask_token_id = token_id(tokenizer, method_config.mask_token or default_mask_token(tokenizer))
        pad = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        if data_collator is None and pad is not None:
            data_collator = DistillCollator(pad, with_prompts=method_config.generates)
        if tokenizer is not None:
            train_dataset = _tokenized(train_dataset, tokenizer, args)
            eval_dataset = ({k: _tokenized(v, tokenizer, args) for k, v in eval_dataset.items()}
                            if isinstance(eval_dataset, dict) else _tokenized(eval_dataset, tokenizer, args))
        if getattr(args, "remove_unused_columns", False):
            args.remove_unused_columns = False  # the collator reads every column (TRL's trainers do the same)
        ex_callbacks = [c for c in kwargs.get("callbacks") or [] if isinstance(c, ExecutionAccuracyCallback)]
        # The Trainer refuses an eval_strategy without an eval_dataset; execution accuracy needs none.
        stand_in = eval_dataset is None and bool(ex_callbacks) and args.eval_strategy != "no"
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=ex_callbacks[0].examples if stand_in else eval_dataset,
                         processing_class=processing_class, **kwargs)
        if stand_in:
            self.eval_dataset = None
        self.method_config = method_config
        if method_config.needs_teacher and teacher is None:
            raise ValueError(f"method {method_config.method!r} needs a teacher model")
        if method_config.method == "kid" and mask_token_id is None:
            raise ValueError("method 'kid' needs mask_token_id (or a processing class to pick the mask token from)")
        tokenizer = self.processing_class
        self.eos_token_id = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.pad_token_id = pad_token_id if pad_token_id is not None else getattr(tokenizer, "pad_token_id", None)
        if self.eos_token_id is None:
            raise ValueError("no EOS token id: pass eos_token_id= or a tokenizer with an EOS token")
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        self.mask_token_id = mask_token_id
        if self.args.n_gpu > 1:
            raise ValueError(f"one process sees {self.args.n_gpu} GPUs (torch.nn.DataParallel is not supported): "
                             "launch one process per GPU with torchrun or accelerate")
        self.teacher = teacher.to(self.args.device) if teacher is not None else None
        if _kid_option(args, "disable_dropout", False):  # TRL's disable_dropout: every dropout p = 0, LoRA's too
            from .models import disable_dropout

            for module in (self.model, self.teacher):
                if module is not None:
                    disable_dropout(module)
        s_vocab = lm_head_of(self.model).num_rows
        self.vocab_size = s_vocab
        # Heads of different sizes (one padded, the same tokenizer): the fused loss uses their first shared rows.
        self.shared_vocab = None
        if self.teacher is not None:
            self.teacher.eval().requires_grad_(False)
            t_vocab = lm_head_of(self.teacher).num_rows
            self.vocab_size = min(self.vocab_size, t_vocab)
            tokens = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None
            if self.vocab_size != t_vocab or self.vocab_size != s_vocab:
                if tokens is None or tokens > self.vocab_size:
                    raise ValueError(
                        f"student and teacher lm_heads differ ({s_vocab} vs {t_vocab} "
                        f"rows) and the smaller does not cover the tokenizer ({tokens} tokens); KD needs one "
                        "vocabulary")
                self.shared_vocab = self.vocab_size
        if method_config.teacher_outputs is not None:
            self._attach_teacher_outputs(method_config.teacher_outputs)
        # The Trainer counts target tokens for num_items_in_batch only when the model "accepts loss kwargs".
        self.model_accepts_loss_kwargs = True
        self._eval_calls = 0
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_count = 0
        self._window_start: tuple[float, int] | None = None
        self._window_host = {"generation_s": 0.0, "gen_rows": 0, "gen_tokens": 0}
        self.generation_seconds = 0.0  # this process, this train() call
        self._train_seconds = 0.0
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ExecutionAccuracyCallback):
                callback.bind(self)

    def add_callback(self, callback):
        from .ex_eval import ExecutionAccuracyCallback

        super().add_callback(callback)
        for added in self.callback_handler.callbacks:
            if isinstance(added, ExecutionAccuracyCallback) and added._trainer_ref is None:
                added.bind(self)

    def _ex_callbacks(self) -> list:
        from .ex_eval import ExecutionAccuracyCallback

        return [c for c in self.callback_handler.callbacks if isinstance(c, ExecutionAccuracyCallback)]

    def _attach_teacher_outputs(self, path) -> None:
        from .teacher_outputs import TeacherAnswerCollator, attach_teacher_outputs, load_teacher_outputs

        meta, outputs = load_teacher_outputs(path)
        if self.train_dataset is not None:
            self.train_dataset = attach_teacher_outputs(self.train_dataset, outputs,
                                                        max_new_tokens=self.method_config.max_new_tokens)
        self.data_collator = TeacherAnswerCollator(self.data_collator)
        self.teacher_outputs_meta = meta

    # ---- seeds and contexts ------------------------------------------------------------------------------------

    def _context(self, model, device: torch.device, *, device_seed: int = 0, host_seed: int = 0) -> DistillContext:
        generator = torch.Generator(device=device)
        generator.manual_seed(device_seed)
        max_steps = max(self.state.max_steps or 0, 1)
        return DistillContext(
            config=self.method_config, student=model, student_head=lm_head_of(model), teacher=self.teacher,
            teacher_head=lm_head_of(self.teacher) if self.teacher is not None else None,
            shared_vocab=self.shared_vocab,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, mask_token_id=self.mask_token_id,
            progress=min(self.state.global_step / max_steps, 1.0), generator=generator,
            rng=random.Random(host_seed), process_index=self.args.process_index,
            num_processes=self.args.world_size)

    def _train_context(self, model, device, step: int, micro: int) -> DistillContext:
        seed = self.args.seed
        return self._context(model, device,
                             device_seed=stable_seed(_DEVICE_SEEDS, seed, self.args.process_index, step, micro),
                             host_seed=stable_seed(_HOST_SEEDS, seed, step, micro))

    # ---- one optimizer step ------------------------------------------------------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, *args, **kwargs):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, *args, **kwargs)
        step = _Step(batch_samples)
        for index, batch in enumerate(batch_samples):
            if isinstance(batch, MutableMapping):
                batch[STEP_KEY] = _MicroBatchRef(step, index)
        return batch_samples, num_items_in_batch

    def _gather_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` ``[k]`` summed over processes (a collective every process calls at the same point)."""
        return self.accelerator.gather(values.unsqueeze(0)).reshape(-1, values.shape[0]).sum(0)

    def _prepare_step(self, model, step: _Step) -> None:
        cfg = self.method_config
        step.device_batches = [self._prepare_inputs({k: v for k, v in b.items() if k != STEP_KEY})
                               for b in step.batches]
        batches = step.device_batches
        device = batches[0]["answer_labels"].device
        step.global_step = self.state.global_step
        across = self.args.world_size > 1 and self.args.average_tokens_across_devices
        step.scale = float(self.args.world_size) if across else 1.0
        gold = torch.stack([(b["answer_labels"] != IGNORE_INDEX).sum() for b in batches]).sum()
        sequences = torch.tensor(sum(int(b["answer_labels"].shape[0]) for b in batches), device=device)
        rollout = None
        if cfg.generates:
            rows = [int(b["input_ids"].shape[0]) for b in batches]
            if self.args.world_size > 1:
                gathered = self.accelerator.gather(torch.tensor([rows], device=device)).reshape(-1, len(rows))
                rows_per_process = gathered.tolist()
            else:
                rows_per_process = [rows]
            ctx = self._train_context(model, device, step.global_step, 0)
            rollout = rollout_step(ctx, batches, seed=stable_seed(_HOST_SEEDS, self.args.seed, step.global_step),
                                   rows_per_process=rows_per_process)
            step.rollout = rollout
            self.generation_seconds += rollout.generation_s
        if rollout is not None and rollout.any_generated:
            # The KD batches differ from the gold ones: the KD term has its own token count.  The host has waited
            # for the generation anyway, so the counts are read here (host numbers: no synchronisation later).
            kd = torch.stack([(b["answer_labels"] if plan.kd_batch is None else plan.kd_batch["answer_labels"])
                              .ne(IGNORE_INDEX).sum() for b, plan in zip(batches, rollout.plans)]).sum()
            counts = torch.stack([gold, kd, sequences])
            if across:
                counts = self._gather_sum(counts)
            step.normalizer, step.kd_normalizer, step.num_sequences = (int(c) for c in counts.tolist())
        else:
            counts = torch.stack([gold, sequences])
            if across:
                counts = self._gather_sum(counts)
            step.normalizer, step.num_sequences = counts[0], counts[1]
            step.kd_normalizer = None
        step.ready = True

    def _micro_batch(self, model, inputs) -> tuple[_Step, int]:
        ref = inputs.get(STEP_KEY)
        if not isinstance(ref, _MicroBatchRef):
            # Called outside the Trainer's loop: a step of this micro-batch alone.
            ref = _MicroBatchRef(_Step([inputs]), 0)
        if not ref.step.ready:
            self._prepare_step(model, ref.step)
        return ref.step, ref.index

    def _plan(self, model, step: _Step, index: int):
        batch = step.device_batches[index]
        ctx = self._train_context(model, batch["answer_labels"].device, step.global_step, index)
        kd_plan = step.rollout.plans[index] if step.rollout is not None else None
        return plan_objective(ctx, batch, step.normalizer, kd_normalizer=step.kd_normalizer,
                              num_sequences=step.num_sequences, kd_plan=kd_plan)

    def _uses_trainer_backward(self) -> bool:
        from accelerate.utils import DistributedType

        # DeepSpeed's engine steps inside backward at accumulation boundaries: one backward per micro-batch.
        return self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
        if self._uses_trainer_backward():
            return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        with self.compute_loss_context_manager():  # mixed precision for the generation and KID's stage too
            step, index = self._micro_batch(model, inputs)
            plan = self._plan(model, step, index)
        total = None
        for i, term in enumerate(plan.terms):
            # DDP: all-reduce once, at the micro-batch's last backward (the Trainer's no_sync covers the others).
            sync = contextlib.nullcontext()
            if i < len(plan.terms) - 1 and getattr(model, "require_backward_grad_sync", False):
                sync = model.no_sync()
            with sync:
                with self.compute_loss_context_manager():
                    parts = term()
                loss = parts.loss * step.scale if step.scale != 1.0 else parts.loss
                self.accelerator.backward(loss)
            parts = LossParts(loss.detach(), parts.kd, parts.mle, parts.tokens)
            total = parts if total is None else LossParts(total.loss + parts.loss, total.kd + parts.kd,
                                                          total.mle + parts.mle, total.tokens + parts.tokens)
        self._record(total, step.scale, plan.kd_plan, step.rollout if index == 0 else None, plan.imperfect,
                     step.device_batches[index]["answer_labels"])
        if index == len(step.device_batches) - 1:
            step.batches = []  # the micro-batches refer to their step: no reference cycle once it is done
        empty_cache_steps = getattr(self.args, "torch_empty_cache_steps", None)
        if empty_cache_steps is not None and self.state.global_step % empty_cache_steps == 0 \
                and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return total.loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            # The Trainer's own training_step (DeepSpeed): the prepared step, all terms in one graph.
            step, index = self._micro_batch(model, inputs)
            batch = step.device_batches[index]
            ctx = self._train_context(model, batch["answer_labels"].device, step.global_step, index)
            plan = plan_objective(
                ctx, batch, step.normalizer, kd_normalizer=step.kd_normalizer, num_sequences=step.num_sequences,
                kd_plan=step.rollout.plans[index] if step.rollout is not None else None)
            parts = run_terms(plan.terms)
            loss = parts.loss * step.scale if step.scale != 1.0 else parts.loss
            self._record(parts, step.scale, None, step.rollout if index == 0 else None, plan.imperfect,
                         batch["answer_labels"])
        else:
            # Evaluation: this batch's own token mean, with seeds that leave training's streams alone.
            self._eval_calls += 1
            batch = {k: v for k, v in inputs.items() if k != STEP_KEY}
            ctx = self._context(model, batch["answer_labels"].device,
                                device_seed=stable_seed(_EVAL_SEEDS, self.args.seed, self.args.process_index,
                                                        self._eval_calls),
                                host_seed=stable_seed(_EVAL_SEEDS, self.args.seed, self._eval_calls))
            parts = compute_objective(ctx, batch)
            loss = parts.loss
        return (loss, {"kd": parts.kd, "mle": parts.mle}) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """The Trainer's evaluation (the objective on ``eval_dataset``, when there is one), then execution accuracy
        for each :class:`~kid.ex_eval.ExecutionAccuracyCallback` (its score may arrive later: see kid.ex_eval).  The
        global RNG (``generate``'s, the data loaders') is restored afterwards: an evaluation during training leaves
        what training draws next unchanged."""
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        # With a dict of evaluation sets the Trainer evaluates each under eval_<name>: execution accuracy once, with
        # the first.
        first = next(iter(self.eval_dataset), None) if isinstance(self.eval_dataset, dict) else None
        ex = self._ex_callbacks() if metric_key_prefix in ("eval", f"eval_{first}") else []
        started = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=devices):
                if eval_dataset is None and self.eval_dataset is None and ex:
                    metrics: dict = {}
                    for callback in ex:
                        metrics.update(callback.evaluate(self))
                    self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
                    return metrics
                metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
                for callback in ex:
                    metrics.update(callback.evaluate(self))
                return metrics
        finally:
            if self._window_start is not None:  # the log's step_time_s / tokens_per_s time training steps only
                start_time_s, start_step = self._window_start
                self._window_start = (start_time_s + time.perf_counter() - started, start_step)

    def _determine_best_metric(self, metrics, trial):
        # A score that arrives after the evaluation (ExecutionAccuracyCallback) updates the best checkpoint then.
        name = self.args.metric_for_best_model
        if name is not None:
            key = name if name.startswith("eval_") else f"eval_{name}"
            if key not in metrics and any(c.deferred and c.metric_key == key for c in self._ex_callbacks()):
                return False
        return super()._determine_best_metric(metrics, trial)

    def _save_checkpoint(self, model, trial):
        for callback in self._ex_callbacks():
            callback.before_save(self)  # rotation must know the best checkpoint before it removes any
        return super()._save_checkpoint(model, trial)

    def _maybe_log_save_evaluate(self, *args, **kwargs):
        result = super()._maybe_log_save_evaluate(*args, **kwargs)
        if self.state.global_step >= self.state.max_steps or self.control.should_training_stop:
            for callback in self._ex_callbacks():
                callback.settle(self)  # before load_best_model_at_end and the end of train()
        return result

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the objective's loss on the batch (there are no logits to return: none is ever built)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # ---- metrics -----------------------------------------------------------------------------------------------

    def _record(self, parts: LossParts, scale: float, kd_plan, rollout: StepRollout | None,
                imperfect: ImperfectBatch | None = None, answer_labels: torch.Tensor | None = None) -> None:
        # Device tensors accumulated without .item(): read once per logging window.  The parts get the loss's
        # process-count scale, so that their mean over processes (at logging time) is the batch's value.
        if self._window_start is None:
            self._window_start = (time.perf_counter(), self.state.global_step)
        values = {"kd": parts.kd * scale, "mle": parts.mle * scale, "tokens": parts.tokens}
        if imperfect is not None:  # KID's stage: slots chosen, chosen slots whose token changed, target tokens
            values.update(kid_chosen=imperfect.chosen.sum(), kid_changed=imperfect.changed.sum(),
                          kid_targets=(answer_labels != IGNORE_INDEX).sum())
        for name, value in values.items():
            value = value.detach().to(torch.float64)
            self._metric_sums[name] = self._metric_sums[name] + value if name in self._metric_sums else value
        self._metric_count += 1
        if rollout is not None:
            self._window_host["generation_s"] += rollout.generation_s
        if kd_plan is not None:
            self._window_host["gen_rows"] += kd_plan.generated_rows
            self._window_host["gen_tokens"] += kd_plan.generated_tokens

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._metric_count and "loss" in logs:
            # Every process logs here together (the Trainer has just gathered the loss the same way): each
            # process's kd / mle are its share of the batch's, so average them over processes; add up the tokens
            # and generated rows / tokens; average the generation time.
            # KID's stage counts are added up too: one gather either way, the same length on every process (every
            # process runs the same method).
            host, device = self._window_host, self._metric_sums["kd"].device
            kid_counts = ("kid_chosen", "kid_changed", "kid_targets") if self.method_config.method == "kid" else ()
            zero = torch.zeros((), dtype=torch.float64, device=device)
            local = torch.stack([self._metric_sums[k] for k in ("kd", "mle", "tokens")] + [
                torch.tensor(float(host[k]), dtype=torch.float64, device=device)
                for k in ("gen_rows", "gen_tokens", "generation_s")] + [
                self._metric_sums.get(k, zero) for k in kid_counts])
            if self.args.world_size > 1:
                gathered = self.accelerator.gather(local.unsqueeze(0)).reshape(-1, local.shape[0])
                mean, total = gathered.mean(0), gathered.sum(0)
                local = torch.cat([torch.stack([mean[0], mean[1], total[2], total[3], total[4], mean[5]]),
                                   total[6:]])
            kd, mle, tokens, gen_rows, gen_tokens, generation_s, *kid_values = local.tolist()
            # Each micro-batch's parts are already divided by its step's token count: their sum over the window
            # divided by the window's optimizer steps is the mean per step (also when the last step is short).
            now, step = time.perf_counter(), self.state.global_step
            start_time_s, start_step = self._window_start or (now, step)
            steps = max(step - start_step, 1)
            logs["kd"] = round(kd / steps, 6)
            logs["mle"] = round(mle / steps, 6)
            if step > start_step:
                elapsed = now - start_time_s
                logs["step_time_s"] = round(elapsed / steps, 4)
                logs["tokens_per_s"] = round(tokens / elapsed, 1)
            if self.method_config.generates:
                logs["generation_s"] = round(generation_s / steps, 4)
                logs["gen_len"] = round(gen_tokens / gen_rows, 2) if gen_rows else 0.0
            if kid_values:
                chosen, changed, targets = kid_values
                logs["kid_chosen"] = round(chosen / targets, 4) if targets else 0.0
                if chosen:
                    logs["kid_changed"] = round(changed / chosen, 4)
            self._window_start = (now, step)
            self._metric_sums, self._metric_count = {}, 0
            self._window_host = {"generation_s": 0.0, "gen_rows": 0, "gen_tokens": 0}
        super().log(logs, *args, **kwargs)

    def _inner_training_loop(self, *args, **kwargs):
        # The first window opens at the first micro-batch: on resume, global_step is restored only inside the loop.
        self._window_start = None
        self.generation_seconds = 0.0
        started = time.perf_counter()
        try:
            return super()._inner_training_loop(*args, **kwargs)
        finally:
            self._train_seconds = time.perf_counter() - started

    def report_fields(self) -> dict:
        """The run's time split, for the run report (this process; the processes run in lockstep):
        ``generation_time_s`` (answers generated during training, including the merge of LoRA weights),
        ``training_time_s`` (the rest of the training loop: the passes, backward, optimizer, logging, saving) and
        ``generation_fraction``; for this ``train()`` call's training loop.  The run report of
        :func:`kid.training.run_training` adds up every segment of a resumed run instead, over the interval its
        ``train_runtime_s`` measures."""
        total = self._train_seconds
        generation = self.generation_seconds
        return {"generation_time_s": round(generation, 3), "training_time_s": round(max(total - generation, 0.0), 3),
                "generation_fraction": round(generation / total, 4) if total > 0 else None}


# ---- what DistillTrainer loads by itself ------------------------------------------------------------------------

def _kid_option(args, name: str, default):
    return getattr(args, name, default) if hasattr(args, "train_config") else default


def _load_student(path: str, args, *, with_tokenizer: bool):
    """The student from a directory or Hub name, with the LoRA adapters a KIDConfig asks for."""
    from .models import LoraOptions, apply_lora, load_causal_lm, resolve_dtype
    from .preflight import load_tokenizer

    tokenizer = load_tokenizer(path, "student") if with_tokenizer else None
    dtype_name = _kid_option(args, "dtype", "auto")
    lora = _kid_option(args, "lora", False)
    # every weight trained under autocast: float32 master weights (AdamW on bfloat16 weights loses small updates)
    autocast = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False))
    dtype = torch.float32 if autocast and not lora and dtype_name == "auto" else resolve_dtype(dtype_name,
                                                                                                args.device)
    model = load_causal_lm(path, dtype=dtype, attn_implementation=_kid_option(args, "attn_implementation", None))
    if lora:
        model = apply_lora(model, LoraOptions(args.lora_r, args.lora_alpha, args.lora_dropout))
    return model, tokenizer


def _load_teacher(path: str, args):
    """The teacher from a directory or Hub name: loaded, its adapter merged in, frozen, on ``args.device``."""
    from .models import load_causal_lm, prepare_teacher, resolve_dtype

    dtype = resolve_dtype(_kid_option(args, "teacher_dtype", "auto"), args.device)
    teacher = load_causal_lm(path, dtype=dtype, attn_implementation=_kid_option(args, "attn_implementation", None))
    return prepare_teacher(teacher, adapter=_kid_option(args, "teacher_adapter", None), device=args.device,
                           dtype=dtype)


def _tokenized(dataset, tokenizer, args):
    """``dataset`` with ``input_ids`` / ``labels`` (kid.data rows are tokenized) and, for length-grouped batches,
    the ``length`` column; anything else as given."""
    if dataset is None or not hasattr(dataset, "column_names"):
        return dataset
    columns = dataset.column_names
    if "input_ids" not in columns and {"prompt", "target"} <= set(columns):
        from .training import tokenize_dataset

        return tokenize_dataset(dataset, tokenizer, max_input_tokens=_kid_option(args, "max_input_tokens", 1024),
                                max_output_tokens=_kid_option(args, "max_output_tokens", 128),
                                progress=not getattr(args, "disable_tqdm", False))
    grouped = getattr(args, "group_by_length", False) or getattr(args, "train_sampling_strategy", "") in (
        "group_by_length", "batch_rebalance")
    if grouped and "input_ids" in columns and getattr(args, "length_column_name", "length") not in columns:
        from .training import add_length_column

        return add_length_column(dataset, getattr(args, "length_column_name", "length"))
    return dataset
