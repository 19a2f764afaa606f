"""Mistakes that used to get past the checks of the ``kid`` commands (a review of the CLI and the trainer): each one
is now one line with exit status 2 before any slow work, or is refused before anything is overwritten."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from kid.cli import main
from kid.config import MethodConfig
from kid.errors import UsageError
from kid.training import TrainConfig, split_options
from tests.toy_spider import toy_spider as toy_spider_fixture
from tests.toy_spider import train_argv

toy_spider = toy_spider_fixture  # the module-scoped fixture


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


# ---- --resume: another run's directory, a finished run ---------------------------------------------------------

def _snapshot(out: Path) -> dict:
    """Every file under ``out`` with its bytes (what a refused command must leave as it was)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_resume_refuses_another_runs_dir_and_a_finished_run(toy_spider, tmp_path, capsys):
    run_a, run_b = tmp_path / "runA", tmp_path / "runB"
    argv_a = train_argv(toy_spider, run_a, "sft", "--save-steps", "1", "--save-total-limit", "1")
    assert main(argv_a) == 0
    argv_b = train_argv(toy_spider, run_b, "sft", "--save-steps", "1", "--save-total-limit", "1", "--seed", "7")
    argv_b[argv_b.index("--max-steps") + 1] = "3"
    assert main(argv_b) == 0
    a, b = _snapshot(run_a), _snapshot(run_b)
    assert "final/adapter_config.json" in b and "checkpoint-3/trainer_state.json" in b
    # runA's checkpoint continued in runB, which holds a run of its own: refused, nothing touched
    _one_line_error(capsys, argv_b + ["--resume", str(run_a / "checkpoint-2")], f"--output-dir {run_b} is not empty",
                    "checkpoint of another directory", "give an empty --output-dir")
    # a finished run: --resume (its newest checkpoint) and the checkpoint by name, with the same --max-steps
    for resume in ([], [str(run_a / "checkpoint-2")]):
        _one_line_error(capsys, argv_a + ["--resume", *resume], "that run is finished", "step 2, --max-steps 2",
                        f"its final model is {run_a / 'final'}", "give a larger --max-steps")
    assert _snapshot(run_a) == a and _snapshot(run_b) == b


def test_finished_by_epochs_or_steps(tmp_path):
    import json

    from kid.preflight import check_not_finished

    checkpoint = tmp_path / "run" / "checkpoint-12"
    checkpoint.mkdir(parents=True)

    def state(step, epoch):
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step, "epoch": epoch,
                                                                   "max_steps": 12, "num_train_epochs": 3}))

    state(12, 2.5)  # --epochs 2.5 ran to its end (the Trainer rounds the steps of the last epoch up)
    with pytest.raises(UsageError, match=r"finished \(step 12, epoch 2.5, --epochs 2.5; it holds the trained"):
        check_not_finished(checkpoint, TrainConfig(epochs=2.5))
    check_not_finished(checkpoint, TrainConfig(epochs=3))  # more epochs: continues
    check_not_finished(checkpoint, TrainConfig(max_steps=13))
    with pytest.raises(UsageError, match="step 12, --max-steps 10"):
        check_not_finished(checkpoint, TrainConfig(max_steps=10))
    state(7, 1.5)  # interrupted half way
    check_not_finished(checkpoint, TrainConfig(epochs=2.5))
    (checkpoint / "trainer_state.json").write_text("{")
    with pytest.raises(UsageError, match="trainer_state.json cannot be read"):
        check_not_finished(checkpoint, TrainConfig(epochs=2.5))


# ---- json input that is not json -------------------------------------------------------------------------------

def test_malformed_json_inputs_are_one_line(toy_spider, tmp_path, capsys, monkeypatch):
    import json

    import kid.data.loaders

    def refuse(*args, **kwargs):
        raise AssertionError("the data was built before the inputs were checked")

    monkeypatch.setattr(kid.data.loaders, "load_dataset_by_name", refuse)
    not_json = tmp_path / "notjson.txt"
    not_json.write_text("not json\n")
    not_tables = tmp_path / "tables.json"
    not_tables.write_text(json.dumps({"db_id": "toy"}))  # json, but not a list of database entries
    out = tmp_path / "out"
    for tables, expected in ((not_json, "not json"), (not_tables, "not a tables.json")):
        _one_line_error(capsys, train_argv(toy_spider, out, "sft", "--tables-file", str(tables)),
                        f"--tables-file {tables}: {expected}")
    data, db = str(toy_spider["data"]), str(toy_spider["db_dir"])
    evaluate = ["eval", "--model", str(tmp_path / "model"), "--db-dir", db, "--output-dir", str(out), "--no-progress"]
    _one_line_error(capsys, evaluate + ["--data-file", str(not_json)], f"--data-file {not_json}: not a json list of "
                    "examples", command="eval")
    _one_line_error(capsys, evaluate + ["--data-file", data, "--tables-file", str(not_json)],
                    f"--tables-file {not_json}: not json", command="eval")
    gold, pred = tmp_path / "gold.sql", tmp_path / "pred.sql"
    gold.write_text("SELECT 1\ttoy\n")
    pred.write_text("SELECT 1\n")
    _one_line_error(capsys, ["score", "--pred", str(pred), "--gold", str(gold), "--db-dir", db, "--data-file",
                             str(not_json), "--no-progress", "--workers", "1"],
                    f"--data-file {not_json}: not a json list of examples", command="score")
    assert not out.exists()


