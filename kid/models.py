"""Loading students and teachers, and reading hidden states at the answer rows without any logits.

:func:`answer_hidden_states` runs a Hugging Face causal LM *through its outermost wrapper* (DDP, peft, ...), so
that distributed data parallelism sees every forward, but with ``logits_to_keep`` set to an empty index: the
lm_head multiplies zero rows.  A forward hook on the decoder (the model's ``base_model_prefix`` module, whose
output is the final-norm hidden state) captures ``[B, T, H]``; the ``[B, A]`` answer rows are gathered from it and
handed to kidkernels together with the lm_head weight (:func:`lm_head_of`).
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass

import torch


def unwrap(model):
    """The ``PreTrainedModel`` causal LM inside DDP / accelerate / peft wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def decoder_of(model) -> torch.nn.Module:
    """The causal LM's decoder stack (``Qwen2Model`` in ``Qwen2ForCausalLM``), whose output is the final-norm
    hidden state the lm_head reads."""
    causal_lm = unwrap(model)
    decoder = getattr(causal_lm, getattr(causal_lm, "base_model_prefix", "model"), None)
    if not isinstance(decoder, torch.nn.Module) and hasattr(causal_lm, "get_decoder"):
        decoder = causal_lm.get_decoder()
    if not isinstance(decoder, torch.nn.Module):
        raise TypeError(f"cannot find the decoder of {type(causal_lm).__name__}; expected a Hugging Face causal LM")
    return decoder


@dataclass
class LMHead:
    """The output projection of a causal LM: ``weight [V, H]`` and optional ``bias [V]``."""
    weight: torch.Tensor
    bias: torch.Tensor | None


def lm_head_of(model, vocab_size: int | None = None) -> LMHead:
    """The model's lm_head; with ``vocab_size``, its first ``vocab_size`` rows (views: no copy)."""
    head = unwrap(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(unwrap(model)).__name__} has no output embedding (lm_head)")
    weight, bias = head.weight, getattr(head, "bias", None)
    if vocab_size is not None and vocab_size < weight.shape[0]:
        weight = weight[:vocab_size]
        bias = bias[:vocab_size] if bias is not None else None
    return LMHead(weight, bias)


def answer_hidden_states(model, batch, *, input_ids: torch.Tensor | None = None,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, A, H]`` final hidden states at the rows that predict the answer tokens (``answer_index - 1``).

    batch: a mapping with ``input_ids``, ``attention_mask``, ``answer_index`` and optionally ``position_ids``
    (see :mod:`kid.batching`).  input_ids: run on these ids instead of ``batch["input_ids"]`` (same shape).
    dtype: cast the rows to this dtype (the lm_head's: under mixed precision the decoder's output may differ).
    Runs under the caller's grad mode.
    """
    ids = batch["input_ids"] if input_ids is None else input_ids
    captured: list[torch.Tensor] = []

    def hook(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder_of(model).register_forward_hook(hook)
    try:
        kwargs = dict(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False,
                      logits_to_keep=torch.empty(0, dtype=torch.long, device=ids.device))
        if batch.get("position_ids") is not None:
            kwargs["position_ids"] = batch["position_ids"]
        model(**kwargs)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder call per forward, saw {len(captured)}")
    hidden = captured[0]
    rows = (batch["answer_index"] - 1).clamp(min=0)
    rows = hidden.gather(1, rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return rows if dtype is None else rows.to(dtype)


# ---- loading ---------------------------------------------------------------------------------------------------

def default_attn_implementation() -> str:
    """flash-attention 2 when the optional ``flash-attn`` package is installed and a GPU is present, else SDPA."""
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """"auto": bfloat16 on a GPU that supports it, else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                             else "cpu")
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return getattr(torch, name)


def load_causal_lm(name_or_path, *, dtype=None, attn_implementation: str | None = None):
    """A Hugging Face causal LM from a directory or Hub name (``local_files_only`` when ``HF_HUB_OFFLINE`` is set,
    as transformers does)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation or
        default_attn_implementation())


@dataclass
class LoraOptions:
    """LoRA on the student (peft).  Paper defaults: rank 64, alpha 32, on every linear layer of the decoder; the
    lm_head and embeddings stay frozen (so the fused loss forms no weight gradient)."""
    r: int = 64
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


def apply_lora(model, options: LoraOptions):
    from peft import LoraConfig, get_peft_model

    if options.r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {options.r}")
    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=options.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def prepare_teacher(teacher, *, adapter: str | None = None, device=None, dtype=None):
    """Freeze a teacher for distillation: optional LoRA adapter of an earlier ``sft`` run merged in, eval mode, no
    gradients, on ``device`` in ``dtype`` (default bfloat16 on a GPU, float32 on CPU)."""
    if adapter is not None:
        from peft import PeftModel

        teacher = PeftModel.from_pretrained(teacher, adapter).merge_and_unload()
    teacher = teacher.to(device=device, dtype=resolve_dtype(dtype, device))
    teacher.eval().requires_grad_(False)
    return teacher


def default_mask_token(tokenizer) -> str:
    """KID's default mask token: an existing special token, so no new embedding is learnt.

    Order: the tokenizer's ``mask_token``; its ``unk_token``; its first additional special token; in each case only
    a token that is not also EOS, BOS or PAD (Qwen's unk token is ``<|endoftext|>``, its EOS: the mask would then
    read as an end of sequence; Qwen's choice is ``<|im_start|>``).  Raise if there is none: pass ``mask_token=``.
    """
    taken = {tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token} - {None}
    candidates = [getattr(tokenizer, "mask_token", None), getattr(tokenizer, "unk_token", None)]
    candidates += list(getattr(tokenizer, "additional_special_tokens", None) or [])
    candidates += list(getattr(tokenizer, "all_special_tokens", None) or [])
    for candidate in candidates:
        if candidate and candidate not in taken:
            return candidate
    raise ValueError("the tokenizer has no spare special token to mask with (every special token is EOS, BOS or "
                     "PAD); pass mask_token= (an existing token)")


def token_id(tokenizer, token: str) -> int:
    """The id of one existing token (an error if ``token`` is not a single vocabulary entry)."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or (tokenizer.unk_token_id is not None and ids[0] == tokenizer.unk_token_id
                                     and token != tokenizer.unk_token):
        raise ValueError(f"{token!r} is not a token of the tokenizer")
    return int(ids[0])


@contextlib.contextmanager
def eval_mode(model):
    """Temporarily in eval mode (no dropout), e.g. for generation during training."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
