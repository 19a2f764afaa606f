"""One optimizer step of ``kid train``, written once and run two ways: on fake tensors for the memory estimate
(:mod:`benchmarks.estimate_memory`) and on a GPU for the measurement it is checked against
(:mod:`benchmarks.measure_step`).

A step is what ``transformers.Trainer`` does with :class:`kid.trainer.DistillTrainer` between two optimizer updates
(:func:`run_step`): for the methods that generate, the step's rollout first (:func:`kid.rollout.rollout_step`: the
source draws and one length-grouped ``generate`` per model for all the step's prompts, as ``DistillTrainer.
_prepare_step`` runs it, under the Trainer's mixed precision); the step's normalisers (:func:`step_counts`); then
``batch_size / micro_batch_size`` micro-batches, each one :func:`micro_batch_step`; then gradient clipping (max norm
1), the optimizer update (``adamw_torch_fused``, the Trainer's default) and ``zero_grad(set_to_none=True)``.

:func:`micro_batch_step` is the one place that says how the trainer runs a micro-batch: as ``DistillTrainer.
training_step`` does, the objective is planned as terms (:func:`kid.methods.plan_objective`, under the Trainer's
``compute_loss_context_manager``) and the terms run one graph at a time (:func:`kid.methods.run_terms`): each term
is built under that context and back-propagated outside it before the next one is built.  If the trainer changes
how it runs a micro-batch, change that function only.

:func:`eager_micro_batch_step` is the same micro-batch written the way a user would without this library: the same
rollout's data, the same passes in the same order, each back-propagated before the next, but the models' full
Hugging Face logits and the float32 losses of :mod:`kidkernels.reference` on the answer rows (the MLE term and SFT as
Hugging Face's own ``ForCausalLMLoss``, on every position's logits upcast to float32).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import kidkernels
from kid.batching import IGNORE_INDEX, with_answer_tokens
from kid.config import MethodConfig
from kid.kid_stage import selectable_positions
from kid.methods import DistillContext, LossParts, Term, plan_objective, run_terms
from kid.models import LoraOptions, eval_mode, lm_head_of
from kid.rollout import GOLD, KDPlan, StepRollout, rollout_step
from kid.training import TrainConfig
from kidkernels.reference import reference_distill_loss_from_logits, reference_entropy

METHODS = ("sft", "fkd", "rkd", "kid", "gkd", "imitkd", "fdistill")
IMPLEMENTATIONS = ("kidkernels", "eager")
# The on-policy methods draw per batch or per sequence whether an answer is generated; a step's peak is that of a
# generated batch (and for f-distill of the larger model's generation), so the estimate takes that draw.
WORST_CASE_OPTIONS = {"gkd": {"gkd_lambda": 1.0}, "imitkd": {"imitkd_gold_probability": 0.0},
                      "fdistill": {"fdistill_teacher_probability": 1.0}}
ROLLOUT_SEED = 0  # the host seed of the step's source draws (the worst-case draws above do not depend on it)
# ``kid train``'s defaults (the paper's settings): the step's shapes, LoRA and optimizer settings below follow them.
TRAIN_DEFAULTS = TrainConfig()
LEARNING_RATE = TRAIN_DEFAULTS.learning_rate  # the optimizer state does not depend on it
MAX_GRAD_NORM = TRAIN_DEFAULTS.max_grad_norm


@dataclass
class StepPlan:
    """What one step trains, on what data.

    teacher, student: a preset of :mod:`benchmarks.model_presets` or a Hugging Face config path (teacher ignored by
        SFT).  method / method_options: :class:`kid.config.MethodConfig`.  batch_size sequences per optimizer step
        in micro-batches of micro_batch_size; every sequence is seq_len tokens, the last answer_len of them the
        answer (the last one EOS).  lora: train LoRA adapters (rank, alpha, dropout) on every linear layer, base
        weights frozen in ``dtype``; else every weight, in float32 with bf16 autocast (``kid train`` on a GPU).
    dtype / teacher_dtype: "bfloat16", "float16" or "float32" (the student's base weights / the teacher).
    implementation: "kidkernels" (:func:`micro_batch_step`) or "eager" (:func:`eager_micro_batch_step`).
    workspace_bytes: kidkernels' chunk budget (None: its default).
    """
    student: str = "qwen1.5-0.5b"
    teacher: str | None = "qwen1.5-7b"
    method: str = "kid"
    method_options: dict = field(default_factory=dict)
    batch_size: int = TRAIN_DEFAULTS.batch_size
    micro_batch_size: int = TRAIN_DEFAULTS.micro_batch_size
    seq_len: int = TRAIN_DEFAULTS.max_input_tokens + TRAIN_DEFAULTS.max_output_tokens
    answer_len: int = TRAIN_DEFAULTS.max_output_tokens
    lora: bool = TRAIN_DEFAULTS.lora
    lora_r: int = TRAIN_DEFAULTS.lora_r
    lora_alpha: int = TRAIN_DEFAULTS.lora_alpha
    lora_dropout: float = TRAIN_DEFAULTS.lora_dropout
    gradient_checkpointing: bool = TRAIN_DEFAULTS.gradient_checkpointing
    dtype: str = "bfloat16"
    teacher_dtype: str = "bfloat16"
    implementation: str = "kidkernels"
    workspace_bytes: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")
        for name in ("batch_size", "micro_batch_size", "seq_len", "answer_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                             f"{self.micro_batch_size}")
        if self.answer_len >= self.seq_len:
            raise ValueError(f"answer_len {self.answer_len} must be below seq_len {self.seq_len} (the prompt needs "
                             "at least one token)")
        for name in ("dtype", "teacher_dtype"):
            if getattr(self, name) not in ("bfloat16", "float16", "float32"):
                raise ValueError(f"{name} must be bfloat16, float16 or float32, got {getattr(self, name)!r}")
        if self.lora:
            if int(self.lora_r) < 1:
                raise ValueError(f"lora_r must be >= 1, got {self.lora_r}")
            if not self.lora_alpha > 0:
                raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.workspace_bytes is not None and int(self.workspace_bytes) < 1:
            raise ValueError(f"workspace_bytes must be >= 1 (None: kidkernels' default), got {self.workspace_bytes}")
        if self.method != "sft" and not self.teacher:
            raise ValueError(f"method {self.method!r} needs a teacher")
        self.method_config()  # validates the options

    @property
    def prompt_len(self) -> int:
        return self.seq_len - self.answer_len

    @property
    def micro_batches(self) -> int:
        return self.batch_size // self.micro_batch_size

    @property
    def autocast(self) -> bool:
        """Full fine-tuning keeps float32 master weights and runs the forward under bf16 autocast (``kid train``)."""
        return not self.lora

    @property
    def student_weight_dtype(self) -> torch.dtype:
        return torch.float32 if self.autocast else getattr(torch, self.dtype)

    def method_config(self) -> MethodConfig:
        options = dict(WORST_CASE_OPTIONS.get(self.method, {}))
        options.update(self.method_options)
        if self.method == "kid" or self.method in WORST_CASE_OPTIONS:
            options.setdefault("max_new_tokens", self.answer_len)
        return MethodConfig(method=self.method, **options)

    def lora_options(self) -> LoraOptions | None:
        return LoraOptions(self.lora_r, self.lora_alpha, self.lora_dropout) if self.lora else None

    def describe(self) -> dict:
        out = asdict(self)
        out["method_config"] = {k: v for k, v in self.method_config().to_dict().items()
                                if k in ("alpha", "strategy", "mle_input", "gkd_lambda", "imitkd_gold_probability",
                                         "fdistill_teacher_probability", "max_new_tokens", "kid_predictions",
                                         "mle_weight", "generation_batch_size")}
        return out


class Recorder:
    """Where a run reports what it is doing (the fake-tensor tracker records it; a GPU run ignores it)."""
    where = ""

    def region(self, label: str, name: str | None = None):
        return contextlib.nullcontext()


@dataclass
class StepModels:
    """Student (wrapped as the trainer sees it: peft), frozen teacher (or None), and the vocabulary of the step:
    the rows both heads have, as ``DistillTrainer`` takes it (the smaller head's rows; the student's alone without
    a teacher).  Random-weight models have no tokenizer: EOS is the second-to-last id of that vocabulary, the mask
    token the last."""
    student: torch.nn.Module
    teacher: torch.nn.Module | None
    vocab_size: int

    @classmethod
    def of(cls, student: torch.nn.Module, teacher: torch.nn.Module | None) -> "StepModels":
        rows = lm_head_of(student).num_rows
        if teacher is not None:
            rows = min(rows, lm_head_of(teacher).num_rows)
        return cls(student, teacher, rows)

    @property
    def shared_vocab(self) -> int | None:
        """``DistillContext.shared_vocab`` as ``DistillTrainer`` sets it: the shared rows when the two heads have
        different numbers of rows (one padded, e.g. Qwen1.5-14B's 152,064 against Qwen1.5-0.5B's 151,936), else
        None (the heads are used whole)."""
        if self.teacher is None:
            return None
        rows = {lm_head_of(self.student).num_rows, lm_head_of(self.teacher).num_rows}
        return None if len(rows) == 1 else self.vocab_size

    @property
    def eos_token_id(self) -> int:
        return self.vocab_size - 2

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1


def allocate_optimizer_state(model, optimizer) -> None:
    """Create the optimizer's state as its first update does (on zero gradients), then drop the gradients: what a
    step after the first starts from."""
    for param in trainable_parameters(model):
        param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(model) -> torch.optim.Optimizer:
    """AdamW fused, as ``transformers.Trainer``'s default ``adamw_torch_fused`` (state: two float32-or-parameter-
    dtype moments per trainable parameter and a step counter)."""
    return torch.optim.AdamW(trainable_parameters(model), lr=LEARNING_RATE, fused=True)


def make_batches(plan: StepPlan, vocab_size: int, device) -> list[dict]:
    """The micro-batches of one step in :mod:`kid.batching`'s layout (unpadded: every row is a prompt of
    ``prompt_len`` tokens and an answer of ``answer_len`` ending in EOS), with the prompts alone for the methods that
    generate.  Random token ids below the two reserved ones (EOS, mask)."""
    eos = vocab_size - 2
    batches = []
    for _ in range(plan.micro_batches):
        ids = torch.randint(0, vocab_size - 2, (plan.micro_batch_size, plan.seq_len), device=device)
        ids[:, -1] = eos
        answer_index = torch.arange(plan.prompt_len, plan.seq_len, device=device).expand(plan.micro_batch_size, -1)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "answer_index": answer_index,
                 "answer_labels": ids[:, plan.prompt_len:].clone()}
        if plan.method_config().generates:
            batch["prompt_input_ids"] = ids[:, :plan.prompt_len].clone()
            batch["prompt_attention_mask"] = torch.ones_like(batch["prompt_input_ids"])
        batches.append(batch)
    return batches


@dataclass
class StepCounts:
    """The step's normalisers, as ``DistillTrainer._prepare_step`` computes them on one process: ``normalizer`` the
    gold target tokens of every micro-batch, ``kd_normalizer`` the target tokens of the batches the KD terms read
    when some micro-batch reads generated answers (else None: the gold count), ``num_sequences`` the step's
    sequences.  Device tensors, or host numbers once the step has generated (as the trainer reads them then)."""
    normalizer: Any
    kd_normalizer: Any = None
    num_sequences: Any = None


def step_counts(plan: StepPlan, batches: list[dict], rollout: StepRollout | None) -> StepCounts:
    """The trainer's normalisers of a step of :func:`make_batches` micro-batches and its ``rollout``.

    The trainer counts the target tokens of the gold and KD batches on the device and reads them on the host after
    the generation; here they are known without reading a value (fake tensors have none): every answer slot of
    :func:`make_batches` is a target, and :func:`kid.rollout.rollout_step` reports each generated answer's tokens,
    every one a target (``KDPlan.generated_tokens``).  The same numbers on real tensors."""
    device = batches[0]["answer_labels"].device
    rows = [int(b["answer_labels"].shape[0]) for b in batches]
    gold, sequences = sum(rows) * plan.answer_len, sum(rows)
    if rollout is None or not rollout.any_generated:
        return StepCounts(torch.tensor(gold, device=device), None, torch.tensor(sequences, device=device))
    if plan.method_config().teacher_outputs is not None:
        raise ValueError("cached teacher outputs are not modelled: their answers are not generated in the step")
    kd = 0
    for count, kd_plan in zip(rows, rollout.plans):
        if kd_plan.kd_batch is None:
            kd += count * plan.answer_len
        else:
            kd += sum(s == GOLD for s in kd_plan.sources) * plan.answer_len + kd_plan.generated_tokens
    return StepCounts(gold, kd, sequences)


def objective_context(plan: StepPlan, models: StepModels, micro_batch: int, device) -> DistillContext:
    """The context ``DistillTrainer._train_context`` builds, seeded per micro-batch: both heads whole, with the
    trainer's ``shared_vocab`` when their row counts differ."""
    config = plan.method_config()
    generator = torch.Generator(device=device)
    generator.manual_seed(micro_batch)
    teacher = models.teacher if config.needs_teacher else None
    return DistillContext(config=config, student=models.student, student_head=lm_head_of(models.student),
                          teacher=teacher, teacher_head=lm_head_of(teacher) if teacher is not None else None,
                          shared_vocab=models.shared_vocab if teacher is not None else None,
                          eos_token_id=models.eos_token_id, pad_token_id=models.eos_token_id,
                          mask_token_id=models.mask_token_id, progress=1.0, generator=generator,
                          rng=random.Random(micro_batch))


