"""Model configurations for the memory estimate, written out here so that nothing is downloaded: the architecture
fields of the published ``config.json`` of each checkpoint (the weights do not matter for memory), plus tiny
configurations for the tests.  Any Hugging Face config can be used instead, by path (a ``config.json`` or a model
directory holding one).
"""
from __future__ import annotations

import json
from pathlib import Path

# Qwen1.5 (the Qwen2 architecture in transformers): the KID paper's student (0.5B) and teachers (1.8B ... 32B).
_QWEN15 = dict(model_type="qwen2", hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
               rope_theta=1_000_000.0, attention_dropout=0.0, vocab_size=151_936, tie_word_embeddings=False)
# Llama-architecture models of the paper (TinyLlama student, Llama-2-7B teacher) and SmolLM2 (the demo's real model).
_LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, attention_dropout=0.0,
              tie_word_embeddings=False)

PRESETS: dict[str, dict] = {
    "qwen1.5-0.5b": dict(_QWEN15, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=True),
    "qwen1.5-1.8b": dict(_QWEN15, hidden_size=2048, intermediate_size=5504, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=16),
    "qwen1.5-4b": dict(_QWEN15, hidden_size=2560, intermediate_size=6912, num_hidden_layers=40,
                       num_attention_heads=20, num_key_value_heads=20, rope_theta=5_000_000.0),
    "qwen1.5-7b": dict(_QWEN15, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "qwen1.5-14b": dict(_QWEN15, hidden_size=5120, intermediate_size=13696, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40, vocab_size=152_064),
    "qwen1.5-32b": dict(_QWEN15, hidden_size=5120, intermediate_size=27392, num_hidden_layers=64,
                        num_attention_heads=40, num_key_value_heads=8, vocab_size=152_064),
    "tinyllama-1.1b": dict(_LLAMA, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32_000,
                           max_position_embeddings=2048, rope_theta=10_000.0),
    "llama2-7b": dict(_LLAMA, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32_000,
                      max_position_embeddings=4096, rope_theta=10_000.0),
    "smollm2-135m": dict(_LLAMA, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49_152,
                         max_position_embeddings=8192, rope_theta=100_000.0, tie_word_embeddings=True),
    # Tiny shapes for the tests (seconds under fake tensors; small enough for a hand count).
    "tiny-qwen2": dict(_QWEN15, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024,
                       tie_word_embeddings=True),
    "tiny-qwen2-teacher": dict(_QWEN15, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
                               max_position_embeddings=1024),
}


class UnknownModel(ValueError):
    """Neither a preset name nor a readable Hugging Face config."""


def config_dict(name_or_path: str) -> dict:
    """The config dict of a preset, or of a Hugging Face ``config.json`` (a file, or a directory holding one)."""
    if name_or_path in PRESETS:
        return dict(PRESETS[name_or_path])
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UnknownModel(f"{name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json or a "
                           "directory holding one")
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UnknownModel(f"cannot read {path}: {error}") from None
    if "model_type" not in values:
        raise UnknownModel(f"{path} has no model_type: not a Hugging Face model config")
    return values


def hf_config(name_or_path: str):
    """A ``transformers`` config object for a preset or a config path."""
    from transformers import AutoConfig

    values = config_dict(name_or_path)
    model_type = values.pop("model_type")
    for key in ("architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "auto_map",
                "quantization_config"):
        values.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **values)
    except ValueError as error:
        raise UnknownModel(f"{name_or_path}: {error}") from None


def parameter_count(config) -> int:
    """Parameters of the causal LM of ``config`` (tied embeddings counted once), built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
