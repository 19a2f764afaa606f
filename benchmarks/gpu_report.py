"""The report of ``tools/gpu_check.sh``: one summary of every part it ran, written where the results go, the README
tables regenerated, and a summary that fits a terminal.

    python -m benchmarks.gpu_report collect --work DIR --dest DIR [--readme README.md] --command "..." \\
        [--budget S] [--elapsed S]
    python -m benchmarks.gpu_report render RESULTS/<gpu>-<date>.json [--readme README.md] [--markdown FILE]

``collect`` (run by the script on the GPU machine) reads the parts' outcomes (``parts.tsv``), the kernel tests'
JUnit XML, the pytest-benchmark JSON files and the step measurement from the work directory, and writes to
``--dest`` at most seven files (the device tool brings back eight from its ``$OUT``): ``<gpu>-<date>.json`` (device,
versions, command, every part and figure), ``<gpu>-<date>.md``, ``<gpu>-<date>-bench.json`` (the benchmark parts
merged into one pytest-benchmark JSON, which ``report.py`` reads), ``-step.json``, ``-kernel-tests.xml``,
``-logs.tar.gz`` and, when ``kid reproduce`` ran, ``-kid-reproduce.tar.gz`` (its files under 1 MiB: reports and
tables, no checkpoints).  Nothing is overwritten: a second run on the same day gets ``<gpu>-<date>-2``.
``render`` rebuilds the Markdown and the README tables from a summary JSON, e.g. after the files came back from
the GPU machine into ``benchmarks/results/``.

README blocks: the benchmark table at the paper's shape between ``<!-- bench:start -->`` / ``<!-- bench:end -->``
(``report.py``'s), and the GPU check's summary between ``<!-- gpu-check:start -->`` / ``<!-- gpu-check:end -->``.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from . import report

GiB = 2 ** 30
GPU_START, GPU_END = "<!-- gpu-check:start -->", "<!-- gpu-check:end -->"
LOG_TAIL_BYTES = 200_000
REPRODUCE_FILE_BYTES = 1 << 20
PACKAGES = ("kidkernels", "torch", "triton", "transformers", "peft", "liger-kernel", "cut-cross-entropy",
            "pytest-benchmark")


def device_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``: the file-name form of a device name."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
    return slug or "gpu"


def package_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_info() -> dict:
    try:
        import torch
    except ImportError:
        return {"name": None}
    info = {"name": None, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), memory_gib=props.total_memory / GiB,
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    return info


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def read_parts(path: Path) -> list[dict]:
    """``parts.tsv`` rows: name, status (ok / failed / timeout / skipped), seconds, limit, detail."""
    parts = []
    if not path.exists():
        return parts
    for line in path.read_text().splitlines():
        fields = line.split("\t")
        if len(fields) < 4:
            continue
        name, status, seconds, limit = fields[:4]
        parts.append({"name": name, "status": status, "seconds": int(seconds), "limit_s": int(limit),
                      "detail": fields[4] if len(fields) > 4 else ""})
    return parts


def read_junit(path: Path) -> dict | None:
    """Counts of a pytest JUnit XML file and the ids of the tests that failed (at most 30)."""
    if not path.exists():
        return None
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_ids"] = failed[:30]
    return counts


def merge_benchmark_json(paths: list[Path]) -> dict:
    """One pytest-benchmark JSON from several parts of a run: the first part's machine description, every part's
    benchmarks (each knows its part in ``extra_info["gpu_check_part"]``)."""
    merged = None
    for path in paths:
        data = json.loads(path.read_text())
        part = path.stem.removeprefix("bench-")
        for bench in data.get("benchmarks", []):
            bench.setdefault("extra_info", {})["gpu_check_part"] = part
        if merged is None:
            merged = dict(data, benchmarks=list(data.get("benchmarks", [])))
        else:
            merged["benchmarks"] += data.get("benchmarks", [])
    return merged


def _free_stem(dest: Path, stem: str) -> str:
    candidate, n = stem, 1
    while any(dest.glob(f"{candidate}.json")) or any(dest.glob(f"{candidate}.md")):
        n += 1
        candidate = f"{stem}-{n}"
    return candidate


def collect(work: Path, dest: Path, *, command: str, budget_s: int | None = None, elapsed_s: int | None = None,
            readme: Path | None = None, root: Path | None = None) -> dict:
    """Gather the parts of a run (module docstring), write the summary files to ``dest``; return the summary."""
    root = root or Path(__file__).resolve().parent.parent
    device = _device_info()
    step = json.loads((work / "step.json").read_text()) if (work / "step.json").exists() else None
    bench_paths = sorted(work.glob("bench-*.json"))
    if device.get("name") is None:  # e.g. the report run alone, away from the GPU: the parts say what ran on
        names = [m.get("device_name") for m in report.load_entries(bench_paths)[1]] if bench_paths else []
        device["name"] = (step or {}).get("device_name") or next((n for n in names if n), None) or "unknown"
    date = datetime.date.today().isoformat()
    dest.mkdir(parents=True, exist_ok=True)
    stem = _free_stem(dest, f"{device_slug(device['name'])}-{date}")
    files = {}
    if bench_paths:
        merged = merge_benchmark_json(bench_paths)
        target = dest / f"{stem}-bench.json"
        target.write_text(json.dumps(merged, indent=1) + "\n")
        files["bench"] = target.name
    for name in ("step.json", "kernel-tests.xml"):
        if (work / name).exists():
            target = dest / f"{stem}-{name}"
            shutil.copyfile(work / name, target)
            files[name] = target.name
    logs = sorted(work.glob("*.log"))
    if logs:
        target = dest / f"{stem}-logs.tar.gz"
        with tarfile.open(target, "w:gz") as tar:
            for log in logs:
                data = log.read_bytes()[-LOG_TAIL_BYTES:]
                info = tarfile.TarInfo(log.name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        files["logs"] = target.name
    reproduce = work / "kid-reproduce"
    if reproduce.is_dir():
        target = dest / f"{stem}-kid-reproduce.tar.gz"
        with tarfile.open(target, "w:gz") as tar:
            for path in sorted(reproduce.rglob("*")):
                if path.is_file() and path.stat().st_size < REPRODUCE_FILE_BYTES:
                    tar.add(path, arcname=str(path.relative_to(work)))
        files["kid-reproduce"] = target.name
    entries, machines = report.load_entries([dest / files["bench"]]) if "bench" in files else ([], [])
    summary = {
        "kind": "gpu_check", "date": date, "command": command, "budget_s": budget_s, "elapsed_s": elapsed_s,
        "device": device, "versions": {p: package_version(p) for p in PACKAGES}, "git_commit": _git_commit(root),
        "parts": read_parts(work / "parts.tsv"), "kernel_tests": read_junit(work / "kernel-tests.xml"),
        "files": files, "bench_machines": machines, "bench_entries": entries, "step": step,
        "note": "measured on the device named here; the step's estimate column is the fake-tensor estimate of the "
                "same step (python -m benchmarks.estimate_memory)",
    }
    summary_path = dest / f"{stem}.json"
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    (dest / f"{stem}.md").write_text(render_markdown(summary, source=summary_path.name))
    if readme is not None:
        update_readme(readme, summary, source=summary_path.name)
    print(terminal_summary(summary, dest / stem))
    return summary


# ---- rendering --------------------------------------------------------------------------------------------------

def _step_rows(summary: dict) -> list[str]:
    step = summary.get("step") or {}
    lines = ["| config | measured peak allocated (GiB) | reserved (GiB) | fake-tensor estimate (GiB) "
             "| measured / estimate | step time (s) | status |", "|---|---|---|---|---|---|---|"]
    sources = sorted({r["estimate_source"] for r in step.get("results", []) if r.get("estimate_source")})
    for r in step.get("results", []):
        ok = r.get("status") == "ok"
        est = r.get("estimate_peak_bytes")
        lines.append("| " + " | ".join([
            r["name"], f"{r['peak_bytes'] / GiB:.2f}" if ok else "-",
            f"{r['peak_reserved_bytes'] / GiB:.2f}" if ok else "-",
            f"{est / GiB:.2f}" if est else (r.get("estimate_error") or "-")[:60],
            f"{r['measured_over_estimate']:.3f}" if ok and r.get("measured_over_estimate") else "-",
            f"{r['step_s']:.2f}" if ok else "-",
            "ok" if ok else f"{r.get('status')}: {(r.get('reason') or '')[:60]}".replace("|", "/"),
        ]) + " |")
    if sources:
        lines += ["", "Estimates: " + "; ".join(sources) + "."]
    return lines


def _headline(summary: dict) -> list[str]:
    """The paper's shape, reverse KL + MLE forward+backward: kidkernels against eager (time, floor, memory)."""
    found = {}
    for e in summary.get("bench_entries", []):
        if (e.get("op"), e.get("divergence"), e.get("pass")) == ("distill", "rkl", "fwd_bwd") \
                and str(e.get("case", "")).startswith("paper") and e.get("status") == "ok":
            found[e["provider"]] = e
    lines = []
    if "kidkernels" in found:
        ours = found["kidkernels"]
        text = (f"paper shape ({ours['case']}), reverse KL + MLE forward+backward: kidkernels "
                f"{ours['time_ms_median']:.2f} ms ({ours['x_floor']:.2f}x the matmul floor), peak extra "
                f"{ours['peak_extra_mib']:,.0f} MiB")
        eager = found.get("eager")
        if eager:
            text += (f"; eager {eager['time_ms_median']:.2f} ms, {eager['peak_extra_mib']:,.0f} MiB "
                     f"({eager['time_ms_median'] / ours['time_ms_median']:.2f}x the time)")
        lines.append(text)
    return lines


