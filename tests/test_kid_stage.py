"""KID's imperfect-data stage (kid.kid_stage.make_imperfect), checked against an independent computation from the
full logits of the Hugging Face model: which slots are chosen, what is written there, and where the predictions are
read (position t - 1 of the *masked* sequence)."""
from __future__ import annotations

import math

import pytest
import torch

from kid.batching import IGNORE_INDEX, DistillCollator, with_answer_tokens
from kid.kid_stage import make_imperfect, sample_next_tokens, selectable_positions
from kid.models import lm_head_of
from tests.kid_tiny import EOS, MASK, PAD, VOCAB, tiny_examples, tiny_model


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")


@pytest.fixture(scope="module")
def student():
    # A larger initialisation than the default: peaky, context-dependent predictions and varied entropies, so that
    # masking a slot changes the later predictions and the entropy ranking has no near-ties.
    return tiny_model(0, layers=2, init_std=0.3).eval()


def _batch(seed=2, n=6, eos=True, answer_len=(3, 9)):
    return DistillCollator(PAD)(tiny_examples(n, seed=seed, prompt_len=(3, 8), answer_len=answer_len, eos=eos))


def _run(student, batch, alpha, strategy, *, seed=0, **kwargs):
    return make_imperfect(student, batch, lm_head_of(student), alpha=alpha, strategy=strategy, mask_token_id=MASK,
                          eos_token_id=EOS, generator=torch.Generator().manual_seed(seed), **kwargs)


def _positions(batch, slots):
    """bool [B, T]: the sequence positions of the answer slots ``slots`` (bool [B, A])."""
    out = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for b in range(out.shape[0]):
        out[b, batch["answer_index"][b, slots[b]]] = True
    return out


def _logits(student, ids, batch):
    with torch.no_grad():
        return student(input_ids=ids, attention_mask=batch["attention_mask"]).logits


def _expected_k(alpha, n):
    return math.floor(alpha * n + 0.5)


def _assert_argmax(predicted, logits_rows):
    """predicted [N] is the argmax of logits_rows [N, V] (a near-tie within float noise may go either way)."""
    best = logits_rows.max(dim=-1).values
    got = logits_rows.gather(1, predicted[:, None]).squeeze(1)
    assert torch.all(best - got <= 1e-5), (predicted, logits_rows.argmax(-1))


def _check_untouched_outside_chosen(batch, out):
    chosen_pos = _positions(batch, out.chosen)
    assert torch.equal(out.input_ids[~chosen_pos], batch["input_ids"][~chosen_pos])
    # answer_tokens is y-hat at the slots, and the sequence holds it
    real = batch["answer_labels"] != IGNORE_INDEX
    assert torch.equal(out.input_ids.gather(1, batch["answer_index"])[real], out.answer_tokens[real])
    assert torch.equal(out.answer_tokens[real & ~out.chosen], batch["answer_labels"][real & ~out.chosen])


@pytest.mark.parametrize("strategy", ["random", "uniform", "hard", "easy"])
@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_chosen_slots_counts_and_untouched_positions(student, strategy, alpha):
    batch = _batch()
    out = _run(student, batch, alpha, strategy)
    gold = batch["answer_labels"]
    selectable = (gold != IGNORE_INDEX) & (gold != EOS)
    assert out.chosen.dtype == torch.bool and out.chosen.shape == gold.shape
    # only selectable slots: never padding slots, never EOS
    assert not (out.chosen & ~selectable).any()
    for b in range(gold.shape[0]):
        assert int(out.chosen[b].sum()) == _expected_k(alpha, int(selectable[b].sum())), b
    # the prompt, the padding, EOS and every unchosen answer token are exactly the gold ones
    _check_untouched_outside_chosen(batch, out)
    assert torch.equal(selectable_positions(gold, EOS), selectable)


def test_round_half_up_rule(student):
    # rows with 1..7 selectable tokens, alpha 0.5: k = floor(n/2 + 0.5), i.e. 1, 1, 2, 2, 3, 3, 4
    rows = [{"input_ids": [5, 6] + list(range(10, 10 + n)) + [EOS], "labels": [IGNORE_INDEX] * 2
             + list(range(10, 10 + n)) + [EOS]} for n in range(1, 8)]
    batch = DistillCollator(PAD)(rows)
    for strategy in ("random", "uniform"):
        out = _run(student, batch, 0.5, strategy, masking_only=True)
        assert out.chosen.sum(1).tolist() == [1, 1, 2, 2, 3, 3, 4]