# ---- one micro-batch ----------------------------------------------------------------------------------------------

def _within(context, term: Term) -> Term:
    """``term`` built inside ``context()`` (the Trainer's ``compute_loss_context_manager``)."""
    def run() -> LossParts:
        with context():
            return term()
    return run


def micro_batch_step(ctx: DistillContext, batch: dict, counts: StepCounts, kd_plan: KDPlan | None,
                     recorder: Recorder, forward_context=contextlib.nullcontext) -> LossParts:
    """One micro-batch as ``DistillTrainer.training_step`` runs it (one process): the objective planned under the
    Trainer's ``compute_loss_context_manager`` (``forward_context``: autocast for full fine-tuning; KID's stage runs
    here), then its terms one graph at a time (:func:`kid.methods.run_terms`), each built inside the context and
    back-propagated outside it before the next is built.  kd_plan: this micro-batch's share of the step's rollout
    (the generating methods).  Returns the parts (loss detached)."""
    with forward_context():
        objective = plan_objective(ctx, batch, counts.normalizer, kd_normalizer=counts.kd_normalizer,
                                   num_sequences=counts.num_sequences, kd_plan=kd_plan)
    return run_terms([_within(forward_context, term) for term in objective.terms], torch.Tensor.backward)


def _hf_logits(model, batch: dict, input_ids=None) -> torch.Tensor:
    """``[B, T, V]`` logits as a Hugging Face forward returns them (every position, in the model's dtype)."""
    kwargs = dict(input_ids=batch["input_ids"] if input_ids is None else input_ids,
                  attention_mask=batch["attention_mask"], use_cache=False)
    if batch.get("position_ids") is not None:
        kwargs["position_ids"] = batch["position_ids"]
    return model(**kwargs).logits


