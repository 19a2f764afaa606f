"""Checks of a training run that need no data and no model weights: they run before anything slow, and every
failure is a :class:`kid.errors.UsageError` naming the option (``kid train`` prints it as one line, exit 2).

:func:`preflight` runs them all: the method's weights, required options, the environment (FSDP, flash-attention),
the output directory policy and the resume checkpoint, the SFT report to compare with, a census of the data file
(examples, missing databases, plainly wrong format) and the models (directories with a ``config.json``, Hub names
that resolve, tokenizers, the teacher's vocabulary against the student's, the mask token).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import MethodConfig
from .errors import UsageError
from .run_report import absolute_paths, config_differences

if TYPE_CHECKING:
    from .training import TrainConfig


def check_method(method: MethodConfig) -> None:
    """Combinations MethodConfig accepts but that cannot train anything."""
    if float(method.kd_weight) == 0 and float(method.mle_weight) == 0:
        raise UsageError("kd_weight and mle_weight are both 0: the loss would be 0 and nothing would train")
    if method.teacher_outputs is not None:  # a missing or unfinished directory is named before any model loads
        from .teacher_outputs import finished_meta

        finished_meta(method.teacher_outputs)


def check_teacher_outputs(config: TrainConfig, method: MethodConfig) -> None:
    """Teacher outputs (``--teacher-outputs``) generated with the prompt budget of this run: their prompts are looked
    up by token ids, which another ``max_input_tokens`` changes (every prompt would be missing, found only once the
    data is built)."""
    if method.teacher_outputs is None:
        return
    from .teacher_outputs import finished_meta

    recorded = finished_meta(method.teacher_outputs).get("max_input_tokens")
    if recorded is not None and int(recorded) != config.max_input_tokens:
        raise UsageError(f"--teacher-outputs {method.teacher_outputs}: generated with --max-input-tokens {recorded}, "
                         f"this run has {config.max_input_tokens}: the prompts would not match; train with "
                         f"--max-input-tokens {recorded}, or generate them again with kid generate-teacher "
                         f"--max-input-tokens {config.max_input_tokens}")


@dataclass
class Preflight:
    """What :func:`preflight` found: the student's tokenizer (when loaded from ``config.student``), the data
    census, the checkpoint to resume from, the SFT report to compare with."""
    tokenizer: Any = None
    census: dict | None = None
    resume_checkpoint: str | None = None
    sft_report: dict | None = None
    notes: tuple[str, ...] = ()


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(name: str) -> bool:
    """Not a Hub name ("org/name" or "name"): absolute, ./ or ~ paths, more than one slash, a trailing slash."""
    return not _HUB_NAME.match(name) or name.startswith(".") or ".." in name


def check_model_source(name: str, option: str, *, allow_adapter: bool = False) -> str:
    """A model directory (with config.json; with ``allow_adapter`` also a LoRA adapter directory, with
    adapter_config.json) or a Hub name whose config loads; returns it (a directory as an absolute path).  Hub names
    are looked up in the local cache first, and on the Hub only when not cached and HF_HUB_OFFLINE is not set."""
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return str(path.resolve())
        if allow_adapter and (path / "adapter_config.json").is_file():
            check_adapter_base(path, option)
            return str(path.resolve())
        wanted = "config.json" + (" or adapter_config.json" if allow_adapter else "")
        raise UsageError(f"--{option} {name}: not a model directory (no {wanted} in it)")
    if path.exists():
        raise UsageError(f"--{option} {name}: not a directory")
    if _looks_like_path(name) or ("/" in name and Path(name.split("/")[0]).is_dir()):
        # a path (or "runs/x" where runs/ is a local directory: a typo, not a Hub name)
        raise UsageError(f"--{option} {name}: no such directory")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return name
    except Exception:  # noqa: BLE001 - not cached: ask the Hub below
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        raise UsageError(f"--{option} {name}: no such directory, and not in the Hugging Face cache (HF_HUB_OFFLINE "
                         "is set)")
    if not _hub_reachable():
        raise UsageError(f"--{option} {name}: no such directory, not in the Hugging Face cache, and the Hub cannot "
                         "be reached from here")
    try:
        AutoConfig.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001 - any failure to load is the user's to fix
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--{option} {name}: no such directory, and no model of that name could be loaded "
                         f"from the Hugging Face Hub ({first})") from None
    return name


def check_adapter_base(adapter: Path, option: str) -> str:
    """The base model a LoRA adapter directory names (``base_model_name_or_path``), checked as
    :func:`check_model_source` checks a model; a :class:`UsageError` naming ``--option`` otherwise."""
    try:
        base = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--{option} {adapter}: a LoRA adapter without a readable base_model_name_or_path in its "
                         "adapter_config.json") from None
    try:
        return check_model_source(str(base), option)
    except UsageError as exc:
        detail = str(exc).split(": ", 1)[-1]
        raise UsageError(f"--{option} {adapter}: a LoRA adapter whose base model {base} cannot be loaded ({detail}; "
                         "a relative path is read from the current directory)") from None


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP connection to the Hub (huggingface_hub itself retries for over a minute when offline); assumed
    reachable behind a proxy, which a direct connection cannot test."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def load_tokenizer(name: str, option: str):
    """The tokenizer of a model directory or Hub name (a LoRA adapter directory without one: its base model's)."""
    from transformers import AutoTokenizer

    adapter = Path(name) / "adapter_config.json"
    if adapter.is_file() and not _has_tokenizer_files(name, strict=True):
        try:
            name = json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"]
        except (ValueError, KeyError, OSError):
            raise UsageError(f"--{option} {name}: a LoRA adapter without a tokenizer or a base model name") from None
    try:
        return AutoTokenizer.from_pretrained(name)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--{option} {name}: cannot load its tokenizer ({first})") from None


def _vocab_rows(name: str) -> int | None:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name)
    except Exception:  # noqa: BLE001 - checked by check_model_source already
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "vocab_size", None)


