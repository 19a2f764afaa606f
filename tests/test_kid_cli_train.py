"""``kid train``: flags, YAML configuration, errors, and end-to-end runs on tiny saved models with Spider-format
data (a toy database built here; the real Spider data where it is available)."""
from __future__ import annotations

import json
import sqlite3

import pytest

from kid.cli import build_parser, config_values, main
from kid.config import MethodConfig
from kid.training import REPORT_NAME, TrainConfig, split_options
from tests.kid_tiny import all_finite, bpe_tokenizer, step_logs, tiny_model
from tests.spider_data import DB_DIR, SPIDER_DIR, needs_spider


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")


def _parse(argv):
    return build_parser().parse_args(["train", *argv])


# ---- flags and YAML ------------------------------------------------------------------------------------------------

def test_train_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--student", "--teacher", "--data-file", "--db-dir", "--output-dir", "--resume",
                 "--method", "--alpha", "--strategy", "--mask-eos", "--no-mask-eos", "--masking-only",
                 "--kid-predictions", "--gkd-lambda", "--beta", "--imitkd-gold-probability", "--max-new-tokens",
                 "--lora", "--no-lora", "--batch-size", "--micro-batch-size", "--max-steps", "--learning-rate"):
        assert flag in text, flag
    assert "sft, fkd, rkd, fdistill, imitkd, gkd or kid" in text


def test_flags_override_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "student: some/student\n"
        "teacher: some/teacher\n"
        "data-file: train.json\n"
        "db_dir: db\n"
        "batch_size: 8\n"
        "micro-batch-size: 2\n"
        "learning_rate: 1.0e-4\n"
        "lora: false\n"
        "method: kid\n"
        "method_options:\n"
        "  alpha: 0.1\n"
        "  strategy: hard\n"
        "  mask_eos: true\n")
    args = _parse(["--config", str(config), "--alpha", "0.3", "--batch-size", "16", "--lora", "--max-steps", "5"])
    values = config_values(args)
    assert values["alpha"] == 0.3 and values["batch_size"] == 16 and values["lora"] is True  # flags win
    assert values["strategy"] == "hard" and values["mask_eos"] is True  # from the method_options section
    assert values["data_file"] == "train.json" and values["micro_batch_size"] == 2  # dashes become underscores
    train, method = split_options(values)
    assert isinstance(train, TrainConfig) and isinstance(method, MethodConfig)
    assert (train.student, train.teacher, train.batch_size, train.micro_batch_size, train.max_steps) == (
        "some/student", "some/teacher", 16, 2, 5)
    assert train.learning_rate == pytest.approx(1e-4) and train.lora is True
    assert (method.method, method.alpha, method.strategy, method.mask_eos) == ("kid", 0.3, "hard", True)
    # flags alone: anything not given keeps the dataclass default
    train, method = split_options(config_values(_parse(["--student", "s", "--method", "gkd", "--no-lora"])))
    assert train.lora is False and train.batch_size == TrainConfig().batch_size
    assert method.method == "gkd" and method.gkd_lambda == MethodConfig().gkd_lambda
    assert config_values(_parse(["--resume"]))["resume"] is True
    assert config_values(_parse(["--resume", "out/checkpoint-4"]))["resume"] == "out/checkpoint-4"


def test_fsdp_flag_sets_fsdp2_training_arguments(tmp_path):
    from kid.training import training_arguments

    train, _ = split_options(config_values(_parse(["--student", "s", "--fsdp", "--gradient-checkpointing",
                                                   "--output-dir", str(tmp_path)])))
    assert train.fsdp is True
    args = training_arguments(train)
    assert args.fsdp and args.fsdp_config["version"] == 2
    # FSDP's own activation checkpointing replaces the Trainer's (which would all-gather twice)
    assert args.fsdp_config["activation_checkpointing"] is True
    assert not getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", None))
    plain = training_arguments(split_options({"output_dir": str(tmp_path)})[0])
    assert not plain.fsdp


