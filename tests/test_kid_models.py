"""kid.models and kid.rollout on real (tiny) Hugging Face models: the guard against forwards that build logits
although none were asked for, and decoding with the LoRA adapters merged into a copy of the weights."""
from __future__ import annotations

import pytest
import torch

from kid.batching import DistillCollator
from kid.models import LoraOptions, answer_hidden_states, apply_lora, check_no_logits
from kid.rollout import generate_answers, merged_lora_weights
from tests.kid_tiny import EOS, PAD, tiny_examples, tiny_model


def test_a_forward_that_ignores_logits_to_keep_fails_loudly():
    from transformers import Qwen2ForCausalLM

    class IgnoresLogitsToKeep(Qwen2ForCausalLM):
        """What transformers 4.46-4.48 did: accept logits_to_keep and return the full logits."""

        def forward(self, *args, logits_to_keep=None, **kwargs):
            return super().forward(*args, **kwargs)

    good = tiny_model(0)
    bad = IgnoresLogitsToKeep(good.config)
    bad.load_state_dict(good.state_dict())
    batch = DistillCollator(PAD)(tiny_examples(3))
    rows = answer_hidden_states(good, batch)
    assert rows.shape == (*batch["answer_labels"].shape, 32)
    with pytest.raises(RuntimeError, match=r"returned logits for \d+ positions although logits_to_keep asked for "
                                           r"none.*transformers>=4.56"):
        answer_hidden_states(bad, batch)
    # tuple outputs (return_dict=False) and outputs without logits
    check_no_logits(good, (torch.zeros(2, 0, 5),))
    check_no_logits(good, None)
    with pytest.raises(RuntimeError, match="returned logits for 7 positions"):
        check_no_logits(good, (torch.zeros(2, 7, 5),))


def _lora_student(seed=0):
    model = apply_lora(tiny_model(seed, layers=2, init_std=0.2), LoraOptions(r=4, alpha=8, dropout=0.0))
    # LoRA's B starts at zero (the adapter would change nothing): give every adapter a visible effect.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def test_merged_lora_decoding_matches_the_lora_layers_and_changes_nothing():
    model = _lora_student()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    batch = DistillCollator(PAD, with_prompts=True)(tiny_examples(4, seed=2))
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with merged_lora_weights(model) as merged:
            assert merged
            folded = model(input_ids=ids, attention_mask=mask).logits
        base_only = model.get_base_model()
        with model.disable_adapter():
            without_adapters = base_only(input_ids=ids, attention_mask=mask).logits
    # the merged forward is the LoRA forward (and the adapters matter: not the base model's)
    assert (folded - plain).abs().max() < 1e-5
    assert (without_adapters - plain).abs().max() > 1e-2
    options = dict(max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD, do_sample=False)
    greedy = generate_answers(model, ids, mask, **options)
    greedy_merged = generate_answers(model, ids, mask, merge_lora=True, **options)
    assert torch.equal(greedy, greedy_merged)
    # nothing was modified: weights bit for bit, trainable flags, and the LoRA layers' own forward is back
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    assert not any("forward" in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, plain)


def test_merged_lora_is_a_no_op_without_plain_lora_layers():
    full = tiny_model(0)
    with merged_lora_weights(full) as merged:
        assert not merged
    model = _lora_student()
    with merged_lora_weights(model, enabled=False) as merged:
        assert not merged
    assert not any("forward" in vars(m) for m in model.modules())


def test_generate_grouped_sorts_by_length_and_makes_the_calls_asked_for(monkeypatch):
    import kid.rollout

    model = tiny_model(0, layers=2, init_std=0.2)
    rows = tiny_examples(5, seed=4, prompt_len=(2, 10))
    prompts = [torch.tensor(r["input_ids"][:next(i for i, y in enumerate(r["labels"]) if y != -100)]) for r in rows]
    assert len({p.numel() for p in prompts}) > 2
    calls = []
    real = kid.rollout.generate_answers

    def record(model, ids, mask, **kwargs):
        calls.append(mask.sum(1).tolist())
        return real(model, ids, mask, **kwargs)

    monkeypatch.setattr(kid.rollout, "generate_answers", record)
    options = dict(max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD, do_sample=False)
    answers = kid.rollout.generate_grouped(model, prompts, batch_size=2, **options)
    # ceil(5 / 2) calls of prompts of similar length, each padded to its own longest prompt only
    assert len(calls) == 3 and [n for call in calls for n in call] == sorted(p.numel() for p in prompts)
    for prompt, answer in zip(prompts, answers):
        alone = real(model, prompt[None], torch.ones_like(prompt)[None], **options)[0]
        assert torch.equal(answer, alone[alone != -100])  # in input order, cut after EOS
    # a process of a sharded student that must make 4 calls for its 5 prompts (another process needs 4), or one
    # call with no prompt of its own, repeats a prompt and drops the answers
    calls.clear()
    assert len(kid.rollout.generate_grouped(model, prompts, batch_size=2, num_calls=4, **options)) == 5
    assert len(calls) == 4
    calls.clear()
    assert kid.rollout.generate_grouped(model, prompts[:1], num_calls=2, **options)[0] is not None
    assert len(calls) == 2
    with pytest.raises(ValueError, match="need 3 generate calls"):
        kid.rollout.generate_grouped(model, prompts, batch_size=2, num_calls=2, **options)


def _train_mode_passes(model, batch) -> list[torch.Tensor]:
    model.train()
    with torch.no_grad():
        return [model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True).hidden_states[-1] for _ in range(2)]


def test_disable_dropout_turns_off_dropout_modules_lora_and_attention_dropout():
    from kid.models import disable_dropout

    batch = DistillCollator(PAD)(tiny_examples(3, seed=2))
    # the attention dropout transformers' Qwen2 attention reads at forward (a float, no dropout module)
    plain = tiny_model(0)
    attention = [m for m in plain.modules() if isinstance(getattr(m, "attention_dropout", None), float)]
    assert attention
    for m in attention:
        m.attention_dropout = 0.4
    first, second = _train_mode_passes(plain, batch)
    assert not torch.equal(first, second)
    assert disable_dropout(plain) == len(attention)
    first, second = _train_mode_passes(plain, batch)
    assert torch.equal(first, second)
    assert plain.config.attention_dropout == 0.0 and disable_dropout(plain) == 0  # config untouched; idempotent
    # peft's lora_dropout modules (TRL's disable_dropout_in_model turns them off too), and a plain nn.Dropout
    lora = apply_lora(tiny_model(0), LoraOptions(4, 8, 0.5))
    with torch.no_grad():  # LoRA B starts at zero: the adapters (and their dropout) would add nothing
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    dropouts = [m for m in lora.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(m.p == 0.5 for m in dropouts)
    first, second = _train_mode_passes(lora, batch)
    assert not torch.equal(first, second)
    assert disable_dropout(lora) == len(dropouts) and all(m.p == 0 for m in dropouts)
    first, second = _train_mode_passes(lora, batch)
    assert torch.equal(first, second)
    assert lora.peft_config["default"].lora_dropout == 0.5  # the saved adapter keeps its setting
    extra = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.3), torch.nn.Dropout2d(0.2))
    assert disable_dropout(extra) == 2 and extra[1].p == 0 and extra[2].p == 0
