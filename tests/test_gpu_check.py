"""``tools/gpu_check.sh`` on a machine without a GPU: the script parses, every part's command exists (its test files
and benchmark selections collect, its modules run ``--help``), and a fake run's results render the README tables."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_report, report

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "gpu_check.sh"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KIDKERNELS_BACKEND")}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def dry_run() -> list[list[str]]:
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=120,
                          env=_env(PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stderr
    return [line.split("\t") for line in proc.stdout.splitlines() if line]


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_parts_come_in_order_of_value_each_with_a_timeout(dry_run):
    names = [row[1] for row in dry_run if row[0] in ("part", "skip")]
    assert names[:5] == ["kernel-tests", "bench-paper", "bench-paper-mle-select", "bench-sweepN", "step"]
    assert "kid-reproduce" in names and dry_run[-1][0] == "report"
    limits = [int(row[2]) for row in dry_run if row[0] == "part"]
    assert all(0 < t <= 600 for t in limits)


def test_the_budget_arithmetic_fits_the_issue_and_the_device_tool(dry_run):
    """The whole run ends within the budget (each part within what is left less its kill grace, the report under
    its reserve); the parts of value fit it with the set-up; the budget fits the issue's 8 minutes and the device
    tool's 600 s a command, and leaves 4 minutes of the session's 15 for one rerun after a 2-minute machine start
    and half a minute of transfers."""
    budget, reserve, grace, setup, min_part = (int(v) for v in next(r for r in dry_run if r[0] == "budget")[1:])
    limits = [int(row[2]) for row in dry_run if row[0] == "part"]
    assert sum(limits[:5]) + setup + reserve <= budget
    assert budget <= 8 * 60 and budget <= 600 - 60
    assert 15 * 60 - 120 - budget - 30 >= 4 * 60
    assert 0 < grace < min_part and reserve > 5  # the report's own timeout is the reserve less its 5 s kill grace
    script = SCRIPT.read_text()
    assert 'local left=$(( BUDGET - REPORT_RESERVE - KILL_GRACE - $(elapsed) ))' in script
    assert 'timeout -s INT -k "$KILL_GRACE" "$limit"' in script
    assert 'timeout -k 5 $(( REPORT_RESERVE - 5 ))' in script


def _split_env(argv: list[str]) -> tuple[dict, list[str]]:
    env = {}
    while argv and argv[0] == "env":
        argv = argv[1:]
        while argv and "=" in argv[0] and not argv[0].startswith("-"):
            key, value = argv[0].split("=", 1)
            env[key] = value
            argv = argv[1:]
    return env, argv


def _collect_ids(args: list[str], env: dict) -> list[str]:
    """Node ids ``pytest --collect-only`` finds for ``args`` (in a subprocess, with ``env``)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=_env(**env))
    assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    return [line for line in proc.stdout.splitlines() if "::" in line]


def _selected(ids: list[str], expression: str) -> list[str]:
    """The ids a ``-k`` expression keeps, with pytest's own expression parser (substring matches, any case, on
    the names of the test and its parents)."""
    from _pytest.mark.expression import Expression

    compiled = Expression.compile(expression)

    def keeps(node_id):
        names = [n.lower() for n in re.split(r"::|/", node_id)]
        return compiled.evaluate(lambda word: any(word.lower() in n for n in names))
    return [i for i in ids if keeps(i)]


def test_every_part_command_exists(dry_run):
    """pytest parts: their files exist and their ``-k`` selection keeps tests (collected at the GPU scale, which
    collection alone allows on a CPU); module parts: ``python -m MODULE --help`` works."""
    parts = [row for row in dry_run if row[0] == "part"]
    assert parts
    collected: dict[tuple, list[str]] = {}
    for _, name, _, command in parts:
        env, argv = _split_env(shlex.split(command))
        assert argv[1] == "-m", (name, argv)
        if argv[2] != "pytest":
            proc = subprocess.run([sys.executable, "-m", argv[2], "--help"], cwd=REPO, capture_output=True,
                                  text=True, timeout=300, env=_env())
            assert proc.returncode == 0, (name, proc.stderr[-2000:])
            continue
        args = argv[3:]
        files = [a for a in args if a.endswith((".py", "/"))]
        assert files and all((REPO / f).exists() for f in files), (name, files)
        expression = args[args.index("-k") + 1] if "-k" in args else None
        env.pop("KIDKERNELS_TEST_DEVICE", None)  # collect on the CPU
        key = (tuple(files), tuple(sorted(env.items())))
        if key not in collected:
            collected[key] = _collect_ids(files, env)
        ids = collected[key] if expression is None else _selected(collected[key], expression)
        assert ids, (name, expression)


