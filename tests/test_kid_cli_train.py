"""``kid train``: flags, YAML configuration, errors, and end-to-end runs on tiny saved models with Spider-format
data (a toy database built here; the real Spider data where it is available)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kid.cli import main
from kid.config import MethodConfig
from kid.kid_config import parse_kid_config
from kid.training import REPORT_NAME, TrainConfig, split_options
from tests.kid_tiny import REPO, all_finite, bpe_tokenizer, step_logs, tiny_model
from tests.spider_data import SPIDER
from tests.toy_spider import QUESTIONS, save_tiny_models, train_argv
from tests.toy_spider import toy_spider as toy_spider_fixture

toy_spider = toy_spider_fixture  # the module-scoped fixture


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")


def _parse(argv):
    """kid train's command line -> (TrainConfig, MethodConfig), as the run sees them."""
    config = parse_kid_config(argv)
    return config.train_config(), config.method_config()


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
    assert "{sft,fkd,rkd,fdistill,imitkd,gkd,kid}" in text  # enum options are choices
    for flag, choice in (("--strategy", "{random,uniform,hard,easy}"), ("--dtype", "{auto,float32,bfloat16,float16}"),
                         ("--lr-scheduler", "{linear,cosine,"), ("--data-format", "{bird,bird-no-evidence,spider,"),
                         ("--kid-predictions", "{argmax,sample}"), ("--attn-implementation", "{sdpa,eager,")):
        assert f"{flag} {choice}" in text, flag
    assert text.count("(default: kid)") == 1 and "(default kid)" not in text  # the default said once
    assert "--overwrite-output-dir" in text and "--version" not in text


def test_train_help_names_each_presets_default(capsys):
    """The options left to the preset say what each preset gives them, from kid.config's own table."""
    from kid.config import preset_defaults

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    paper_gkd, paper_fdistill = preset_defaults("paper", "gkd"), preset_defaults("paper", "fdistill")
    assert (f"(default: {preset_defaults('default', 'gkd')['gkd_lambda']} with --preset default; "
            f"{paper_gkd['gkd_lambda']} with --preset paper)") in text
    assert f"fdistill {paper_fdistill['top_p']}" in text and f"fdistill {paper_fdistill['mle_weight']}" in text
    assert f"imitkd {preset_defaults('paper', 'imitkd')['top_k']}" in text


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
    train, method = _parse(["--config", str(config), "--alpha", "0.3", "--batch-size", "16", "--lora",
                            "--max-steps", "5"])
    assert isinstance(train, TrainConfig) and isinstance(method, MethodConfig)
    assert method.alpha == 0.3 and train.batch_size == 16 and train.lora is True  # flags win
    assert method.strategy == "hard" and method.mask_eos is True  # from the method_options section
    assert train.data_file == "train.json" and train.micro_batch_size == 2  # dashes become underscores
    assert (train.student, train.teacher, train.batch_size, train.micro_batch_size, train.max_steps) == (
        "some/student", "some/teacher", 16, 2, 5)
    assert train.learning_rate == pytest.approx(1e-4) and train.lora is True
    assert (method.method, method.alpha, method.strategy, method.mask_eos) == ("kid", 0.3, "hard", True)
    # flags alone: anything not given keeps the dataclass default
    train, method = _parse(["--student", "s", "--method", "gkd", "--no-lora"])
    assert train.lora is False and train.batch_size == TrainConfig().batch_size
    assert method.method == "gkd" and method.gkd_lambda == MethodConfig().gkd_lambda
    assert _parse(["--resume"])[0].resume is True
    assert _parse(["--resume", "out/checkpoint-4"])[0].resume == "out/checkpoint-4"


def test_fsdp_flag_sets_fsdp2_training_arguments(tmp_path):
    from kid.training import training_arguments

    config = parse_kid_config(["--student", "s", "--fsdp", "--gradient-checkpointing", "--output-dir", str(tmp_path)])
    assert config.train_config().fsdp is True and config.train_config().gradient_checkpointing is True
    for args in (config, training_arguments(config.train_config())):
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

