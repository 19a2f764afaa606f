"""Loading students and teachers, and reading hidden states at the answer rows without any logits.

:func:`answer_hidden_states` runs a Hugging Face causal LM *through its outermost wrapper* (DDP, peft, ...), so
that distributed data parallelism sees every forward, but with ``logits_to_keep`` set to an empty index: the
lm_head multiplies zero rows (:func:`kidkernels.integrations.hf.last_hidden_states`, public for any script).  A
forward hook on the decoder (the model's ``base_model_prefix`` module, whose output is the final-norm hidden state)
captures ``[B, T, H]``; the ``[B, A]`` answer rows are gathered from it and
handed to kidkernels together with the lm_head weight (:func:`lm_head_of`), read after the forward, when FSDP2
holds it whole (:class:`LMHead`, :func:`gather_fsdp_root`).
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

# The Hugging Face pieces live in kidkernels (public there, for any distillation script), used here under these names.
from kidkernels.integrations.hf import check_no_logits, decoder_of, last_hidden_states  # noqa: F401
from kidkernels.integrations.hf import unwrap_causal_lm as unwrap


class LMHead:
    """The output projection of a causal LM: ``weight [V, H]`` and optional ``bias [V]``.

    ``LMHead(weight, bias)`` holds two tensors.  :func:`lm_head_of` instead binds the model's output-embedding
    module and reads its parameters *at each access*, because FSDP swaps them between shards and full tensors around
    every forward: read after the student's forward, as the objectives do, ``weight`` is the full matrix that forward
    used; if FSDP2 resharded it after the forward, it is gathered again (``FSDPModule.unshard``; FSDP reshards it and
    reduce-scatters its gradient after the backward).  ``dtype`` and ``num_rows`` never gather.
    """

    def __init__(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, *,
                 module: torch.nn.Module | None = None, model: torch.nn.Module | None = None,
                 vocab_size: int | None = None):
        if (weight is None) == (module is None):
            raise TypeError("LMHead takes either a weight tensor or an output-embedding module")
        self._weight, self._bias = weight, bias
        self._module, self._model, self._vocab_size = module, model, vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return (self._module.weight if self._module is not None else self._weight).dtype

    @property
    def num_rows(self) -> int:
        """V: the rows the weight has (or is cut to); a sharded weight's global row count."""
        rows = (self._module.weight if self._module is not None else self._weight).shape[0]
        return rows if self._vocab_size is None else min(rows, self._vocab_size)

    @property
    def weight(self) -> torch.Tensor:
        if self._module is None:
            return self._weight
        return self._cut(_full_parameter(self._module, "weight", self._model))

    @property
    def bias(self) -> torch.Tensor | None:
        if self._module is None:
            return self._bias
        if getattr(self._module, "bias", None) is None:
            return None
        return self._cut(_full_parameter(self._module, "bias", self._model))

    def leading_rows(self, vocab_size: int) -> LMHead:
        """The same head restricted to its first ``vocab_size`` rows (views, read at use like this one)."""
        return LMHead(self._weight, self._bias, module=self._module, model=self._model, vocab_size=vocab_size) \
            if self._module is not None else LMHead(self._weight[:vocab_size], None if self._bias is None
                                                    else self._bias[:vocab_size])

    def _cut(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._vocab_size is not None and self._vocab_size < tensor.shape[0]:
            return tensor[:self._vocab_size]  # a view: no copy
        return tensor


def lm_head_of(model, vocab_size: int | None = None) -> LMHead:
    """The model's lm_head, read at use (see :class:`LMHead`); with ``vocab_size``, its first ``vocab_size`` rows
    (views: no copy).  ``model`` may be wrapped (DDP, peft, FSDP)."""
    head = unwrap(model).get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(unwrap(model)).__name__} has no output embedding (lm_head)")
    return LMHead(module=head, model=model, vocab_size=vocab_size)


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return False
    return isinstance(tensor, DTensor)


def _full_parameter(module: torch.nn.Module, name: str, model: torch.nn.Module | None) -> torch.Tensor:
    """``module.<name>`` as the full tensor: as is, unless FSDP2 left it sharded (a DTensor), in which case the
    FSDP unit that owns it is unsharded (a collective: every process reads the head at the same points)."""
    tensor = getattr(module, name)
    if not _is_dtensor(tensor):
        expected = _expected_shape(module, name)
        if expected is not None and tuple(tensor.shape) != expected:
            raise RuntimeError(
                f"the lm_head's {name} has shape {tuple(tensor.shape)}, not {expected}: it is sharded (FSDP1 with "
                "the lm_head in its own unit?).  Keep the lm_head in the root FSDP unit, or use FSDP2 "
                "(fsdp_version 2), whose shards are gathered here")
        return tensor
    owner = _fsdp_owner(model if model is not None else module, module)
    if owner is None:
        raise RuntimeError(f"the lm_head's {name} is a DTensor not managed by FSDP2 (tensor parallelism is not "
                           "supported): kidkernels needs the full [V, H] weight on each process")
    owner.unshard()
    tensor = getattr(module, name)
    if _is_dtensor(tensor):
        raise RuntimeError(f"FSDP2 did not unshard the lm_head's {name}")
    return tensor