def _kernel_line(summary: dict) -> str:
    k = summary.get("kernel_tests")
    if not k:
        return "kernel tests on CUDA: no result (see the parts)"
    text = (f"kernel tests on CUDA: {k['tests']} run, {k['passed']} passed, {k['failures']} failed, "
            f"{k['errors']} errors, {k['skipped']} skipped")
    if k.get("failed_ids"):
        text += " (failed: " + ", ".join(k["failed_ids"][:5]) + (" ..." if len(k["failed_ids"]) > 5 else "") + ")"
    return text


def _header(summary: dict) -> str:
    d, v = summary["device"], summary["versions"]
    memory = f", {d['memory_gib']:.0f} GiB" if d.get("memory_gib") else ""
    software = ", ".join(f"{name} {version}" for name, version in v.items() if version)
    used = f"; {summary['elapsed_s']} s of a {summary['budget_s']} s budget" if summary.get("elapsed_s") else ""
    commit = f"; commit {summary['git_commit'][:10]}" if summary.get("git_commit") else ""
    return (f"**{d.get('name')}**{memory} (CUDA {d.get('cuda')}), {summary['date']}: `{summary['command']}`{used}"
            f"{commit}.  {software}.")


def render_markdown(summary: dict, *, source: str) -> str:
    lines = [f"# GPU check, {summary['device'].get('name')}, {summary['date']}", "",
             "**Measured** on the device below (not estimates), by `bash tools/gpu_check.sh` (`" + source + "`).",
             "", _header(summary), "", "## Parts", "", "| part | status | time (s) | limit (s) | detail |",
             "|---|---|---|---|---|"]
    for p in summary.get("parts", []):
        lines.append(f"| {p['name']} | {p['status']} | {p['seconds']} | {p['limit_s']} | {p['detail']} |")
    lines += ["", "## Kernel tests", "", _kernel_line(summary)]
    if summary.get("bench_entries"):
        lines += ["", "## Benchmarks", "", *_headline(summary), "",
                  report.render(summary["bench_entries"], summary.get("bench_machines", [])).rstrip()]
    if summary.get("step"):
        lines += ["", "## KID step at 7B / 0.5B (batch 16 x (1,024 + 128), LoRA r=64, bf16)", "",
                  "Measured: `torch.cuda.max_memory_allocated()` over one optimizer step after a warm-up step; "
                  "estimate: the same step on fake tensors (`python -m benchmarks.estimate_memory`), which leaves "
                  "out the CUDA context, library workspaces and fragmentation.", "", *_step_rows(summary)]
    return "\n".join(lines) + "\n"


