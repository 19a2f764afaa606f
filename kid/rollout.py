"""Answers generated during training, for the on-policy baselines (GKD, ImitKD, f-distill).

:func:`generate_answers` samples from a model given left-padded prompts and returns ``[B, G]`` answer tokens with
-100 after the first EOS (EOS itself is kept: it is a target, as in the gold data).  :func:`kid.batching.
prompt_plus_answer` turns prompts and answers into a batch the losses read.  Generation waits on the host for each
new token by nature; it is the on-policy methods' cost (the paper's 8-14x), not a hot path to keep sync-free.
"""
from __future__ import annotations

import torch

from .batching import IGNORE_INDEX
from .models import eval_mode, gather_fsdp_root, is_fsdp_sharded


@torch.no_grad()
def generate_answers(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                     eos_token_id: int, pad_token_id: int, temperature: float = 1.0, do_sample: bool = True
                     ) -> torch.Tensor:
    """``[B, G]`` int64 generated answer tokens (``G <= max_new_tokens``), -100 after each row's first EOS.

    model: a causal LM, possibly wrapped (DDP, peft); generation runs on the unwrapped model in eval mode (no
    dropout) with a KV cache.  A row with no EOS within ``max_new_tokens`` keeps all its tokens (truncated, like a
    gold answer longer than the output budget).
    """
    from transformers import GenerationConfig

    # Generate through the peft model itself when there is one (its LoRA layers), not the bare base model.
    lm = model.module if isinstance(getattr(model, "module", None), torch.nn.Module) else model
    # Every sampling knob explicit: transformers fills unset ones from the checkpoint's generation_config.json (a
    # chat model's repetition penalty would make the samples stop following the student's distribution).
    config = GenerationConfig(do_sample=do_sample, temperature=temperature if do_sample else None, top_k=0,
                              top_p=1.0, min_p=None, typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                              max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                              use_cache=True)
    # Under FSDP every decoding step all-gathers parameters, so a process whose rows all ended must keep stepping
    # until every process has ended (transformers detects only the FSDP it applied itself, not accelerate's).
    synced = is_fsdp_sharded(lm) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if synced:
        gather_fsdp_root(lm)
    with eval_mode(lm):
        out = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                          synced_gpus=synced)
    new = out[:, prompt_ids.shape[1]:]
    if new.shape[1] == 0:
        return torch.full((prompt_ids.shape[0], 1), eos_token_id, dtype=torch.long, device=prompt_ids.device)
    is_eos = new == eos_token_id
    # Slots strictly after the first EOS: at least one EOS before them.
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return torch.where(after_eos, torch.full_like(new, IGNORE_INDEX), new)