def is_fsdp_sharded(model: torch.nn.Module) -> bool:
    """Whether any part of ``model`` is sharded by FSDP (FSDP2 ``fully_shard`` or FSDP1): its forwards are then
    collectives, which every process must call equally often."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def gather_fsdp_root(model) -> None:
    """Gather the parameters of ``model``'s outermost FSDP2 unit (a no-op without FSDP2, or when they are gathered).

    FSDP2 gathers a unit's parameters in hooks around that unit's forward, and for the backward in a hook on that
    unit's *outputs*.  Two uses here bypass the root unit:

    * the answer rows come from the decoder, inside the root, and never pass through the root's output, so a root
      resharded after the forward (``reshard_after_forward=True``) would not be gathered for the backward, whose
      saved tensors (the final norm's weight, the embedding) would then point to freed storage;
    * ``generate`` on a peft model calls the inner causal LM, not the root's forward.

    FSDP reshards the unit and reduces its gradients in its end-of-backward callback, or at its next forward.  A
    root that keeps its parameters after the forward (the default of ``fully_shard`` and of accelerate) makes the
    first case a no-op.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    node = model
    while True:
        if isinstance(node, FSDPModule):
            # FSDP2 initialises lazily, taking the first unit that runs a forward as the root; an inner unit run
            # first (generate on a peft model, before any training forward) would claim it.  Initialise from the
            # real root now (idempotent; private API, hence the guard).
            state = node._get_fsdp_state() if hasattr(node, "_get_fsdp_state") else None
            if state is not None and hasattr(state, "_lazy_init"):
                state._lazy_init()
            node.unshard()
            return
        inner = getattr(node, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return
        node = inner


def _expected_shape(module: torch.nn.Module, name: str) -> tuple[int, ...] | None:
    if isinstance(module, torch.nn.Linear):
        return (module.out_features, module.in_features) if name == "weight" else (module.out_features,)
    if isinstance(module, torch.nn.Embedding) and name == "weight":
        return (module.num_embeddings, module.embedding_dim)
    return None


def _fsdp_owner(model: torch.nn.Module, head: torch.nn.Module):
    """The innermost FSDP2 unit (``FSDPModule``) whose parameters include ``head``'s: ``head`` itself or its
    nearest wrapped ancestor in ``model``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return None
    if isinstance(head, FSDPModule):
        return head
    path = next((name for name, m in model.named_modules() if m is head), None)
    if path is None:
        return None
    owner = model if isinstance(model, FSDPModule) else None
    parts = path.split(".") if path else []
    node = model
    for part in parts:
        node = getattr(node, part)
        if isinstance(node, FSDPModule):
            owner = node
    return owner


def answer_hidden_states(model, batch, *, input_ids: torch.Tensor | None = None,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[B, A, H]`` final hidden states at the rows that predict the answer tokens (``answer_index - 1``).

    batch: a mapping with ``input_ids``, ``attention_mask``, ``answer_index`` and optionally ``position_ids``
    (see :mod:`kid.batching`).  input_ids: run on these ids instead of ``batch["input_ids"]`` (same shape).
    dtype: cast the rows to this dtype (the lm_head's: under mixed precision the decoder's output may differ).
    Runs under the caller's grad mode, through the outermost wrapper with no logits
    (:func:`kidkernels.integrations.hf.last_hidden_states`; RuntimeError if the model returns logits anyway).
    """
    ids = batch["input_ids"] if input_ids is None else input_ids
    hidden = last_hidden_states(model, ids, batch["attention_mask"], position_ids=batch.get("position_ids"))
    if torch.is_grad_enabled():
        gather_fsdp_root(model)
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
    as transformers does).  A directory is loaded by its absolute path: the model records the name it was loaded
    by, and a LoRA adapter saved from it names its base model so (``base_model_name_or_path``), which must stay
    valid from any working directory."""
    from transformers import AutoModelForCausalLM

    if Path(name_or_path).expanduser().is_dir():
        name_or_path = str(Path(name_or_path).expanduser().resolve())
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


_DROPOUT_MODULES = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
                    torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)


def disable_dropout(model: torch.nn.Module) -> int:
    """Turn every dropout of ``model`` off, in place, and return how many were on.

    TRL's ``disable_dropout`` (``disable_dropout_in_model``): ``p = 0`` on every dropout module, peft's
    ``lora_dropout`` modules included (so ``lora_dropout`` no longer applies).  Also 0.0 for the float attributes
    ending in ``dropout`` that modules read at forward instead of holding a dropout module (transformers' Llama /
    Qwen2 / Mistral attention passes ``attention_dropout`` to SDPA in train mode), which TRL leaves on.  The model's
    config is not changed: a saved model or adapter keeps its dropout settings.
    """
    turned_off = 0
    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            turned_off += module.p > 0
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if name.endswith("dropout") and isinstance(value, float):
                turned_off += value > 0
                setattr(module, name, 0.0)
    return int(turned_off)


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