def readme_block(summary: dict, *, source: str) -> str:
    lines = ["GPU check (**measured**), " + _header(summary) + f"  Details: `benchmarks/results/{source}` and the "
             "`.md` next to it.", "", "- " + _kernel_line(summary)]
    parts = ", ".join(f"{p['name']} {p['status']}" for p in summary.get("parts", []))
    if parts:
        lines.append("- parts: " + parts)
    lines += ["- " + h for h in _headline(summary)]
    if summary.get("step"):
        lines += ["", *_step_rows(summary)]
    return "\n".join(lines) + "\n"


def _replace_block(content: str, start: str, end: str, text: str, path: Path) -> str:
    i, j = content.find(start), content.find(end)
    if i < 0 or j < i:
        raise SystemExit(f"{path} has no {start} ... {end} block; add the two markers where the table should go")
    return content[:i + len(start)] + "\n" + text + content[j:]


def update_readme(readme: Path, summary: dict, *, source: str) -> None:
    """The GPU check's block, and the benchmark block with the paper-shape table (when there are entries)."""
    content = readme.read_text()
    content = _replace_block(content, GPU_START, GPU_END, readme_block(summary, source=source), readme)
    paper = [e for e in summary.get("bench_entries", []) if str(e.get("case", "")).startswith("paper")
             and e.get("status") != "skipped"]
    if paper:
        table = report.render(paper, summary.get("bench_machines", []))
        content = _replace_block(content, report.START_MARKER, report.END_MARKER, table, readme)
    readme.write_text(content)