@pytest.mark.parametrize("method", ["sft", "kid"])
def test_train_end_to_end_on_saved_tiny_models(toy_spider, tmp_path, method, capsys):
    out = tmp_path / method
    assert main(train_argv(toy_spider, out, method, "--alpha", "0.5")) == 0
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
    assert main(train_argv(toy_spider, sft, "sft", "--no-lora")) == 0
    kid_out = tmp_path / "kid"
    argv = train_argv(toy_spider, kid_out, "kid", "--no-lora", "--sft-report", str(sft / REPORT_NAME),
                       "--save-steps", "2")
    assert main(argv) == 0
    assert "training time relative to SFT" in capsys.readouterr().out
    assert json.loads((kid_out / REPORT_NAME).read_text())["latency_vs_sft"] > 0
    assert (kid_out / "final" / "config.json").is_file()  # a full model without LoRA
    first = json.loads((kid_out / REPORT_NAME).read_text())
    assert len(first["segments"]) == 1 and first["train_runtime_s"] == first["segments"][0]["train_time_s"]
    assert json.loads((kid_out / "checkpoint-2" / "kid_run_state.json").read_text())["segments"][0]["last_step"] == 2
    # --resume from the finished run's checkpoint, with more steps: the SFT run is no longer comparable (2 steps
    # there, 4 here), which is refused before any work
    argv[argv.index("--max-steps") + 1] = "4"
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "--sft-report" in err and "not comparable" in err and "max_steps 2 there, 4 here" in err
    i = argv.index("--sft-report")
    del argv[i:i + 2]
    assert main(argv + ["--resume"]) == 0
    resumed = json.loads((kid_out / REPORT_NAME).read_text())
    assert resumed["global_steps"] == 4 and resumed["status"] == "finished"
    # the training time adds up both segments (steps 0-2 from the checkpoint, 2-4 now)
    segments = resumed["segments"]
    assert [(seg["first_step"], seg["last_step"]) for seg in segments] == [(0, 2), (2, 4)]
    # the first segment as the checkpoint recorded it (at its save, just before the first run ended)
    assert 0 < segments[0]["train_time_s"] <= first["segments"][0]["train_time_s"]
    assert resumed["train_runtime_s"] == pytest.approx(sum(seg["train_time_s"] for seg in segments), abs=2e-3)
    assert resumed["train_runtime_s"] > segments[1]["train_time_s"] > 0
    assert resumed["resumed_from"] == str((kid_out / "checkpoint-2").resolve())


def test_latency_vs_sft_is_flagged_when_the_runs_differ(toy_spider, tmp_path, capsys):
    from kid.run_report import sft_comparison

    sft = tmp_path / "sft"
    assert main(train_argv(toy_spider, sft, "sft", "--no-lora")) == 0
    report = json.loads((sft / REPORT_NAME).read_text())
    assert sft_comparison(report, report) == []
    other = dict(report, global_steps=5, examples_used=3, status="interrupted",
                 device_info=dict(report["device_info"], name="NVIDIA H100"))
    reasons = " ".join(sft_comparison(report, other))
    for text in ("steps 5 there, 2 here", "examples 3 there, 6 here", "did not finish", "device name"):
        assert text in reasons, text
    # through the CLI: an SFT report that finished fewer steps than this run is not divided by
    edited = tmp_path / "sft_edited.json"
    edited.write_text(json.dumps(dict(report, global_steps=1)))
    out = tmp_path / "kid"
    capsys.readouterr()
    assert main(train_argv(toy_spider, out, "kid", "--no-lora", "--sft-report", str(edited))) == 0
    printed = capsys.readouterr().out
    kid_report = json.loads((out / REPORT_NAME).read_text())
    assert kid_report["latency_vs_sft"] is None and kid_report["latency_vs_sft_not_comparable"] == [
        "steps 1 there, 2 here"]
    assert "training time relative to SFT: not given, the runs differ: steps 1 there, 2 here" in printed


def test_train_on_spider_data(tmp_path):
    # The real Spider training file (or the shipped slice's), its first 8 examples with a database, and tables.json,
    # on tiny models.
    import contextlib

    from kid.data import MissingDatabaseWarning

    root = tmp_path / "models"
    # a byte-level BPE: Spider's words it never saw are spelled out in bytes
    save_tiny_models(root, bpe_tokenizer([" ".join(q for q, _ in QUESTIONS)] + [s for _, s in QUESTIONS]))
    toy = {"student": root / "student", "teacher": root / "teacher", "data": SPIDER.train_file,
           "db_dir": SPIDER.db_dir}
    out = tmp_path / "run"
    argv = train_argv(toy, out, "kid", "--tables-file", str(SPIDER.tables_file), "--limit", "8")
    with pytest.warns(MissingDatabaseWarning) if SPIDER.full else contextlib.nullcontext():
        assert main(argv) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["global_steps"] == 2 and all_finite([h["loss"] for h in step_logs(report)])
    assert report["examples"]["used"] == 8
    assert report["examples"]["without_database"] == (96 if SPIDER.full else 0)
    assert (out / "final").is_dir()


