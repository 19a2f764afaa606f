"""KID's imperfect-data stage (Zhong et al., 2024): turn gold answers y into y-hat, per batch.

1. Choose ``alpha`` of the selectable answer positions: target tokens, never the prompt or padding, and not EOS
   unless ``mask_eos``.  "random" / "uniform" need no model; "hard" / "easy" rank by the student's entropy at the
   position that predicts each token, from one no-grad student pass over the gold sequence
   (:func:`kidkernels.fused_linear_select`).
2. Replace the chosen tokens by the mask token (an existing special token by default).
3. One no-grad student pass over the masked sequence; the prediction for chosen slot ``t`` is the student's
   next-token choice at position ``t - 1`` (:func:`kidkernels.fused_linear_argmax`, on the answer rows only), or a
   sample from it at ``sampling_temperature`` with ``kid_predictions="sample"``.
4. Write the predictions into y: y-hat.  The "masking only" ablation keeps the mask tokens instead (no step 3).

A chosen slot whose prediction is the gold token itself leaves y unchanged there: ``ImperfectBatch.changed`` marks
the chosen slots whose token did change.  For a student that already fits y, far fewer than ``alpha`` of the
tokens change (the trainer logs the fraction as ``kid_changed``).

Everything runs on the device with static shapes: no host synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kidkernels
from kidkernels.ops.gemm import linear_logits, without_autocast

from .batching import IGNORE_INDEX, with_answer_tokens
from .models import LMHead, answer_hidden_states

# Rows of fp32 logits a sampling chunk may hold, as bytes (the [rows, V] chunk is the only vocabulary-wide buffer).
SAMPLING_CHUNK_BYTES = 64 << 20


@dataclass
class ImperfectBatch:
    """The result of the KID stage for one batch.

    input_ids: ``[B, T]`` the sequence with y-hat in the answer span (x unchanged).
    answer_tokens: ``[B, A]`` y-hat at the answer slots.
    chosen: bool ``[B, A]``, the slots that were masked.
    changed: bool ``[B, A]``, the chosen slots whose y-hat token differs from the gold token (a prediction, or the
        mask token for "masking only"); a subset of ``chosen``.
    """
    input_ids: torch.Tensor
    answer_tokens: torch.Tensor
    chosen: torch.Tensor
    changed: torch.Tensor


def selectable_positions(answer_labels: torch.Tensor, eos_token_id: int | None, *, mask_eos: bool = False
                         ) -> torch.Tensor:
    """bool ``[B, A]``: target slots that may be masked (padding never; EOS only with ``mask_eos``)."""
    valid = answer_labels != IGNORE_INDEX
    if not mask_eos and eos_token_id is not None:
        valid &= answer_labels != eos_token_id
    return valid


@without_autocast  # the Trainer's bf16 autocast would round the logits (and the Gumbel sum) to bfloat16
def sample_next_tokens(hidden: torch.Tensor, head: LMHead, *, temperature: float = 1.0,
                       generator: torch.Generator | None = None, chunk_bytes: int = SAMPLING_CHUNK_BYTES
                       ) -> torch.Tensor:
    """``[...]`` int64 samples from ``softmax(hidden @ W.T + b) / temperature)`` per row, by the Gumbel-max trick,
    over row chunks whose fp32 logits take at most ``chunk_bytes`` (never the whole ``[rows, V]`` at once).

    hidden: ``[..., H]`` in the head's dtype.  The logits and the Gumbel noise are float32 whatever the dtypes and
    any enclosing ``torch.autocast``.  The chunk count depends only on shapes: no host synchronisation.
    """
    weight, bias = head.weight, head.bias
    rows = hidden.reshape(-1, hidden.shape[-1])
    vocab = weight.shape[0]
    per_chunk = max(1, chunk_bytes // (4 * vocab))
    out = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
    for start in range(0, rows.shape[0], per_chunk):
        # float32 logits straight from the product (never rounded to a bf16 weight's dtype first).
        logits = linear_logits(rows[start:start + per_chunk], weight, bias)
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(min=1e-20)
        # argmax(logits / T + Gumbel) is a sample of softmax(logits / T).
        logits.div_(temperature).sub_(uniform.log_().neg_().log_())
        out[start:start + per_chunk] = logits.argmax(dim=-1)
    return out.reshape(hidden.shape[:-1])


@torch.no_grad()
def make_imperfect(student, batch, head: LMHead, *, alpha: float, strategy: str, mask_token_id: int,
                   eos_token_id: int | None, mask_eos: bool = False, masking_only: bool = False,
                   predictions: str = "argmax", sampling_temperature: float = 1.0,
                   generator: torch.Generator | None = None) -> ImperfectBatch:
    """Run the KID stage (module docstring) on ``batch`` (see :mod:`kid.batching`) with the ``student`` model.

    head: the student's lm_head (:func:`kid.models.lm_head_of`).  generator: randomness of "random" selection and
    of sampled predictions (a generator on the batch's device, or a CPU generator for "random").
    """
    gold = batch["answer_labels"]
    valid = selectable_positions(gold, eos_token_id, mask_eos=mask_eos)
    if strategy in ("hard", "easy"):
        gold_hidden = answer_hidden_states(student, batch, dtype=head.dtype)
        chosen = kidkernels.fused_linear_select(gold_hidden, head.weight, valid, alpha, strategy, head.bias,
                                                generator=generator)
        del gold_hidden
    else:
        chosen = kidkernels.select_positions(valid, alpha, strategy, generator=generator)
    answer = batch["input_ids"].gather(1, batch["answer_index"])
    masked_answer = torch.where(chosen, torch.full_like(answer, mask_token_id), answer)
    masked_ids = with_answer_tokens(batch["input_ids"], batch["answer_index"], masked_answer, gold)
    if masking_only:
        return ImperfectBatch(masked_ids, masked_answer, chosen, chosen & (masked_answer != answer))
    hidden = answer_hidden_states(student, batch, input_ids=masked_ids, dtype=head.dtype)
    if predictions == "argmax":
        predicted = kidkernels.fused_linear_argmax(hidden, head.weight, head.bias)
    elif predictions == "sample":
        predicted = sample_next_tokens(hidden, head, temperature=sampling_temperature, generator=generator)
    else:
        raise ValueError(f"predictions must be 'argmax' or 'sample', got {predictions!r}")
    answer_hat = torch.where(chosen, predicted, answer)
    return ImperfectBatch(with_answer_tokens(batch["input_ids"], batch["answer_index"], answer_hat, gold),
                          answer_hat, chosen, chosen & (answer_hat != answer))
