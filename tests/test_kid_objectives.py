"""Every objective (method and KID variant), recomputed from the full Hugging Face logits in float64: the KD and MLE
parts, the loss and the gradient; the normalisers (token mean over a step, per-sequence mean of Eq. 2, generated
batches by their own token count); one graph at a time gives the gradient of the single-graph sum and holds half
the saved activations; generated answers follow top-k / top-p."""
from __future__ import annotations

import random
import weakref

import pytest
import torch

from kid.batching import IGNORE_INDEX, DistillCollator
from kid.config import MethodConfig
from kid.methods import DistillContext, compute_objective, plan_objective, run_terms
from kid.models import lm_head_of
from kid.rollout import GOLD, STUDENT, TEACHER, rollout_step
from tests.kid_tiny import EOS, MASK, PAD, tiny_examples, tiny_model


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")


@pytest.fixture(scope="module")
def models():
    # A wide initialisation: peaky, context-dependent distributions that differ between the two models.
    student = tiny_model(0, layers=2, init_std=0.2)
    teacher = tiny_model(1, hidden=48, layers=2, init_std=0.2).eval().requires_grad_(False)
    return student, teacher


@pytest.fixture(scope="module")
def batch():
    rows = tiny_examples(4, seed=3, prompt_len=(3, 9), answer_len=(2, 7))
    out = DistillCollator(PAD, with_prompts=True)(rows)
    assert len({int(n) for n in (out["answer_labels"] != IGNORE_INDEX).sum(1)}) > 1  # ragged answers
    return out


def _ctx(models, config, *, seed=0):
    student, teacher = models
    return DistillContext(config=config, student=student, student_head=lm_head_of(student), teacher=teacher,
                          teacher_head=lm_head_of(teacher), eos_token_id=EOS, pad_token_id=PAD, mask_token_id=MASK,
                          generator=torch.Generator().manual_seed(seed), rng=random.Random(seed))


# ---- the float64 reference --------------------------------------------------------------------------------------

def answer_logits(model, b) -> torch.Tensor:
    """``[B, A, V]`` float64 full logits of ``model`` at the rows predicting the answer slots of batch ``b``."""
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b.get("position_ids"))
    logits = out.logits.double()
    rows = (b["answer_index"] - 1).clamp(min=0)
    return logits.gather(1, rows.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))


def divergence_rows(s, t, divergence, *, beta=0.5, temperature=1.0):
    ls, lt = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
    q, p = ls.exp(), lt.exp()
    if divergence == "fkl":
        return (p * (lt - ls)).sum(-1)
    if divergence == "rkl":
        return (q * (ls - lt)).sum(-1)
    if divergence == "jsd":
        lm = (beta * p + (1 - beta) * q).log()
        return beta * (p * (lt - lm)).sum(-1) + (1 - beta) * (q * (ls - lm)).sum(-1)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(divergence)


def ce_rows(s, labels):
    return -s.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def reduce(rows, labels, *, normalization, normalizer=None, num_sequences=None):
    valid = labels != IGNORE_INDEX
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if normalization == "sequence":
        lengths = valid.sum(1).clamp(min=1)
        return (rows.sum(1) / lengths).sum() / (labels.shape[0] if num_sequences is None else num_sequences)
    return rows.sum() / (valid.sum() if normalizer is None else normalizer)