# ---- mistakes are named, before any work ---------------------------------------------------------------------------

@pytest.fixture
def no_data_building(monkeypatch):
    """Fail the test if the training data is built: every check below must come first."""
    import kid.data.loaders

    def refuse(*args, **kwargs):
        raise AssertionError("the data was built before the options were checked")

    monkeypatch.setattr(kid.data.loaders, "load_dataset_by_name", refuse)


def _one_line_error(capsys, argv, *expected):
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's errors (a flag) exit from the parser
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert err.startswith("kid train: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    return err


def test_user_mistakes_are_one_line_before_the_data_is_built(toy_spider, tmp_path, capsys, no_data_building):
    out = tmp_path / "out"
    argv = train_argv(toy_spider, out, "kid")

    def with_option(flag, value, base=argv):
        i = base.index(flag)
        return base[:i + 1] + [value] + base[i + 2:]

    _one_line_error(capsys, with_option("--student", str(tmp_path / "no" / "such" / "model")), "--student",
                    "no such directory")
    _one_line_error(capsys, with_option("--teacher", str(tmp_path / "nope")), "--teacher", "no such directory")
    _one_line_error(capsys, with_option("--student", str(tmp_path)), "not a model directory (no config.json")
    _one_line_error(capsys, [a for a in argv if a != str(toy_spider["teacher"]) and a != "--teacher"],
                    "method 'kid' needs a teacher")
    _one_line_error(capsys, argv + ["--mask-token", "<nonexistent>"], "--mask-token", "not a token")
    _one_line_error(capsys, argv + ["--resume", str(tmp_path / "checkpoint-9")], "no such checkpoint directory")
    _one_line_error(capsys, argv + ["--resume"], "no checkpoint in")
    _one_line_error(capsys, argv + ["--kd-weight", "0", "--mle-weight", "0"], "both 0")
    _one_line_error(capsys, argv + ["--data-format", "bird"], "looks like Spider data", "--data-format spider")
    _one_line_error(capsys, with_option("--db-dir", str(tmp_path)), "none of the 6 examples", "is --db-dir right?")
    _one_line_error(capsys, argv + ["--attn-implementation", "flash_attention_2"], "flash_attn")
    _one_line_error(capsys, argv + ["--fsdp"], "--fsdp needs GPUs")
    _one_line_error(capsys, argv + ["--limit", "0"], "limit must be >= 1")
    _one_line_error(capsys, argv + ["--warmup-ratio", "1.5"], "warmup_ratio must be in [0, 1)")
    _one_line_error(capsys, argv + ["--resume", "--overwrite-output-dir"], "contradict")
    _one_line_error(capsys, argv + ["--sft-report", str(tmp_path / "missing.json")], "--sft-report", "not found")
    # a typo in an enum option is argparse's one line
    for flag, value in (("--dtype", "bf16"), ("--lr-scheduler", "cosin"), ("--method", "kd"),
                        ("--strategy", "hardest")):
        with pytest.raises(SystemExit) as exc:
            main(argv + [flag, value])
        assert exc.value.code == 2
        assert f"argument {flag}: invalid choice: '{value}'" in capsys.readouterr().err
    assert not out.exists()  # and nothing was created


def test_yaml_mistakes_are_one_line(tmp_path, capsys, no_data_building):
    cases = {
        "student: [unclosed\n": "not valid YAML",
        "student: s\nbatch_size: eight\n": "batch_size: expected an integer, got 'eight'",
        "student: s\nlora: maybe\n": "lora: expected true or false",
        "student: s\nlearning_rate: [1, 2]\n": "learning_rate: expected a number",
        "student: s\nmethod_options: 3\n": "method_options must be a mapping",
        "student: s\nmethod_options:\n  alpha: lots\n": "alpha",
    }
    for i, (text, expected) in enumerate(cases.items()):
        config = tmp_path / f"c{i}.yaml"
        config.write_text(text)
        _one_line_error(capsys, ["train", "--config", str(config), "--data-file", "d", "--db-dir", "x"], expected)
    _one_line_error(capsys, ["train", "--config", str(tmp_path / "none.yaml")], "--config", "file not found")
    # numbers as strings in YAML are fine
    config = tmp_path / "ok.yaml"
    config.write_text("batch_size: '8'\nmicro_batch_size: 2\nlora: 'false'\nepochs: 2\n")
    train, _ = _parse(["--config", str(config)])
    assert (train.batch_size, train.lora, train.epochs) == (8, False, 2.0)


def test_teacher_with_another_tokenizer_is_refused(toy_spider, tmp_path, capsys, no_data_building):
    other = tmp_path / "other_teacher"
    tokenizer = bpe_tokenizer(["completely different words here"], vocab_size=280)
    tiny_model(1, vocab=len(tokenizer)).save_pretrained(other)
    tokenizer.save_pretrained(other)
    capsys.readouterr()
    argv = train_argv(toy_spider, tmp_path / "out", "kid")
    argv[argv.index("--teacher") + 1] = str(other)
    _one_line_error(capsys, argv, "the teacher's tokenizer differs from the student's", "token id ")


def test_output_dir_of_an_earlier_run_is_kept_unless_asked(toy_spider, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(toy_spider, out, "sft", "--save-steps", "1")
    first = argv.copy()
    first[first.index("--max-steps") + 1] = "3"
    assert main(first) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    (out / "notes.txt").write_text("mine")
    report_before = (out / REPORT_NAME).read_bytes()
    capsys.readouterr()
    # the same directory again, without --resume: refused, naming both ways on, and nothing touched
    err = _one_line_error(capsys, argv, f"--output-dir {out} is not empty", "--resume", "--overwrite-output-dir")
    assert "checkpoint-2" in err
    assert (out / REPORT_NAME).read_bytes() == report_before and (out / "checkpoint-3").is_dir()
    # --overwrite-output-dir: the earlier run's checkpoints, model and report go (checkpoint-3 would otherwise be
    # what a later --resume picks); the user's other files stay
    assert main(argv + ["--overwrite-output-dir"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert json.loads((out / REPORT_NAME).read_text())["global_steps"] == 2
    assert (out / "notes.txt").read_text() == "mine" and (out / "final" / "adapter_config.json").is_file()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no staging directories left


def test_report_records_versions_commit_counts_paths_device(toy_spider, tmp_path, capsys, monkeypatch):
    import re

    # one more example whose database is missing; relative paths on the command line
    data = json.loads(toy_spider["data"].read_text()) + [{"db_id": "gone", "question": "q", "query": "SELECT 1"}]
    (tmp_path / "train.json").write_text(json.dumps(data))
    monkeypatch.chdir(tmp_path)
    argv = train_argv(toy_spider, "out", "sft")
    argv[argv.index("--data-file") + 1] = "train.json"
    assert main(argv) == 0
    start = capsys.readouterr().err
    assert "kid train: sft on " in start and "6 examples (1 without a database, skipped)" in start
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["status"] == "finished" and report["signal"] is None
    for name in ("torch", "triton", "transformers", "peft", "kidkernels", "kid", "python"):
        assert name in report["versions"], name
    assert report["versions"]["torch"] and report["versions"]["kid"]
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", report["git"]["commit"]) and isinstance(report["git"]["dirty"], bool)
    assert report["examples"] == {"in_file": 7, "with_database": 6, "without_database": 1,
                                  "missing_databases": {"gone": 1}, "used": 6}
    config = report["train_config"]
    assert config["data_file"] == str(tmp_path / "train.json") and config["output_dir"] == str(tmp_path / "out")
    assert all(Path(config[k]).is_absolute() for k in ("student", "teacher", "db_dir", "data_file", "output_dir"))
    assert report["device"] == "cpu" and report["device_info"]["type"] == "cpu"
    assert report["device_info"]["world_size"] == 1 and report["device_info"]["cpu_count"] >= 1
    segment = report["segments"][0]
    assert segment["step_time_s"]["n"] == 2 and segment["cpu_time_s"] > 0 and report["cpu_time_s"] > 0


def test_a_failed_run_leaves_no_empty_output_dir(toy_spider, tmp_path, capsys, monkeypatch):
    import kid.trainer

    def broken(self, *args, **kwargs):
        assert out.is_dir()  # the Trainer made it
        raise RuntimeError("simulated failure at the start of training")

    monkeypatch.setattr(kid.trainer.DistillTrainer, "train", broken)
    out = tmp_path / "run"
    assert main(train_argv(toy_spider, out, "sft")) == 1  # not the user's fault: a bug, with its traceback
    err = capsys.readouterr().err
    assert "simulated failure" in err and "internal error (RuntimeError)" in err
    assert not out.exists()


def test_option_choices_match_the_libraries():
    from transformers.trainer_utils import SchedulerType

    from kid.data import LOADERS
    from kid.training import DATA_FORMATS, LR_SCHEDULERS

    assert set(LR_SCHEDULERS) <= {s.value for s in SchedulerType}
    assert tuple(sorted(LOADERS)) == DATA_FORMATS
