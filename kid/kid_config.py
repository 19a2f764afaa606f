"""``KIDConfig``: ``transformers.TrainingArguments`` with kid's options, what ``kid train`` parses.

TRL's pattern (``GKDConfig``, ``DistillationConfig``): one ``TrainingArguments`` subclass carries the method's
options next to every Trainer option, so ``HfArgumentParser`` reads all of them from flags and YAML, and
``DistillTrainer(model, args=KIDConfig(...), ...)`` needs nothing else.

Where the fields come from (one source of truth each):

* every ``TrainingArguments`` field, with the Trainer's help; kid changes a few defaults
  (:data:`kid.training.TRAINER_SETTINGS`: no reporting integration, every column kept, no NaN filter, ...);
* the options of :class:`kid.training.TrainConfig` (student, teacher, data, LoRA, token budgets, the dev slice of
  the execution-accuracy evaluation, ...) and of :class:`kid.config.MethodConfig` (method, alpha, presets, ...),
  with their defaults, help texts and choices (:func:`kid.options.kid_options`).  The TrainConfig options that
  are Trainer fields under another name take the Trainer's field, with TrainConfig's default and the old name as
  an alias (:data:`kid.training.TRAINER_EQUIVALENTS`): ``--epochs`` is ``--num-train-epochs`` (default 8),
  ``--lr-scheduler`` is ``--lr-scheduler-type`` (cosine), ``--micro-batch-size`` is
  ``--per-device-train-batch-size`` (4); learning rate 2e-4, warm-up 0.03, 2 checkpoints kept, ...

``TrainConfig`` and ``MethodConfig`` stay the plain API (``kid reproduce``, ``kid demo`` and the benchmarks build
them): :meth:`KIDConfig.train_config` and :meth:`KIDConfig.method_config` give the views of a KIDConfig, whose
checks are theirs; :meth:`KIDConfig.from_configs` goes the other way (what :func:`kid.training.
training_arguments` returns).

What KIDConfig works out when it is built (``__post_init__``), before the Trainer's own checks:

* ``gradient_accumulation_steps`` from ``batch_size`` (sequences per optimizer step over every process:
  ``batch_size / (per_device_train_batch_size x WORLD_SIZE)``), or ``batch_size`` from it; both given must agree;
* ``bf16`` (None: on when every weight trains on a GPU with bfloat16), ``use_cpu`` (None: when there is no GPU),
  ``disable_tqdm`` from ``progress``, ``save_total_limit`` 0 as None (keep every checkpoint);
* ``fsdp=True`` (``--fsdp`` without a value): FSDP2 (``fsdp_config`` version 2) with FSDP's own activation
  checkpointing in place of the Trainer's;
* transformers 5 spellings: ``warmup_ratio`` as a fractional ``warmup_steps``, ``group_by_length`` as
  ``train_sampling_strategy="group_by_length"``, ``gradient_checkpointing`` as ``activation_checkpointing``;
* ``metric_for_best_model`` "eval_ex" when a dev set is given and the best checkpoint is asked for.

A value out of range, a wrong type, or options that contradict each other raise :class:`kid.errors.UsageError`
naming the option.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from functools import lru_cache
from typing import Any, Literal, Optional

from transformers import TrainingArguments

from .config import MethodConfig
from .errors import UsageError
from .options import help_text, kid_options
from .training import TRAINER_SETTINGS, TrainConfig, _coerce_resume

_TRAINER_FIELDS = {f.name: f for f in dataclasses.fields(TrainingArguments)}
_TRAINER_TYPES = typing.get_type_hints(TrainingArguments)
# Trainer fields that kid works out when None (KIDConfig's default): the option is then "auto".
_AUTO_FIELDS = {"bf16": Optional[bool], "use_cpu": Optional[bool], "gradient_accumulation_steps": Optional[int]}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0", "")


def _kid_type(option):
    """The annotation of a kid option's KIDConfig field (Literal for choices: HfArgumentParser makes them argparse
    choices)."""
    if option.kind in ("resume", "fsdp"):
        return Optional[str]
    if option.choices:
        base = Literal[tuple(option.choices)]
    else:
        base = {"int": int, "float": float, "bool": bool}.get(option.kind, str)
    return Optional[base] if option.optional and option.kind != "bool" else base


def _aliases(option) -> list[str]:
    """The option strings HfArgumentParser does not add by itself (it adds --name and --name-with-dashes)."""
    own = {"--" + option.name, "--" + option.name.replace("_", "-")}
    return [flag for flag in option.flags if flag not in own]


def _fields() -> list[tuple[str, Any, dataclasses.Field]]:
    out = []
    for option in kid_options():
        metadata = {"help": help_text(option)}
        aliases = _aliases(option)
        if aliases:
            metadata["aliases"] = aliases
        default = None if option.source_name == "batch_size" else option.default
        if option.name in _TRAINER_FIELDS:  # the Trainer's field, with kid's default, help and old name
            annotation = _TRAINER_TYPES[option.name]
        else:
            annotation = _kid_type(option)
        out.append((option.name, annotation, dataclasses.field(default=default, metadata=metadata)))
    taken = {name for name, _, _ in out}
    for name, value in TRAINER_SETTINGS.items():
        if name in taken or name not in _TRAINER_FIELDS:
            continue
        metadata = dict(_TRAINER_FIELDS[name].metadata)
        default = (dataclasses.field(default_factory=lambda v=value: list(v), metadata=metadata)
                   if isinstance(value, list) else dataclasses.field(default=value, metadata=metadata))
        out.append((name, _TRAINER_TYPES[name], default))
    for name, annotation in _AUTO_FIELDS.items():
        if name in _TRAINER_FIELDS:
            metadata = dict(_TRAINER_FIELDS[name].metadata)
            metadata["help"] = (metadata.get("help", "") + " (kid: None works it out when the run starts)").strip()
            out.append((name, annotation, dataclasses.field(default=None, metadata=metadata)))
    return out


@lru_cache(maxsize=None)
def _run_options():
    return tuple(o for o in kid_options() if o.group != "method")


@lru_cache(maxsize=None)
def _method_options():
    return tuple(o for o in kid_options() if o.group == "method")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _checkpointing_name() -> str:
    return "activation_checkpointing" if "activation_checkpointing" in _TRAINER_FIELDS else "gradient_checkpointing"


def _post_init(self) -> None:
    try:
        self._kid_resolve()
        TrainingArguments.__post_init__(self)
        self.train_config()  # the run's and the method's own checks
        self.method_config()
    except UsageError:
        raise
    except (ValueError, TypeError) as exc:
        raise UsageError(_one_line(exc)) from None


def _kid_resolve(self) -> None:
    """The values kid works out before the Trainer's own __post_init__ (module docstring); idempotent."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    self.resume = _coerce_resume(self.resume)
    if self.resume is None and getattr(self, "resume_from_checkpoint", None):
        self.resume = self.resume_from_checkpoint
    if self.disable_tqdm is None:
        self.disable_tqdm = not self.progress

    micro = self.per_device_train_batch_size
    if not isinstance(micro, int) or isinstance(micro, bool) or micro < 1:
        raise UsageError(f"micro_batch_size (per_device_train_batch_size) must be an integer >= 1, got {micro!r}")
    steps = self.gradient_accumulation_steps
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise UsageError(f"gradient_accumulation_steps must be an integer >= 1, got {steps!r}")
    if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
        raise UsageError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
    if self.batch_size is None and steps is None:
        self.batch_size = TrainConfig.batch_size
    if steps is None:
        if self.batch_size % (micro * world):
            raise UsageError(f"batch_size {self.batch_size} is not a multiple of micro_batch_size x processes "
                             f"({micro} x {world})")
        self.gradient_accumulation_steps = self.batch_size // (micro * world)
    elif self.batch_size is None:
        self.batch_size = steps * micro * world
    elif self.batch_size != steps * micro * world:
        raise UsageError(f"batch_size {self.batch_size} but gradient_accumulation_steps x micro_batch_size x "
                         f"processes is {steps} x {micro} x {world} = {steps * micro * world}: give one of them")

    if self.save_total_limit == 0:
        self.save_total_limit = None  # keep every checkpoint
    if "warmup_ratio" not in _TRAINER_FIELDS and self.warmup_ratio and not self.warmup_steps:
        self.warmup_steps = float(self.warmup_ratio)  # transformers 5: warmup_steps in [0, 1) is a ratio
    if "group_by_length" not in _TRAINER_FIELDS and self.group_by_length \
            and getattr(self, "train_sampling_strategy", "random") == "random":
        self.train_sampling_strategy = "group_by_length"
    checkpointing = _checkpointing_name()
    if checkpointing != "gradient_checkpointing" and self.gradient_checkpointing is not None \
            and self.activation_checkpointing is None:
        # transformers 5 renamed it; kid's --gradient-checkpointing keeps working without a deprecation warning
        self.activation_checkpointing, self.gradient_checkpointing = bool(self.gradient_checkpointing), None

    fsdp = self.fsdp
    if fsdp is True or (isinstance(fsdp, str) and fsdp.strip().lower() in _TRUE + ("fsdp2",)):
        # kid's --fsdp: FSDP2, whose lm_head kid gathers; FSDP's own activation checkpointing (the Trainer's
        # would all-gather twice)
        config = dict(self.fsdp_config) if isinstance(self.fsdp_config, dict) else {}
        if isinstance(self.fsdp_config, str) and self.fsdp_config.strip():
            config = self.fsdp_config  # a file or JSON the Trainer reads; the user's settings
        else:
            config.setdefault("version", 2)
            if getattr(self, checkpointing):
                config["activation_checkpointing"] = True
                setattr(self, checkpointing, False)
        self.fsdp, self.fsdp_config = True, config
    elif fsdp is False or (isinstance(fsdp, str) and fsdp.strip().lower() in _FALSE):
        self.fsdp = _TRAINER_FIELDS["fsdp"].default
    if getattr(self, checkpointing) and getattr(self, checkpointing + "_kwargs") is None:
        setattr(self, checkpointing + "_kwargs", {"use_reentrant": False})

    on_gpu = torch.cuda.is_available()
    if self.bf16 is None:
        self.bf16 = bool(not self.lora and self.dtype == "auto" and on_gpu and torch.cuda.is_bf16_supported()
                         and not self.fp16)
    if self.use_cpu is None:
        self.use_cpu = not on_gpu
    if self.metric_for_best_model is None and self.eval_data_file \
            and (self.load_best_model_at_end or self.save_strategy == "best"):
        self.metric_for_best_model = "eval_ex"


