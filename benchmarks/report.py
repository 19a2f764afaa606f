"""Turn pytest-benchmark JSON files of ``pytest benchmarks/ --benchmark-only --benchmark-json FILE`` into a Markdown
table (with the device, versions and date they came from) and a plot of time and memory against N per provider.

    python benchmarks/report.py RESULTS.json [MORE.json ...] [--markdown FILE] [--plot FILE.png]
                                [--only SUBSTRING ...] [--hide-skipped]

Several JSON files (e.g. the parts of a GPU run split with ``-k``) are merged.  The table goes to stdout, and with
``--markdown`` also replaces the text between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in FILE.
Entries whose status is not "ok" (skipped, oom, error) show their status and reason instead of figures.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

START_MARKER = "<!-- bench:start -->"
END_MARKER = "<!-- bench:end -->"


def load_entries(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """``(entries, machines)``: every benchmark's ``extra_info`` (plus its pytest name), and each file's machine
    description with its file name and date."""
    entries, machines = [], []
    for path in paths:
        data = json.loads(path.read_text())
        machine = dict(data.get("machine_info", {}).get("kidkernels", {}))
        machine.update(file=path.name, datetime=data.get("datetime"))
        machines.append(machine)
        for bench in data.get("benchmarks", []):
            entry = dict(bench.get("extra_info", {}))
            if "op" not in entry:  # not one of ours
                continue
            entry["name"] = bench.get("name")
            entries.append(entry)
    return entries, machines


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def machine_lines(machines: list[dict]) -> list[str]:
    lines = []
    seen = set()
    for m in machines:
        versions = m.get("versions", {})
        key = (m.get("device_name"), tuple(sorted(versions.items())), m.get("scale"), m.get("dtype"))
        if key in seen:
            continue
        seen.add(key)
        software = ", ".join(f"{name} {version}" for name, version in versions.items() if version)
        memory = f", {m['device_memory_gib']:.0f} GiB" if m.get("device_memory_gib") else ""
        lines.append(f"- **{m.get('device_name', '?')}**{memory} ({m.get('device', '?')}); scale `{m.get('scale')}`, "
                     f"inputs {m.get('dtype')}; {software}; run {m.get('date') or m.get('datetime', '')[:10]} "
                     f"(`{m['file']}`).  Matmul floor at {m.get('peak_tflops_assumed', 0):.3g} TFLOP/s "
                     f"({m.get('peak_tflops_source')}).")
        if m.get("note"):
            lines.append(f"- **{m['note']}**")
    return lines


def table_lines(entries: list[dict]) -> list[str]:
    header = ("| op | case | div | pass | provider | N | V | time (ms) | x floor | TFLOP/s | peak extra (MiB) "
              "| largest tensor (MiB) | status |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for e in entries:
        ok = e.get("status") == "ok"
        status = "ok" if ok else f"{e.get('status')}: {(e.get('reason') or '')[:80]}".replace("|", "/")
        largest = e.get("largest_tensor_bytes")
        lines.append("| " + " | ".join([
            e.get("op", ""), e.get("case", ""), e.get("divergence") or "", e.get("pass", ""), e.get("provider", ""),
            _fmt(e.get("n"), ","), _fmt(e.get("v"), ","),
            _fmt(e.get("time_ms_median"), ".2f") if ok else "-",
            _fmt(e.get("x_floor"), ".1f") if ok else "-",
            _fmt(e.get("tflops_per_s"), ".3g") if ok else "-",
            _fmt(e.get("peak_extra_mib"), ",.1f") if ok else "-",
            _fmt(largest / 2 ** 20 if largest is not None else None, ",.1f") if ok else "-",
            status,
        ]) + " |")
    return lines


def step_summary_lines(entries: list[dict]) -> list[str]:
    """KID against SFT for each full-step case: time ratio, and total peak memory against SFT + one teacher
    forward (each measured with both models resident, so the shared weights are counted once)."""
    lines = []
    by_case = defaultdict(dict)
    for e in entries:
        if e.get("op") == "kd_step" and e.get("status") == "ok":
            by_case[e["case"]][e["provider"]] = e
    for case, steps in by_case.items():
        sft, teacher = steps.get("sft"), steps.get("teacher_forward")
        if not sft:
            continue
        for variant in ("kid_random", "kid_hard", "rkd_kidkernels", "rkd_hf_eager"):
            kid = steps.get(variant)
            if not kid:
                continue
            text = f"- `{case}` {variant}: {kid['time_ms_median'] / sft['time_ms_median']:.2f}x the SFT step time"
            if teacher and None not in (kid.get("peak_extra_bytes"), sft.get("peak_extra_bytes"),
                                        teacher.get("peak_extra_bytes"), kid.get("memory_before_bytes")):
                total = kid["memory_before_bytes"] + kid["peak_extra_bytes"]
                budget = kid["memory_before_bytes"] + sft["peak_extra_bytes"] + teacher["peak_extra_bytes"]
                text += (f"; peak {total / 2 ** 30:.2f} GiB = {total / budget:.2f}x (SFT step + one teacher "
                         f"forward, {budget / 2 ** 30:.2f} GiB)")
            lines.append(text)
    return lines


def render(entries: list[dict], machines: list[dict]) -> str:
    parts = ["Figures from:", *machine_lines(machines), "",
             "Time: median of the timed rounds, forward (+ backward) with a device synchronisation, after warm-up. "
             "x floor: time over the matmul floor (FLOPs of the cost model at the assumed peak). Peak extra: "
             "memory above the inputs and weights during one call (CUDA allocator; on CPU the growth of peak "
             "resident memory). Largest tensor: the biggest tensor any aten op allocated (one fp32 N x V logits "
             "tensor is 4NV bytes).", "", *table_lines(entries)]
    summary = step_summary_lines(entries)
    if summary:
        parts += ["", "Full training step (KID vs SFT):", *summary]
    return "\n".join(parts) + "\n"


def write_between_markers(path: Path, text: str) -> None:
    content = path.read_text()
    start, end = content.find(START_MARKER), content.find(END_MARKER)
    if start < 0 or end < start:
        raise SystemExit(f"{path} has no {START_MARKER} ... {END_MARKER} block; add the two markers where the "
                         "table should go")
    path.write_text(content[:start + len(START_MARKER)] + "\n" + text + content[end:])


def plot(entries: list[dict], machines: list[dict], path: Path, *, op: str, divergence: str | None,
         pass_: str) -> None:
    """Time and peak extra memory against N, one line per provider, for the (H_s, H_t, V) shape of ``op`` with
    the most N values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = [e for e in entries if e.get("op") == op and e.get("pass") == pass_ and e.get("status") == "ok"
              and (divergence is None or e.get("divergence") == divergence)]
    groups = defaultdict(list)
    for e in chosen:
        groups[(e.get("h_s"), e.get("h_t"), e.get("v"))].append(e)
    if not groups:
        print(f"no ok entries for op={op} divergence={divergence} pass={pass_}: no plot written", file=sys.stderr)
        return
    shape, series = max(groups.items(), key=lambda kv: (len({e["n"] for e in kv[1]}), kv[0][2] or 0))
    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for provider in sorted({e["provider"] for e in series}):
        points = sorted((e["n"], e["time_ms_median"], e.get("peak_extra_mib")) for e in series
                        if e["provider"] == provider)
        ns = [p[0] for p in points]
        time_axis.plot(ns, [p[1] for p in points], marker="o", label=provider)
        memory_axis.plot(ns, [p[2] for p in points], marker="o", label=provider)
    device = machines[0].get("device_name", "?") if machines else "?"
    for axis, label in ((time_axis, "time (ms)"), (memory_axis, "peak extra memory (MiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("N (rows)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    h_s, h_t, v = shape
    cpu_note = " - CPU harness figures, not GPU figures" if machines and machines[0].get("device") == "cpu" else ""
    figure.suptitle(f"{op} {divergence or ''} {pass_}: H_s={h_s}, H_t={h_t}, V={v} on {device} "
                    f"({machines[0].get('date', '') if machines else ''}){cpu_note}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+", type=Path, help="pytest-benchmark JSON file(s)")
    parser.add_argument("--markdown", type=Path, help="write the table between the bench markers of this file")
    parser.add_argument("--plot", type=Path, help="write the time/memory vs N plot to this PNG")
    parser.add_argument("--plot-op", default="distill")
    parser.add_argument("--plot-divergence", default="rkl")
    parser.add_argument("--plot-pass", default="fwd_bwd")
    parser.add_argument("--only", action="append", default=[],
                        help="keep entries whose case or op contains this text (repeatable: any of them)")
    parser.add_argument("--hide-skipped", action="store_true", help="leave out entries that did not run")
    args = parser.parse_args(argv)
    entries, machines = load_entries(args.json)
    if args.only:
        entries = [e for e in entries if any(s in e.get("case", "") or s == e.get("op") for s in args.only)]
    if args.hide_skipped:
        entries = [e for e in entries if e.get("status") != "skipped"]
    text = render(entries, machines)
    print(text, end="")
    if args.markdown:
        write_between_markers(args.markdown, text)
    if args.plot:
        plot(entries, machines, args.plot, op=args.plot_op, divergence=args.plot_divergence or None,
             pass_=args.plot_pass)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