def test_optional_kid_reproduce_slot_is_guarded(dry_run):
    row = next(r for r in dry_run if r[1] == "kid-reproduce")
    has_reproduce = subprocess.run([sys.executable, "-m", "kid.cli", "reproduce", "--help"], cwd=REPO,
                                   capture_output=True, env=_env(), timeout=120).returncode == 0
    if has_reproduce:
        assert row[0] in ("part", "skip")
    else:
        assert row[0] == "skip" and "issue 15" in row[2]


def test_script_refuses_to_run_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=120,
                          env=_env(PYTHON=sys.executable, GPU_CHECK_DEST=str(tmp_path / "dest"),
                                   GPU_CHECK_WORK=str(tmp_path / "work")))
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "dest").exists() or not any((tmp_path / "dest").iterdir())


def test_device_slug():
    assert gpu_report.device_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert gpu_report.device_slug("NVIDIA H200") == "h200"
    assert gpu_report.device_slug("") == "gpu"


# ---- a fake run renders -----------------------------------------------------------------------------------------

def _bench_entry(provider, time_ms, mib, **extra):
    entry = dict(op="distill", provider=provider, case="paper-N2048-Hs1024-Ht4096-V151936", divergence="rkl",
                 status="ok", reason=None, n=2048, v=151936, time_ms_median=time_ms, x_floor=time_ms / 5.6,
                 tflops_per_s=4.46 / time_ms * 1e3 if time_ms else None, peak_extra_mib=mib,
                 largest_tensor_bytes=2 ** 29)
    entry.update({"pass": "fwd_bwd"}, **extra)
    return entry


def _fake_work(work: Path) -> None:
    work.mkdir()
    (work / "parts.tsv").write_text("kernel-tests\tok\t93\t120\trc=0\nbench-paper\ttimeout\t75\t75\trc=124\n"
                                    "kid-reproduce\tskipped\t0\t0\tkid reproduce is not in this checkout\n")
    (work / "kernel-tests.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_distill" name="test_a"/><testcase classname="tests.test_distill" '
        'name="test_b"><failure message="x"/></testcase><testcase classname="tests.test_cross_entropy" '
        'name="test_c"/></testsuite></testsuites>')
    machine = {"kidkernels": {"device": "cuda", "device_name": "NVIDIA H200", "device_memory_gib": 139.8,
                              "scale": "gpu", "dtype": "bfloat16", "versions": {"torch": "2.11.0"},
                              "date": "2026-11-23", "peak_tflops_assumed": 800, "peak_tflops_source": "assumed"}}
    benchmarks = [{"name": f"bench[{p}]", "extra_info": e} for p, e in (
        ("kidkernels", _bench_entry("kidkernels", 8.0, 530.0)), ("eager", _bench_entry("eager", 30.0, 9100.0)),
        ("liger", _bench_entry("liger", 0, 0, status="skipped", reason="liger-kernel is not installed")))]
    (work / "bench-paper.json").write_text(json.dumps({"machine_info": machine, "datetime": "2026-11-23T00:00",
                                                       "benchmarks": benchmarks}))
    step = {"kind": "measured_step", "device_name": "NVIDIA H200", "results": [
        {"name": "kid-mb4", "status": "ok", "peak_bytes": 26 * 2 ** 30, "peak_reserved_bytes": 28 * 2 ** 30,
         "step_s": 1.9, "estimate_peak_bytes": 25 * 2 ** 30, "measured_over_estimate": 26 / 25},
        {"name": "kid-mb16-ckpt", "status": "oom", "reason": "CUDA out of memory"}]}
    (work / "step.json").write_text(json.dumps(step))
    (work / "kernel-tests.log").write_text("x" * 10)
    (work / "kid-reproduce" / "runs").mkdir(parents=True)
    (work / "kid-reproduce" / "table.md").write_text("| method | EX |\n")
    (work / "kid-reproduce" / "runs" / "model.safetensors").write_bytes(b"\0" * (2 << 20))  # left behind