def _answer_rows(logits: torch.Tensor, batch: dict, *, copy: bool = False) -> torch.Tensor:
    """``[B, A, V]``: the logits that predict the answer tokens, as a slice (every batch here ends each row with
    its answer: :func:`make_batches`, :func:`kid.batching.prompt_plus_answer`).  The leanest a careful user gets:
    a view for the student (nothing saved for the backward; a gather would keep the full logits until then), a
    copy for the teacher (``copy``: its full logits are freed at once)."""
    answer = batch["answer_labels"].shape[1]
    start = batch["input_ids"].shape[1] - answer - 1
    rows = logits[:, start:start + answer]
    return rows.contiguous() if copy else rows


def _eager_mle(ctx: DistillContext, batch: dict, normalizer, recorder: Recorder) -> torch.Tensor:
    """The MLE term as ``model(..., labels=labels).loss`` computes it: Hugging Face's ``ForCausalLMLoss`` on every
    position's logits (upcast to float32 there), summed over the answer tokens and divided by ``normalizer``."""
    logits = _hf_logits(ctx.student, batch)
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX).scatter(1, batch["answer_index"],
                                                                         batch["answer_labels"])
    from transformers.loss.loss_utils import ForCausalLMLoss

    with recorder.region("loss workspace", "eager MLE (HF ForCausalLMLoss)"):
        return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1], num_items_in_batch=normalizer)


