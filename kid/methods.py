"""The training objectives: SFT, FKD, RKD, f-distill, ImitKD, GKD and KID, each a function of one micro-batch.

Every term goes through kidkernels on hidden states gathered at the answer rows (:func:`kid.models.
answer_hidden_states`): no model is asked for logits, and no ``[tokens, vocab]`` tensor exists.

An objective is planned as a list of *terms* (:func:`plan_objective`), each a function that builds one student
graph and returns its :class:`LossParts`: the loss to back-propagate, already normalised, and its KD and MLE parts,
detached.  Most objectives are one term (one student pass: SFT, FKD, RKD, KID with ``mle_input="imperfect"``, and
a generating method's micro-batch that reads the gold data); the two-pass ones (a KD pass over generated answers or
KID's (x, y-hat), then an MLE pass over the gold batch) are two.  :func:`compute_objective` runs the terms: with
``backward=``, each term is back-propagated before the next one is built, so only one student graph is alive at a
time (what :class:`kid.trainer.DistillTrainer` does); without, it returns the sum of the terms' losses, one graph
per term alive until the caller's backward.  The gradients are the same either way.

Normalisation (``MethodConfig.normalization``):

* "token": each term is a sum over target tokens divided by a count over the whole optimizer step (all
  micro-batches and processes, see :class:`kid.trainer.DistillTrainer`): the MLE term by ``normalizer`` (the gold
  target tokens), the KD term by ``kd_normalizer`` (the target tokens of the batches the KD term reads: the same
  count for gold-data methods and KID; for generated batches, the generated answers' tokens).  Gradient
  accumulation is then exact: splitting a step's rows over micro-batches does not change its gradient.
* "sequence": the per-sequence mean of Eq. 2: row weights ``1 / (len(y_i) * num_sequences)``, ``num_sequences``
  the step's sequence count (the same for both terms: each KD sequence stands for one gold sequence).  The fused
  loss then runs with ``reduction="none"`` (its backward recomputes the logits: some extra loss-kernel time).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch

import kidkernels

from .batching import IGNORE_INDEX
from .config import MethodConfig
from .kid_stage import ImperfectBatch, make_imperfect
from .models import LMHead, answer_hidden_states, eval_mode
from .rollout import KDPlan, rollout_step


@dataclass
class LossParts:
    """loss: 0-d float32 (with a graph unless already back-propagated); kd, mle: 0-d float32, detached
    (``loss = kd_weight kd + mle_weight mle``); tokens: 0-d, the attended input tokens of the student passes that
    built graphs (for throughput)."""
    loss: torch.Tensor
    kd: torch.Tensor
    mle: torch.Tensor
    tokens: torch.Tensor | None = None


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
    generator: device-side randomness (KID's random selection and sampled predictions), seeded per micro-batch; it
        may differ between processes.
    rng: host-side randomness of the generating methods' source draws (which rows are generated).  It must be the
        same on every process (seeded without the process index): the draws decide which collectives run.
    process_index, num_processes: this process and the process count (the source draws cover every process's
        rows, see :mod:`kid.rollout`).
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
    process_index: int = 0
    num_processes: int = 1


Term = Callable[[], LossParts]


@dataclass
class ObjectivePlan:
    """A micro-batch's objective, ready to run: ``terms`` in order; ``kd_batch`` is the batch the KD term reads
    (the gold batch, KID's (x, y-hat), or one with generated answers); ``imperfect``: KID's stage output."""
    terms: list[Term]
    kd_batch: dict
    imperfect: ImperfectBatch | None = None
    kd_plan: KDPlan | None = None
    extra: dict = field(default_factory=dict)


def _zero(like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=like.device)


def _teacher_hidden(ctx: DistillContext, batch) -> torch.Tensor:
    with torch.no_grad():
        return answer_hidden_states(ctx.teacher, batch, dtype=ctx.teacher_head.dtype)


def _target_count(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE_INDEX).sum()


def sequence_weights(labels: torch.Tensor, num_sequences) -> torch.Tensor:
    """``[B, A]`` float32 weights of Eq. 2's per-sequence mean: ``1 / (len(y_b) * num_sequences)`` on every slot
    (ignored slots contribute 0 through their row loss)."""
    lengths = (labels != IGNORE_INDEX).sum(dim=1, keepdim=True).clamp(min=1).to(torch.float32)
    return (1.0 / (lengths * num_sequences)).expand(labels.shape)


def _ratio(numerator, denominator) -> float:
    """``numerator / denominator`` on the host (a synchronisation when they are device tensors; the trainer passes
    host numbers, known after the step's generation)."""
    return float(numerator) / float(denominator)


def loss_term(ctx: DistillContext, batch, *, kd: bool, mle_weight: float, kd_normalizer=None, mle_normalizer=None,
              num_sequences=None, targets: torch.Tensor | None = None) -> LossParts:
    """One student pass over ``batch`` and one fused kidkernels call: ``kd_weight * divergence / kd_normalizer +
    mle_weight * MLE / mle_normalizer`` (token normalisation), or the per-sequence mean (see the module docstring).

    kd: include the divergence (the teacher reads ``batch`` too); ``mle_weight`` 0: the divergence alone.  targets:
    the answer tokens of the MLE term and the rows that count (default ``batch["answer_labels"]``).  Without
    normalisers, the counts of this batch.
    """
    cfg = ctx.config
    targets = batch["answer_labels"] if targets is None else targets
    s = ctx.student_head
    # The MLE term alone softmaxes over the same rows as the MLE term of the fused KD call: the shared vocabulary.
    s_mle = _shared_student_head(ctx)
    teacher_hidden = _teacher_hidden(ctx, batch) if kd else None
    student_hidden = answer_hidden_states(ctx.student, batch, dtype=s.dtype)
    tokens = batch["attention_mask"].sum()
    if cfg.normalization == "sequence":
        weights = sequence_weights(targets, targets.shape[0] if num_sequences is None else num_sequences)
        if kd:
            t = ctx.teacher_head
            rows, kd_rows, ce_rows = kidkernels.fused_linear_distill_loss(
                student_hidden, s.weight, teacher_hidden, t.weight, targets, divergence=cfg.kd_divergence,
                beta=cfg.beta, temperature=cfg.temperature, kd_weight=cfg.kd_weight, mle_weight=mle_weight,
                student_bias=s.bias, teacher_bias=t.bias, reduction="none", return_parts=True,
                shared_vocab=ctx.shared_vocab)
            kd_value = (kd_rows * weights).sum().detach()
        else:
            ce_rows = kidkernels.fused_linear_cross_entropy(student_hidden, s_mle.weight, targets, bias=s_mle.bias,
                                                            reduction="none")
            rows, kd_value = mle_weight * ce_rows, None
        loss = (rows * weights).sum()
        # At mle_weight 0 the cross-entropy of the KD batch's own answers is not the MLE term.
        mle_value = (ce_rows.detach() * weights).sum() if mle_weight != 0 or not kd else _zero(loss)
        return LossParts(loss, _zero(loss) if kd_value is None else kd_value, mle_value, tokens)
    if not kd:
        normalizer = _target_count(targets) if mle_normalizer is None else mle_normalizer
        mle = kidkernels.fused_linear_cross_entropy(student_hidden, s_mle.weight, targets, bias=s_mle.bias,
                                                    normalizer=normalizer)
        return LossParts(mle_weight * mle, _zero(mle), mle.detach(), tokens)
    if kd_normalizer is None:
        kd_normalizer = _target_count(targets) if mle_normalizer is None else mle_normalizer
    ratio = 1.0
    if mle_weight != 0 and mle_normalizer is not None and mle_normalizer is not kd_normalizer:
        # One call, one normaliser: fold the MLE term's own normaliser into its weight.
        ratio = _ratio(kd_normalizer, mle_normalizer)
    t = ctx.teacher_head
    loss, kd_value, mle_value = kidkernels.fused_linear_distill_loss(
        student_hidden, s.weight, teacher_hidden, t.weight, targets, divergence=cfg.kd_divergence, beta=cfg.beta,
        temperature=cfg.temperature, kd_weight=cfg.kd_weight, mle_weight=mle_weight * ratio, student_bias=s.bias,
        teacher_bias=t.bias, normalizer=kd_normalizer, return_parts=True, shared_vocab=ctx.shared_vocab)
    if mle_weight == 0:
        mle_value = _zero(loss)  # the cross-entropy of the KD batch's own answers is not the MLE term
    return LossParts(loss, kd_value, mle_value * ratio if ratio != 1.0 else mle_value, tokens)


# ---- objectives ------------------------------------------------------------------------------------------------

def _sft(ctx, batch, normalizer, kd_normalizer, num_sequences, kd_plan) -> ObjectivePlan:
    """MLE only (also how teachers are fine-tuned first)."""
    cfg = ctx.config
    return ObjectivePlan([lambda: loss_term(ctx, batch, kd=False, mle_weight=cfg.mle_weight,
                                            mle_normalizer=normalizer, num_sequences=num_sequences)], batch)


def _gold_kd(ctx, batch, normalizer, kd_normalizer, num_sequences, kd_plan) -> ObjectivePlan:
    """FKD / RKD: the divergence on the gold data plus MLE, one fused call."""
    cfg = ctx.config
    return ObjectivePlan([lambda: loss_term(ctx, batch, kd=True, mle_weight=cfg.mle_weight,
                                            kd_normalizer=kd_normalizer, mle_normalizer=normalizer,
                                            num_sequences=num_sequences)], batch)


def _two_passes(ctx, gold_batch, kd_batch, normalizer, kd_normalizer, num_sequences) -> list[Term]:
    """KD on ``kd_batch`` (MLE weight 0), then the MLE term on a separate student pass over ``gold_batch``."""
    cfg = ctx.config
    terms = [lambda: loss_term(ctx, kd_batch, kd=True, mle_weight=0.0, kd_normalizer=kd_normalizer,
                               num_sequences=num_sequences)]
    if cfg.mle_weight > 0:
        terms.append(lambda: loss_term(ctx, gold_batch, kd=False, mle_weight=cfg.mle_weight,
                                       mle_normalizer=normalizer, num_sequences=num_sequences))
    return terms


def _shared_student_head(ctx: DistillContext) -> LMHead:
    """The student's head restricted to the shared vocabulary (its first ``ctx.shared_vocab`` rows, views read at use;
    the whole head when None): the rows the fused KD call reads, and so those of every MLE-only pass too."""
    return ctx.student_head if ctx.shared_vocab is None else ctx.student_head.leading_rows(ctx.shared_vocab)


def _prediction_head(ctx: DistillContext) -> LMHead:
    """The student's head for KID's predictions: restricted to the shared vocabulary, so that every predicted token
    is one the teacher has."""
    return _shared_student_head(ctx)


def _kid(ctx, batch, normalizer, kd_normalizer, num_sequences, kd_plan) -> ObjectivePlan:
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
        terms = [lambda: loss_term(ctx, hat_batch, kd=True, mle_weight=cfg.mle_weight, kd_normalizer=kd_normalizer,
                                   mle_normalizer=normalizer, num_sequences=num_sequences)]
    else:
        terms = _two_passes(ctx, batch, hat_batch, normalizer, normalizer if kd_normalizer is None else kd_normalizer,
                            num_sequences)
    return ObjectivePlan(terms, hat_batch, imperfect=imperfect)


def _generated_kd(ctx, batch, normalizer, kd_normalizer, num_sequences, kd_plan) -> ObjectivePlan:
    """GKD, ImitKD and f-distill: the divergence on a batch whose answers are (partly) generated during training,
    plus MLE on the gold batch.  A micro-batch that reads the gold data on every process is one fused call, like
    RKD.  kd_plan: the micro-batch's share of its step's rollout (:func:`kid.rollout.rollout_step`); None: drawn
    and generated here for this micro-batch alone."""
    if "prompt_input_ids" not in batch:
        raise ValueError(f"method {ctx.config.method!r} generates answers: collate with with_prompts=True")
    if kd_plan is None:
        seed = (ctx.rng or random.Random(0)).getrandbits(63)
        kd_plan = rollout_step(ctx, [batch], seed=seed).plans[0]
    if kd_plan.kd_batch is None:
        plan = _gold_kd(ctx, batch, normalizer, kd_normalizer, num_sequences, None)
    else:
        plan = ObjectivePlan(_two_passes(ctx, batch, kd_plan.kd_batch, normalizer, kd_normalizer, num_sequences),
                             kd_plan.kd_batch)
    plan.kd_plan = kd_plan
    return plan


PLANNERS: dict[str, Callable[..., ObjectivePlan]] = {
    "sft": _sft, "fkd": _gold_kd, "rkd": _gold_kd, "kid": _kid,
    "gkd": _generated_kd, "imitkd": _generated_kd, "fdistill": _generated_kd,
}


def plan_objective(ctx: DistillContext, batch, normalizer=None, *, kd_normalizer=None, num_sequences=None,
                   kd_plan: KDPlan | None = None) -> ObjectivePlan:
    """The configured method's objective on one micro-batch, as terms to run in order (see the module docstring).

    The host-side work happens here, before any graph exists: KID's stage (no-grad student passes), and for the
    generating methods without a ``kd_plan`` the source draws and the generation.  normalizer, kd_normalizer,
    num_sequences: see the module docstring (None: this micro-batch's own counts).
    """
    if ctx.config.needs_teacher and ctx.teacher is None:
        raise ValueError(f"method {ctx.config.method!r} needs a teacher")
    return PLANNERS[ctx.config.method](ctx, batch, normalizer, kd_normalizer, num_sequences, kd_plan)


def run_terms(terms: list[Term], backward: Callable[[torch.Tensor], None] | None = None) -> LossParts:
    """Run the terms in order and add up their parts.  With ``backward``, ``backward(term.loss)`` is called on each
    term's loss before the next term is built (one graph at a time), and the returned loss is detached."""
    total = None
    for term in terms:
        parts = term()
        if backward is not None:
            backward(parts.loss)
            parts = LossParts(parts.loss.detach(), parts.kd, parts.mle, parts.tokens)
        if total is None:
            total = parts
        else:
            tokens = parts.tokens if total.tokens is None else (
                total.tokens if parts.tokens is None else total.tokens + parts.tokens)
            total = LossParts(total.loss + parts.loss, total.kd + parts.kd, total.mle + parts.mle, tokens)
    return total


def compute_objective(ctx: DistillContext, batch, normalizer=None, *, kd_normalizer=None, num_sequences=None,
                      kd_plan: KDPlan | None = None, backward: Callable[[torch.Tensor], None] | None = None
                      ) -> LossParts:
    """The configured method's :class:`LossParts` on one micro-batch (:func:`plan_objective`, then
    :func:`run_terms`).

    backward: e.g. ``torch.Tensor.backward``; each term is back-propagated before the next is built, so a two-pass
    objective keeps one student graph alive instead of two, and the returned ``loss`` is detached.  Without it the
    returned loss carries every term's graph (the caller back-propagates once; same gradients).
    """
    plan = plan_objective(ctx, batch, normalizer, kd_normalizer=kd_normalizer, num_sequences=num_sequences,
                          kd_plan=kd_plan)
    return run_terms(plan.terms, backward)
