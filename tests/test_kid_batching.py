"""kid.batching (collation, left-padded prompt + answer batches, answer-token writes) and
kid.models.answer_hidden_states (the hidden rows that predict the answer tokens)."""
from __future__ import annotations

import pytest
import torch

from kid.batching import (
    IGNORE_INDEX,
    DistillCollator,
    left_padded,
    positions_from_mask,
    prompt_plus_answer,
    with_answer_tokens,
)
from kid.models import answer_hidden_states, lm_head_of
from tests.kid_tiny import EOS, PAD, tiny_examples, tiny_model


def _split(example):
    """(prompt, answer) token lists of one feature."""
    start = next(i for i, y in enumerate(example["labels"]) if y != IGNORE_INDEX)
    return example["input_ids"][:start], example["input_ids"][start:]


@pytest.fixture
def examples():
    # Varied prompt and answer lengths: every padding path is exercised.
    rows = tiny_examples(5, seed=3, prompt_len=(2, 9), answer_len=(1, 7))
    lengths = {(len(_split(r)[0]), len(_split(r)[1])) for r in rows}
    assert len({p for p, _ in lengths}) > 1 and len({a for _, a in lengths}) > 1
    return rows


# ---- DistillCollator -------------------------------------------------------------------------------------------

def test_collator_right_pads_and_indexes_the_answer(examples):
    batch = DistillCollator(PAD)(examples)
    width = max(len(r["input_ids"]) for r in examples)
    answer_width = max(len(_split(r)[1]) for r in examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "answer_index", "answer_labels"}
    assert batch["input_ids"].shape == batch["labels"].shape == (len(examples), width)
    assert batch["answer_index"].shape == batch["answer_labels"].shape == (len(examples), answer_width)
    for b, row in enumerate(examples):
        prompt, answer = _split(row)
        n, p, a = len(row["input_ids"]), len(prompt), len(answer)
        # right padding: tokens then pad, attention 1 then 0
        assert batch["input_ids"][b, :n].tolist() == row["input_ids"]
        assert (batch["input_ids"][b, n:] == PAD).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (width - n)
        # labels: -100 off the answer, the answer tokens on it
        assert batch["labels"][b].tolist() == [IGNORE_INDEX] * p + answer + [IGNORE_INDEX] * (width - n)
        # answer_index points at the answer tokens; the labels are those tokens
        index = batch["answer_index"][b]
        assert index[:a].tolist() == list(range(p, n))
        assert batch["input_ids"][b, index[:a]].tolist() == answer
        assert batch["answer_labels"][b, :a].tolist() == answer
        # padded slots: label -100, an in-range index of a real token of the same row
        assert (batch["answer_labels"][b, a:] == IGNORE_INDEX).all()
        assert ((index[a:] >= p) & (index[a:] < n)).all()
    assert batch["answer_index"].dtype == batch["answer_labels"].dtype == torch.long
    # the Trainer's token count (labels != -100) equals the number of loss targets
    assert (batch["labels"] != IGNORE_INDEX).sum() == (batch["answer_labels"] != IGNORE_INDEX).sum()


def test_collator_with_prompts_left_pads_the_prompts(examples):
    batch = DistillCollator(PAD, with_prompts=True)(examples)
    prompts = [_split(r)[0] for r in examples]
    width = max(len(p) for p in prompts)
    assert batch["prompt_input_ids"].shape == batch["prompt_attention_mask"].shape == (len(examples), width)
    for b, prompt in enumerate(prompts):
        ids, mask = batch["prompt_input_ids"][b], batch["prompt_attention_mask"][b]
        assert ids[mask.bool()].tolist() == prompt
        assert mask.tolist() == [0] * (width - len(prompt)) + [1] * len(prompt)
        assert (ids[: width - len(prompt)] == PAD).all()


def test_collator_pad_to_multiple_of(examples):
    batch = DistillCollator(PAD, with_prompts=True, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["answer_index"].shape[1] % 8 == 0
    assert batch["prompt_input_ids"].shape[1] % 8 == 0
    assert (batch["answer_index"] < batch["input_ids"].shape[1]).all()
    plain = DistillCollator(PAD)(examples)
    a = plain["answer_labels"].shape[1]
    assert torch.equal(batch["answer_labels"][:, :a], plain["answer_labels"])
    assert (batch["answer_labels"][:, a:] == IGNORE_INDEX).all()


def test_collator_errors():
    collate = DistillCollator(PAD)
    with pytest.raises(ValueError, match="empty list"):
        collate([])
    with pytest.raises(ValueError, match="no target token"):
        collate([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}])
    with pytest.raises(ValueError, match="at least one prompt token"):
        collate([{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}])
    with pytest.raises(ValueError, match="input_ids has 3 tokens but labels has 2"):
        collate([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6]}])
    with pytest.raises(ValueError, match="pad_token_id is None"):
        DistillCollator(None)