def _eager_distill(ctx: DistillContext, batch: dict, recorder: Recorder, *, mle_weight: float, normalizer,
                   mle_normalizer=None) -> torch.Tensor:
    """``(kd_weight * divergence + mle_weight * MLE) / normalizer`` on the answer rows of both models' full logits,
    float32; with an ``mle_normalizer`` of its own, the MLE term is divided by that instead (its weight rescaled, as
    :func:`kid.methods.loss_term` does)."""
    cfg = ctx.config
    vocab = ctx.shared_vocab or ctx.student_head.num_rows  # the shared vocabulary (a padded head's extra rows cut)
    ratio = 1.0
    if mle_weight != 0 and mle_normalizer is not None and mle_normalizer is not normalizer:
        ratio = float(normalizer) / float(mle_normalizer)
    with torch.no_grad():
        teacher_rows = _answer_rows(_hf_logits(ctx.teacher, batch)[..., :vocab], batch, copy=True)
    student_rows = _answer_rows(_hf_logits(ctx.student, batch)[..., :vocab], batch)
    with recorder.region("loss workspace", f"eager {cfg.kd_divergence}" + (" + MLE" if mle_weight else "")):
        loss = reference_distill_loss_from_logits(
            student_rows, teacher_rows, batch["answer_labels"], divergence=cfg.kd_divergence, beta=cfg.beta,
            temperature=cfg.temperature, kd_weight=cfg.kd_weight, mle_weight=mle_weight * ratio, reduction="sum",
            dtype=torch.float32)
        return loss / normalizer