def _has_tokenizer_files(name: str, strict: bool = False) -> bool:
    path = Path(name)
    if not path.is_dir():
        return not strict  # a Hub name: its tokenizer is part of the repository
    return any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                               "tokenizer.model"))


def check_models(config: TrainConfig, method: MethodConfig, *, student: bool = True, teacher: bool = True
                 ) -> tuple[Any, list[str]]:
    """Student and teacher sources (those not passed as objects), their tokenizers and vocabularies, the mask
    token; returns (the student's tokenizer or None, notes to print)."""
    notes = []
    if not student:
        if teacher and config.teacher:
            check_model_source(config.teacher, "teacher")
        return None, notes
    student = check_model_source(config.student, "student")
    tokenizer = load_tokenizer(student, "student")
    if teacher and method.needs_teacher:
        teacher = check_model_source(config.teacher, "teacher")
        if _has_tokenizer_files(teacher):
            teacher_tokenizer = load_tokenizer(teacher, "teacher")
            s_vocab, t_vocab = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
            if s_vocab != t_vocab:
                s_by_id = {i: tok for tok, i in s_vocab.items()}
                t_by_id = {i: tok for tok, i in t_vocab.items()}
                first = min(i for i in set(s_by_id) | set(t_by_id) if s_by_id.get(i) != t_by_id.get(i))
                raise UsageError(
                    f"the teacher's tokenizer differs from the student's ({len(t_vocab)} vs {len(s_vocab)} tokens; "
                    f"token id {first} is {s_by_id.get(first)!r} for the student, {t_by_id.get(first)!r} for the "
                    "teacher): distillation compares the two models token by token, so they need the same tokenizer")
        s_rows, t_rows = _vocab_rows(student), _vocab_rows(teacher)
        if s_rows and t_rows and s_rows != t_rows:
            shared = min(s_rows, t_rows)
            if shared < len(tokenizer):
                raise UsageError(f"the student's lm_head has {s_rows} rows and the teacher's {t_rows}: the smaller "
                                 f"does not cover the tokenizer's {len(tokenizer)} tokens")
            notes.append(f"note: the student's lm_head has {s_rows} rows and the teacher's {t_rows}; both are cut "
                         f"to the first {shared} (the tokenizer has {len(tokenizer)} tokens, the rest is padding)")
        if config.teacher_adapter:
            adapter = Path(config.teacher_adapter)
            if not (adapter / "adapter_config.json").is_file():
                raise UsageError(f"--teacher-adapter {adapter}: not a LoRA adapter directory (no adapter_config.json)")
    if method.method == "kid":
        check_mask_token(tokenizer, method.mask_token, _vocab_rows(student))
    return tokenizer, notes


