"""The Triton kernels compile for Hopper (sm_90) with the installed Triton, on a machine without a GPU.

The interpreter that runs the kernels on CPU tensors accepts code the compiler rejects; this catches that.  One
variant per kernel and dtype here (seconds); ``python tools/compile_kernels.py`` compiles every variant.
"""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "compile_kernels.py"), "--quick", "--arch", "90"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled 9 kernel variants for sm_90" in proc.stdout
