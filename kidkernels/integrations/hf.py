"""Hidden states of a Hugging Face causal LM at the positions that carry labels, without the model computing logits,
so that any distillation script is one call away from :func:`kidkernels.fused_linear_distill_loss`::

    from kidkernels.integrations.hf import hidden_states_at_labels, lm_head, logit_options

    h_s, target = hidden_states_at_labels(student, batch)          # [M, H_s], [M]: only the labelled positions
    with torch.no_grad():
        h_t, _ = hidden_states_at_labels(teacher, batch)             # [M, H_t]
    (w_s, b_s), (w_t, b_t) = lm_head(student), lm_head(teacher)
    loss = kidkernels.fused_linear_distill_loss(
        h_s, w_s, h_t, w_t, target, student_bias=b_s, teacher_bias=b_t, divergence="jsd", mle_weight=0.5,
        **logit_options(student, "student"), **logit_options(teacher, "teacher"))

The model runs through its outermost wrapper (DDP, peft, accelerate), so distributed data parallelism sees every
forward, with ``logits_to_keep`` an empty index: the lm_head multiplies zero rows, and a forward hook on the decoder
(the module that outputs the final-norm hidden states the lm_head reads) captures ``[B, T, H]``.  ``through="decoder"``
calls the decoder alone instead (the lm_head is never called at all; for models outside DDP whose forward does not
honour ``logits_to_keep``).  Nothing here imports transformers; models are recognised by their attributes.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

import torch

__all__ = ["hidden_states_at_labels", "last_hidden_states", "LabelledHiddenStates", "lm_head", "logit_options",
           "unwrap_causal_lm", "decoder_of", "check_no_logits"]


def unwrap_causal_lm(model):
    """The ``PreTrainedModel`` causal LM inside DDP / FSDP1 / accelerate (``.module``) and peft
    (``get_base_model()``) wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def decoder_of(model) -> torch.nn.Module:
    """The causal LM's decoder stack (``Qwen2Model`` in ``Qwen2ForCausalLM``: the ``base_model_prefix`` module, else
    ``get_decoder()``), whose output is the final-norm hidden state the lm_head reads.  TypeError if there is none."""
    causal_lm = unwrap_causal_lm(model)
    decoder = getattr(causal_lm, getattr(causal_lm, "base_model_prefix", "model"), None)
    if not isinstance(decoder, torch.nn.Module) and hasattr(causal_lm, "get_decoder"):
        decoder = causal_lm.get_decoder()
    if not isinstance(decoder, torch.nn.Module) or decoder is causal_lm:
        raise TypeError(f"cannot find the decoder of {type(causal_lm).__name__}; expected a Hugging Face causal LM")
    return decoder


def check_no_logits(model, output) -> None:
    """RuntimeError if a forward that asked for no logits (``logits_to_keep`` empty) returned some anyway.

    transformers 4.46-4.48 accept ``logits_to_keep`` and ignore it, and a custom model may too: every forward would
    then build the full ``[B, T, V]`` logits.  Only the shape is read (no host synchronisation).
    """
    logits = output[0] if isinstance(output, (tuple, list)) and output else getattr(output, "logits", None)
    if torch.is_tensor(logits) and logits.dim() >= 2 and logits.shape[-2] != 0:
        import transformers

        raise RuntimeError(
            f"{type(unwrap_causal_lm(model)).__name__} returned logits for {logits.shape[-2]} positions although "
            "logits_to_keep asked for none: it ignores logits_to_keep and builds the full [batch, tokens, vocab] "
            f"logits (transformers {transformers.__version__}; this needs transformers>=4.56 and a causal LM whose "
            "forward honours logits_to_keep, or through='decoder')")


def last_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       position_ids: torch.Tensor | None = None, through: str = "model", **model_kwargs
                       ) -> torch.Tensor:
    """``[B, T, H]`` final hidden states (after the last norm: what the lm_head reads) of ``input_ids`` ``[B, T]``.

    through: "model" (default) runs ``model`` itself, its outermost wrapper included, with an empty
    ``logits_to_keep``: the lm_head multiplies zero rows (RuntimeError from :func:`check_no_logits` if the model
    returns logits anyway).  "decoder" calls the decoder module alone: no lm_head call at all, but a DDP wrapper
    does not see the forward.  Runs under the caller's grad mode; ``model_kwargs`` go to the forward.
    """
    if through not in ("model", "decoder"):
        raise ValueError(f"through must be 'model' or 'decoder', got {through!r}")
    kwargs = dict(model_kwargs, input_ids=input_ids, use_cache=False)
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    decoder = decoder_of(model)
    if through == "decoder":
        output = decoder(**kwargs)
        return output[0] if isinstance(output, tuple) else output.last_hidden_state
    captured: list[torch.Tensor] = []

    def hook(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(hook)
    try:
        kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=input_ids.device)
        check_no_logits(model, model(**kwargs))
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder call per forward, saw {len(captured)}")
    return captured[0]