def check_mask_token(tokenizer, mask_token: str | None, embedding_rows: int | None) -> int:
    """KID's mask token (``mask_token``, or the tokenizer's default, :func:`kid.models.default_mask_token`): its
    id, which must be a row of the student's embedding (a tokenizer may add special tokens past the model's
    vocabulary: Qwen2's ``<|endoftext|>`` unk token for a vocabulary without it)."""
    from .models import default_mask_token, token_id

    if mask_token is None:
        try:
            mask_token = default_mask_token(tokenizer)
        except ValueError:
            raise UsageError("KID's mask token: the student's tokenizer has no spare special token (every special "
                             "token is EOS, BOS or PAD); give --mask-token (an existing token)") from None
        where = f"KID's default mask token {mask_token!r} (the tokenizer's; choose one with --mask-token)"
    else:
        where = f"--mask-token {mask_token!r}"
    try:
        mask_id = token_id(tokenizer, mask_token)
    except ValueError:
        raise UsageError(f"{where} is not a token of the student's tokenizer (give an existing token, e.g. one of "
                         "its special tokens)") from None
    if embedding_rows is not None and mask_id >= embedding_rows:
        raise UsageError(f"{where} has id {mask_id}, past the student's {embedding_rows} embedding rows: give "
                         f"--mask-token a token with an id below {embedding_rows}")
    return mask_id


def data_census(data_format: str, data_file, db_dir) -> dict:
    """Read the data file (no prompts built) and count its examples and those whose database is missing; check
    that the file matches ``data_format``.  Raises :class:`UsageError` when nothing has a database."""
    from .evaluation.scoring import missing_database_counts

    data_file, db_dir = Path(data_file), Path(db_dir)
    if not data_file.is_file():
        raise UsageError(f"data file not found: {data_file}")
    if not db_dir.is_dir():
        raise UsageError(f"database directory not found: {db_dir}")
    raw = read_examples(data_file)
    check_data_format(data_format, raw, data_file)
    for i, example in enumerate(raw):
        if "db_id" not in example:
            raise UsageError(f"{data_file}: example {i} has no db_id")
    missing = missing_database_counts([str(example["db_id"]) for example in raw], db_dir)
    with_db = len(raw) - sum(missing.values())
    if with_db == 0:
        shown = ", ".join(sorted(missing)[:5]) + (", ..." if len(missing) > 5 else "")
        raise UsageError(f"none of the {len(raw)} examples of {data_file} has its database in {db_dir} (looked for "
                         f"{db_dir}/<db_id>/<db_id>.sqlite with db_id {shown}): is --db-dir right?")
    return {"in_file": len(raw), "with_database": with_db, "without_database": sum(missing.values()),
            "missing_databases": missing}