# ---- left padding, prompt + answer, token writes, row mixing ----------------------------------------------------

def test_left_padded_and_positions():
    out = left_padded([[5, 6], [7], [8, 9, 10]], PAD, prefix="p_")
    assert out["p_input_ids"].tolist() == [[0, 5, 6], [0, 0, 7], [8, 9, 10]]
    assert out["p_attention_mask"].tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]]
    wide = left_padded([[5, 6], [7]], PAD, multiple=4)
    assert wide["input_ids"].tolist() == [[0, 0, 5, 6], [0, 0, 0, 7]]
    assert positions_from_mask(out["p_attention_mask"]).tolist() == [[0, 0, 1], [0, 0, 0], [0, 1, 2]]


def test_prompt_plus_answer_layout():
    prompts = left_padded([[5, 6, 7], [8], [9, 10]], PAD)
    # answers: row 0 ends with EOS then padded slots (-100), row 1 full width, row 2 a lone EOS
    answers = torch.tensor([[11, EOS, IGNORE_INDEX, IGNORE_INDEX], [12, 13, 14, EOS],
                            [EOS, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]])
    batch = prompt_plus_answer(prompts["input_ids"], prompts["attention_mask"], answers, PAD)
    width = 3
    assert batch["answer_index"].tolist() == [[3, 4, 5, 6]] * 3  # every answer starts at column P
    assert torch.equal(batch["answer_labels"], answers)
    ids, mask, pos = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    assert ids.tolist() == [[5, 6, 7, 11, EOS, PAD, PAD], [0, 0, 8, 12, 13, 14, EOS], [0, 9, 10, EOS, PAD, PAD, PAD]]
    # attention: zero on the left pads and on every slot after EOS
    assert mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0, 0]]
    # position ids restart at 0 on each row's first real token and count attended tokens
    for b in range(3):
        real = mask[b].bool()
        assert pos[b, real].tolist() == list(range(int(real.sum())))
    assert (batch["input_ids"].gather(1, batch["answer_index"])[answers != IGNORE_INDEX]
            == answers[answers != IGNORE_INDEX]).all()
    assert batch["answer_index"].shape[1] + width == ids.shape[1]
    with pytest.raises(ValueError, match="do not describe the same batch"):
        prompt_plus_answer(prompts["input_ids"], prompts["attention_mask"], answers[:2], PAD)


def test_with_answer_tokens_changes_only_answer_positions(examples):
    batch = DistillCollator(PAD)(examples)
    ids, index, labels = batch["input_ids"], batch["answer_index"], batch["answer_labels"]
    real = labels != IGNORE_INDEX
    new_tokens = torch.where(real, torch.full_like(labels, 2), torch.full_like(labels, 33))
    out = with_answer_tokens(ids, index, new_tokens, labels)
    expected = ids.clone()
    for b in range(ids.shape[0]):
        expected[b, index[b, real[b]]] = 2
    assert torch.equal(out, expected)  # padded slots (token 33) wrote nothing; every real slot, the last included
    assert torch.equal(ids, batch["input_ids"])  # not in place
    # identity write: same tensor
    assert torch.equal(with_answer_tokens(ids, index, ids.gather(1, index), labels), ids)