def train_config(self) -> TrainConfig:
    """The run options as a :class:`kid.training.TrainConfig` (a new object: it follows later changes)."""
    values = {}
    for option in _run_options():
        value = getattr(self, option.name)
        if option.source_name == "lr_scheduler":
            value = getattr(value, "value", value)
        elif option.source_name == "save_total_limit":
            value = 0 if value is None else value
        elif option.source_name in ("logging_steps", "save_steps") and isinstance(value, float):
            value = int(value) if value.is_integer() else max(1, int(value))  # a ratio: the Trainer's business
        elif option.source_name == "fsdp":
            value = bool(value)
        elif option.source_name == "gradient_checkpointing":
            fsdp_config = self.fsdp_config if isinstance(self.fsdp_config, dict) else {}
            value = bool(getattr(self, _checkpointing_name()) or self.gradient_checkpointing
                         or fsdp_config.get("activation_checkpointing"))
        elif option.source_name == "progress":
            value = not self.disable_tqdm
        elif option.source_name == "group_by_length":
            value = bool(value) or getattr(self, "train_sampling_strategy", None) == "group_by_length"
        values[option.source_name] = value
    return TrainConfig(**values)


def method_config(self) -> MethodConfig:
    """The method options as a :class:`kid.config.MethodConfig` (a new object)."""
    try:
        return MethodConfig(**{o.name: getattr(self, o.name) for o in _method_options()})
    except UsageError:
        raise
    except (ValueError, TypeError) as exc:
        raise UsageError(_one_line(exc)) from None