def reference(models, config, gold_batch, kd_batch, *, kd_targets, normalizer=None, kd_normalizer=None,
              num_sequences=None, separate_mle_pass):
    """(loss, kd, mle) in float64 from full logits: KD on ``kd_batch`` against ``kd_targets``; MLE on the gold tokens,
    read from ``kd_batch``'s pass (KID's "imperfect") or a separate pass over ``gold_batch``."""
    student, teacher = models
    gold = gold_batch["answer_labels"]
    norm = dict(normalization=config.normalization, num_sequences=num_sequences)
    s_kd = answer_logits(student, kd_batch)
    kd = torch.zeros((), dtype=torch.float64)
    if config.kd_divergence is not None:
        with torch.no_grad():
            t_kd = answer_logits(teacher, kd_batch)
        kd_rows = divergence_rows(s_kd, t_kd, config.kd_divergence, beta=config.beta,
                                  temperature=config.temperature)
        kd = reduce(kd_rows, kd_targets, normalizer=kd_normalizer if kd_normalizer is not None else normalizer,
                    **norm)
    s_mle = answer_logits(student, gold_batch) if separate_mle_pass else s_kd
    mle = reduce(ce_rows(s_mle, gold), gold, normalizer=normalizer, **norm)
    if config.mle_weight == 0:
        mle = torch.zeros((), dtype=torch.float64)  # no MLE term (the paper's generated-data baselines)
    loss = config.kd_weight * kd + config.mle_weight * mle
    return loss, kd, mle


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def _rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _check(models, config, batch, plan, parts, *, kd_targets, separate_mle_pass, **norms):
    student = models[0]
    grads = _grads(student)
    student.zero_grad()
    loss, kd, mle = reference(models, config, batch, plan.kd_batch, kd_targets=kd_targets,
                              separate_mle_pass=separate_mle_pass, **norms)
    loss.backward()
    expected = _grads(student)
    student.zero_grad()
    loss, kd, mle = loss.detach(), kd.detach(), mle.detach()
    assert float(parts.kd) == pytest.approx(float(kd), rel=1e-5, abs=1e-7), "kd"
    assert float(parts.mle) == pytest.approx(float(mle), rel=1e-5, abs=1e-7), "mle"
    assert float(parts.loss) == pytest.approx(float(loss), rel=1e-5), "loss"
    assert expected.norm() > 0 and _rel(grads, expected) < 1e-4, "gradient"
    return float(kd), float(mle)


# ---- gold-data methods and KID ----------------------------------------------------------------------------------

GOLD_CASES = {
    "sft": dict(method="sft"),
    "fkd": dict(method="fkd"),
    "rkd": dict(method="rkd", mle_weight=0.7, kd_weight=1.3),
    "rkd_jsd_T2": dict(method="rkd", divergence="jsd", beta=0.3, temperature=2.0),
    "fkd_tvd_sequence": dict(method="fkd", divergence="tvd", normalization="sequence"),
    "kid_random": dict(method="kid", alpha=0.5),
    "kid_uniform_gold_mle": dict(method="kid", alpha=0.5, strategy="uniform", mle_input="gold"),
    "kid_hard": dict(method="kid", alpha=0.5, strategy="hard"),
    "kid_easy_sampled": dict(method="kid", alpha=0.5, strategy="easy", kid_predictions="sample",
                             sampling_temperature=0.7),
    "kid_masking_only": dict(method="kid", alpha=0.5, masking_only=True),
    "kid_mask_eos_T2_sequence": dict(method="kid", alpha=0.6, strategy="uniform", mask_eos=True, temperature=2.0,
                                     normalization="sequence"),
    "kid_gold_mle_sequence": dict(method="kid", alpha=0.5, mle_input="gold", normalization="sequence"),
}


@pytest.mark.parametrize("name", list(GOLD_CASES))
def test_gold_data_objectives_match_float64_logits(models, batch, name):
    config = MethodConfig(**GOLD_CASES[name])
    ctx = _ctx(models, config)
    gold = batch["answer_labels"]
    # step-wide normalisers larger than this micro-batch's counts, as under gradient accumulation
    norms = dict(normalizer=int((gold != IGNORE_INDEX).sum()) + 5, num_sequences=gold.shape[0] + 3)
    plan = plan_objective(ctx, batch, norms["normalizer"], num_sequences=norms["num_sequences"])
    parts = run_terms(plan.terms, backward=torch.Tensor.backward)
    two_pass = config.method == "kid" and config.mle_input == "gold"
    assert len(plan.terms) == (2 if two_pass else 1)
    if config.method == "kid":
        imperfect = plan.imperfect
        assert imperfect.chosen.any()
        hat = plan.kd_batch["input_ids"]
        # KID's y-hat, recomputed: only chosen slots changed; masking only keeps the mask; argmax predictions are
        # the argmax at t - 1 of the masked sequence's full logits.
        positions = torch.zeros_like(hat, dtype=torch.bool)
        for b in range(hat.shape[0]):
            positions[b, batch["answer_index"][b, imperfect.chosen[b]]] = True
        assert torch.equal(hat[~positions], batch["input_ids"][~positions])
        if config.masking_only:
            assert (hat[positions] == MASK).all()
        elif config.kid_predictions == "argmax":
            masked = torch.where(positions, torch.full_like(hat, MASK), batch["input_ids"])
            with torch.no_grad():
                logits = answer_logits(models[0], dict(batch, input_ids=masked))
            best = logits.argmax(-1)
            assert torch.equal(imperfect.answer_tokens[imperfect.chosen], best[imperfect.chosen])
        if not config.mask_eos:
            assert not (imperfect.chosen & (gold == EOS)).any()
    kd, mle = _check(models, config, batch, plan, parts, kd_targets=gold, separate_mle_pass=two_pass, **norms)
    assert mle > 0 and (kd > 0) == (config.method != "sft")