def _eager_imperfect_ids(ctx: DistillContext, batch: dict, recorder: Recorder) -> torch.Tensor:
    """KID's stage from full logits: entropies (hard/easy) and argmax predictions of the answer rows, over the
    shared vocabulary (as the trainer's prediction head)."""
    cfg = ctx.config
    vocab = ctx.shared_vocab or ctx.student_head.num_rows
    gold = batch["answer_labels"]
    valid = selectable_positions(gold, ctx.eos_token_id, mask_eos=cfg.mask_eos)
    with torch.no_grad(), eval_mode(ctx.student):
        if cfg.strategy in ("hard", "easy"):
            rows = _answer_rows(_hf_logits(ctx.student, batch)[..., :vocab], batch)
            with recorder.region("selection workspace", "eager entropy"):
                scores = reference_entropy(rows, dtype=torch.float32)
            del rows
            chosen = kidkernels.select_positions(valid, cfg.alpha, cfg.strategy, scores=scores)
        else:  # no vocabulary involved: the same selection as the library's
            chosen = kidkernels.select_positions(valid, cfg.alpha, cfg.strategy, generator=ctx.generator)
        answer = batch["input_ids"].gather(1, batch["answer_index"])
        masked = torch.where(chosen, torch.full_like(answer, ctx.mask_token_id), answer)
        masked_ids = with_answer_tokens(batch["input_ids"], batch["answer_index"], masked, gold)
        if cfg.masking_only:
            return masked_ids
        rows = _answer_rows(_hf_logits(ctx.student, batch, input_ids=masked_ids)[..., :vocab], batch)
        with recorder.region("selection workspace", "eager argmax"):
            predicted = rows.argmax(dim=-1)
        del rows
        hat = torch.where(chosen, predicted, answer)
    return with_answer_tokens(batch["input_ids"], batch["answer_index"], hat, gold)


def _loss_only(loss: torch.Tensor) -> LossParts:
    zero = torch.zeros((), dtype=torch.float32, device=loss.device)
    return LossParts(loss, zero, zero)


