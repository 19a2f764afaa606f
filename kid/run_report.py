"""The run report (``run_report.json``): what ran, on what, how long, and whether its training time can be
divided by an SFT run's.

* settings with absolute paths (:func:`absolute_paths`), library versions (:func:`library_versions`), the git commit
  of the source tree (:func:`git_state`), the device (:func:`device_info`), example counts;
* the training time of every segment of a resumed run and their sum, with wall and CPU time per step;
* ``latency_vs_sft`` (training time / the SFT run's, the paper's "Latency") only when :func:`sft_comparison` finds
  nothing that differs; otherwise ``latency_vs_sft_not_comparable`` lists the reasons.
"""
from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .files import atomic_write_json

if TYPE_CHECKING:
    from .config import MethodConfig
    from .training import TrainConfig, _RunClock

# Settings that must agree for a training-time ratio to mean anything.
COMPARABLE_SETTINGS = ("student", "data_file", "tables_file", "db_dir", "data_format", "limit", "batch_size",
                       "micro_batch_size",
                       "epochs", "max_steps", "max_input_tokens", "max_output_tokens", "lora", "lora_r", "dtype",
                       "gradient_checkpointing", "fsdp", "attn_implementation", "group_by_length", "eval_data_file",
                       "eval_limit")


def _resolved(value):
    if isinstance(value, str) and value and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


def absolute_paths(config: TrainConfig) -> dict:
    """``config.to_dict()`` with every local path made absolute (Hub names stay)."""
    values = config.to_dict()
    for name in ("student", "teacher", "teacher_adapter", "data_file", "db_dir", "tables_file", "output_dir",
                 "sft_report", "resume"):
        if name == "output_dir":
            values[name] = str(Path(values[name]).expanduser().resolve())
        else:
            values[name] = _resolved(values[name])
    return values


def config_differences(mine: Mapping[str, Any], theirs: Mapping[str, Any]) -> list[str]:
    """The :data:`COMPARABLE_SETTINGS` in which two runs' ``train_config`` differ, as "name X there, Y here" (a
    setting a report predates counts as its default)."""
    import dataclasses

    from .training import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return [f"{name} {theirs.get(name, defaults.get(name))!r} there, {mine.get(name)!r} here"
            for name in COMPARABLE_SETTINGS
            if name in mine and mine.get(name) != theirs.get(name, defaults.get(name, "<missing>"))]


def sft_comparison(report: Mapping[str, Any], sft: Mapping[str, Any]) -> list[str]:
    """Why ``report``'s training time cannot be divided by ``sft``'s (empty: comparable)."""
    reasons = config_differences(report["train_config"], sft.get("train_config", {}))
    if sft.get("status", "finished" if not sft.get("interrupted") else "interrupted") != "finished":
        reasons.append("the SFT run did not finish")
    for key, label in (("global_steps", "steps"), ("examples_used", "examples")):
        if report.get(key) != sft.get(key):
            reasons.append(f"{label} {sft.get(key)} there, {report.get(key)} here")
    mine, theirs = report.get("device_info") or {}, sft.get("device_info") or {}
    for key in ("type", "name", "cpu_model", "world_size"):
        if mine.get(key) != theirs.get(key):
            reasons.append(f"device {key} {theirs.get(key)!r} there, {mine.get(key)!r} here")
    if report.get("train_time_complete") is False or sft.get("train_time_complete") is False:
        reasons.append("a resumed segment's time is unknown")
    return reasons