class LabelledHiddenStates(NamedTuple):
    """What :func:`hidden_states_at_labels` returns: ``hidden`` ``[M, H]`` (or ``[B, T - 1, H]``) and ``target``
    ``[M]`` int64 (or ``[B, T - 1]``, ``ignore_index`` where there is no label)."""
    hidden: torch.Tensor
    target: torch.Tensor


def hidden_states_at_labels(model, batch: Mapping[str, torch.Tensor], *, labels: torch.Tensor | None = None,
                            ignore_index: int = -100, compact: bool = True, dtype: torch.dtype | None = None,
                            through: str = "model") -> LabelledHiddenStates:
    """The hidden states that predict the labelled tokens, and those tokens, shifted as Hugging Face's causal-LM loss
    does: the hidden state at position ``t`` predicts ``labels[:, t + 1]``.

    batch: a mapping with ``input_ids`` ``[B, T]``, optionally ``attention_mask``, ``position_ids`` and ``labels``
    ``[B, T]`` (``ignore_index`` off the targets, as for ``model(**batch).loss``); ``labels`` overrides the batch's.
    compact: True (default) returns only the labelled rows, ``hidden`` ``[M, H]`` and ``target`` ``[M]`` (the boolean
    selection reads ``M`` on the host: one synchronisation); False returns ``[B, T - 1, H]`` and ``[B, T - 1]`` with
    ``ignore_index`` at unlabelled rows (no synchronisation: kidkernels' losses skip those rows, but the lm_head
    matmul still covers them).  dtype: cast ``hidden`` (e.g. to the lm_head's dtype under mixed precision).
    through: see :func:`last_hidden_states`.  Gradients flow to the model under the caller's grad mode.
    """
    labels = batch.get("labels") if labels is None else labels
    if labels is None:
        raise ValueError("hidden_states_at_labels needs labels: a 'labels' entry in the batch or labels=")
    input_ids = batch["input_ids"]
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but input_ids has {tuple(input_ids.shape)}")
    hidden = last_hidden_states(model, input_ids, batch.get("attention_mask"), position_ids=batch.get("position_ids"),
                                through=through)
    hidden, target = hidden[:, :-1], labels[:, 1:].to(torch.int64)
    if compact:
        keep = target != ignore_index
        hidden, target = hidden[keep], target[keep]
    return LabelledHiddenStates(hidden if dtype is None else hidden.to(dtype), target)


def lm_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V, H], bias [V] or None)`` of the causal LM's output embedding (read when called: under FSDP, after
    the forward)."""
    head = unwrap_causal_lm(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(unwrap_causal_lm(model)).__name__} has no output embedding (lm_head)")
    return head.weight, getattr(head, "bias", None)


def logit_options(model, prefix: str | None = None) -> dict:
    """The model's logit scale and final-logit softcapping as kidkernels' keyword arguments, read from its (text)
    config as TRL's DistillationTrainer reads them: the scale from ``logit_scale`` (Cohere), ``output_multiplier``,
    ``lm_head_multiplier`` (Falcon-H1), or ``logits_scaling`` (divided by, for Granite and MiniCPM3; multiplied by,
    for HyperCLOVA X), 1 when none is set; the softcap from ``final_logit_softcapping`` (Gemma 2/3).

    prefix: None gives ``{"logit_scale", "softcap"}`` (for :func:`kidkernels.fused_linear_cross_entropy` and the
    entropy); "student" or "teacher" gives ``{"student_logit_scale", "student_softcap"}`` and so on, for
    :func:`kidkernels.fused_linear_distill_loss`.
    """
    config = unwrap_causal_lm(model).config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = getattr(config, "logit_scale", None)
    for name in ("output_multiplier", "lm_head_multiplier"):
        if scale is None:
            scale = getattr(config, name, None)
    if scale is None and getattr(config, "logits_scaling", None) is not None:
        scaling = config.logits_scaling
        scale = scaling if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / scaling
    options = {"logit_scale": 1.0 if scale is None else float(scale),
               "softcap": getattr(config, "final_logit_softcapping", None)}
    if prefix is None:
        return options
    if prefix not in ("student", "teacher"):
        raise ValueError(f"prefix must be None, 'student' or 'teacher', got {prefix!r}")
    return {f"{prefix}_{name}": value for name, value in options.items()}
