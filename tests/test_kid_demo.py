"""The demo pipeline end to end at its "smoke" scale (two steps per run, six held-out questions): tokenizer, models
from config, teacher SFT, students, generation, the real evaluator, the report, the table and the plot."""
import json

import pytest

from kid.cli import main
from kid.demo.run import SCALES, format_table, run_demo


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")


def test_demo_smoke_scale_writes_report_table_and_plot(tmp_path, capsys):
    report = run_demo(tmp_path, scale="smoke", methods=["kid", "gkd"], progress=False)
    names = [row["method"] for row in report["table"]]
    assert names == ["teacher (sft)", "sft", "kid", "gkd"]  # sft always runs first: the time reference
    for row in report["table"]:
        assert row["total"] == SCALES["smoke"].heldout_limit
        assert 0 <= row["correct"] <= row["total"]
        assert row["ex"] == pytest.approx(row["correct"] / row["total"])
        assert row["steps"] == (SCALES["smoke"].teacher_steps if row["method"].startswith("teacher")
                                else SCALES["smoke"].student_steps)
        assert row["train_runtime_s"] > 0
    by_method = {row["method"]: row for row in report["table"]}
    assert by_method["sft"]["time_vs_sft"] == 1.0
    assert by_method["kid"]["time_vs_sft"] > 0 and by_method["teacher (sft)"]["time_vs_sft"] is None
    saved = json.loads((tmp_path / "demo_report.json").read_text())
    assert saved["table"] == report["table"]
    assert len(saved["runs"]["kid"]["predictions"]) == SCALES["smoke"].heldout_limit
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert format_table(report) in out


def test_demo_rejects_unknown_method(tmp_path, capsys):
    assert main(["demo", "--out-dir", str(tmp_path), "--scale", "smoke", "--methods", "sft,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
