"""``kid export``: a trained student as a model to deploy.

``kid train`` leaves ``final/``: the student's LoRA adapter and tokenizer (or the full model with ``--no-lora``),
and checkpoints that also hold the optimizer, scheduler, RNG and Trainer state.  :func:`export_model` turns any
of them (a run directory means its ``final/``) into a directory others load without kid:

* ``merge=True`` (``kid export --merge``): the adapter merged into its base model -- a full model with the
  tokenizer, loadable by plain ``AutoModelForCausalLM.from_pretrained`` (no peft needed, no adapter overhead when
  decoding).  The merge ``W + (alpha / r) B A`` is formed in float32 and stored in the base checkpoint's dtype (or
  ``dtype``).  A full model is written as is (in ``dtype`` if given).
* ``merge=False``: a clean copy -- the model or adapter files and the tokenizer, without the training state; an
  adapter's ``base_model_name_or_path`` is made absolute when it is a local directory, so the copy loads from
  anywhere with ``peft.AutoPeftModelForCausalLM`` (or ``AutoModelForCausalLM`` with peft installed, which
  loads the base and applies the adapter).  The files are copied byte for byte.

The output appears complete or not at all (written into a staging directory, then renamed), and a non-empty
output directory is replaced only with ``overwrite``.  Every mistake is a :class:`kid.errors.UsageError` found
before any weight is loaded.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import UsageError
from .files import atomic_write_json, replace_directory

# What checkpoints hold besides the model: never part of an export.
TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin",
                  "kid_run_state.json")
EXPORT_NOTE = "kid_export.json"


def resolve_source(path) -> Path:
    """The model or adapter directory ``path`` names: itself, or a kid run directory's ``final/``."""
    source = Path(path).expanduser()
    if not source.exists():
        raise UsageError(f"--model {path}: no such directory")
    if not source.is_dir():
        raise UsageError(f"--model {path}: not a directory")
    if (source / "adapter_config.json").is_file() or (source / "config.json").is_file():
        return source.resolve()
    if (source / "final").is_dir():
        return resolve_source(source / "final")
    raise UsageError(f"--model {path}: not a model, a LoRA adapter or a kid run directory (no config.json, "
                     "adapter_config.json or final/)")


def _is_training_state(name: str) -> bool:
    return name in TRAINING_STATE or name.startswith("rng_state")


def _base_of(source: Path, base_model: str | None) -> str:
    from .preflight import check_model_source

    if base_model is None:
        try:
            base_model = json.loads((source / "adapter_config.json").read_text(encoding="utf-8"))[
                "base_model_name_or_path"]
        except (OSError, ValueError, KeyError):
            base_model = None
        if not base_model:
            raise UsageError(f"--model {source}: the adapter does not name its base model; give --base-model")
        if not Path(base_model).is_absolute() and (source / base_model).is_dir():
            base_model = str((source / base_model).resolve())  # written relative to the adapter
    return check_model_source(str(base_model), "base-model")


def _stored_dtype(name: str):
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def check_output_dir(out: Path, overwrite: bool, what: str = "it") -> None:
    """``--output-dir``: a directory, empty unless ``overwrite`` (``what``: what --overwrite-output-dir replaces)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--output-dir {out} is not empty: choose another directory, or replace {what} with "
                         "--overwrite-output-dir")


def export_model(model, output_dir, *, merge: bool = False, base_model: str | None = None, dtype: str = "auto",
                 overwrite: bool = False) -> dict:
    """Export ``model`` (a run directory, ``final/`` or ``checkpoint-N``) into ``output_dir`` (module docstring);
    returns what was written: ``{"output_dir", "kind": "merged" | "model" | "adapter", "base_model", "dtype"}``."""
    from .models import resolve_dtype

    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    source = resolve_source(model)
    out = Path(output_dir).expanduser()
    check_output_dir(out, overwrite)
    if out.resolve() == source or source in out.resolve().parents:
        raise UsageError(f"--output-dir {out} is inside the model directory {source}: choose another directory")
    adapter = (source / "adapter_config.json").is_file()
    base = _base_of(source, base_model) if adapter else None
    staging = out.with_name(f".{out.name}.staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        if merge or (dtype != "auto" and not adapter):
            kind, stored = _write_loaded(source, staging, base=base, dtype=dtype, resolve_dtype=resolve_dtype)
        else:
            kind, stored = _write_copy(source, staging, base=base)
        info = {"source": str(source), "kind": kind, "base_model": base, "dtype": stored}
        atomic_write_json(staging / EXPORT_NOTE, info)
        replace_directory(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dict(info, output_dir=str(out.resolve()))


def _write_copy(source: Path, staging: Path, *, base: str | None) -> tuple[str, str | None]:
    """The model or adapter files, byte for byte, without the training state; a tokenizer from the base model when
    the source has none."""
    for item in source.iterdir():
        if _is_training_state(item.name) or item.name == EXPORT_NOTE:
            continue
        if item.is_dir():
            shutil.copytree(item, staging / item.name)
        else:
            shutil.copy2(item, staging / item.name)
    if base is not None:
        config_path = staging / "adapter_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = base  # absolute for a local directory (check_model_source)
        atomic_write_json(config_path, config)
    if base is not None:
        from .preflight import _has_tokenizer_files, load_tokenizer

        if not _has_tokenizer_files(str(source), strict=True):
            load_tokenizer(base, "base-model").save_pretrained(str(staging))
    return ("adapter" if base is not None else "model"), None


def _write_loaded(source: Path, staging: Path, *, base: str | None, dtype: str, resolve_dtype) -> tuple[str, str]:
    """The adapter merged into its base (formed in float32), or a full model in another dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    from .preflight import _has_tokenizer_files, load_tokenizer

    if base is not None:
        from peft import PeftModel

        target = _stored_dtype(base) if dtype == "auto" else resolve_dtype(dtype)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(source)).merge_and_unload()
        kind = "merged"
    else:
        target = resolve_dtype(dtype)
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
        kind = "model"
    model = model.to(target)
    model.save_pretrained(str(staging), safe_serialization=True)
    tokenizer = load_tokenizer(str(source) if _has_tokenizer_files(str(source), strict=True) else base, "model")
    tokenizer.save_pretrained(str(staging))
    return kind, str(target).replace("torch.", "")