def test_fsdp_without_gpus_is_refused(tmp_path, monkeypatch):
    # accelerate would quietly fall back to DDP on CPU processes
    from kid.training import run_training

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    train, method = split_options({"student": "s", "fsdp": True, "output_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="fsdp needs GPUs"):
        run_training(train, method, student=tiny_model(0), tokenizer=bpe_tokenizer(["select 1"]),
                     train_dataset=_one_example())


def _one_example():
    from datasets import Dataset

    return Dataset.from_list([{"input_ids": [5, 6, 7, 1], "labels": [-100, -100, 7, 1],
                               "attention_mask": [1, 1, 1, 1]}])


def test_split_options_errors():
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['alhpa', 'epochz'\]"):
        split_options({"alhpa": 0.2, "epochz": 3})
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size"):
        split_options({"batch_size": 6, "micro_batch_size": 4})
    with pytest.raises(ValueError, match="alpha must be in"):
        split_options({"alpha": 2})


def test_unknown_yaml_key_is_a_one_line_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("student: s\ndata_file: d\ndb_dir: x\nlearnig_rate: 0.1\n")
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kid train: error:") and "learnig_rate" in err
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- a\n- b\n")
    assert main(["train", "--config", str(not_a_mapping)]) == 2
    assert "expected a mapping" in capsys.readouterr().err


def test_missing_required_options(tmp_path, capsys):
    assert main(["train", "--data-file", "d.json", "--db-dir", str(tmp_path)]) == 2
    assert "--student is required" in capsys.readouterr().err
    assert main(["train", "--student", "s", "--db-dir", str(tmp_path)]) == 2
    assert "--data-file is required" in capsys.readouterr().err
    assert main(["train", "--student", "s", "--data-file", "d.json"]) == 2
    assert "--db-dir is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse: a bad flag value
        main(["train", "--alpha", "lots"])
    assert exc.value.code == 2


# ---- end to end ----------------------------------------------------------------------------------------------------

QUESTIONS = [
    ("How many singers are there?", "SELECT count(*) FROM singer"),
    ("List the names of all singers.", "SELECT name FROM singer"),
    ("What is the average age of singers?", "SELECT avg(age) FROM singer"),
    ("Show the names of singers older than 30.", "SELECT name FROM singer WHERE age > 30"),
    ("Which country has the most singers?",
     "SELECT country FROM singer GROUP BY country ORDER BY count(*) DESC LIMIT 1"),
    ("What are the distinct countries of singers?", "SELECT DISTINCT country FROM singer"),
]


@pytest.fixture(scope="module")
def toy_spider(tmp_path_factory):
    """A Spider-format data file on one toy database, and a tiny student and teacher whose tokenizer knows the
    data's words, saved with save_pretrained."""
    from transformers import AutoTokenizer

    from kid.data import load_spider

    root = tmp_path_factory.mktemp("toy_spider")
    db = root / "database" / "toy" / "toy.sqlite"
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER)")
        con.executemany("INSERT INTO singer VALUES (?, ?, ?, ?)",
                        [(1, "Joe", "France", 52), (2, "Ann", "Netherlands", 29), (3, "Tim", "France", 41)])
    data = root / "train.json"
    data.write_text(json.dumps([{"db_id": "toy", "question": q, "query": s} for q, s in QUESTIONS]))
    rows = load_spider(data, root / "database")
    tokenizer = bpe_tokenizer([r["prompt"] + " " + r["target"] for r in rows])
    _save_tiny_models(root, tokenizer)
    # kid train loads the tokenizer with AutoTokenizer: it must read the data as the tokenizer we built does
    loaded = AutoTokenizer.from_pretrained(root / "student")
    prompt = rows[0]["prompt"]
    assert len(loaded(prompt)["input_ids"]) > 20 and loaded.decode(loaded(prompt)["input_ids"]) == prompt
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.mask_token) == (1, 0, "<mask>")
    return {"data": data, "db_dir": root / "database", "student": root / "student", "teacher": root / "teacher"}