@pytest.mark.parametrize("strategy", ["random", "uniform", "hard", "easy"])
def test_predictions_read_position_t_minus_1_of_the_masked_sequence(student, strategy):
    batch = _batch()
    out = _run(student, batch, 0.5, strategy)
    assert out.chosen.any()
    # Independently: the masked sequence, then the full logits of the model.
    masked = batch["input_ids"].clone()
    chosen_pos = _positions(batch, out.chosen)
    masked[chosen_pos] = MASK
    masked_logits = _logits(student, masked, batch)
    gold_logits = _logits(student, batch["input_ids"], batch)
    differs_from_gold_context = differs_from_t = 0
    for b in range(masked.shape[0]):
        slots = out.chosen[b].nonzero().flatten()
        t = batch["answer_index"][b, slots]
        predicted = out.answer_tokens[b, slots]
        _assert_argmax(predicted, masked_logits[b, t - 1])
        assert torch.equal(out.input_ids[b, t], predicted)
        differs_from_gold_context += int((predicted != gold_logits[b, t - 1].argmax(-1)).sum())
        differs_from_t += int((predicted != masked_logits[b, t].argmax(-1)).sum())
    # the check above tells the masked from the gold context and t - 1 from t
    assert differs_from_gold_context > 0 and differs_from_t > 0


@pytest.mark.parametrize("strategy", ["hard", "easy"])
def test_hard_and_easy_rank_by_entropy_at_t_minus_1(student, strategy):
    batch = _batch(seed=5)
    out = _run(student, batch, 0.4, strategy)
    logits = _logits(student, batch["input_ids"], batch).double()
    gold = batch["answer_labels"]
    selectable = (gold != IGNORE_INDEX) & (gold != EOS)
    for b in range(gold.shape[0]):
        slots = selectable[b].nonzero().flatten()
        rows = logits[b, batch["answer_index"][b, slots] - 1]
        entropy = -(rows.softmax(-1) * rows.log_softmax(-1)).sum(-1)
        k = _expected_k(0.4, len(slots))
        order = entropy.argsort(descending=(strategy == "hard"))
        expected = set(slots[order[:k]].tolist())
        assert set(out.chosen[b].nonzero().flatten().tolist()) == expected, (b, entropy)
    other = _run(student, batch, 0.4, "easy" if strategy == "hard" else "hard")
    assert not torch.equal(other.chosen, out.chosen)


def test_alpha_zero_changes_nothing_and_alpha_one_takes_every_selectable_slot(student):
    batch = _batch()
    gold = batch["answer_labels"]
    for strategy in ("random", "uniform", "hard", "easy"):
        none = _run(student, batch, 0.0, strategy)
        assert not none.chosen.any()
        assert torch.equal(none.input_ids, batch["input_ids"])
        every = _run(student, batch, 1.0, strategy)
        assert torch.equal(every.chosen, (gold != IGNORE_INDEX) & (gold != EOS))
        _check_untouched_outside_chosen(batch, every)


def test_mask_eos_and_truncated_answers(student):
    # mask_eos: EOS is selectable too; with alpha 1 every real slot is replaced, EOS included, and the sequence
    # holds the predictions (a padded slot points at the row's last token: it must not undo the write).
    batch = _batch()
    out = _run(student, batch, 1.0, "random", mask_eos=True)
    real = batch["answer_labels"] != IGNORE_INDEX
    assert torch.equal(out.chosen, real)
    _check_untouched_outside_chosen(batch, out)
    # a truncated answer (no EOS): its last token is selectable
    cut = _batch(eos=False)
    out = _run(student, cut, 1.0, "uniform")
    assert torch.equal(out.chosen, cut["answer_labels"] != IGNORE_INDEX)
    _check_untouched_outside_chosen(cut, out)


def test_masking_only_leaves_mask_tokens(student):
    batch = _batch()
    out = _run(student, batch, 0.5, "random", masking_only=True)
    assert out.chosen.any()
    assert (out.answer_tokens[out.chosen] == MASK).all()
    assert (out.input_ids[_positions(batch, out.chosen)] == MASK).all()
    _check_untouched_outside_chosen(batch, out)
    # the same seed chooses the same slots with and without predictions
    assert torch.equal(_run(student, batch, 0.5, "random").chosen, out.chosen)


def test_changed_marks_the_chosen_slots_whose_token_changed(student):
    # A student that already fits y at some chosen slots: its predictions written into the gold answer there.  The
    # masked sequence is the same (those slots hold the mask token) and "random" selection reads only which slots
    # are selectable, so the chosen slots and the predictions are the same; exactly those slots no longer change.
    batch = _batch(seed=5, n=8)
    first = _run(student, batch, 0.6, "random", seed=4)
    gold = batch["answer_labels"]
    assert first.changed.dtype == torch.bool and first.changed.shape == first.chosen.shape
    assert torch.equal(first.changed, first.chosen & (first.answer_tokens != gold))
    fit = first.changed & (first.answer_tokens != EOS)
    fit &= torch.rand(fit.shape, generator=torch.Generator().manual_seed(1)) < 0.5
    assert fit.any() and (first.changed & ~fit).any()
    fitted_gold = torch.where(fit, first.answer_tokens, gold)
    fitted = dict(batch, answer_labels=fitted_gold, input_ids=with_answer_tokens(
        batch["input_ids"], batch["answer_index"], fitted_gold, gold))
    second = _run(student, fitted, 0.6, "random", seed=4)
    assert torch.equal(second.chosen, first.chosen) and torch.equal(second.answer_tokens, first.answer_tokens)
    assert torch.equal(second.changed, first.changed & ~fit)
    assert int(second.changed.sum()) < int(second.chosen.sum())
    # masking only: every chosen slot holds the mask token, which no gold token is here
    masked = _run(student, batch, 0.6, "random", seed=4, masking_only=True)
    assert (gold != MASK).all() and torch.equal(masked.changed, masked.chosen)


