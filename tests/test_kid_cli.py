"""The ``kid score`` command line: report format, input order, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kid.cli import COMMANDS, main
from tests.spider_data import DB_DIR, SPIDER_DIR, needs_spider

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def score_files(tmp_path):
    dev = json.loads((SPIDER_DIR / "dev.json").read_text())
    examples = [x for x in dev if x["db_id"] in ("concert_singer", "pets_1", "wta_1")][:40]
    examples = examples[:30] + [x for x in dev if x["db_id"] == "wta_1"][:2]
    gold = tmp_path / "gold.sql"
    gold.write_text("".join(f"{x['query']}\t{x['db_id']}\n" for x in examples))
    preds = []
    for i, x in enumerate(examples):
        preds.append(x["query"] if i % 3 else "SELECT count(*) FROM no_such_table")
    pred = tmp_path / "pred.sql"
    pred.write_text("\n".join(preds) + "\n")
    return examples, gold, pred


@needs_spider
def test_score_writes_report_in_input_order(score_files, tmp_path, capsys):
    examples, gold, pred = score_files
    out = tmp_path / "report.json"
    code = main(
        [
            "score",
            "--pred",
            str(pred),
            "--gold",
            str(gold),
            "--db-dir",
            str(DB_DIR),
            "--timeout",
            "5",
            "--out",
            str(out),
            "--workers",
            "2",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert [e["db_id"] for e in report["examples"]] == [x["db_id"] for x in examples]
    for i, (e, x) in enumerate(zip(report["examples"], examples)):
        has_db = x["db_id"] != "wta_1"
        assert e["correct"] is (bool(i % 3) and has_db), (i, e)
        assert (e["error"] is None) == (bool(i % 3) and has_db)
        assert e["index"] == i and e["hardness"] in ("easy", "medium", "hard", "extra")
    expected = sum(1 for i, x in enumerate(examples) if i % 3 and x["db_id"] != "wta_1")
    assert report["totals"]["correct"] == expected and report["totals"]["count"] == len(examples)
    assert report["totals"]["accuracy"] == pytest.approx(expected / len(examples))
    assert sum(g["count"] for g in report["breakdowns"]["hardness"].values()) == len(examples)
    assert f"({expected}/{len(examples)})" in printed


@needs_spider
def test_score_bird_mode_and_console_entry_point(score_files, tmp_path):
    _, gold, pred = score_files
    out = tmp_path / "bird.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kid.cli",
            "score",
            "--pred",
            str(pred),
            "--gold",
            str(gold),
            "--db-dir",
            str(DB_DIR),
            "--bird",
            "--out",
            str(out),
            "--workers",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["metric"] == "bird" and "bird execution accuracy" in proc.stdout
    assert all("hardness" not in e for e in report["examples"])


@needs_spider
def test_score_rejects_bad_input(score_files, tmp_path, capsys):
    _, gold, pred = score_files
    short = tmp_path / "short.sql"
    short.write_text("SELECT 1\n")
    assert main(["score", "--pred", str(short), "--gold", str(gold), "--db-dir", str(DB_DIR)]) == 2
    assert "1 predictions but the gold file has 32" in capsys.readouterr().err
    assert main(["score", "--pred", str(tmp_path / "none.sql"), "--gold", str(gold), "--db-dir", str(DB_DIR)]) == 2
    assert "prediction file not found" in capsys.readouterr().err
    bad_gold = tmp_path / "bad_gold.sql"
    bad_gold.write_text("SELECT 1 no tab here\n")
    assert main(["score", "--pred", str(short), "--gold", str(bad_gold), "--db-dir", str(DB_DIR)]) == 2
    assert "expected 'SQL<TAB>db_id'" in capsys.readouterr().err
    assert main(["score", "--pred", str(pred), "--gold", str(gold), "--db-dir", str(tmp_path / "nodb")]) == 2
    assert "database directory not found" in capsys.readouterr().err


def test_subcommand_registry_is_extensible():
    assert [name for name, _, _ in COMMANDS][:2] == ["score", "eval"]
    with pytest.raises(SystemExit):
        main(["--help"])


def test_prediction_file_formats(tmp_path):
    from kid.evaluation.scoring import read_prediction_file, write_prediction_file

    bird = tmp_path / "predict_dev.json"
    bird.write_text(json.dumps({"1": "SELECT 2\t----- bird -----\tdb", "0": "SELECT 1\t----- bird -----\tdb"}))
    assert read_prediction_file(bird) == ["SELECT 1", "SELECT 2"]
    plain = tmp_path / "pred.sql"
    write_prediction_file(plain, ["SELECT a\nFROM t", "", "SELECT 3"])
    assert plain.read_text() == "SELECT a FROM t\n\nSELECT 3\n"
    assert read_prediction_file(plain, expected=3) == ["SELECT a FROM t", "", "SELECT 3"]
