"""``DistillTrainer``: ``transformers.Trainer`` with a distillation objective from :mod:`kid.methods`.

Checkpointing and resume, gradient accumulation, bf16, gradient checkpointing, logging, progress bars and
multi-process runs (torchrun / accelerate with DDP) are the Trainer's; this class only supplies the loss:

* ``compute_loss`` builds a :class:`kid.methods.DistillContext` and calls the method's objective.  The teacher is
  frozen, held outside the Trainer's model (each process keeps its own copy on its device).
* Normaliser: the Trainer counts the target tokens of all micro-batches of an optimizer step (and, with
  ``average_tokens_across_devices``, of all processes) and passes the count as ``num_items_in_batch``; every term is
  a sum over target tokens divided by that count, so two micro-batches accumulate exactly the gradient of one batch
  of twice the size.  DDP averages gradients over processes, so the loss is multiplied by the process count.
* Randomness: KID's selection and sampled predictions, and the on-policy methods' choice of which sequences are
  generated, are seeded from ``(args.seed, process, optimizer step, micro-batch)``.  ``generate`` itself samples
  from the global RNG, which checkpoints save and resume restores; a resumed run draws what an uninterrupted run
  would.
* Vocabularies: checkpoints of one family may pad their lm_heads to different sizes (Qwen1.5: 151,936 rows for
  0.5B-7B, 152,064 for 14B+); both heads are cut to the smaller size, which must cover the tokenizer.
* Metrics (added to each log line): ``kd``, ``mle`` (the parts, averaged over the logging window), ``tokens_per_s``
  (attended input tokens of the student's training pass per second) and ``step_time_s`` (seconds per optimizer
  step over the logging window: the host waits for the device at logging time anyway, so no extra synchronisation).
"""
from __future__ import annotations

import random
import time

import torch
from transformers import Trainer

from .config import MethodConfig
from .methods import DistillContext, compute_objective
from .models import lm_head_of


class DistillTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is the ``method_config`` objective.

    teacher: frozen causal LM (needed by every method but "sft"); moved to ``args.device``.
    method_config: :class:`kid.config.MethodConfig`.
    mask_token_id: KID's mask token (see :func:`kid.models.default_mask_token`).
    eos_token_id, pad_token_id: default to the processing class's (tokenizer's).
    Other arguments are ``transformers.Trainer``'s; use :class:`kid.batching.DistillCollator` as the data collator
    (``with_prompts=True`` for the methods that generate).
    """

    # The loss returned by compute_loss is already divided by the step's token count: no further division by the
    # number of accumulation steps.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, method_config: MethodConfig, teacher=None, mask_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.method_config = method_config
        if method_config.needs_teacher and teacher is None:
            raise ValueError(f"method {method_config.method!r} needs a teacher model")
        if method_config.method == "kid" and mask_token_id is None:
            raise ValueError("method 'kid' needs mask_token_id")
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
        # The Trainer counts target tokens for num_items_in_batch only when the model "accepts loss kwargs".
        self.model_accepts_loss_kwargs = True
        self._micro_step = (-1, 0)
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_count = 0
        self._window_start: tuple[float, int] | None = None

    # ---- the loss --------------------------------------------------------------------------------------------

    def _seed(self) -> int:
        step = self.state.global_step
        last_step, micro = self._micro_step
        micro = micro + 1 if last_step == step else 0
        self._micro_step = (step, micro)
        return hash((self.args.seed, self.args.process_index, step, micro)) & 0x7FFF_FFFF_FFFF

    def _context(self, model, device: torch.device) -> DistillContext:
        seed = self._seed()
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
        max_steps = max(self.state.max_steps or 0, 1)
        return DistillContext(
            config=self.method_config, student=model, student_head=lm_head_of(model), teacher=self.teacher,
            teacher_head=lm_head_of(self.teacher) if self.teacher is not None else None,
            shared_vocab=self.shared_vocab,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id, mask_token_id=self.mask_token_id,
            progress=min(self.state.global_step / max_steps, 1.0), generator=generator, rng=random.Random(seed))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["answer_labels"]
        if num_items_in_batch is None:
            # No step-wide count (the Trainer counts only batches with "labels"): this micro-batch's own count,
            # times the accumulation steps, since the loss counts as already scaled for accumulation.
            normalizer = (labels != -100).sum() * getattr(self, "current_gradient_accumulation_steps",
                                                           self.args.gradient_accumulation_steps)
            scale = 1.0
        else:
            normalizer = num_items_in_batch
            # The count covers every process; DDP then averages the gradients over processes.
            scale = float(self.accelerator.num_processes) if self.args.average_tokens_across_devices else 1.0
        if torch.is_tensor(normalizer):
            normalizer = normalizer.to(labels.device)
        parts = compute_objective(self._context(model, labels.device), inputs, normalizer)
        loss = parts.loss * scale if scale != 1.0 else parts.loss
        if model.training:
            self._record(parts, inputs["attention_mask"], scale)
        return (loss, {"kd": parts.kd, "mle": parts.mle}) if return_outputs else loss

    # ---- metrics -----------------------------------------------------------------------------------------------

    def _record(self, parts, attention_mask: torch.Tensor, scale: float = 1.0) -> None:
        # Device tensors accumulated without .item(): read once per logging window.  The parts get the loss's
        # process-count scale, so that their mean over processes (at logging time) is the batch's value.
        if self._window_start is None:
            self._window_start = (time.perf_counter(), self.state.global_step)
        values = {"kd": parts.kd * scale, "mle": parts.mle * scale, "tokens": attention_mask.sum()}
        for name, value in values.items():
            value = value.detach().to(torch.float64)
            self._metric_sums[name] = self._metric_sums[name] + value if name in self._metric_sums else value
        self._metric_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metric_count and "loss" in logs:
            # Every process logs here together (the Trainer has just gathered the loss the same way): each
            # process's kd / mle are its share of the batch's, so average them over processes; add up the tokens.
            names = ("kd", "mle", "tokens")
            local = torch.stack([self._metric_sums[k] for k in names])
            if self.args.world_size > 1:
                gathered = self.accelerator.gather(local).reshape(-1, len(names))
                local = torch.cat([gathered[:, :2].mean(0), gathered[:, 2:].sum(0)])
            sums = dict(zip(names, local.tolist()))
            # Each micro-batch's parts are already divided by its step's token count: their sum over the window
            # divided by the window's optimizer steps is the mean per step (also when the last step is short).
            now, step = time.perf_counter(), self.state.global_step
            start_time_s, start_step = self._window_start or (now, step)
            steps = max(step - start_step, 1)
            logs["kd"] = round(sums["kd"] / steps, 6)
            logs["mle"] = round(sums["mle"] / steps, 6)
            if step > start_step:
                elapsed = now - start_time_s
                logs["step_time_s"] = round(elapsed / steps, 4)
                logs["tokens_per_s"] = round(sums["tokens"] / elapsed, 1)
            self._window_start = (now, step)
            self._metric_sums, self._metric_count = {}, 0
        super().log(logs, start_time)

    def _inner_training_loop(self, *args, **kwargs):
        # The first window opens at the first micro-batch: on resume, global_step is restored only inside the loop.
        self._window_start = None
        return super()._inner_training_loop(*args, **kwargs)
