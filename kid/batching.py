"""Batches for distillation: where the target tokens are, so that only their hidden states are ever read.

A training example is ``prompt + answer`` (the answer being the SQL tokens and EOS, see
:func:`kid.prompts.tokenize_example`).  In a causal LM the hidden state at position ``t - 1`` predicts the token at
``t``, so the loss rows of answer token ``j`` are the hidden states at ``answer_index[:, j] - 1``.  Every batch,
whatever produced it (the collator, a generation, KID's imperfect data), carries:

* ``input_ids``, ``attention_mask``: ``[B, T]``;
* ``position_ids``: ``[B, T]`` or absent (absent: right padding, positions 0..T-1);
* ``answer_index``: ``[B, A]`` int64, the sequence position of answer token ``j`` (padded slots point at a real
  position of the same row, with label -100);
* ``answer_labels``: ``[B, A]`` int64, the answer tokens, -100 on padded slots: the loss targets.

``A`` (the longest answer in the batch) is known on the host when the batch is built, so gathering the rows is a
static-shape ``gather``: no host synchronisation, and the lm_head work covers ``B x A`` rows instead of ``B x T``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

IGNORE_INDEX = -100


def _answer_start(labels: Sequence[int]) -> int:
    for i, label in enumerate(labels):
        if label != IGNORE_INDEX:
            return i
    return len(labels)


class DistillCollator:
    """Right-padded training batches from ``{"input_ids", "labels"[, "attention_mask"]}`` features (lists of ints).

    Output keys: ``input_ids``, ``attention_mask``, ``labels`` (``[B, T]``, -100 off the answer: the token count
    ``transformers.Trainer`` uses to normalise gradient accumulation), ``answer_index``, ``answer_labels``; with
    ``with_prompts`` also ``prompt_input_ids`` / ``prompt_attention_mask`` (``[B, P]``, *left*-padded prompts, for
    methods that generate answers).

    pad_token_id: id written at padded positions (never attended, never a target).
    pad_to_multiple_of: round ``T`` (and ``A``) up to a multiple, for kernels that like aligned shapes.
    """

    def __init__(self, pad_token_id: int, *, with_prompts: bool = False, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None; set the tokenizer's pad token (e.g. to its EOS token)")
        self.pad_token_id = int(pad_token_id)
        self.with_prompts = with_prompts
        self.pad_to_multiple_of = pad_to_multiple_of

    def _round(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else -(-n // m) * m

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of examples")
        ids = [list(f["input_ids"]) for f in features]
        labels = [list(f["labels"]) for f in features]
        for i, (x, y) in enumerate(zip(ids, labels)):
            if len(x) != len(y):
                raise ValueError(f"example {i}: input_ids has {len(x)} tokens but labels has {len(y)}")
        starts = [_answer_start(y) for y in labels]
        for i, (s, x) in enumerate(zip(starts, ids)):
            if s == 0:
                raise ValueError(f"example {i}: the answer starts at position 0; it needs at least one prompt token")
            if s == len(x):
                raise ValueError(f"example {i}: no target token (every label is {IGNORE_INDEX})")
        width = self._round(max(len(x) for x in ids))
        answer_width = self._round(max(len(x) - s for x, s in zip(ids, starts)))
        batch = len(ids)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        full_labels = torch.full((batch, width), IGNORE_INDEX, dtype=torch.long)
        answer_index = torch.empty((batch, answer_width), dtype=torch.long)
        answer_labels = torch.full((batch, answer_width), IGNORE_INDEX, dtype=torch.long)
        for b, (x, y, s) in enumerate(zip(ids, labels, starts)):
            n = len(x)
            input_ids[b, :n] = torch.tensor(x)
            attention[b, :n] = 1
            full_labels[b, :n] = torch.tensor(y)
            # Padded answer slots point at the row's last real token: a valid gather, label -100.
            answer_index[b] = torch.clamp(torch.arange(s, s + answer_width), max=n - 1)
            answer_labels[b, : n - s] = torch.tensor(y[s:])
        out = {"input_ids": input_ids, "attention_mask": attention, "labels": full_labels,
               "answer_index": answer_index, "answer_labels": answer_labels}
        if self.with_prompts:
            prompts = [x[:s] for x, s in zip(ids, starts)]
            out.update(left_padded(prompts, self.pad_token_id, prefix="prompt_", multiple=self.pad_to_multiple_of))
        return out


def left_padded(sequences: Sequence[Sequence[int]], pad_token_id: int, *, prefix: str = "",
                multiple: int | None = None) -> dict[str, torch.Tensor]:
    """``{prefix}input_ids`` / ``{prefix}attention_mask`` of ``sequences`` padded on the left (generation input)."""
    width = max(len(s) for s in sequences)
    if multiple:
        width = -(-width // multiple) * multiple
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for b, s in enumerate(sequences):
        if len(s):
            ids[b, width - len(s):] = torch.tensor(list(s))
            mask[b, width - len(s):] = 1
    return {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask}


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first attended token (left padding); 0 on padding."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def prompt_plus_answer(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answer: torch.Tensor,
                       pad_token_id: int) -> dict[str, torch.Tensor]:
    """A batch (see the module docstring) from left-padded prompts ``[B, P]`` and answers ``[B, A]`` (token ids,
    -100 on padded slots; each answer's slots are contiguous from slot 0).

    The layout is ``[pad.. prompt | answer | pad..]``: every answer starts at column P, so ``answer_index`` is
    ``P + j`` for all rows and building it needs no host synchronisation.
    """
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.shape[0] != answer.shape[0]:
        raise ValueError(f"prompt_ids {tuple(prompt_ids.shape)}, prompt_mask {tuple(prompt_mask.shape)} and answer "
                         f"{tuple(answer.shape)} do not describe the same batch")
    batch, width = prompt_ids.shape
    answer_width = answer.shape[1]
    valid = answer != IGNORE_INDEX
    input_ids = torch.cat([prompt_ids, torch.where(valid, answer, pad_token_id)], dim=1)
    attention = torch.cat([prompt_mask.to(torch.long), valid.to(torch.long)], dim=1)
    answer_index = torch.arange(width, width + answer_width, device=answer.device).expand(batch, -1)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions_from_mask(attention),
            "answer_index": answer_index, "answer_labels": answer}


def with_answer_tokens(input_ids: torch.Tensor, answer_index: torch.Tensor, answer_tokens: torch.Tensor,
                       answer_labels: torch.Tensor) -> torch.Tensor:
    """A copy of ``input_ids`` whose answer positions hold ``answer_tokens`` (padded slots keep their token).

    Padded slots may point at the same position as a real slot (the collator points them at the row's last
    token, which a real slot may be changing: a truncated answer without EOS, or ``mask_eos``): their writes go to a
    scratch column past the end, dropped afterwards, so every real position is written exactly once and the scatter
    is deterministic.
    """
    real = answer_labels != IGNORE_INDEX
    width = input_ids.shape[1]
    index = torch.where(real, answer_index, torch.full_like(answer_index, width))
    values = torch.where(real, answer_tokens.to(input_ids.dtype), torch.zeros_like(input_ids[:, :1]))
    widened = torch.nn.functional.pad(input_ids, (0, 1))
    return widened.scatter(1, index, values)[:, :width].contiguous()