def read_examples(path, option: str | None = None) -> list[dict]:
    """The examples of a data file (:func:`kid.data.loaders.read_json_examples`: a json list of objects, or json
    lines); a missing file, or one that is not such json, is a :class:`UsageError` naming ``--option``."""
    from .data.loaders import read_json_examples

    path = Path(path)
    where = f"--{option} {path}" if option else str(path)
    if not path.is_file():
        raise UsageError(f"{where}: file not found")
    try:
        return read_json_examples(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{where}: not a json list of examples ({str(exc).splitlines()[0]})") from None


def check_tables_file(path, option: str = "tables-file") -> None:
    """A Spider/BIRD ``tables.json`` that :func:`kid.data.schema.load_tables_json` reads; else a
    :class:`UsageError` naming ``--option`` (a missing file, not json, not a list of database entries)."""
    from .data.schema import load_tables_json

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--{option} {path}: file not found")
    try:
        load_tables_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"--{option} {path}: not json ({str(exc).splitlines()[0]})") from None
    except (KeyError, TypeError, AttributeError):
        raise UsageError(f"--{option} {path}: not a tables.json (expected a json list of database entries, each "
                         "with its db_id)") from None


def check_data_format(data_format: str, raw: list[dict], path) -> None:
    """Refuse a data file that is plainly of another format (BIRD read as Spider or the other way round)."""
    sample = raw[:50]

    def has(key):
        return any(key in x for x in sample)

    if not sample:
        raise UsageError(f"{path}: no examples")
    if data_format.startswith("bird"):
        if not has("SQL") and has("query"):
            raise UsageError(f"{path} looks like Spider data ('query' fields, no 'SQL'): use --data-format spider")
        if not has("SQL"):
            raise UsageError(f"{path}: BIRD data needs a 'SQL' field in each example")
    else:
        if has("SQL") and has("evidence") and not has("query"):
            raise UsageError(f"{path} looks like BIRD data ('SQL' and 'evidence' fields, no 'query'): use "
                             "--data-format bird")
        if not has("query") and not has("SQL"):
            raise UsageError(f"{path}: Spider data needs a 'query' field in each example")
        if data_format == "spider-syn" and not has("SpiderSynQuestion"):
            raise UsageError(f"{path}: Spider-Syn data needs a 'SpiderSynQuestion' field")
    if data_format != "spider-syn":
        without = next((i for i, x in enumerate(raw) if x.get("question") is None), None)
        if without is not None:
            raise UsageError(f"{path}: example {without} has no 'question'")