def from_configs(cls, config: TrainConfig, method: MethodConfig | None = None, **overrides):
    """A KIDConfig with ``config``'s run options (and ``method``'s), then ``overrides`` (any field).  Given
    ``gradient_accumulation_steps`` alone, the batch size follows from it."""
    values = {option.name: getattr(config, option.source_name) for option in _run_options()}
    if method is not None:
        values.update({option.name: getattr(method, option.name) for option in _method_options()})
    if "gradient_accumulation_steps" in overrides and "batch_size" not in overrides:
        values["batch_size"] = None
    values.update(overrides)
    return cls(**values)


def kid_field_names(cls) -> tuple[str, ...]:
    """The fields KIDConfig adds to or takes over from ``TrainingArguments`` (kid's options)."""
    return tuple(o.name for o in kid_options())


KIDConfig = dataclasses.make_dataclass(
    "KIDConfig", _fields(), bases=(TrainingArguments,),
    namespace={"__post_init__": _post_init, "_kid_resolve": _kid_resolve, "train_config": train_config,
               "method_config": method_config, "from_configs": classmethod(from_configs),
               "kid_field_names": classmethod(kid_field_names)})
KIDConfig.__module__ = __name__  # for pickle (the Trainer saves its arguments in every checkpoint)
KIDConfig.__doc__ = """``transformers.TrainingArguments`` plus kid's run, evaluation and method options (see
:mod:`kid.kid_config`).  ``KIDConfig(output_dir=..., student=..., teacher=..., method="kid", alpha=0.2,
report_to="wandb", eval_strategy="steps", ...)``; ``HfArgumentParser(KIDConfig)`` reads it from flags, YAML or a
dict; ``kid train`` is :func:`kid.training.run_training` on one."""


