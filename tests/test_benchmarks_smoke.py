"""Smoke test of the benchmark harness (``benchmarks/``): it runs, at tiny sizes on the CPU, and records what the
report needs.  Timings are never asserted: only that every case ran or says why not, with the expected
``extra_info`` keys, and that ``benchmarks/report.py`` turns the JSON into a table and a plot."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
OPS = {"distill", "cross_entropy", "entropy", "argmax", "select_hard", "select_random", "kd_step"}


@pytest.fixture
def bench_modules(monkeypatch):
    """``benchmarks.harness`` and ``benchmarks.report``, imported from the repository root."""
    monkeypatch.syspath_prepend(str(REPO))
    return importlib.import_module("benchmarks.harness"), importlib.import_module("benchmarks.report")


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory) -> Path:
    """Run ``pytest benchmarks/ --benchmark-only`` at the smoke scale, without torch.compile (a C++ compilation
    would take longer than the whole test), and return its JSON."""
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KIDKERNELS_BACKEND")}
    env.update(KIDKERNELS_BENCH_SCALE="smoke", KIDKERNELS_BENCH_DEVICE="cpu", KIDKERNELS_BENCH_NO_COMPILE="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only", "-q",
                           "-p", "no:cacheprovider", f"--benchmark-json={out}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "GPU figures need a GPU" in proc.stdout
    return out


def test_every_case_is_recorded_with_its_extra_info(smoke_json, bench_modules):
    harness, _ = bench_modules
    data = json.loads(smoke_json.read_text())
    entries = [b["extra_info"] for b in data["benchmarks"]]
    assert {e["op"] for e in entries} == OPS
    for e in entries:
        missing = set(harness.EXTRA_INFO_KEYS) - set(e)
        assert not missing, (e["op"], e["provider"], missing)
        assert e["scale"] == "smoke" and e["device"] == "cpu"
        if e["status"] == "ok":
            assert e["time_ms_median"] > 0 and e["time_ms_min"] > 0
            assert e["peak_extra_bytes"] is not None and e["memory_measure"].startswith("cpu:")
            if e["flops"]:
                assert e["tflops_per_s"] > 0 and e["x_floor"] > 0 and e["matmul_floor_ms"] > 0
        else:
            assert e["status"] == "skipped" and e["reason"], e
    ok = {(e["op"], e["provider"]) for e in entries if e["status"] == "ok"}
    for op in OPS - {"kd_step"}:
        assert (op, "kidkernels") in ok
    assert {p for op, p in ok if op == "kd_step"} == {"sft", "teacher_forward", "rkd_hf_eager", "rkd_kidkernels",
                                                        "kid_random", "kid_hard"}
    compiled = [e for e in entries if e["provider"] == "compile"]
    assert compiled and all(e["reason"] == "KIDKERNELS_BENCH_NO_COMPILE=1" for e in compiled)
    liger = [e for e in entries if e["provider"] in ("liger", "liger_chunked")]
    assert liger and {e["divergence"] for e in liger} <= {"fkl", "rkl", "jsd"}
    if not torch.cuda.is_available():
        assert all(e["status"] == "skipped" for e in liger)
    # The MLE-only path's peers are all recorded: run where present, skipped with the reason where not.
    peers = {e["provider"]: e for e in entries if e["op"] == "cross_entropy" and e["pass"] == "fwd_bwd"}
    assert {"torch_lce", "liger_flce", "cce", "eager", "kidkernels"} <= set(peers)
    if hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        assert peers["torch_lce"]["status"] == "ok"
    else:
        assert "PyTorch 2.13+" in peers["torch_lce"]["reason"]
    if not torch.cuda.is_available():
        assert peers["liger_flce"]["status"] == peers["cce"]["status"] == "skipped"
        assert peers["cce"]["reason"] and peers["liger_flce"]["reason"]
    machine = data["machine_info"]["kidkernels"]
    assert machine["versions"]["torch"] and machine["date"] and "GPU figures need a GPU" in machine["note"]


def test_report_writes_table_and_plot(smoke_json, bench_modules, tmp_path):
    _, report = bench_modules
    readme = tmp_path / "README.md"
    readme.write_text(f"# results\n\n{report.START_MARKER}\nold\n{report.END_MARKER}\n\nafter\n")
    plot = tmp_path / "plot.png"
    assert report.main([str(smoke_json), "--markdown", str(readme), "--plot", str(plot)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith(f"{report.END_MARKER}\n\nafter\n")
    assert "| distill | smoke-" in text and "kidkernels" in text and "torch 2." in text
    assert "x the SFT step time" in text
    assert plot.stat().st_size > 1000


class _FakeBenchmark:
    """Stands in for pytest-benchmark's fixture: runs ``pedantic`` once and keeps ``extra_info``."""

    def __init__(self):
        self.extra_info, self.group, self._mode, self.has_error, self.calls = {}, None, None, False, 0

    def pedantic(self, target, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        self._mode = "pedantic"
        self.calls += 1
        if setup:
            setup()
        return target()


def _info(harness):
    return harness.CaseInfo(op="distill", provider="eager", case="unit", pass_="fwd", n=4, v=8, flops=64)


def _failing_step(error):
    def step():
        raise error
    return step


def test_out_of_memory_is_recorded_not_raised(bench_modules):
    harness, _ = bench_modules
    benchmark = _FakeBenchmark()
    with pytest.raises(pytest.skip.Exception, match="oom"):
        harness.run_case(benchmark, _info(harness), lambda: _failing_step(RuntimeError("CUDA out of memory.")),
                         reset=lambda: None, device=torch.device("cpu"), dtype=torch.float32)
    assert benchmark.extra_info["status"] == "oom" and "out of memory" in benchmark.extra_info["reason"]
    assert benchmark.calls == 1  # the placeholder entry


def test_compile_failure_is_an_error_entry_and_other_failures_raise(bench_modules):
    harness, _ = bench_modules
    benchmark = _FakeBenchmark()
    with pytest.raises(pytest.skip.Exception, match="error"):
        harness.run_case(benchmark, _info(harness), lambda: _failing_step(ValueError("inductor failed")),
                         reset=lambda: None, device=torch.device("cpu"), dtype=torch.float32, may_fail=True)
    assert benchmark.extra_info["status"] == "error"
    with pytest.raises(ValueError, match="a real bug"):
        harness.run_case(_FakeBenchmark(), _info(harness), lambda: _failing_step(ValueError("a real bug")),
                         reset=lambda: None, device=torch.device("cpu"), dtype=torch.float32)
