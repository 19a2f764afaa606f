"""pytest setup of the benchmarks: device and dtype fixtures, per-case memory release, and the machine description
(device, versions, scale, date) written into the pytest-benchmark JSON that ``report.py`` reads.

Run ``pytest benchmarks/ --benchmark-only`` (see ``benchmarks/README.md``).  On a machine without CUDA the same
cases run at small sizes on the PyTorch backend; their figures exercise the harness and are not GPU figures.
"""
from __future__ import annotations

import datetime
import os
import platform

import pytest
import torch

from .gpu_report import package_version
from .harness import (
    compile_disabled,
    current_device,
    current_dtype,
    current_scale,
    glibc_for_memory_tracking,
    peak_tflops,
    release_memory,
)

if current_device().type != "cuda":
    # The CPU figures are of the chunked PyTorch backend, never of Triton's (slow) interpreter.
    os.environ.setdefault("KIDKERNELS_BACKEND", "torch")
    glibc_for_memory_tracking()  # fixes the mmap threshold before tensors are allocated (harness.measure_peak_memory)

CPU_NOTE = ("no CUDA device: the benchmarks ran on the CPU at small sizes (PyTorch backend); "
            "GPU figures need a GPU (KIDKERNELS_BENCH_SCALE=gpu on a CUDA machine)")


def pytest_report_header(config):
    device = current_device()
    lines = [f"kidkernels benchmarks: scale={current_scale()} device={device} dtype={current_dtype()} "
             f"compile={'off' if compile_disabled() else 'on'}"]
    if device.type != "cuda":
        lines.append(CPU_NOTE)
    return lines


def pytest_benchmark_update_machine_info(config, machine_info):
    """Add what the figures depend on: the accelerator, the library versions, the scale and the date."""
    device = current_device()
    peak, peak_source = peak_tflops()
    info = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or machine_info.get("cpu", {}).get("brand_raw") or "cpu",
        "cuda_version": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "scale": current_scale(),
        "dtype": str(current_dtype()).removeprefix("torch."),
        "peak_tflops_assumed": peak,
        "peak_tflops_source": peak_source,
        "date": datetime.date.today().isoformat(),
        "versions": {name: package_version(name) for name in
                     ("kidkernels", "torch", "triton", "transformers", "liger-kernel", "cut-cross-entropy",
                      "pytest-benchmark")},
        "kidkernels_backend_env": os.environ.get("KIDKERNELS_BACKEND"),
        "note": None if device.type == "cuda" else CPU_NOTE,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_memory_gib"] = props.total_memory / 2 ** 30
    machine_info["kidkernels"] = info


def pytest_terminal_summary(terminalreporter):
    if current_device().type != "cuda":
        terminalreporter.write_line(CPU_NOTE, yellow=True)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return current_device()


@pytest.fixture(scope="session")
def dtype() -> torch.dtype:
    return current_dtype()


@pytest.fixture(autouse=True)
def _release_memory_after_case(device):
    """Each case's inputs are freed before the next case measures its baseline."""
    yield
    release_memory(device)
