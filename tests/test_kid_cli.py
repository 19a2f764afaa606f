"""The ``kid`` command line: ``kid score`` (report format, input order, missing databases, errors), the prediction
and gold file formats, and what every subcommand shares (one-line errors with exit 2, bugs with a traceback and a
hint, ``--version``, ``--help`` without torch, the same option names)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

import kid
from kid.cli import COMMANDS, build_parser, main
from kid.evaluation.scoring import read_gold_file, read_prediction_file, write_gold_file, write_prediction_file
from tests.spider_data import MISSING_DB, SPIDER

REPO = Path(__file__).resolve().parents[1]
DB_DIR = SPIDER.db_dir
MISSING_EXAMPLE = {"db_id": MISSING_DB, "query": "SELECT count(*) FROM players", "question": "How many players?"}


def _env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))


@pytest.fixture
def score_files(tmp_path):
    """About 30 examples: up to 30 from three databases of the evaluation split (Spider dev, or the slice's
    held-out part), then two whose database is missing; every third prediction fails."""
    dev = json.loads(SPIDER.dev_file.read_text())
    dbs = list(dict.fromkeys(x["db_id"] for x in dev if (DB_DIR / x["db_id"]).is_dir()))[:3]
    examples = [x for x in dev if x["db_id"] in dbs][:30] + [MISSING_EXAMPLE] * 2
    gold = tmp_path / "gold.sql"
    gold.write_text("".join(f"{x['query']}\t{x['db_id']}\n" for x in examples))
    preds = []
    for i, x in enumerate(examples):
        preds.append(x["query"] if i % 3 else "SELECT count(*) FROM no_such_table")
    pred = tmp_path / "pred.sql"
    pred.write_text("\n".join(preds) + "\n")
    return examples, gold, pred


def _score(pred, gold, *extra, db_dir=DB_DIR):
    return ["score", "--pred", str(pred), "--gold", str(gold), "--db-dir", str(db_dir), "--timeout", "5",
            "--workers", "1", "--no-progress", *extra]


def test_score_writes_report_in_input_order(score_files, tmp_path, capsys):
    examples, gold, pred = score_files
    out = tmp_path / "report.json"
    assert main(_score(pred, gold, "--out", str(out), "--workers", "2")) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [e["db_id"] for e in report["examples"]] == [x["db_id"] for x in examples]
    for i, (e, x) in enumerate(zip(report["examples"], examples)):
        has_db = x["db_id"] != MISSING_DB
        assert e["correct"] is (bool(i % 3) and has_db), (i, e)
        assert (e["error"] is None) == (bool(i % 3) and has_db)
        assert e["index"] == i and e["hardness"] in ("easy", "medium", "hard", "extra")
    expected = sum(1 for i, x in enumerate(examples) if i % 3 and x["db_id"] != MISSING_DB)
    assert report["totals"]["correct"] == expected and report["totals"]["count"] == len(examples)
    assert report["totals"]["accuracy"] == pytest.approx(expected / len(examples))
    assert sum(g["count"] for g in report["breakdowns"]["hardness"].values()) == len(examples)
    assert f"({expected}/{len(examples)})" in printed
    # the examples without a database are counted, reported and named
    assert report["totals"]["missing_database"] == 2 and report["missing_databases"] == {MISSING_DB: 2}
    assert f"warning: 2 of {len(examples)} examples have no database" in printed and f"{MISSING_DB} (2)" in printed


def test_score_fails_when_no_database_is_there(score_files, tmp_path, capsys):
    # --db-dir one level off: every example's database is missing -> a one-line error before any scoring, not EX 0
    examples, gold, pred = score_files
    n = len(examples)
    assert main(_score(pred, gold, db_dir=DB_DIR.parent)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kid score: error: none of the {n} examples") and err.count("\n") == 1
    assert "is --db-dir right?" in err
    # with --require-all-databases, any missing database is an error
    assert main(_score(pred, gold, "--require-all-databases")) == 2
    err = capsys.readouterr().err
    assert f"2 of {n} examples of {gold} have no database" in err and MISSING_DB in err


def test_score_bird_mode_and_console_entry_point(score_files, tmp_path):
    _, gold, pred = score_files
    out = tmp_path / "bird.json"
    proc = subprocess.run([sys.executable, "-m", "kid.cli", *_score(pred, gold, "--bird", "--out", str(out))],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["metric"] == "bird" and "bird execution accuracy" in proc.stdout
    assert all("hardness" not in e for e in report["examples"])


def test_score_rejects_bad_input_before_scoring(score_files, tmp_path, capsys, monkeypatch):
    import kid.evaluation.scoring as scoring

    def no_scoring(*args, **kwargs):
        raise AssertionError("scored despite bad input")

    monkeypatch.setattr(scoring, "evaluate_predictions", no_scoring)
    examples, gold, pred = score_files

    def error(argv, *expected):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("kid score: error:") or err.startswith("usage:"), err
        for text in expected:
            assert text in err, (text, err)

    short = tmp_path / "short.sql"
    short.write_text("SELECT 1\n")
    error(_score(short, gold), f"1 predictions but the gold file has {len(examples)}")
    error(_score(tmp_path / "none.sql", gold), "prediction file not found")
    bad_gold = tmp_path / "bad_gold.sql"
    bad_gold.write_text("SELECT 1 no tab here\n")
    error(_score(short, bad_gold), "expected 'SQL<TAB>db_id'")
    error(_score(pred, gold, db_dir=tmp_path / "nodb"), "database directory not found")
    # a report path that is a directory, or an existing report: refused before the work, not after it
    error(_score(pred, gold, "--out", str(tmp_path)), "is a directory")
    existing = tmp_path / "old.json"
    existing.write_text("{}")
    error(_score(pred, gold, "--out", str(existing)), "--overwrite")
    assert existing.read_text() == "{}"
    # numbers out of range: argparse's one line and exit 2
    for flag, value in (("--timeout", "0"), ("--timeout", "-1"), ("--max-rows", "0"), ("--workers", "0")):
        with pytest.raises(SystemExit) as exc:
            main(_score(pred, gold, flag, value))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}: must be" in err and "Traceback" not in err


def test_prediction_file_round_trips_every_output(tmp_path):
    rng = random.Random(0)
    alphabet = ["a", " ", "\t", "\n", "\r", '"', "\\", "'", "é", "\u2028", "SELECT", ";", "\x0b"]
    predictions = ["", "SELECT 1", '"SELECT 1"', "  padded  ", "a\nb", "x\ty", "\r", "", "last"]
    predictions += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12))) for _ in range(300)]
    predictions.append("")  # the last prediction empty: once unreadable
    path = tmp_path / "pred.sql"
    write_prediction_file(path, predictions)
    assert read_prediction_file(path, expected=len(predictions)) == predictions
    assert path.read_text().count("\n") == len(predictions)  # one line each
    # plain queries stay plain lines (what the official evaluators read)
    write_prediction_file(path, ["SELECT a FROM t", "SELECT 2"])
    assert path.read_text() == "SELECT a FROM t\nSELECT 2\n"
    # the gold file too
    gold = [("SELECT 'a\tb'", "db1"), ("SELECT 1", "db2"), ('SELECT "x"\n FROM y', "db1")]
    write_gold_file(tmp_path / "gold.sql", gold)
    assert read_gold_file(tmp_path / "gold.sql") == [(sql.strip(), db) for sql, db in gold]


def test_prediction_count_mismatch_is_always_an_error(tmp_path):
    path = tmp_path / "pred.sql"
    path.write_text("SELECT 1\n\nSELECT 2\n")  # a blank line is an (empty) prediction, never a separator
    assert read_prediction_file(path, expected=3) == ["SELECT 1", "", "SELECT 2"]
    with pytest.raises(ValueError, match="3 predictions but the gold file has 2"):
        read_prediction_file(path, expected=2)
    path.write_text("SELECT 1\nSELECT 2\n\n")
    with pytest.raises(ValueError, match=r"3 predictions .* has 2 examples \(its last 1 line\(s\) are blank"):
        read_prediction_file(path, expected=2)
    bird = tmp_path / "predict_dev.json"
    bird.write_text(json.dumps({"1": "SELECT 2\t----- bird -----\tdb", "0": "SELECT 1\t----- bird -----\tdb"}))
    assert read_prediction_file(bird) == ["SELECT 1", "SELECT 2"]
    with pytest.raises(ValueError, match="2 predictions"):
        read_prediction_file(bird, expected=3)


# ---- what every subcommand shares --------------------------------------------------------------------------------

def test_subcommand_registry_and_version(capsys):
    assert [name for name, _, _ in COMMANDS][:4] == ["score", "eval", "train", "demo"]
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"kid {kid.__version__}"


def test_help_does_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "import kid.cli\n"
        "parser = kid.cli.build_parser()\n"
        "for argv in (['--help'], ['train', '--help'], ['eval', '--help'], ['score', '--help'], ['demo', '--help'],\n"
        "             ['export', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "        try:\n"
        "            parser.parse_args(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "    assert 'usage: kid' in out.getvalue(), argv\n"
        "    if argv[0] == 'train':  # the Trainer's options too, read from transformers' source\n"
        "        for flag in ('--report-to', '--eval-strategy', '--push-to-hub', '--optim', '--bf16',\n"
        "                     '--torch-compile', '--dataloader-num-workers', '--metric-for-best-model'):\n"
        "            assert '  ' + flag + '  ' in out.getvalue(), flag\n"
        "heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_same_option_names_across_subcommands():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    options = {name: {s for a in p._actions for s in a.option_strings} for name, p in sub.choices.items()}
    for name in ("train", "eval"):
        # one set of names, the others kept as aliases
        assert {"--data-file", "--data", "--tables-file", "--tables", "--db-dir", "--data-format",
                "--format"} <= options[name], name
    for name in ("train", "eval", "demo", "generate-teacher"):
        assert {"--output-dir", "--out-dir", "--overwrite-output-dir"} <= options[name], name
    assert {"--data-file", "--data"} <= options["score"]
    assert {"--data-file", "--data", "--tables-file", "--tables", "--db-dir", "--data-format",
            "--format"} <= options["generate-teacher"]
    assert {"--output-dir", "--out-dir"} <= options["reproduce"]
    if "export" in options:  # kid export (issue 14)
        assert {"--output-dir", "--out-dir", "--overwrite-output-dir"} <= options["export"]
    args = parser.parse_args(["generate-teacher", "--teacher", "t", "--data", "d.json", "--db-dir", "db", "--out",
                              "o", "--tables", "t.json", "--format", "bird"])
    assert (args.data_file, args.tables_file, args.out, args.data_format) == (
        Path("d.json"), Path("t.json"), Path("o"), "bird")
    args = parser.parse_args(["eval", "--model", "m", "--data", "d.json", "--tables", "t.json", "--out-dir", "o",
                              "--db-dir", "db", "--format", "bird"])
    assert (args.data_file, args.tables_file, args.output_dir, args.data_format) == (
        Path("d.json"), Path("t.json"), Path("o"), "bird")


def test_a_bug_shows_its_traceback_and_a_hint(monkeypatch, capsys):
    # a user's mistake is one line; an unexpected exception (here a TypeError, and a ValueError from outside kid)
    # is a bug: the traceback, then a line saying so
    import kid.cli as cli

    parser = cli.build_parser()
    args = parser.parse_args(["demo"])

    def broken(_args):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(cli, "build_parser", lambda: _FixedParser(args, broken))
    assert main(["demo"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "TypeError: unsupported operand" in err
    assert "kid demo: internal error (TypeError): this is a bug in kid" in err

    def library_value_error(_args):
        import json as _json

        _json.loads("{")  # a ValueError raised inside the json library

    monkeypatch.setattr(cli, "build_parser", lambda: _FixedParser(args, library_value_error))
    assert main(["demo"]) == 1
    assert "internal error (JSONDecodeError)" in capsys.readouterr().err


class _FixedParser:
    def __init__(self, args, run):
        self.args, self.run = args, run

    def parse_known_args(self, argv):
        self.args._run = self.run
        return self.args, []


def test_eval_mistakes_are_one_line_before_any_model_is_loaded(tmp_path, capsys, monkeypatch):
    import torch

    import kid.generation
    from tests.kid_tiny import bpe_tokenizer, tiny_model

    tokenizer = bpe_tokenizer(["SELECT count(*) FROM track"])
    model_dir = tmp_path / "model"
    tiny_model(0, vocab=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    def no_generation(*args, **kwargs):
        raise AssertionError("generated despite bad input")

    monkeypatch.setattr(kid.generation, "generate_sql", no_generation)
    out = tmp_path / "out"
    base = ["eval", "--model", str(model_dir), "--data-file", str(SPIDER.dev_file), "--db-dir", str(DB_DIR),
            "--output-dir", str(out), "--no-progress"]

    def error(extra, *expected, argv=None):
        capsys.readouterr()
        assert main((argv or base) + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("kid eval: error: ") and err.count("\n") == 1, err
        for text in expected:
            assert text in err, (text, err)

    def replaced(flag, value):
        argv = list(base)
        argv[argv.index(flag) + 1] = value
        return argv

    error([], "--model", "no such directory", argv=replaced("--model", str(tmp_path / "no" / "model")))
    error([], "not a model directory", argv=replaced("--model", str(tmp_path)))
    if not torch.cuda.is_available():
        error(["--device", "cuda"], "--device cuda: CUDA is not available")
    error(["--device", "banana"], "not a torch device")
    error(["--check-executable"], "--num-beams 2 or more")
    error(["--data-format", "bird"], "looks like Spider data")
    error(["--no-evidence"], "for BIRD data")
    error([], "none of the", "is --db-dir right?", argv=replaced("--db-dir", str(tmp_path)))
    error([], "--tables-file", "not found", argv=base + ["--tables-file", str(tmp_path / "tables.json")])
    for flag in ("--num-beams", "--batch-size", "--max-new-tokens", "--limit"):
        with pytest.raises(SystemExit) as exc:
            main(base + [flag, "0"])
        assert exc.value.code == 2 and f"argument {flag}: must be >= 1" in capsys.readouterr().err
    assert not out.exists()