def test_with_answer_tokens_last_real_slot_wins_over_padded_slots():
    # A padded slot points at the row's last token; a real slot changing that token (a truncated answer, or a
    # masked EOS) must win.
    batch = DistillCollator(PAD)([{"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]},
                                  {"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX, 6, 7, 8, 9]}])
    assert batch["answer_index"][0].tolist() == [2, 3, 3, 3]
    tokens = torch.tensor([[40, 41, 50, 51], [42, 43, 44, 45]])
    out = with_answer_tokens(batch["input_ids"], batch["answer_index"], tokens, batch["answer_labels"])
    assert out.tolist() == [[5, 6, 40, 41, PAD], [5, 42, 43, 44, 45]]


# ---- answer_hidden_states ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    return tiny_model(0, layers=2).eval()


def test_answer_hidden_states_right_padded(model, examples):
    batch = DistillCollator(PAD)(examples)
    with torch.no_grad():
        rows = answer_hidden_states(model, batch)
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    b, a = batch["answer_index"].shape
    assert rows.shape == (b, a, hidden.shape[-1])
    expected = hidden[torch.arange(b)[:, None], batch["answer_index"] - 1]
    real = batch["answer_labels"] != IGNORE_INDEX
    assert torch.allclose(rows[real], expected[real], atol=1e-6, rtol=0)
    # the padded slots gather a real row too (no garbage, no NaN)
    assert torch.isfinite(rows).all()


def _gpt2():
    """A tiny GPT-2: absolute position embeddings, so wrong position ids show in the hidden states (Qwen2's RoPE
    is relative: a constant shift of the positions of a left-padded row changes nothing)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=EOS,
                        eos_token_id=EOS, pad_token_id=PAD)
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_answer_hidden_states_left_padded_match_unpadded(arch, model, examples):
    lm = model if arch == "qwen2" else _gpt2()
    decoder = lm.model if arch == "qwen2" else lm.transformer
    collated = DistillCollator(PAD, with_prompts=True)(examples)
    batch = prompt_plus_answer(collated["prompt_input_ids"], collated["prompt_attention_mask"],
                               collated["answer_labels"], PAD)
    assert (batch["attention_mask"][:, 0] == 0).any()  # some left padding
    with torch.no_grad():
        rows = answer_hidden_states(lm, batch)
        no_positions = answer_hidden_states(lm, {k: v for k, v in batch.items() if k != "position_ids"})
        wrong = 0
        for b, row in enumerate(examples):
            prompt, answer = _split(row)
            alone = decoder(input_ids=torch.tensor([row["input_ids"]])).last_hidden_state[0]
            expected = alone[len(prompt) - 1: len(row["input_ids"]) - 1]
            torch.testing.assert_close(rows[b, : len(answer)], expected, atol=1e-5, rtol=1e-5)
            wrong += not torch.allclose(no_positions[b, : len(answer)], expected, atol=1e-4)
    if arch == "gpt2":
        # the position ids are what makes the left-padded rows right: the check above is not vacuous
        assert wrong > 0


def test_answer_hidden_states_input_ids_override_and_dtype(model, examples):
    batch = DistillCollator(PAD)(examples)
    other = batch["input_ids"].clone()
    other[:, 0] = 7
    with torch.no_grad():
        via_override = answer_hidden_states(model, batch, input_ids=other, dtype=torch.float64)
        direct = answer_hidden_states(model, dict(batch, input_ids=other))
    assert via_override.dtype == torch.float64
    torch.testing.assert_close(via_override, direct.double())


def test_answer_hidden_states_lm_head_logits_match_model_logits(model, examples):
    batch = DistillCollator(PAD)(examples)
    head = lm_head_of(model)
    with torch.no_grad():
        rows = answer_hidden_states(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    b = batch["input_ids"].shape[0]
    expected = logits[torch.arange(b)[:, None], batch["answer_index"] - 1]
    ours = torch.nn.functional.linear(rows, head.weight, head.bias)
    real = batch["answer_labels"] != IGNORE_INDEX
    torch.testing.assert_close(ours[real], expected[real], atol=1e-5, rtol=1e-5)


def test_answer_hidden_states_gradients_flow_through_peft(examples):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(tiny_model(0), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                          lora_dropout=0.0, task_type="CAUSAL_LM"))
    # LoRA B starts at zero: perturb it so that A's gradient is non-zero too
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = DistillCollator(PAD)(examples)
    head = lm_head_of(peft_model)
    assert not head.weight.requires_grad  # the lm_head stays frozen under LoRA
    rows = answer_hidden_states(peft_model, batch)
    logits = torch.nn.functional.linear(rows, head.weight, head.bias)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["answer_labels"].flatten(),
                                             ignore_index=IGNORE_INDEX)
    loss.backward()
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable.values())
    assert sum(p.grad.abs().sum() for p in trainable.values()) > 0
    assert all(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_A" in n)


def test_default_mask_token_never_reuses_eos_bos_or_pad():
    # Qwen's tokenizer: unk, pad and EOS are all <|endoftext|>; the mask must be another special token.
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from kid.models import default_mask_token, token_id

    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "a": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    qwen_like = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>",
                                                                                              "<|im_end|>"])
    assert default_mask_token(qwen_like) == "<|im_start|>" and token_id(qwen_like, "<|im_start|>") == 1
    only_eos = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>",
                                       unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    # No spare special token at all: a clear error rather than masking with EOS.
    assert set(only_eos.all_special_tokens) == {"<|endoftext|>"}
    with pytest.raises(ValueError, match="mask_token="):
        default_mask_token(only_eos)