def terminal_summary(summary: dict, stem: Path) -> str:
    lines = [f"== gpu_check: {summary['device'].get('name')}, {summary['date']}, "
             f"torch {summary['versions'].get('torch')}, triton {summary['versions'].get('triton')}"
             + (f", {summary['elapsed_s']}s of {summary['budget_s']}s" if summary.get("elapsed_s") else "")]
    for p in summary.get("parts", []):
        lines.append(f"  {p['name']:<24} {p['status']:<8} {p['seconds']:>4}s  {p['detail'][:40]}")
    lines.append("  " + _kernel_line(summary)[:150])
    lines += ["  " + h[:160] for h in _headline(summary)]
    for r in (summary.get("step") or {}).get("results", []):
        if r.get("status") == "ok":
            est = r.get("estimate_peak_bytes")
            lines.append(f"  step {r['name']:<14} measured {r['peak_bytes'] / GiB:6.2f} GiB"
                         + (f", estimate {est / GiB:6.2f} GiB ({r['peak_bytes'] / est:.3f}x)" if est else "")
                         + f", {r['step_s']:.2f} s")
        else:
            lines.append(f"  step {r['name']:<14} {r.get('status')}")
    lines.append(f"  results: {stem}.json / .md and {len(summary['files'])} more files (into benchmarks/results/, "
                 "then commit)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="action", required=True)
    c = sub.add_parser("collect", help="gather a gpu_check run (the script calls this)")
    c.add_argument("--work", type=Path, required=True)
    c.add_argument("--dest", type=Path, required=True)
    c.add_argument("--readme", type=Path)
    c.add_argument("--command", default="bash tools/gpu_check.sh")
    c.add_argument("--budget", type=int)
    c.add_argument("--elapsed", type=int)
    r = sub.add_parser("render", help="rebuild the Markdown and the README tables from a summary JSON")
    r.add_argument("summary", type=Path)
    r.add_argument("--readme", type=Path)
    r.add_argument("--markdown", type=Path, help="write the Markdown report here (default: print it)")
    args = parser.parse_args(argv)
    if args.action == "collect":
        if not args.work.is_dir():
            parser.error(f"--work {args.work} is not a directory")
        collect(args.work, args.dest, command=args.command, budget_s=args.budget, elapsed_s=args.elapsed,
                readme=args.readme)
        return 0
    try:
        summary = json.loads(args.summary.read_text())
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"cannot read {args.summary}: {error}")
    if summary.get("kind") != "gpu_check":
        parser.error(f"{args.summary} is not a gpu_check summary")
    text = render_markdown(summary, source=args.summary.name)
    if args.markdown:
        args.markdown.write_text(text)
    else:
        sys.stdout.write(text)
    if args.readme:
        update_readme(args.readme, summary, source=args.summary.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
