"""kidkernels.integrations.hf on tiny Hugging Face models built from config (no download): the hidden states at the
labelled positions, shifted as HF's causal-LM loss does, without the lm_head multiplying a single row, one call away
from kidkernels' losses: ``fused_linear_cross_entropy`` of them equals the model's own ``loss``, for a Qwen2, a
Gemma 2 (final-logit softcapping 30, read by ``logit_options``) and a Cohere (logit scale 1/16) model."""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("transformers")

import kidkernels  # noqa: E402
from kidkernels.integrations.hf import (  # noqa: E402
    hidden_states_at_labels,
    last_hidden_states,
    lm_head,
    logit_options,
)
from kidkernels.reference import reference_distill_loss_from_logits  # noqa: E402
from tests.helpers import rel_l2  # noqa: E402
from tests.kid_tiny import tiny_model  # noqa: E402

VOCAB = 64


def gemma2(seed=0):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, initializer_range=0.5,
                          final_logit_softcapping=30.0, pad_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return Gemma2ForCausalLM(config).float()


def cohere(seed=0):
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(seed)
    config = CohereConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, logit_scale=0.0625, initializer_range=0.5,
                          pad_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = "eager"
    return CohereForCausalLM(config).float()


def batch(seed=0):
    """Right-padded prompts + answers: labels -100 on the prompt and the padding, as a HF collator makes them."""
    g = torch.Generator().manual_seed(seed)
    lengths, prompts = [9, 6, 8], [4, 3, 5]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    labels = torch.full((3, 9), -100)
    for b, (n, p) in enumerate(zip(lengths, prompts)):
        ids[b, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, :n] = 1
        labels[b, p:n] = ids[b, p:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class LMHeadRows:
    """Records the rows every call of the model's lm_head multiplies."""

    def __init__(self, model):
        self.rows: list[int] = []
        self.handle = lm_head_module(model).register_forward_hook(
            lambda _m, args, _out: self.rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def lm_head_module(model):
    return model.get_output_embeddings()


@pytest.mark.parametrize("make", [lambda: tiny_model(0, init_std=0.5), gemma2, cohere],
                         ids=["qwen2", "gemma2", "cohere"])
def test_labelled_rows_give_the_models_own_loss(make):
    model = make().eval()
    data = batch()
    with LMHeadRows(model) as calls:
        hidden, target = hidden_states_at_labels(model, data)
    assert calls.rows and all(r == 0 for r in calls.rows)  # called through the wrapper, on no row at all
    n_labelled = int((data["labels"][:, 1:] != -100).sum())
    assert hidden.shape == (n_labelled, 32) and target.shape == (n_labelled,) and target.dtype == torch.int64
    # the same rows as the model's own last hidden state, shifted
    with torch.no_grad():
        out = model(**data, output_hidden_states=True)
    keep = data["labels"][:, 1:] != -100
    assert torch.allclose(hidden, out.hidden_states[-1][:, :-1][keep], rtol=0, atol=1e-6)
    assert torch.equal(target, data["labels"][:, 1:][keep])
    # one call away from the fused losses, with the model's logit scale and softcap
    weight, bias = lm_head(model)
    ours = kidkernels.fused_linear_cross_entropy(hidden, weight, target, bias=bias, backend="torch",
                                                 **logit_options(model))
    assert rel_l2(ours, out.loss) <= 1e-5
    # without them a softcapped / scaled model's loss would differ
    if logit_options(model) != {"logit_scale": 1.0, "softcap": None}:
        plain = kidkernels.fused_linear_cross_entropy(hidden, weight, target, bias=bias, backend="torch")
        assert rel_l2(plain, out.loss) > 1e-3


def test_distill_loss_between_hf_models_matches_their_logits():
    """The README's recipe: a Qwen2 student and a Gemma 2 teacher (softcap 30), the fused JSD + MLE from the labelled
    rows equals the float64 loss of the models' own (capped) logits at those positions; gradients reach the
    student's parameters."""
    student, teacher = tiny_model(0, init_std=0.5), gemma2(1).eval()
    data = batch(1)
    h_s, target = hidden_states_at_labels(student, data)
    with torch.no_grad():
        h_t, _ = hidden_states_at_labels(teacher, data)
    (w_s, b_s), (w_t, b_t) = lm_head(student), lm_head(teacher)
    loss = kidkernels.fused_linear_distill_loss(h_s, w_s, h_t, w_t, target, student_bias=b_s, teacher_bias=b_t,
                                                divergence="jsd", beta=0.5, mle_weight=0.5, temperature=1.5,
                                                backend="torch", **logit_options(student, "student"),
                                                **logit_options(teacher, "teacher"))
    keep = data["labels"][:, 1:] != -100
    with torch.no_grad():
        s_logits = student(**data).logits[:, :-1][keep]
        t_logits = teacher(**data).logits[:, :-1][keep]
    ref = reference_distill_loss_from_logits(s_logits, t_logits, target, divergence="jsd", beta=0.5, mle_weight=0.5,
                                             temperature=1.5)
    assert rel_l2(loss, ref) <= 1e-5
    loss.backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_uncompacted_rows_and_the_decoder_route():
    model = tiny_model(0, init_std=0.5).eval()
    data = batch(2)
    compact = hidden_states_at_labels(model, data)
    with LMHeadRows(model) as calls:
        padded = hidden_states_at_labels(model, data, compact=False, through="decoder", dtype=torch.float64)
    assert calls.rows == []  # the decoder alone: the lm_head is never called
    assert padded.hidden.shape == (3, 8, 32) and padded.hidden.dtype == torch.float64
    assert padded.target.shape == (3, 8)
    keep = padded.target != -100
    assert torch.allclose(padded.hidden[keep].float(), compact.hidden, rtol=0, atol=1e-6)
    weight, _ = lm_head(model)
    a = kidkernels.fused_linear_cross_entropy(compact.hidden, weight, compact.target, backend="torch")
    b = kidkernels.fused_linear_cross_entropy(padded.hidden.float(), weight, padded.target, backend="torch")
    assert rel_l2(a, b) <= 1e-6
    # labels given apart, and last_hidden_states directly
    other = torch.where(data["labels"] == -100, -100, 5)
    assert torch.equal(hidden_states_at_labels(model, data, labels=other).target, torch.full_like(compact.target, 5))
    assert last_hidden_states(model, data["input_ids"], data["attention_mask"]).shape == (3, 9, 32)


def test_clear_errors():
    model = tiny_model(0)
    data = batch()
    with pytest.raises(ValueError, match="needs labels"):
        hidden_states_at_labels(model, {k: v for k, v in data.items() if k != "labels"})
    with pytest.raises(ValueError, match="labels has shape"):
        hidden_states_at_labels(model, data, labels=data["labels"][:, 1:])
    with pytest.raises(ValueError, match="through"):
        last_hidden_states(model, data["input_ids"], through="lm_head")
    with pytest.raises(ValueError, match="prefix"):
        logit_options(model, "pupil")


def test_logit_options_read_configs_as_trl_does():
    from transformers import GraniteConfig, Qwen2Config

    def wrapped(config):
        return types.SimpleNamespace(config=config)

    assert logit_options(wrapped(Qwen2Config())) == {"logit_scale": 1.0, "softcap": None}
    assert logit_options(wrapped(GraniteConfig(logits_scaling=8.0)), "teacher") == {
        "teacher_logit_scale": 0.125, "teacher_softcap": None}
    assert logit_options(gemma2(), "student") == {"student_logit_scale": 1.0, "student_softcap": 30.0}
    assert logit_options(cohere())["logit_scale"] == 0.0625
