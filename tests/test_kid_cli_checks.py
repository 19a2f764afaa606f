"""Mistakes that used to get past the checks of the ``kid`` commands (a review of the CLI and the trainer): each one
is now one line with exit status 2 before any slow work, or is refused before anything is overwritten."""
from __future__ import annotations

import math

import pytest

from kid.cli import main
from kid.config import MethodConfig
from kid.errors import UsageError
from kid.training import TrainConfig, split_options


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")


def _one_line_error(capsys, argv, *expected, command="train"):
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert err.startswith(f"kid {command}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


# ---- numbers ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_every_float_method_option_must_be_finite(value):
    floats = ("kd_weight", "mle_weight", "temperature", "alpha", "gkd_lambda", "beta", "fdistill_teacher_probability",
              "sampling_temperature", "top_p")
    for name in floats:
        with pytest.raises(ValueError, match=f"{name} must be"):
            MethodConfig(method="gkd", **{name: value})
        with pytest.raises(ValueError, match=f"{name} must be"):  # as YAML or a flag gives it: text
            MethodConfig(method="gkd", **{name: str(value)})
    with pytest.raises(ValueError, match="imitkd_gold_probability"):
        MethodConfig(method="imitkd", imitkd_gold_probability=value)
    for name in ("lora_dropout", "epochs", "learning_rate", "warmup_ratio", "weight_decay", "max_grad_norm"):
        with pytest.raises(UsageError, match=name):
            TrainConfig(**{name: value})
    with pytest.raises(UsageError, match="mle_weight must be a finite number"):
        split_options({"student": "s", "method": "sft", "mle_weight": str(value)})


def test_non_finite_weight_on_the_command_line_is_one_line(capsys, tmp_path):
    base = ["train", "--student", "s", "--data-file", "d.json", "--db-dir", "db", "--output-dir", str(tmp_path / "o")]
    _one_line_error(capsys, base + ["--method", "sft", "--mle-weight", "nan"], "mle_weight must be a finite number")
    _one_line_error(capsys, base + ["--method", "rkd", "--kd-weight", "inf"], "kd_weight must be a finite number")
    _one_line_error(capsys, base + ["--temperature", "inf"], "temperature must be a finite number")
    with pytest.raises(SystemExit) as exc:  # the shared argparse number type (eval, score, generate-teacher)
        main(["score", "--pred", "p", "--gold", "g", "--db-dir", "d", "--timeout", "inf"])
    assert exc.value.code == 2 and "--timeout: must be a finite number" in capsys.readouterr().err