def output_dir_contents(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.is_dir() else []


def check_output_dir(config: TrainConfig) -> str | None:
    """The output directory policy (module docstring); returns the checkpoint to resume from, if any."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output-dir {out} is a file, not a directory")
    resume = config.resume
    if resume is True:
        checkpoint = get_last_checkpoint(str(out)) if out.is_dir() else None
        if checkpoint is None:
            raise UsageError(f"--resume: no checkpoint in {out} (nothing to resume; leave out --resume to start a "
                             "new run)")
        resume = checkpoint
    if isinstance(resume, str):
        path = Path(resume)
        if not path.is_dir():
            raise UsageError(f"--resume {resume}: no such checkpoint directory")
        if not (path / "trainer_state.json").is_file():
            raise UsageError(f"--resume {resume}: not a complete checkpoint (no trainer_state.json)")
        check_not_finished(path, config)
        contents = output_dir_contents(out)
        if contents and not path.resolve().is_relative_to(out.resolve()):
            # another run's checkpoint: this run's checkpoints (and their rotation), final model and report would
            # replace what the output directory holds
            shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
            raise UsageError(f"--output-dir {out} is not empty ({shown}) and --resume {resume} is a checkpoint of "
                             "another directory: continuing it here would replace what is there; give an empty "
                             f"--output-dir, or resume in the checkpoint's own directory ({path.resolve().parent})")
        return str(path.resolve())
    contents = output_dir_contents(out)
    if contents and not config.overwrite_output_dir:
        shown = ", ".join(contents[:4]) + (", ..." if len(contents) > 4 else "")
        raise UsageError(f"--output-dir {out} is not empty ({shown}): continue that run with --resume, or start "
                         "over with --overwrite-output-dir (removes its checkpoints, final model and report)")
    return None


def check_not_finished(checkpoint: Path, config: TrainConfig) -> None:
    """Refuse to resume a checkpoint that has trained every step this run asks for: the Trainer would take one step
    more than ``max_steps`` and replace the final model.  (A :class:`UsageError`, exit 2: nothing is trained.)"""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        step, epoch = int(state["global_step"]), float(state.get("epoch") or 0)
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--resume {checkpoint}: trainer_state.json cannot be read") from None
    if config.max_steps > 0:
        finished, target = step >= config.max_steps, f"--max-steps {config.max_steps}"
    else:  # epochs: the Trainer rounds the last epoch's steps up, so a finished run's epoch is >= epochs
        finished, target = epoch >= config.epochs - 1e-6, f"epoch {epoch:g}, --epochs {config.epochs:g}"
    if finished:
        from .training import FINAL_NAME

        final = checkpoint.resolve().parent / FINAL_NAME
        model = f"its final model is {final}" if final.is_dir() else "it holds the trained weights"
        raise UsageError(f"--resume {checkpoint}: that run is finished (step {step}, {target}; {model}): nothing to "
                         "train; to train longer, give a larger --max-steps")


def check_environment(config: TrainConfig) -> None:
    import importlib.util

    import torch

    on_gpu = torch.cuda.is_available()
    if config.fsdp and not on_gpu:
        # accelerate would silently fall back to DDP on CPU processes
        raise UsageError("--fsdp needs GPUs (accelerate shards only on accelerators); on CPU, run without --fsdp "
                         "(DDP)")
    needs = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
    if config.attn_implementation in needs:
        if importlib.util.find_spec(needs[config.attn_implementation]) is None:
            raise UsageError(f"--attn-implementation {config.attn_implementation}: the "
                             f"{needs[config.attn_implementation]} package is not installed (pip install "
                             "kidkernels[flash-attn]), or use sdpa")
        if not on_gpu:
            raise UsageError(f"--attn-implementation {config.attn_implementation} needs a CUDA GPU; use sdpa")


def preflight(config: TrainConfig, method: MethodConfig, *, student: bool = True, teacher: bool = True,
              data: bool = True) -> Preflight:
    """Every check that needs no data and no model weights (module docstring).  ``student`` / ``teacher``: check
    ``config.student`` / ``config.teacher`` (and load the student's tokenizer; False: the caller passes the model
    objects); ``data``: read the data file."""
    check_method(method)
    check_teacher_outputs(config, method)
    check_environment(config)
    teacher = teacher and method.needs_teacher
    if student and not config.student:
        raise UsageError("--student is required (a model directory or Hub name)")
    if teacher and not config.teacher:
        raise UsageError(f"method {method.method!r} needs a teacher: set --teacher (only sft trains without one)")
    if data:
        for name in ("data_file", "db_dir"):
            if not getattr(config, name):
                raise UsageError(f"--{name.replace('_', '-')} is required")
    if config.tables_file:
        check_tables_file(config.tables_file)
    resume = check_output_dir(config)
    sft = read_sft_report(config, method) if config.sft_report else None
    census = data_census(config.data_format, config.data_file, config.db_dir) if data else None
    if config.eval_data_file:
        check_eval_options(config)
    tokenizer, notes = check_models(config, method, student=student, teacher=teacher)
    return Preflight(tokenizer=tokenizer, census=census, resume_checkpoint=resume, sft_report=sft, notes=tuple(notes))


def check_eval_options(config: TrainConfig) -> dict:
    """The execution-accuracy dev set (``eval_data_file``): the file, its databases and format (a census)."""
    tables = config.eval_tables_file
    if tables and not Path(tables).is_file():
        raise UsageError(f"--eval-tables-file {tables}: file not found")
    fmt = config.eval_data_format or config.data_format
    db_dir = config.eval_db_dir or config.db_dir
    if not db_dir:
        raise UsageError("--eval-data-file needs its databases: give --eval-db-dir (or --db-dir)")
    try:
        return data_census(fmt, config.eval_data_file, db_dir)
    except UsageError as exc:
        raise UsageError(f"--eval-data-file: {exc}") from None


def check_trainer_arguments(args, config: TrainConfig | None = None, *, eval_dataset: bool = False) -> None:
    """The Trainer options that would otherwise fail only once data and models are loaded (or at the first
    evaluation): an evaluation schedule without a dev set, a best-model metric nothing computes, a reporting
    integration that is not installed, an optimizer whose package is missing, ``push_to_hub`` without a token.
    ``eval_dataset``: the caller passes its own evaluation data (then any metric may exist)."""
    eval_file = getattr(config, "eval_data_file", None) if config is not None else None
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if strategy != "no" and not eval_file and not eval_dataset:
        raise UsageError(f"--eval-strategy {strategy} needs a dev set: give --eval-data-file (execution accuracy "
                         "on it is what kid train evaluates)")
    metric = args.metric_for_best_model
    if metric and not eval_dataset:
        key = metric if metric.startswith("eval_") else f"eval_{metric}"
        if key != "eval_ex":
            raise UsageError(f"--metric-for-best-model {metric}: kid train evaluates execution accuracy only "
                             "(eval_ex, on --eval-data-file); use --metric-for-best-model eval_ex")
        if not eval_file:
            raise UsageError(f"--metric-for-best-model {metric} needs a dev set: give --eval-data-file")
    if getattr(args, "remove_unused_columns", False):
        raise UsageError("--remove-unused-columns: kid's collator reads every column of the data; leave it off")
    _check_report_to(args.report_to)
    _check_optimizer(args)
    if getattr(args, "push_to_hub", False):
        _check_hub(args)
    deepspeed = getattr(args, "deepspeed", None)
    if isinstance(deepspeed, str) and not deepspeed.lstrip().startswith("{") and not Path(deepspeed).is_file():
        raise UsageError(f"--deepspeed {deepspeed}: file not found")


def _check_report_to(report_to) -> None:
    from transformers.integrations import get_available_reporting_integrations

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    wanted = [n for n in names if n not in ("none", "all")]
    if not wanted:
        return
    available = set(get_available_reporting_integrations())
    missing = [n for n in wanted if n not in available]
    if missing:
        have = ", ".join(sorted(available)) or "none is installed"
        raise UsageError(f"--report-to {', '.join(missing)}: not installed (pip install {' '.join(missing)}); "
                         f"available: {have}")


def _check_optimizer(args) -> None:
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(args)
    except (ImportError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--optim {getattr(args.optim, 'value', args.optim)}: {first}") from None
    except Exception:  # noqa: BLE001 - needs the model (GaLore's target modules, ...): the Trainer checks it later
        pass


def _check_hub(args) -> None:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline:
        raise UsageError("--push-to-hub: HF_HUB_OFFLINE is set, nothing can be pushed")
    token = getattr(args, "hub_token", None)
    if not token:
        try:
            from huggingface_hub import get_token

            token = get_token()
        except ImportError:
            token = None
    if not token:
        raise UsageError("--push-to-hub needs a Hugging Face token: `hf auth login`, HF_TOKEN, or --hub-token")


def read_sft_report(config: TrainConfig, method: MethodConfig) -> dict:
    path = Path(config.sft_report)
    if not path.is_file():
        raise UsageError(f"--sft-report {path}: file not found")
    try:
        sft = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"--sft-report {path}: not a run report ({exc})") from None
    if not isinstance(sft, dict) or "train_config" not in sft:
        raise UsageError(f"--sft-report {path}: not a kid run report (no train_config)")
    if sft.get("method") != "sft":
        raise UsageError(f"--sft-report {path}: a {sft.get('method')!r} run, not an sft one")
    reasons = config_differences(absolute_paths(config), sft["train_config"])
    if reasons:
        raise UsageError(f"--sft-report {path}: not comparable with this run ({'; '.join(reasons)}); the training "
                         "time ratio needs the same data and settings")
    return sft