def eager_terms(ctx: DistillContext, batch: dict, counts: StepCounts, kd_plan: KDPlan | None,
                recorder: Recorder) -> list[Term]:
    """The eager twin of :func:`kid.methods.plan_objective`'s terms: the same passes over the same data in the same
    order (one term for SFT, FKD, RKD, KID with ``mle_input="imperfect"`` and a generating method's micro-batch
    that reads the gold data; else a KD term over KID's (x, y-hat) or the generated answers, then the MLE term
    over the gold batch), with the same token normalisers.  KID's stage runs here, before any graph.  Token
    normalisation only."""
    cfg = ctx.config
    normalizer = counts.normalizer
    kd_normalizer = normalizer if counts.kd_normalizer is None else counts.kd_normalizer
    if cfg.method == "sft":
        return [lambda: _loss_only(cfg.mle_weight * _eager_mle(ctx, batch, normalizer, recorder))]
    if cfg.method == "kid":
        kd_batch = dict(batch, input_ids=_eager_imperfect_ids(ctx, batch, recorder))
        separate = cfg.mle_input == "gold"
    elif cfg.generates:
        if kd_plan is None:
            raise ValueError(f"method {cfg.method!r} reads the step's rollout: pass its kd_plan")
        kd_batch = batch if kd_plan.kd_batch is None else kd_plan.kd_batch
        separate = kd_plan.kd_batch is not None
    else:
        kd_batch, separate = batch, False
    if not separate:
        return [lambda: _loss_only(_eager_distill(ctx, kd_batch, recorder, mle_weight=cfg.mle_weight,
                                                  normalizer=kd_normalizer, mle_normalizer=normalizer))]
    terms = [lambda: _loss_only(_eager_distill(ctx, kd_batch, recorder, mle_weight=0.0, normalizer=kd_normalizer))]
    if cfg.mle_weight > 0:
        terms.append(lambda: _loss_only(cfg.mle_weight * _eager_mle(ctx, batch, normalizer, recorder)))
    return terms


def eager_micro_batch_step(ctx: DistillContext, batch: dict, counts: StepCounts, kd_plan: KDPlan | None,
                           recorder: Recorder, forward_context=contextlib.nullcontext) -> LossParts:
    """The same micro-batch without this library (module docstring): the terms of :func:`eager_terms`, run as
    :func:`micro_batch_step` runs the library's (one graph at a time)."""
    with forward_context():
        terms = eager_terms(ctx, batch, counts, kd_plan, recorder)
    return run_terms([_within(forward_context, term) for term in terms], torch.Tensor.backward)


MICRO_BATCH_STEPS = {"kidkernels": micro_batch_step, "eager": eager_micro_batch_step}


# ---- one optimizer step -------------------------------------------------------------------------------------------

def run_step(plan: StepPlan, models: StepModels, batches: list[dict], optimizer, recorder: Recorder | None = None,
             *, device_type: str = "cuda", label: str = "step", micro_batches: int | None = None
             ) -> StepRollout | None:
    """One optimizer step as the Trainer runs it: the rollout of the methods that generate (for every micro-batch
    of the step), the step's normalisers, the micro-batches, clipping, the update and ``zero_grad``.  Returns the
    rollout (None for the methods that do not generate).

    micro_batches: run only the first ones (the memory estimate runs two: from the second on, every micro-batch
    starts from the same live tensors, the accumulated gradients included, and runs the same ops on the same shapes,
    so the later ones repeat the second's peak exactly; the update then starts from the same state as well).  The
    rollout still generates for the whole step, as the trainer does.
    """
    recorder = recorder or Recorder()
    count = len(batches) if micro_batches is None else min(micro_batches, len(batches))
    one_micro_batch = MICRO_BATCH_STEPS[plan.implementation]
    device = batches[0]["input_ids"].device

    def forward_context():
        if plan.autocast:
            return torch.autocast(device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()
    rollout = None
    if plan.method_config().generates:
        recorder.where = f"{label}, rollout"
        with forward_context():  # the trainer prepares the step under its compute_loss_context_manager
            rollout = rollout_step(objective_context(plan, models, 0, device), batches, seed=ROLLOUT_SEED)
    counts = step_counts(plan, batches, rollout)
    for index, batch in enumerate(batches[:count]):
        recorder.where = f"{label}, micro-batch {index + 1}/{len(batches)}"
        ctx = objective_context(plan, models, index, device)
        one_micro_batch(ctx, batch, counts, rollout.plans[index] if rollout is not None else None, recorder,
                        forward_context)
    recorder.where = f"{label}, optimizer update"
    with recorder.region("optimizer step"):
        torch.nn.utils.clip_grad_norm_(trainable_parameters(models.student), MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return rollout