def _save_tiny_models(root, tokenizer):
    """A tiny student and a larger teacher with ``tokenizer``'s vocabulary, saved with their tokenizer."""
    for name, seed, size in (("student", 0, {}), ("teacher", 1, {"hidden": 48, "layers": 2})):
        tiny_model(seed, vocab=len(tokenizer), **size).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)


def _train_argv(toy, out, method, *extra):
    return ["train", "--student", str(toy["student"]), "--teacher", str(toy["teacher"]), "--data-file",
            str(toy["data"]), "--db-dir", str(toy["db_dir"]), "--output-dir", str(out), "--method", method,
            "--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "1", "--lora-r", "4", "--lora-alpha", "8",
            "--learning-rate", "1e-3", "--logging-steps", "1", "--no-progress", "--max-input-tokens", "256",
            "--max-output-tokens", "32", *extra]


@pytest.mark.parametrize("method", ["sft", "kid"])
def test_train_end_to_end_on_saved_tiny_models(toy_spider, tmp_path, method, capsys):
    out = tmp_path / method
    assert main(_train_argv(toy_spider, out, method, "--alpha", "0.5")) == 0
    assert f"kid train: {method} done" in capsys.readouterr().out
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["method"] == method and report["global_steps"] == 2 and not report["interrupted"]
    assert report["train_config"]["student"] == str(toy_spider["student"])
    assert report["method_config"]["alpha"] == 0.5
    logs = step_logs(report)
    assert len(logs) == 2 and all_finite([h[k] for h in logs for k in ("loss", "kd", "mle")])
    assert (logs[0]["kd"] == 0) == (method == "sft")
    final = out / "final"
    assert (final / "adapter_config.json").is_file() and (final / "tokenizer.json").is_file()
    # the saved adapter loads onto the student
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(toy_spider["student"]), final)


def test_train_sft_report_gives_latency_and_resume_continues(toy_spider, tmp_path, capsys):
    sft = tmp_path / "sft"
    assert main(_train_argv(toy_spider, sft, "sft", "--no-lora")) == 0
    kid_out = tmp_path / "kid"
    argv = _train_argv(toy_spider, kid_out, "kid", "--no-lora", "--sft-report", str(sft / REPORT_NAME),
                       "--save-steps", "2")
    assert main(argv) == 0
    assert "training time relative to SFT" in capsys.readouterr().out
    assert json.loads((kid_out / REPORT_NAME).read_text())["latency_vs_sft"] > 0
    assert (kid_out / "final" / "config.json").is_file()  # a full model without LoRA
    # --resume from the finished run's checkpoint, with more steps
    argv[argv.index("--max-steps") + 1] = "3"
    assert main(argv + ["--resume"]) == 0
    assert json.loads((kid_out / REPORT_NAME).read_text())["global_steps"] == 3


@needs_spider
def test_train_on_spider_data(tmp_path):
    # The real Spider training file (its first 8 examples with a database) and tables.json, on tiny models.
    from kid.data import MissingDatabaseWarning

    root = tmp_path / "models"
    # a byte-level BPE: Spider's words it never saw are spelled out in bytes
    _save_tiny_models(root, bpe_tokenizer([" ".join(q for q, _ in QUESTIONS)] + [s for _, s in QUESTIONS]))
    toy = {"student": root / "student", "teacher": root / "teacher", "data": SPIDER_DIR / "train_spider.json",
           "db_dir": DB_DIR}
    out = tmp_path / "run"
    argv = _train_argv(toy, out, "kid", "--tables-file", str(SPIDER_DIR / "tables.json"), "--limit", "8")
    with pytest.warns(MissingDatabaseWarning):
        assert main(argv) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["global_steps"] == 2 and all_finite([h["loss"] for h in step_logs(report)])
    assert (out / "final").is_dir()