# ---- generating methods -----------------------------------------------------------------------------------------

GENERATED_CASES = {
    "gkd_jsd": dict(method="gkd", gkd_lambda=1.0),
    "gkd_paper": dict(method="gkd", preset="paper"),  # lambda 1, reverse KL, no MLE
    "gkd_rkl_sequence": dict(method="gkd", gkd_lambda=1.0, gkd_divergence="rkl", normalization="sequence"),
    "imitkd_mixed_topk": dict(method="imitkd", imitkd_gold_probability=0.5, top_k=3),
    "fdistill_online_topp": dict(method="fdistill", top_p=0.8),
    "fdistill_sequence": dict(method="fdistill", fdistill_teacher_probability=1.0, normalization="sequence"),
}


def _nucleus_ok(logits_row: torch.Tensor, token: int, top_k: int, top_p: float) -> bool:
    """Whether ``token`` survives top-k and top-p truncation of ``logits_row`` (float64)."""
    order = logits_row.argsort(descending=True)
    rank = int((order == token).nonzero())
    if top_k and rank >= top_k:
        return False
    probs = logits_row.softmax(-1)[order]
    before = float(probs[:rank].sum())
    return before < top_p + 1e-9


@pytest.mark.parametrize("name", list(GENERATED_CASES))
def test_generating_objectives_match_float64_logits(models, batch, name):
    config = MethodConfig(max_new_tokens=6, **GENERATED_CASES[name])
    gold = batch["answer_labels"]
    torch.manual_seed(5)  # generate samples from the global generator
    rollout = rollout_step(_ctx(models, config), [batch], seed=11)
    kd_plan = rollout.plans[0]
    sources = kd_plan.sources
    if name == "imitkd_mixed_topk":
        assert GOLD in sources and STUDENT in sources, sources
    if name == "fdistill_online_topp":
        assert TEACHER in sources and STUDENT in sources, sources
    kd_batch = kd_plan.kd_batch
    assert kd_batch is not None
    kd_labels = kd_batch["answer_labels"]
    # the KD batch: the gold prompts; gold rows keep the gold answer; generated rows end at their first EOS
    assert torch.equal(kd_batch["input_ids"][:, :batch["prompt_input_ids"].shape[1]], batch["prompt_input_ids"])
    for r, source in enumerate(sources):
        answer = kd_labels[r][kd_labels[r] != IGNORE_INDEX]
        if source == GOLD:
            assert torch.equal(answer, gold[r][gold[r] != IGNORE_INDEX])
        else:
            assert 1 <= answer.numel() <= config.max_new_tokens
            assert (answer[:-1] != EOS).all()
    # every generated student token survives the configured top-k / top-p (from the student's full logits)
    with torch.no_grad():
        student_logits = answer_logits(models[0], kd_batch)
    for r, source in enumerate(sources):
        if source != STUDENT:
            continue
        for j in (kd_labels[r] != IGNORE_INDEX).nonzero().flatten().tolist():
            assert _nucleus_ok(student_logits[r, j], int(kd_labels[r, j]), config.top_k, config.top_p), (r, j)
    assert kd_plan.generated_tokens == sum(int((kd_labels[r] != IGNORE_INDEX).sum())
                                           for r, s in enumerate(sources) if s != GOLD)

    normalizer = int((gold != IGNORE_INDEX).sum()) + 4
    kd_normalizer = int((kd_labels != IGNORE_INDEX).sum()) + 2
    num_sequences = gold.shape[0] + 1
    ctx = _ctx(models, config)
    plan = plan_objective(ctx, batch, normalizer, kd_normalizer=kd_normalizer, num_sequences=num_sequences,
                          kd_plan=kd_plan)
    assert plan.kd_batch is kd_batch and len(plan.terms) == (2 if config.mle_weight > 0 else 1)
    parts = run_terms(plan.terms, backward=torch.Tensor.backward)
    kd, mle = _check(models, config, batch, plan, parts, kd_targets=kd_labels, separate_mle_pass=True,
                     normalizer=normalizer, kd_normalizer=kd_normalizer, num_sequences=num_sequences)
    assert kd > 0
    if config.mle_weight == 0:
        assert mle == 0 and float(parts.mle) == 0


