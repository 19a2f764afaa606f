"""The training objectives: SFT, FKD, RKD, f-distill, ImitKD, GKD and KID, each a function of one micro-batch.

Every term goes through kidkernels on hidden states gathered at the answer rows (:func:`kid.models.
answer_hidden_states`): no model is asked for logits, and no ``[tokens, vocab]`` tensor exists.  Each objective
returns :class:`LossParts`: the loss to back-propagate, already divided by ``normalizer`` (the number of gold
target tokens over all micro-batches of the optimizer step, see :class:`kid.trainer.DistillTrainer`), and its KD
and MLE parts, detached.

Methods on generated sequences (GKD's student batches, ImitKD, f-distill) sum their KD term over the generated
tokens and divide by the same gold-token normaliser, so that every method shares one normaliser and gradient
accumulation stays exact; their MLE term is a second student pass over the gold batch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

import kidkernels

from .batching import IGNORE_INDEX, prompt_plus_answer
from .config import MethodConfig
from .kid_stage import make_imperfect
from .models import LMHead, answer_hidden_states, eval_mode
from .rollout import generate_answers


@dataclass
class LossParts:
    """loss: 0-d float32 with a graph; kd, mle: 0-d float32, detached (``loss = kd_weight kd + mle_weight mle``)."""
    loss: torch.Tensor
    kd: torch.Tensor
    mle: torch.Tensor


@dataclass
class DistillContext:
    """What an objective needs besides the batch.

    student: the trained model *as the trainer wraps it* (DDP, peft): its forward is what gradients flow through.
    teacher: frozen causal LM or None (SFT).  student_head / teacher_head: their lm_heads (:func:`lm_head_of`), read
        at use: an objective reads ``.weight`` only after the student's forward, when FSDP holds it whole.
    shared_vocab: when the two heads have different numbers of rows (one padded: Qwen's 152,064 vs 151,936, the same
        tokenizer), the rows both models use: the fused loss reads the first ``shared_vocab`` rows of each head
        (``kidkernels``' ``shared_vocab=``, views), and KID's predictions are drawn from them.  None: equal heads.
    progress: fraction of training done, in [0, 1] (ImitKD's schedule).
    generator: device-side randomness (KID's random selection and sampled predictions), seeded per micro-batch.
    rng: host-side randomness (which sequences or batches are generated), seeded per micro-batch.
    """
    config: MethodConfig
    student: torch.nn.Module
    student_head: LMHead
    teacher: torch.nn.Module | None
    teacher_head: LMHead | None
    eos_token_id: int
    pad_token_id: int
    mask_token_id: int | None = None
    shared_vocab: int | None = None
    progress: float = 0.0
    generator: torch.Generator | None = None
    rng: random.Random | None = None


Objective = Callable[[DistillContext, dict, torch.Tensor], LossParts]


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=like.device)


def _teacher_hidden(ctx: DistillContext, batch) -> torch.Tensor:
    with torch.no_grad():
        return answer_hidden_states(ctx.teacher, batch, dtype=ctx.teacher_head.dtype)


def cross_entropy_term(ctx: DistillContext, batch, normalizer) -> torch.Tensor:
    """The MLE term (sum over the batch's target tokens / normalizer) on a student pass over ``batch``."""
    head = ctx.student_head
    hidden = answer_hidden_states(ctx.student, batch, dtype=head.dtype)
    return kidkernels.fused_linear_cross_entropy(hidden, head.weight, batch["answer_labels"], bias=head.bias,
                                                 normalizer=normalizer)


def distill_term(ctx: DistillContext, batch, normalizer, *, divergence: str, mle_weight: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kd_weight * divergence + mle_weight * MLE`` in one fused call, both models reading ``batch``; the targets
    (and the rows that count) are ``batch["answer_labels"]``.  Returns ``(loss, kd, mle)``."""
    cfg = ctx.config
    teacher_hidden = _teacher_hidden(ctx, batch)
    s, t = ctx.student_head, ctx.teacher_head
    student_hidden = answer_hidden_states(ctx.student, batch, dtype=s.dtype)
    return kidkernels.fused_linear_distill_loss(
        student_hidden, s.weight, teacher_hidden, t.weight, batch["answer_labels"], divergence=divergence,
        beta=cfg.beta, temperature=cfg.temperature, kd_weight=cfg.kd_weight, mle_weight=mle_weight,
        student_bias=s.bias, teacher_bias=t.bias, normalizer=normalizer, return_parts=True,
        shared_vocab=ctx.shared_vocab)


# ---- objectives ------------------------------------------------------------------------------------------------

def sft(ctx: DistillContext, batch, normalizer) -> LossParts:
    """MLE only (also how teachers are fine-tuned first)."""
    mle = cross_entropy_term(ctx, batch, normalizer)
    return LossParts(ctx.config.mle_weight * mle, _zero(mle), mle.detach())


def gold_kd(ctx: DistillContext, batch, normalizer) -> LossParts:
    """FKD / RKD: the divergence on the gold data plus MLE, one fused call."""
    loss, kd, mle = distill_term(ctx, batch, normalizer, divergence=ctx.config.kd_divergence,
                                 mle_weight=ctx.config.mle_weight)
    return LossParts(loss, kd, mle)


def _with_gold_mle(ctx: DistillContext, gold_batch, normalizer, kd_batch) -> LossParts:
    """KD on ``kd_batch`` (MLE weight 0) plus the MLE term on a separate student pass over ``gold_batch``."""
    cfg = ctx.config
    kd_loss, kd, _ = distill_term(ctx, kd_batch, normalizer, divergence=cfg.kd_divergence, mle_weight=0.0)
    if cfg.mle_weight == 0:
        return LossParts(kd_loss, kd, _zero(kd))
    mle = cross_entropy_term(ctx, gold_batch, normalizer)
    return LossParts(kd_loss + cfg.mle_weight * mle, kd, mle.detach())


def _prediction_head(ctx: DistillContext) -> LMHead:
    """The student's head for KID's predictions: restricted to the shared vocabulary, so that every predicted token
    is one the teacher has."""
    return ctx.student_head if ctx.shared_vocab is None else ctx.student_head.leading_rows(ctx.shared_vocab)


def kid(ctx: DistillContext, batch, normalizer) -> LossParts:
    """KID: the imperfect-data stage (:mod:`kid.kid_stage`), then reverse KL on (x, y-hat) with MLE against the gold
    tokens y, by default on the same student pass (``mle_input="gold"``: a second pass over (x, y))."""
    cfg = ctx.config
    if ctx.mask_token_id is None:
        raise ValueError("KID needs a mask token id in the context")
    with eval_mode(ctx.student):
        imperfect = make_imperfect(
            ctx.student, batch, _prediction_head(ctx), alpha=cfg.alpha, strategy=cfg.strategy,
            mask_token_id=ctx.mask_token_id, eos_token_id=ctx.eos_token_id, mask_eos=cfg.mask_eos,
            masking_only=cfg.masking_only, predictions=cfg.kid_predictions,
            sampling_temperature=cfg.sampling_temperature, generator=ctx.generator)
    hat_batch = dict(batch, input_ids=imperfect.input_ids)
    if cfg.mle_input == "imperfect":
        loss, kd, mle = distill_term(ctx, hat_batch, normalizer, divergence=cfg.kd_divergence,
                                     mle_weight=cfg.mle_weight)
        return LossParts(loss, kd, mle)
    return _with_gold_mle(ctx, batch, normalizer, hat_batch)


def _sources(ctx: DistillContext, batch_size: int) -> list[str]:
    """Where each sequence of the KD batch comes from: "gold", "student" or "teacher" (host-side draws)."""
    cfg, rng = ctx.config, ctx.rng or random.Random(0)
    if cfg.method == "gkd":
        source = "student" if rng.random() < cfg.gkd_lambda else "gold"
        return [source] * batch_size
    if cfg.method == "imitkd":
        gold_p = (1.0 - ctx.progress) if cfg.imitkd_gold_probability == "linear" else cfg.imitkd_gold_probability
        return ["gold" if rng.random() < gold_p else "student" for _ in range(batch_size)]
    if cfg.method == "fdistill":
        return ["teacher" if rng.random() < cfg.fdistill_teacher_probability else "student"
                for _ in range(batch_size)]
    raise ValueError(f"method {cfg.method!r} does not generate")


def _generated_kd_batch(ctx: DistillContext, batch, sources: list[str]) -> dict:
    """The KD batch: the prompts with each row's answer taken from its source (generated rows sampled at
    ``sampling_temperature``, at most ``max_new_tokens``)."""
    cfg = ctx.config
    prompt_ids, prompt_mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    gold = batch["answer_labels"]
    parts = {"gold": gold}
    for source, model in (("student", ctx.student), ("teacher", ctx.teacher)):
        rows = [i for i, s in enumerate(sources) if s == source]
        if not rows:
            continue
        index = torch.tensor(rows, device=prompt_ids.device)
        generated = generate_answers(model, prompt_ids[index], prompt_mask[index], max_new_tokens=cfg.max_new_tokens,
                                     eos_token_id=ctx.eos_token_id, pad_token_id=ctx.pad_token_id,
                                     temperature=cfg.sampling_temperature)
        parts[source] = (index, generated)
    width = max(gold.shape[1], *(p[1].shape[1] for k, p in parts.items() if k != "gold"))
    answers = torch.full((gold.shape[0], width), IGNORE_INDEX, dtype=torch.long, device=gold.device)
    gold_rows = [i for i, s in enumerate(sources) if s == "gold"]
    if gold_rows:
        index = torch.tensor(gold_rows, device=gold.device)
        answers[index, :gold.shape[1]] = gold[index]
    for source in ("student", "teacher"):
        if source in parts:
            index, generated = parts[source]
            answers[index, :generated.shape[1]] = generated
    return prompt_plus_answer(prompt_ids, prompt_mask, answers, ctx.pad_token_id)


def generated_kd(ctx: DistillContext, batch, normalizer) -> LossParts:
    """GKD, ImitKD and f-distill: the divergence on a batch whose answers are (partly) generated during training,
    plus MLE on the gold batch.  A GKD batch that draws the gold data is one fused call, like RKD."""
    if "prompt_input_ids" not in batch:
        raise ValueError(f"method {ctx.config.method!r} generates answers: collate with with_prompts=True")
    sources = _sources(ctx, batch["input_ids"].shape[0])
    if all(s == "gold" for s in sources):
        return gold_kd(ctx, batch, normalizer)
    return _with_gold_mle(ctx, batch, normalizer, _generated_kd_batch(ctx, batch, sources))


OBJECTIVES: dict[str, Objective] = {
    "sft": sft, "fkd": gold_kd, "rkd": gold_kd, "kid": kid,
    "gkd": generated_kd, "imitkd": generated_kd, "fdistill": generated_kd,
}


def compute_objective(ctx: DistillContext, batch, normalizer) -> LossParts:
    """The configured method's :class:`LossParts` on one micro-batch."""
    if ctx.config.needs_teacher and ctx.teacher is None:
        raise ValueError(f"method {ctx.config.method!r} needs a teacher")
    return OBJECTIVES[ctx.config.method](ctx, batch, normalizer)
