"""The demo pipeline end to end at its "smoke" scale (two steps per run, six held-out questions): tokenizer, models
from config, teacher SFT, students, generation, the real evaluator, the report, the table and the plot."""
import json
import os

import pytest

from kid.cli import main
from kid.demo.run import SCALES, format_table, paired_step_ratio, run_demo, wilson_interval


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
        assert row["train_runtime_s"] > 0 and row["cpu_time_s"] > 0
        low, high = row["ex_interval_95"]
        assert 0 <= low <= row["ex"] <= high <= 1
    by_method = {row["method"]: row for row in report["table"]}
    assert by_method["sft"]["time_vs_sft"] == 1.0 and by_method["sft"]["cpu_time_vs_sft"] == 1.0
    assert by_method["sft"]["step_time_vs_sft"]["median"] == 1.0
    assert by_method["kid"]["time_vs_sft"] > 0 and by_method["teacher (sft)"]["time_vs_sft"] is None
    assert by_method["kid"]["cpu_time_vs_sft"] > 0 and by_method["kid"]["step_time_vs_sft"]["steps"] == 1
    assert report["machine"]["cpus"] >= 1 and "versions" in report
    saved = json.loads((tmp_path / "demo_report.json").read_text())
    assert saved["table"] == report["table"]
    assert len(saved["runs"]["kid"]["predictions"]) == SCALES["smoke"].heldout_limit
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert format_table(report) in out
    assert "accuracy is noise" in out and "95% interval" in out and "CPU" in out


def test_demo_table_states_noise_and_busy_machines():
    # Wilson 95% intervals: 3/64 and 4/64 overlap almost entirely
    low3, high3 = wilson_interval(3, 64)
    low4, high4 = wilson_interval(4, 64)
    assert (round(low3, 3), round(high3, 3)) == (0.016, 0.129) and low4 < high3
    assert paired_step_ratio([2.0, 1.0, 2.2, 1.8], [9.0, 1.0, 1.0, 1.0]) == {
        "median": 1.8, "p10": 1.16, "p90": 2.12, "steps": 3}  # the first (warm-up) step left out
    row = {"method": "kid", "ex": 4 / 64, "correct": 4, "total": 64, "train_runtime_s": 90.0, "cpu_time_s": 100.0,
           "time_vs_sft": 0.71, "cpu_time_vs_sft": 1.32, "step_time_vs_sft": {"median": 1.3, "p10": 1.2, "p90": 1.5}}
    busy = {"table": [row], "machine": {"cpus": 2, "load_average_start": 7.5, "load_average_end": 6.0},
            "machine_busy": True, "wall_and_cpu_ratios_disagree": ["kid"]}
    text = format_table(busy)
    assert "WARNING: the machine was busy" in text and "read the CPU column" in text
    assert "0.71x" in text and "1.32x" in text and "1.30x (1.20-1.50)" in text and "2.5-15." in text
    quiet = dict(busy, machine_busy=False, wall_and_cpu_ratios_disagree=[])
    assert "WARNING" not in format_table(quiet)


def test_demo_rejects_unknown_method_and_keeps_earlier_output(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["demo", "--out-dir", str(tmp_path), "--scale", "smoke", "--methods", "sft,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # for the processes it starts, and torch if not yet loaded
    (tmp_path / "demo_report.json").write_text("{}")
    assert main(["demo", "--output-dir", str(tmp_path), "--scale", "smoke"]) == 2
    assert "--overwrite-output-dir" in capsys.readouterr().err
    assert (tmp_path / "demo_report.json").read_text() == "{}"