def library_versions() -> dict:
    """Versions of Python, torch, triton, transformers, peft, accelerate, datasets, kidkernels and kid."""
    import importlib.metadata as metadata

    import torch

    import kid

    versions = {"python": platform.python_version(), "torch": torch.__version__, "kid": kid.__version__}
    for dist in ("triton", "transformers", "peft", "accelerate", "datasets", "kidkernels"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


# A copy of the source without its .git directory (a GPU machine's) names the commit it was copied from in a JSON
# file (``{"commit": ..., "dirty": ...}``, e.g. written by tools/gpu_reproduce_prepare.sh), given by this variable.
SOURCE_COMMIT_FILE_ENV = "KID_SOURCE_COMMIT_FILE"


def git_state() -> dict | None:
    """The commit of the source tree ``kid`` is imported from, when it is a git checkout; else the commit recorded
    in ``$KID_SOURCE_COMMIT_FILE`` when the source was copied (``"source"`` then names that file); else None."""
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10, check=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
        else:
            return {"commit": commit, "dirty": bool(dirty), "source": str(root)}
    return recorded_commit()


def recorded_commit() -> dict | None:
    """The commit named by ``$KID_SOURCE_COMMIT_FILE`` (None when unset, unreadable or without a commit)."""
    path = os.environ.get(SOURCE_COMMIT_FILE_ENV)
    if not path:
        return None
    try:
        recorded = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or not isinstance(recorded.get("commit"), str):
        return None
    return {"commit": recorded["commit"], "dirty": bool(recorded.get("dirty")),
            "source": f"recorded in {path}" + (f" ({recorded['recorded_at']})" if recorded.get("recorded_at") else "")}


def device_info(device) -> dict:
    """This process's device: type, name (GPU name or "cpu"), CPU model, counts, threads, load at the start."""
    import torch

    dev = torch.device(device)
    info: dict[str, Any] = {"type": dev.type, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if dev.type == "cuda":
        info["name"] = torch.cuda.get_device_name(dev)
        info["count"] = torch.cuda.device_count()
    else:
        info["name"] = "cpu"
        info["cpu_model"] = _cpu_model()
    info.update(cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads())
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = round(os.getloadavg()[0], 2)
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_report(trainer, config: TrainConfig, method: MethodConfig, metrics: dict, *, clock: _RunClock | None = None,
                 segments_before=(), time_complete: bool = True, examples: Mapping | None = None,
                 device: Mapping | None = None, resumed_from: str | None = None, signum: int | None = None,
                 sft: Mapping | None = None) -> dict:
    """The run report: status, settings (absolute paths), training time over every segment (and relative to the SFT
    run when comparable), throughput, peak memory, versions, commit, example counts, device, the log history; for KID
    ``kid_chosen`` and ``kid_changed``, the means of the log lines' values (:mod:`kid.trainer`), None without any."""
    import torch

    history = [dict(h) for h in trainer.state.log_history]
    steps = [h for h in history if "loss" in h]
    device = dict(device or device_info(trainer.args.device))
    segments = list(segments_before)
    if clock is not None and clock.t0 is not None:
        segments.append(clock.segment(trainer.state.global_step, device))
    train_time = round(sum(s.get("train_time_s") or 0 for s in segments), 3) if segments else None
    report = {
        "status": "interrupted" if signum else "finished",
        "interrupted": bool(signum),
        "signal": signal.Signals(signum).name if signum else None,
        "method": method.method,
        "method_config": method.to_dict(),
        "train_config": absolute_paths(config),
        "train_runtime_s": train_time if train_time is not None else metrics.get("train_runtime"),
        "train_time_complete": time_complete,
        "cpu_time_s": round(sum(s.get("cpu_time_s") or 0 for s in segments), 3) if segments else None,
        "segments": segments,
        "resumed_from": resumed_from,
        "global_steps": trainer.state.global_step,
        "max_steps": trainer.state.max_steps,
        "examples": dict(examples or {}),
        "examples_used": (examples or {}).get("used"),
        "final_loss": steps[-1]["loss"] if steps else None,
        "tokens_per_s": _mean([h["tokens_per_s"] for h in steps if "tokens_per_s" in h]),
        "step_time_s": _mean([h["step_time_s"] for h in steps if "step_time_s" in h]),
        "peak_gpu_memory_gib": (round(torch.cuda.max_memory_allocated() / 2**30, 3)
                                if torch.cuda.is_available() else None),
        "device": device.get("name"),
        "device_info": device,
        "versions": library_versions(),
        "git": git_state(),
        "argv": list(sys.argv),
        "log_history": history,
    }
    report.update(trainer.report_fields() if hasattr(trainer, "report_fields") else {})  # generation vs training
    if method.method == "kid":  # the KID stage's diagnostics (kid.trainer): their means over the log lines
        for key in ("kid_chosen", "kid_changed"):
            report[key] = _mean([h[key] for h in steps if key in h])
    report.update(evaluation_fields(trainer, history))
    if sft is None and config.sft_report:
        with open(config.sft_report, encoding="utf-8") as f:
            sft = json.load(f)
    if sft is not None:
        reasons = sft_comparison(report, sft)
        report["sft_report"] = absolute_paths(config)["sft_report"]
        if reasons:
            report["latency_vs_sft"] = None
            report["latency_vs_sft_not_comparable"] = reasons
        elif sft.get("train_runtime_s") and report["train_runtime_s"]:
            report["latency_vs_sft"] = round(report["train_runtime_s"] / sft["train_runtime_s"], 3)
            if report.get("cpu_time_s") and sft.get("cpu_time_s"):
                report["cpu_time_vs_sft"] = round(report["cpu_time_s"] / sft["cpu_time_s"], 3)
    return report


def evaluation_fields(trainer, history: list[dict]) -> dict:
    """The execution-accuracy evaluations (kid.ex_eval: every segment's, from the log history), the best
    checkpoint by ``metric_for_best_model``, and the Trainer's arguments."""
    args, state = trainer.args, trainer.state
    evaluations = [{"step": h.get("eval_ex_step", h.get("step")), "ex": h["eval_ex"], "count": h.get("eval_ex_count"),
                    "generation_s": h.get("eval_ex_generation_s"), "scoring_s": h.get("eval_ex_scoring_s"),
                    "waited_s": h.get("eval_ex_waited_s")} for h in history if "eval_ex" in h]
    out = {"evaluations": evaluations}
    if evaluations:
        out["final_ex"] = evaluations[-1]["ex"]
    if args.metric_for_best_model:
        out.update(metric_for_best_model=args.metric_for_best_model, best_metric=state.best_metric,
                   best_global_step=getattr(state, "best_global_step", None),
                   best_model_checkpoint=state.best_model_checkpoint,
                   final_model_is_best=bool(args.load_best_model_at_end and state.best_model_checkpoint))
    try:
        out["training_args"] = json.loads(args.to_json_string())
    except (TypeError, ValueError, AttributeError):
        out["training_args"] = None
    return out


def _mean(values):
    return round(sum(values) / len(values), 4) if values else None


def write_json(path, payload) -> None:
    """``payload`` (keys starting with "_" left out) as JSON, replacing ``path`` atomically."""
    atomic_write_json(path, {k: v for k, v in payload.items() if not k.startswith("_")})