def test_a_gold_micro_batch_of_a_generating_step_keeps_both_normalisers(models, batch):
    # GKD's gold micro-batch in a step whose other micro-batches were generated: one fused pass, the KD term over
    # the step's KD tokens, the MLE term over its gold tokens.
    config = MethodConfig(method="gkd", gkd_lambda=0.0, max_new_tokens=6)
    gold = batch["answer_labels"]
    kd_plan = rollout_step(_ctx(models, config), [batch], seed=1).plans[0]
    assert kd_plan.kd_batch is None and set(kd_plan.sources) == {GOLD}
    normalizer, kd_normalizer = int((gold != IGNORE_INDEX).sum()) + 3, int((gold != IGNORE_INDEX).sum()) + 9
    plan = plan_objective(_ctx(models, config), batch, normalizer, kd_normalizer=kd_normalizer, kd_plan=kd_plan)
    assert len(plan.terms) == 1 and plan.kd_batch is batch
    parts = run_terms(plan.terms, backward=torch.Tensor.backward)
    _check(models, config, batch, plan, parts, kd_targets=gold, separate_mle_pass=False, normalizer=normalizer,
           kd_normalizer=kd_normalizer)


def test_generated_kd_term_defaults_to_its_own_token_count(models, batch):
    # Without a step-wide kd_normalizer the KD term over generated answers is divided by their count, not by the
    # gold token count (the KD:MLE ratio must not drift with the generation length).
    config = MethodConfig(method="gkd", gkd_lambda=1.0, max_new_tokens=8)
    torch.manual_seed(2)
    ctx = _ctx(models, config)
    plan = plan_objective(ctx, batch)
    parts = run_terms(plan.terms, backward=torch.Tensor.backward)
    kd_labels = plan.kd_batch["answer_labels"]
    assert int((kd_labels != IGNORE_INDEX).sum()) != int((batch["answer_labels"] != IGNORE_INDEX).sum())
    _check(models, config, batch, plan, parts, kd_targets=kd_labels, separate_mle_pass=True)


# ---- one graph at a time ----------------------------------------------------------------------------------------

class SavedTensorMeter:
    """Bytes of tensors saved for backward that are alive, and their peak, via saved-tensor hooks."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def _pack(self, tensor):
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        holder = [tensor]

        def release(meter=self, n=size):
            meter.live -= n

        box = _Box(holder)
        weakref.finalize(box, release)
        return box

    @staticmethod
    def _unpack(box):
        return box.items[0]

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Box:
    def __init__(self, items):
        self.items = items


TWO_PASS = {
    "kid_gold_mle": dict(method="kid", alpha=0.5, mle_input="gold"),
    "gkd": dict(method="gkd", gkd_lambda=1.0, max_new_tokens=6),
    "imitkd": dict(method="imitkd", imitkd_gold_probability=0.5, max_new_tokens=6),
    "fdistill": dict(method="fdistill", max_new_tokens=6),
}


@pytest.mark.parametrize("name", list(TWO_PASS))
def test_one_graph_at_a_time_same_gradient_half_the_saved_activations(models, batch, name):
    config = MethodConfig(**TWO_PASS[name])
    student = models[0]
    torch.manual_seed(7)
    kd_plan = (rollout_step(_ctx(models, config), [batch], seed=3).plans[0] if config.generates else None)
    normalizer = int((batch["answer_labels"] != IGNORE_INDEX).sum())
    results = {}
    for mode in ("single_graph", "one_at_a_time"):
        student.zero_grad()
        with SavedTensorMeter() as meter:
            if mode == "single_graph":
                parts = compute_objective(_ctx(models, config), batch, normalizer, kd_plan=kd_plan)
                before_backward = meter.live
                parts.loss.backward()
            else:
                parts = compute_objective(_ctx(models, config), batch, normalizer, kd_plan=kd_plan,
                                          backward=torch.Tensor.backward)
                assert not parts.loss.requires_grad
        results[mode] = (_grads(student).clone(), float(parts.loss.detach()), float(parts.kd), float(parts.mle),
                         meter.peak)
        if mode == "single_graph":
            assert before_backward == meter.peak  # both graphs alive at once before the backward
    student.zero_grad()
    single, split = results["single_graph"], results["one_at_a_time"]
    assert _rel(split[0], single[0]) < 1e-6
    assert split[1:4] == pytest.approx(single[1:4], rel=1e-6)
    # The two graphs are of similar size: one at a time peaks near the larger one, well under both together.
    assert split[4] < 0.75 * single[4], (split[4], single[4])