def test_random_selection_is_reproducible_with_the_generator(student):
    batch = _batch()
    first = _run(student, batch, 0.5, "random", seed=11, masking_only=True)
    again = _run(student, batch, 0.5, "random", seed=11, masking_only=True)
    assert torch.equal(first.chosen, again.chosen)
    others = [_run(student, batch, 0.5, "random", seed=s, masking_only=True).chosen for s in range(12, 16)]
    assert any(not torch.equal(first.chosen, o) for o in others)


def test_sampled_predictions(student):
    batch = _batch()
    out = _run(student, batch, 0.6, "uniform", predictions="sample", sampling_temperature=1.0, seed=3)
    again = _run(student, batch, 0.6, "uniform", predictions="sample", sampling_temperature=1.0, seed=3)
    assert torch.equal(out.input_ids, again.input_ids)
    chosen = out.answer_tokens[out.chosen]
    assert chosen.dtype == torch.long and ((chosen >= 0) & (chosen < VOCAB)).all()
    _check_untouched_outside_chosen(batch, out)
    draws = [_run(student, batch, 0.6, "uniform", predictions="sample", seed=s).answer_tokens for s in range(4, 8)]
    assert any(not torch.equal(d, out.answer_tokens) for d in draws)
    with pytest.raises(ValueError, match="predictions must be"):
        _run(student, batch, 0.5, "uniform", predictions="beam")


def test_sample_next_tokens_follows_the_softmax():
    # rows whose logits favour token 3 (p ~ 0.88) and token 5 (p ~ 0.64 at temperature 1, ~0.99 at 0.1)
    weight = torch.eye(8)
    hidden = torch.zeros(2, 8)
    hidden[0, 3] = 4.0
    hidden[1, 5] = 2.0
    from kid.models import LMHead

    g = torch.Generator().manual_seed(0)
    draws = sample_next_tokens(hidden.expand(2000, 2, 8), LMHead(weight, None), generator=g, chunk_bytes=4096)
    assert draws.shape == (2000, 2)
    p = torch.softmax(hidden, -1)
    assert abs((draws[:, 0] == 3).double().mean().item() - p[0, 3].item()) < 0.04
    assert abs((draws[:, 1] == 5).double().mean().item() - p[1, 5].item()) < 0.04
    cold = sample_next_tokens(hidden.expand(500, 2, 8), LMHead(weight, None), temperature=0.1, generator=g)
    assert (cold[:, 1] == 5).double().mean().item() > 0.97


def test_triton_backend_matches_torch(student, monkeypatch):
    """The KID stage through the Triton kernels (the interpreter on CPU: conftest sets TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    batch = _batch(n=3)
    expected = {s: _run(student, batch, 0.5, s) for s in ("hard", "random")}
    monkeypatch.delenv("KIDKERNELS_BACKEND")
    from kidkernels._backend import resolve_backend

    assert resolve_backend(None, batch["input_ids"].device, torch.float32) == "triton"
    for strategy, ref in expected.items():
        out = _run(student, batch, 0.5, strategy)
        assert torch.equal(out.chosen, ref.chosen)
        assert torch.equal(out.input_ids, ref.input_ids)


def test_sampled_predictions_ignore_an_enclosing_bf16_autocast():
    # Under the Trainer's bf16 autocast, x @ W.T would come out in bfloat16 and the Gumbel-max sample would be
    # taken on rounded logits.  The samples must be those of the float32 logits, bit for bit.
    from kid.models import LMHead

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3000, 16, generator=g)
    weight = torch.randn(40, 16, generator=g) * 0.6
    head = LMHead(weight, torch.randn(40, generator=g))
    plain = sample_next_tokens(hidden, head, generator=torch.Generator().manual_seed(1), chunk_bytes=40960)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (hidden @ weight.t()).dtype == torch.bfloat16  # autocast is on: an unguarded product is bf16
        autocast = sample_next_tokens(hidden, head, generator=torch.Generator().manual_seed(1), chunk_bytes=40960)
    assert torch.equal(plain, autocast)
    # ... and rounding the logits to bf16 does change some samples: the check above can fail.
    rounded = LMHead(weight.bfloat16().float(), head.bias)
    noisy = sample_next_tokens(hidden.bfloat16().float(), rounded, generator=torch.Generator().manual_seed(1),
                               chunk_bytes=40960)
    assert not torch.equal(plain, noisy)