# ---- parsing: flags and YAML ---------------------------------------------------------------------------------

def _parser_class():
    from transformers import HfArgumentParser

    from .options import OneLineErrors

    class KIDArgumentParser(OneLineErrors, HfArgumentParser):
        """``HfArgumentParser(KIDConfig)`` with kid's conventions: a boolean option works as a bare flag
        (``--bf16``), as ``--bf16 false`` and as ``--no-bf16``; ``--resume`` without a value continues the newest
        checkpoint; ``--fsdp`` without a value is kid's FSDP2; ``--config FILE`` reads a YAML file whose values
        the flags override; a mistake is one line."""

        def __init__(self, prog: str = "kid train"):
            super().__init__(KIDConfig, prog=prog, allow_abbrev=False)
            _adjust_actions(self)
            self.add_argument("--config", default=None, metavar="FILE",
                              help="YAML file of options (flags override it)")

    return KIDArgumentParser


def _adjust_actions(parser) -> None:
    from transformers.hf_argparser import string_to_bool

    from .options import negations

    taken = set(parser._option_string_actions)
    kid_bools = {o.name for o in kid_options() if o.kind == "bool"}
    for action in list(parser._actions):
        if action.dest == "resume":
            action.nargs, action.const = "?", "true"
        elif action.dest == "fsdp":
            action.nargs, action.const = "?", True
        elif action.type is string_to_bool:
            if action.nargs is None:  # an Optional[bool] field: a bare flag too
                action.nargs, action.const = "?", True
            if action.dest in kid_bools:  # --no-x for every boolean kid option, whatever its default
                missing = [s for s in negations(o for o in action.option_strings if not o.startswith("--no"))
                           if s not in taken]
                if missing:
                    parser.add_argument(*missing, dest=action.dest, action="store_false",
                                        help=argparse_suppress())
                    taken.update(missing)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def kid_argument_parser(prog: str = "kid train"):
    """The parser ``kid train`` reads its flags with (an ``HfArgumentParser`` over :class:`KIDConfig`)."""
    return _parser_class()(prog)


def _field_hints() -> dict:
    return typing.get_type_hints(KIDConfig)


def option_aliases() -> dict[str, str]:
    """Every spelling of every KIDConfig field (``epochs``, ``micro-batch-size``, ``lr_scheduler`` ...) -> the field."""
    names: dict[str, str] = {}
    for f in dataclasses.fields(KIDConfig):
        if not f.init:
            continue
        for alias in [f.name, *f.metadata.get("aliases", [])]:
            key = alias.lstrip("-").replace("-", "_")
            names.setdefault(key, f.name)
    return names


