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

# TEMPORARY, until the GEMM-fused gradient (kidkernels/ops/distill_fused_grad.py) is merged: a stand-in built from the
# row kernel (tests/fused_grad_standin.py) takes its place.
from tests import fused_grad_standin  # noqa: E402

fused_grad_standin.install()

BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") is not None else [])


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def device():
    return torch.device(DEVICE)