# ---- a relative --student path in the saved adapter ------------------------------------------------------------

def test_adapter_names_its_base_model_by_absolute_path(toy_spider, tmp_path, capsys, monkeypatch):
    import json
    import shutil

    import kid.data.loaders

    monkeypatch.chdir(toy_spider["student"].parent)
    out = tmp_path / "run"
    argv = train_argv(toy_spider, out, "sft")
    argv[argv.index("--student") + 1] = "student"  # relative to the working directory
    assert main(argv) == 0
    adapter = json.loads((out / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(toy_spider["student"])
    # an adapter whose base model cannot be found from here (a relative path written elsewhere): one line, before
    # the data is built
    broken = tmp_path / "broken"
    shutil.copytree(out / "final", broken)
    adapter["base_model_name_or_path"] = "models/student"
    (broken / "adapter_config.json").write_text(json.dumps(adapter))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(kid.data.loaders, "load_dataset_by_name", lambda *a, **k: pytest.fail("data built"))
    _one_line_error(capsys, ["eval", "--model", str(broken), "--data-file", str(toy_spider["data"]), "--db-dir",
                             str(toy_spider["db_dir"]), "--output-dir", str(tmp_path / "eval"), "--no-progress"],
                    f"--model {broken}: a LoRA adapter whose base model models/student cannot be loaded",
                    "no such directory", command="eval")


# ---- KID's mask token ------------------------------------------------------------------------------------------

def test_mask_token_past_the_embedding_is_refused_before_the_data(toy_spider, tmp_path, capsys, monkeypatch):
    import json
    import shutil

    import kid.data.loaders

    student = tmp_path / "student_nomask"
    shutil.copytree(toy_spider["student"], student)
    config = json.loads((student / "tokenizer_config.json").read_text())
    config.pop("mask_token", None)  # the default is then the unk token, which Qwen2Tokenizer adds past the vocabulary
    (student / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setattr(kid.data.loaders, "load_dataset_by_name", lambda *a, **k: pytest.fail("data built"))
    argv = train_argv(toy_spider, tmp_path / "out", "kid")
    argv[argv.index("--student") + 1] = str(student)
    rows = json.loads((student / "config.json").read_text())["vocab_size"]
    _one_line_error(capsys, argv, "KID's default mask token '<|endoftext|>'", f"has id {rows}, past the student's "
                    f"{rows} embedding rows", "--mask-token")
    _one_line_error(capsys, argv + ["--mask-token", "<|endoftext|>"], "--mask-token '<|endoftext|>' has id")
    # objects given to run_training are checked too (kid.training, once the models are loaded)
    from transformers import AutoTokenizer

    from kid.config import MethodConfig
    from kid.training import run_training
    from tests.kid_tiny import tiny_dataset, tiny_model, train_config

    tokenizer = AutoTokenizer.from_pretrained(student)
    token = tokenizer.convert_ids_to_tokens(100)  # a token of the tokenizer past the 64 rows of tiny_model
    with pytest.raises(UsageError, match="has id 100, past the student's 64 embedding rows"):
        run_training(train_config(tmp_path / "objects", max_steps=1), MethodConfig(method="kid", mask_token=token),
                     student=tiny_model(0), teacher=tiny_model(1), tokenizer=tokenizer, train_dataset=tiny_dataset(4))


# ---- kid generate-teacher --------------------------------------------------------------------------------------

def test_generate_teacher_mistakes_are_one_line_before_any_model_loads(toy_spider, tmp_path, capsys, monkeypatch):
    import torch

    import kid.data.loaders
    import kid.models

    monkeypatch.setattr(kid.data.loaders, "load_dataset_by_name", lambda *a, **k: pytest.fail("data built"))
    monkeypatch.setattr(kid.models, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "outputs"
    base = ["generate-teacher", "--teacher", str(toy_spider["teacher"]), "--data-file", str(toy_spider["data"]),
            "--db-dir", str(toy_spider["db_dir"]), "--output-dir", str(out), "--no-progress"]

    def error(argv, *expected):
        _one_line_error(capsys, argv, *expected, command="generate-teacher")

    def replaced(flag, value):
        argv = list(base)
        argv[argv.index(flag) + 1] = value
        return argv

    error(replaced("--teacher", str(tmp_path / "no_such_dir")), "--teacher", "no such directory")
    error(replaced("--teacher", str(tmp_path)), "--teacher", "not a model directory")
    error(base + ["--teacher-adapter", str(tmp_path)], "--teacher-adapter", "not a LoRA adapter directory")
    error(base + ["--tokenizer", str(tmp_path / "nope" / "tok")], "--tokenizer", "no such directory")
    if not torch.cuda.is_available():
        error(base + ["--device", "cuda"], "--device cuda: CUDA is not available")
    error(base + ["--device", "banana"], "not a torch device")
    error(base + ["--sample", "--top-p", "1.5"], "--top-p must be in (0, 1]")
    error(replaced("--db-dir", str(tmp_path)), "none of the 6 examples", "is --db-dir right?")
    error(base + ["--data-format", "bird"], "looks like Spider data")
    not_json = tmp_path / "notjson.txt"
    not_json.write_text("not json")
    error(replaced("--data-file", str(not_json)), "not a json list of examples")
    error(base + ["--tables-file", str(not_json)], "--tables-file", "not json")
    for flag, value in (("--limit", "0"), ("--batch-size", "0"), ("--num-beams", "0"), ("--max-new-tokens", "0"),
                        ("--max-input-tokens", "-1"), ("--temperature", "0"), ("--temperature", "nan"),
                        ("--top-k", "-1")):
        with pytest.raises(SystemExit) as exc:
            main(base + [flag, value])
        assert exc.value.code == 2 and f"argument {flag}: must be" in capsys.readouterr().err, (flag, value)
    assert not out.exists()


# ---- teacher outputs: never rewritten, paths compared resolved, the prompt budget checked early -------------

def test_teacher_outputs_are_appended_never_rewritten(tmp_path, monkeypatch):
    import json

    import kid.teacher_outputs as teacher_outputs
    from tests.kid_tiny import EOS, PAD, tiny_dataset, tiny_model

    teacher, dataset, out = tiny_model(1).eval(), tiny_dataset(6), tmp_path / "out"
    outputs, meta_file = out / teacher_outputs.OUTPUTS_NAME, out / teacher_outputs.META_NAME

    def generate(data=dataset):
        return teacher_outputs.generate_teacher_outputs(teacher, data, out, eos_token_id=EOS, pad_token_id=PAD,
                                                        max_new_tokens=3, batch_size=2, progress=False)

    generate()
    written = (outputs.read_bytes(), outputs.stat().st_mtime_ns, meta_file.read_bytes(), meta_file.stat().st_mtime_ns)
    generate()  # finished: nothing is written
    assert (outputs.read_bytes(), outputs.stat().st_mtime_ns, meta_file.read_bytes(),
            meta_file.stat().st_mtime_ns) == written
    # continued (two more prompts) after a line was cut by an interruption: the kept records are written anew,
    # atomically; a crash while doing so keeps every answer of the old file
    with open(outputs, "a") as f:
        f.write('{"prompt": "abc", "ans')

    class FailingJson:
        loads, load, dump = json.loads, json.load, json.dump

        @staticmethod
        def dumps(*args, **kwargs):
            raise OSError("disk full")

    monkeypatch.setattr(teacher_outputs, "json", FailingJson)
    with pytest.raises(OSError, match="disk full"):
        generate(tiny_dataset(8))  # its first 6 examples are those above
    monkeypatch.setattr(teacher_outputs, "json", json)
    assert outputs.read_bytes().startswith(written[0]) and len(teacher_outputs._read_outputs(out)) == 6
    assert generate(tiny_dataset(8))["complete"] and len(teacher_outputs._read_outputs(out)) == 8
    assert outputs.read_bytes().startswith(written[0]) and outputs.read_text().count("\n") == 8  # the cut line went


def test_teacher_named_another_way_is_the_same_and_the_budget_is_checked(toy_spider, tmp_path, capsys, monkeypatch):
    import json

    import kid.data.loaders
    import kid.models

    root = toy_spider["student"].parent
    monkeypatch.chdir(root)
    out = tmp_path / "outputs"
    argv = ["generate-teacher", "--teacher", "teacher", "--tokenizer", "student", "--data-file", "train.json",
            "--db-dir", "database", "--output-dir", str(out), "--max-new-tokens", "4", "--max-input-tokens", "256",
            "--no-progress"]
    assert main(argv) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["teacher"], meta["tokenizer"]) == (str(root / "teacher"), str(root / "student"))
    # the same teacher by its absolute path, or recorded relative (as an older kid wrote it): reused as is
    monkeypatch.setattr(kid.models, "load_causal_lm", lambda *a, **k: pytest.fail("the teacher was loaded"))
    for flag, value in (("--teacher", str(root / "teacher")), ("--tokenizer", str(root / "student"))):
        argv[argv.index(flag) + 1] = value
    (out / "meta.json").write_text(json.dumps(dict(meta, teacher="teacher")))
    capsys.readouterr()
    assert main(argv) == 0 and "already holds the answers to all 6 prompts" in capsys.readouterr().out
    # kid train with another prompt budget than the outputs': one line before the data is built
    monkeypatch.setattr(kid.data.loaders, "load_dataset_by_name", lambda *a, **k: pytest.fail("data built"))
    train = train_argv(toy_spider, tmp_path / "run", "fdistill", "--teacher-outputs", str(out))
    assert train[train.index("--max-input-tokens") + 1] == "256"
    train[train.index("--max-input-tokens") + 1] = "128"
    _one_line_error(capsys, train, f"--teacher-outputs {out}: generated with --max-input-tokens 256, this run has "
                    "128")


# ---- the run report's time split ---------------------------------------------------------------------------------

def test_time_split_covers_every_segment_over_the_runtime_interval(tmp_path):
    import json

    from kid.training import RUN_STATE_NAME, run_training
    from tests.kid_tiny import tiny_dataset, tiny_model, tiny_teacher, tiny_tokenizer, train_config

    method = MethodConfig(method="gkd", gkd_lambda=1.0, max_new_tokens=4)

    def run(steps, **options):
        config = train_config(tmp_path / "run", max_steps=steps, save_steps=2, batch_size=2, micro_batch_size=1,
                              **options)
        return run_training(config, method, student=tiny_model(0), teacher=tiny_teacher(), tokenizer=tiny_tokenizer(),
                            train_dataset=tiny_dataset(8), write_final=False)

    def check(report):
        segments = report["segments"]
        assert all(s["generation_time_s"] > 0 for s in segments), segments
        assert report["generation_time_s"] == pytest.approx(sum(s["generation_time_s"] for s in segments), abs=2e-3)
        # generation + the rest = the training time of the report, the same interval
        assert report["generation_time_s"] + report["training_time_s"] == pytest.approx(report["train_runtime_s"],
                                                                                         abs=2e-3)
        assert report["generation_fraction"] == pytest.approx(
            report["generation_time_s"] / report["train_runtime_s"], abs=1e-3)

    check(run(2))
    state = json.loads((tmp_path / "run" / "checkpoint-2" / RUN_STATE_NAME).read_text())
    assert state["segments"][0]["generation_time_s"] > 0  # the checkpoint carries it to a resumed run
    resumed = run(3, resume=True)
    assert len(resumed["segments"]) == 2
    check(resumed)


def test_runs_with_other_tables_are_not_comparable():
    from kid.run_report import config_differences

    # tables.json changes every prompt (column comments, foreign keys): another training time
    assert config_differences({"tables_file": "/data/tables.json"}, {"tables_file": None}) == [
        "tables_file None there, '/data/tables.json' here"]


# ---- kid eval interrupted ----------------------------------------------------------------------------------------

def test_interrupted_eval_keeps_the_predictions_so_far(toy_spider, tmp_path, capsys, monkeypatch):
    import json

    import kid.generation

    real, calls = kid.generation.clean_generated_sql, []

    def interrupted(text):  # Ctrl-C while the second batch is decoded
        calls.append(text)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(text)

    monkeypatch.setattr(kid.generation, "clean_generated_sql", interrupted)
    out = tmp_path / "eval"
    code = main(["eval", "--model", str(toy_spider["student"]), "--data-file", str(toy_spider["data"]), "--db-dir",
                 str(toy_spider["db_dir"]), "--output-dir", str(out), "--batch-size", "2", "--max-new-tokens", "3",
                 "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 130 and "kid eval: interrupted" in err, err
    partial = json.loads((out / "predictions.partial.json").read_text())
    assert partial["generated"] == 2 and partial["examples"] == 6 and len(partial["predictions"]) == 2
    assert all(p["db_id"] == "toy" and p["question"] for p in partial["predictions"])
    assert f"the 2 of 6 predictions generated so far are in {out / 'predictions.partial.json'}" in err
    assert not (out / "predictions.sql").exists() and not (out / "report.json").exists()