def yaml_options(path) -> dict[str, Any]:
    """A YAML file of options -> {KIDConfig field: value}, values converted to the fields' types.  Flat keys (dashes
    or underscores, kid's older names too) or method options nested under ``method_options:``.  Errors name the
    file and the option."""
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--config {path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"--config {path}: not valid YAML ({problem}{where})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--config {path}: not a UTF-8 text file") from None
    if not isinstance(loaded, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values")
    method_section = loaded.pop("method_options", None) or {}
    if not isinstance(method_section, dict):
        raise UsageError(f"--config {path}: method_options must be a mapping")
    raw = {str(k): v for k, v in loaded.items()}
    raw.update({str(k): v for k, v in method_section.items()})
    aliases, hints = option_aliases(), _field_hints()
    unknown = sorted(k for k in raw if k.replace("-", "_") not in aliases)
    if unknown:
        import difflib

        hints_text = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), list(aliases), n=1)
            if close:
                hints_text.append(f"{key}: did you mean {close[0]}?")
        extra = f" ({'; '.join(hints_text)})" if hints_text else ""
        raise UsageError(f"--config {path}: unknown option(s) {unknown}{extra}")
    values, spelled = {}, {}
    for key, value in raw.items():
        name = aliases[key.replace("-", "_")]
        if name in spelled:
            raise UsageError(f"--config {path}: {spelled[name]} and {key} are the same option; give one")
        spelled[name] = key
        try:
            values[name] = coerce_value(name, hints[name], value)
        except UsageError as exc:
            text = str(exc)
            if key != name and text.startswith(name + ":"):
                text = key + text[len(name):]  # the key as the file spells it
            raise UsageError(f"--config {path}: {text}") from None
    return values


def coerce_value(name: str, hint, value):
    """A YAML value converted to a field's type (``"8"`` -> 8 for an int, ``"true"`` -> True for a bool); a
    value of the wrong type is a :class:`UsageError` naming the field.  Enums, lists and mappings are checked by
    KIDConfig itself."""
    import enum
    import types

    from .training import _coerce

    if name == "resume":
        if isinstance(value, (bool, str)) or value is None:
            return value
        raise UsageError(f"resume: expected true or a checkpoint directory, got {value!r}")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in args
    bases = [a for a in args if a is not type(None)]
    if value is None:
        if optional:
            return None
        raise UsageError(f"{name}: a value is required, got null")
    if len(bases) == 1:
        base = bases[0]
        if base in (bool, int, float):
            return _coerce(name, base.__name__, optional, value)
        if base is str:
            return _coerce(name, "str", optional, value)
        if typing.get_origin(base) is Literal or (isinstance(base, type) and issubclass(base, enum.Enum)):
            names = ([str(v) for v in typing.get_args(base)] if typing.get_origin(base) is Literal
                     else [str(m.value) for m in base])
            text = str(getattr(value, "value", value))
            if isinstance(value, bool) or text not in names:
                raise UsageError(f"{name}: expected one of {', '.join(names)}; got {value!r}")
            return text
        if typing.get_origin(base) is list:
            return list(value) if isinstance(value, (list, tuple)) else [value]
    enums = [b for b in bases if isinstance(b, type) and issubclass(b, enum.Enum)]
    if enums and isinstance(value, str):  # Union[IntervalStrategy, str] and the like: a name of the enum
        names = [str(m.value) for m in enums[0]]
        if value not in names:
            raise UsageError(f"{name}: expected one of {', '.join(names)}; got {value!r}")
    return value  # a mapping, a list, ...: the Trainer's own checks


def parse_kid_config(argv, *, prog: str = "kid train") -> KIDConfig:
    """``kid train``'s command line (``--config FILE`` first, then the flags over it) -> a KIDConfig; a mistake is
    a :class:`UsageError` (a value) or argparse's one-line error and exit status 2 (a flag)."""
    import argparse

    argv = list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    parser = kid_argument_parser(prog)
    if known.config is not None:
        parser.set_defaults(**yaml_options(known.config))
    namespace, rest = parser.parse_known_args(argv)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    fields = {f.name for f in dataclasses.fields(KIDConfig) if f.init}
    return KIDConfig(**{k: v for k, v in vars(namespace).items() if k in fields})
