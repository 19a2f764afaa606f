"""Shared test setup: backends, device, and inputs shaped like a trained model's.

On a machine without CUDA the Triton kernels run under the Triton interpreter, which must be switched on before
Triton is imported; every kernel test is parametrised over both backends, so one pytest run covers both.
Set ``KIDKERNELS_TEST_DEVICE=cuda`` to run the same tests on CUDA tensors.
"""
import importlib.util
import os

import torch

DEVICE = os.environ.get("KIDKERNELS_TEST_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def device():
    return torch.device(DEVICE)