def test_a_fake_run_renders_the_readme_tables_and_never_overwrites(tmp_path, capsys):
    work, dest = tmp_path / "work", tmp_path / "dest"
    _fake_work(work)
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{report.START_MARKER}\nold bench\n{report.END_MARKER}\n\n"
                      f"{gpu_report.GPU_START}\nold gpu\n{gpu_report.GPU_END}\ntail\n")
    summary = gpu_report.collect(work, dest, command="bash tools/gpu_check.sh", budget_s=470, elapsed_s=400,
                                 readme=readme)
    out = capsys.readouterr().out
    stem = f"{gpu_report.device_slug(summary['device']['name'])}-{summary['date']}"
    for name in (f"{stem}.json", f"{stem}.md", f"{stem}-bench.json", f"{stem}-step.json",
                 f"{stem}-kernel-tests.xml", f"{stem}-logs.tar.gz"):
        assert (dest / name).exists(), name
    assert len(list(dest.iterdir())) <= 7 and all(p.is_file() for p in dest.iterdir())  # what $OUT brings back
    import tarfile

    with tarfile.open(dest / f"{stem}-kid-reproduce.tar.gz") as tar:
        assert tar.getnames() == ["kid-reproduce/table.md"]
    merged = json.loads((dest / f"{stem}-bench.json").read_text())
    assert {b["extra_info"]["gpu_check_part"] for b in merged["benchmarks"]} == {"paper"}
    assert summary["kernel_tests"]["passed"] == 2 and summary["kernel_tests"]["failed_ids"] == [
        "tests.test_distill::test_b"]
    text = readme.read_text()
    assert "old bench" not in text and "old gpu" not in text and text.endswith(f"{gpu_report.GPU_END}\ntail\n")
    assert "| distill | paper-N2048" in text and "kidkernels" in text  # report.py's table at the paper's shape
    assert "liger-kernel is not installed" not in text  # skipped peers are left out of the README table
    assert "| kid-mb4 | 26.00 | 28.00 | 25.00 | 1.040 | 1.90 | ok |" in text
    assert "kid-mb16-ckpt" in text and "oom" in text and "**measured**" in text
    assert "3.75x the time" in text  # the headline: eager 30 ms against kidkernels 8 ms
    assert "kernel-tests" in out and "measured  26.00 GiB" in out
    assert max(len(line) for line in out.splitlines()) <= 200
    again = gpu_report.collect(work, dest, command="bash tools/gpu_check.sh")
    assert again["files"]["bench"] == f"{stem}-2-bench.json"  # a second run is kept beside the first
    # render: the summary JSON that came back rebuilds the Markdown and the README blocks.
    readme2 = tmp_path / "README2.md"
    readme2.write_text(f"{report.START_MARKER}\n{report.END_MARKER}\n{gpu_report.GPU_START}\n{gpu_report.GPU_END}\n")
    md = tmp_path / "out.md"
    assert gpu_report.main(["render", str(dest / f"{stem}.json"), "--readme", str(readme2),
                            "--markdown", str(md)]) == 0
    assert "# GPU check" in md.read_text() and "| kid-mb4 |" in readme2.read_text()
    with pytest.raises(SystemExit) as error:
        gpu_report.main(["render", str(dest / f"{stem}-step.json")])
    assert error.value.code == 2


def test_every_measured_step_has_a_committed_estimate():
    """The step part compares each measurement with an estimate; the committed paper table holds one for each
    configuration it measures (a fresh estimate on the GPU machine's CPU replaces it when there is time)."""
    from benchmarks import measure_step

    source, estimates = measure_step.committed_estimates()
    assert source is not None, "commit the table: python -m benchmarks.estimate_memory --paper-table"
    for config in measure_step.CONFIGS.values():
        result = {"name": config.name, "plan": json.loads(json.dumps(config.plan().describe())), "status": "ok",
                  "peak_bytes": 2 ** 30}
        measure_step.add_committed_estimate(result, source, estimates)
        assert result.get("estimate_peak_bytes", 0) > 0, config.name
        assert source in result["estimate_source"] and result["measured_over_estimate"] > 0
