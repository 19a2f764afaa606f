"""``kid.training.KIDConfig`` (a ``transformers.TrainingArguments`` with kid's options) and what it opens up: every
Trainer option from ``kid train``'s flags and YAML, execution accuracy on a dev slice during training with the best
checkpoint chosen by it (:mod:`kid.ex_eval`), ``kid export --merge``, and ``DistillTrainer`` with nothing but a
model, a teacher, its arguments, data and a tokenizer.  Tiny models built from config; the toy Spider database."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from kid.cli import main
from kid.kid_config import parse_kid_config
from kid.training import REPORT_NAME
from tests.kid_tiny import all_finite, bpe_tokenizer, step_logs, tiny_model
from tests.test_kid_cli_train import _one_line_error
from tests.toy_spider import QUESTIONS, train_argv
from tests.toy_spider import toy_spider as toy_spider_fixture

toy_spider = toy_spider_fixture  # the module-scoped fixture


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")


# ---- KIDConfig: the Trainer's options and kid's --------------------------------------------------------------

def test_kid_config_is_training_arguments_with_kid_defaults(tmp_path):
    from transformers import TrainingArguments

    from kid.config import MethodConfig
    from kid.kid_config import KIDConfig as FromModule
    from kid.training import KIDConfig, TrainConfig, training_arguments

    assert KIDConfig is FromModule and issubclass(KIDConfig, TrainingArguments)
    args = KIDConfig(output_dir=str(tmp_path), method="gkd", preset="paper", alpha=0.3)
    # kid's defaults where the Trainer has the field (TrainConfig's), and the settings kid's step relies on
    assert (args.num_train_epochs, args.learning_rate, args.per_device_train_batch_size) == (8, 2e-4, 4)
    assert str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)) == "cosine"
    assert args.gradient_accumulation_steps == 4 and args.batch_size == 16  # 16 sequences per optimizer step
    assert args.report_to in ([], "none", ["none"]) and args.remove_unused_columns is False
    assert args.label_names == ["answer_labels"] and args.save_total_limit == 2
    # the views: the plain dataclasses, with their own checks and the preset applied
    method = args.method_config()
    assert isinstance(method, MethodConfig) and (method.method, method.gkd_lambda, method.gkd_divergence,
                                                 method.mle_weight, method.alpha) == ("gkd", 1.0, "rkl", 0.0, 0.3)
    train = args.train_config()
    assert isinstance(train, TrainConfig) and train.epochs == 8 and train.batch_size == 16
    # from the plain dataclasses back to a KIDConfig (what run_training builds for a TrainConfig)
    again = training_arguments(TrainConfig(output_dir=str(tmp_path), batch_size=8, micro_batch_size=2, epochs=3))
    assert isinstance(again, KIDConfig) and again.gradient_accumulation_steps == 4 and again.num_train_epochs == 3
    # the batch follows from gradient accumulation when that is what is given; both given must agree
    assert KIDConfig(output_dir=str(tmp_path), gradient_accumulation_steps=2).batch_size == 8
    from kid.errors import UsageError

    with pytest.raises(UsageError, match="give one of them"):
        KIDConfig(output_dir=str(tmp_path), batch_size=16, gradient_accumulation_steps=2)
    with pytest.raises(UsageError, match="alpha must be in"):
        KIDConfig(output_dir=str(tmp_path), alpha=3)


def test_trainer_options_from_flags_and_yaml(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("student: s\n"
                      "optim: adafactor\n"
                      "dataloader-num-workers: 2\n"
                      "eval_strategy: steps\n"
                      "eval_steps: 3\n"
                      "report_to: none\n"
                      "torch_compile: true\n"
                      "push_to_hub: false\n"
                      "epochs: 2\n"
                      "method_options:\n"
                      "  method: rkd\n")
    args = parse_kid_config(["--config", str(config), "--output-dir", str(tmp_path / "o"), "--bf16", "false",
                             "--eval-steps", "5", "--adam-beta2", "0.95", "--run-name", "mine",
                             "--group-by-length", "--no-lora"])
    value = lambda v: str(getattr(v, "value", v))  # noqa: E731 - enums or their names
    assert value(args.optim) == "adafactor" and args.dataloader_num_workers == 2 and args.torch_compile is True
    assert value(args.eval_strategy) == "steps" and args.eval_steps == 5  # the flag wins over the file
    assert args.report_to in ([], "none", ["none"]) and args.push_to_hub is False and args.bf16 is False
    assert args.adam_beta2 == 0.95 and args.run_name == "mine" and args.num_train_epochs == 2
    assert args.method_config().method == "rkd" and args.train_config().lora is False
    # length-grouped batches from kid's flag, in whatever the installed transformers calls it
    assert args.train_config().group_by_length is True
    assert getattr(args, "train_sampling_strategy", "group_by_length") == "group_by_length" \
        or getattr(args, "group_by_length", False) is True
    # the old names are aliases of the Trainer's fields
    args = parse_kid_config(["--output-dir", str(tmp_path / "o"), "--epochs", "3", "--lr-scheduler", "linear",
                             "--micro-batch-size", "2", "--batch-size", "8"])
    assert (args.num_train_epochs, value(args.lr_scheduler_type), args.per_device_train_batch_size,
            args.gradient_accumulation_steps) == (3, "linear", 2, 4)


def test_trainer_option_mistakes_are_one_line_before_the_data_is_built(toy_spider, tmp_path, capsys, monkeypatch):
    import kid.data.loaders

    def refuse(*args, **kwargs):
        raise AssertionError("the data was built before the options were checked")

    monkeypatch.setattr(kid.data.loaders, "load_dataset_by_name", refuse)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    argv = train_argv(toy_spider, out, "kid")
    _one_line_error(capsys, argv + ["--no-such-trainer-flag", "3"], "unrecognized arguments: --no-such-trainer-flag")
    _one_line_error(capsys, argv + ["--eval-strategy", "steps"], "needs a dev set", "--eval-data-file")
    _one_line_error(capsys, argv + ["--metric-for-best-model", "loss", "--eval-data-file", str(toy_spider["data"])],
                    "eval_ex")
    _one_line_error(capsys, argv + ["--push-to-hub"], "--push-to-hub")
    _one_line_error(capsys, argv + ["--eval-data-file", str(tmp_path / "dev.json")], "--eval-data-file")
    _one_line_error(capsys, argv + ["--eval-data-file", str(toy_spider["data"]), "--eval-db-dir", str(tmp_path)],
                    "--eval-data-file", "none of the 6 examples")
    for flag, value, expected in (("--eval-strategy", "sometimes", "invalid choice: 'sometimes'"),
                                  ("--optim", "adamw_nonexistent", "invalid choice"),
                                  ("--dataloader-num-workers", "two", "invalid int value"),
                                  ("--bf16", "maybe", "--bf16")):
        _one_line_error(capsys, argv + [flag, value], expected)
    # in YAML: the key as the file spells it, the allowed values, the file
    cases = {"eval_strategy: sometimes\n": "eval_strategy: expected one of no, steps, epoch",
             "lr_scheduler: cosin\n": "lr_scheduler: expected one of linear, cosine",
             "dataloader_num_workers: two\n": "dataloader_num_workers: expected an integer",
             "epochs: 2\nnum_train_epochs: 3\n": "epochs and num_train_epochs are the same option",
             "report_too: wandb\n": "report_too: did you mean report_to?"}
    for i, (text, expected) in enumerate(cases.items()):
        config = tmp_path / f"c{i}.yaml"
        config.write_text(text)
        _one_line_error(capsys, argv + ["--config", str(config)], f"--config {config}", expected)
    assert not out.exists()


# ---- execution accuracy during training, the best checkpoint ------------------------------------------------------

def _adapter_weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_execution_accuracy_selects_the_best_checkpoint(toy_spider, tmp_path, capsys, monkeypatch):
    from kid.ex_eval import ExecutionAccuracyCallback

    real_generate = ExecutionAccuracyCallback._generate
    gold = [sql for _, sql in QUESTIONS]
    right_at = {1: 2, 2: 6, 3: 3}  # step -> how many of the 6 answers are right: step 2 is the best

    def generate(self, trainer):
        decoded = real_generate(self, trainer)  # greedy decoding of the slice, as always
        assert len(decoded) == len(gold) and all(isinstance(t, str) for t in decoded)
        k = right_at[trainer.state.global_step]
        return gold[:k] + ["SELECT name FROM nowhere"] * (len(gold) - k)

    monkeypatch.setattr(ExecutionAccuracyCallback, "_generate", generate)
    out = tmp_path / "run"
    argv = train_argv(toy_spider, out, "kid", "--eval-data-file", str(toy_spider["data"]), "--eval-strategy",
                      "steps", "--eval-steps", "1", "--save-steps", "1", "--load-best-model-at-end",
                      "--eval-max-new-tokens", "4", "--group-by-length")
    argv[argv.index("--max-steps") + 1] = "3"
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / REPORT_NAME).read_text())
    assert [(e["step"], e["count"]) for e in report["evaluations"]] == [(1, 6), (2, 6), (3, 6)]
    assert [e["ex"] for e in report["evaluations"]] == pytest.approx([2 / 6, 1.0, 3 / 6])
    assert report["metric_for_best_model"] == "eval_ex" and report["best_metric"] == pytest.approx(1.0)
    assert report["best_global_step"] == 2 and report["best_model_checkpoint"] == str(out / "checkpoint-2")
    assert report["final_model_is_best"] is True
    assert "execution accuracy (eval_ex) at step 3: 0.5000 on 6 dev examples; best 1.0000" in printed
    # rotation (2 checkpoints kept) kept the best one; the final model is the best checkpoint's
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    best, final, last = (_adapter_weights(out / name) for name in ("checkpoint-2", "final", "checkpoint-3"))
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    assert any(not torch.equal(best[k], last[k]) for k in best)
    # every evaluation's per-example report, from the real evaluator
    step2 = json.loads((out / "evaluations" / "step-2.json").read_text())
    assert step2["step"] == 2 and step2["totals"]["accuracy"] == pytest.approx(1.0)
    assert [e["pred"] for e in step2["examples"]] == gold and all(e["correct"] for e in step2["examples"])
    step1 = json.loads((out / "evaluations" / "step-1.json").read_text())
    assert [e["correct"] for e in step1["examples"]] == [True, True] + [False] * 4
    # every step still logs its loss (a score arriving mid-step does not swallow the step's log line)
    logs = step_logs(report)
    assert [h["step"] for h in logs] == [1, 2, 3] and all_finite([h["loss"] for h in logs])
    assert report["training_args"]["load_best_model_at_end"] is True


def test_scoring_runs_beside_training(toy_spider, tmp_path, monkeypatch):
    """The SQL is executed in the background: the evaluation returns once the SQL is generated, and the score
    is logged when the real evaluator is done."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import kid.evaluation.scoring
    from kid.data import load_spider
    from kid.ex_eval import ExecutionAccuracyCallback
    from kid.trainer import DistillTrainer
    from kid.training import KIDConfig

    real = kid.evaluation.scoring.evaluate_predictions
    gate, threads = threading.Event(), []

    def gated(*args, **kwargs):
        threads.append(threading.current_thread().name)
        assert gate.wait(60), "the test never opened the gate"
        return real(*args, **kwargs)

    monkeypatch.setattr(kid.evaluation.scoring, "evaluate_predictions", gated)
    dev = load_spider(toy_spider["data"], toy_spider["db_dir"])
    callback = ExecutionAccuracyCallback(dev, toy_spider["db_dir"], max_new_tokens=4, max_input_tokens=256,
                                         num_workers=1)
    gold = list(dev["query"])
    monkeypatch.setattr(ExecutionAccuracyCallback, "_generate", lambda self, trainer: gold[:3] + ["SELECT"] * 3)
    tokenizer = AutoTokenizer.from_pretrained(toy_spider["student"])
    args = KIDConfig(output_dir=str(tmp_path / "o"), method="sft", lora=False, disable_tqdm=True, max_steps=1,
                     eval_data_file=str(toy_spider["data"]))
    trainer = DistillTrainer(AutoModelForCausalLM.from_pretrained(toy_spider["student"]), args=args,
                             train_dataset=dev, processing_class=tokenizer, callbacks=[callback])
    assert trainer.evaluate() == {}  # returned while the evaluator waits at the gate
    assert callback._pending is not None and not callback._pending.future.done()
    assert threads and threads[0].startswith("kid-ex-scoring")
    gate.set()
    metrics = callback.settle(trainer)
    assert metrics["eval_ex"] == pytest.approx(0.5) and metrics["eval_ex_count"] == 6
    assert trainer.state.log_history[-1]["eval_ex"] == pytest.approx(0.5)
    callback.close()


# ---- kid export --merge ---------------------------------------------------------------------------------------

def test_export_merge_gives_a_plain_model_with_the_peft_models_logits(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kid.models import LoraOptions, apply_lora

    tokenizer = bpe_tokenizer(["select name from singer where age > 30"], vocab_size=270)
    base_dir, run = tmp_path / "base", tmp_path / "run"
    tiny_model(3, vocab=len(tokenizer), layers=2).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    peft_model = apply_lora(AutoModelForCausalLM.from_pretrained(base_dir), LoraOptions(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero: give the adapters something to merge
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(run / "final")
    tokenizer.save_pretrained(run / "final")
    out = tmp_path / "merged"
    assert main(["export", "--model", str(run), "--output-dir", str(out), "--merge"]) == 0
    assert "merged model (float32)" in capsys.readouterr().out
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    assert not any("lora" in name for name, _ in merged.named_parameters())
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run / "final").eval()
    ids = AutoTokenizer.from_pretrained(out)(["select name from singer", "where age > 30 select"],
                                             return_tensors="pt", padding=True)["input_ids"]
    with torch.no_grad():
        got, want = merged(ids).logits.double(), reference(ids).logits.double()
        with reference.disable_adapter():
            plain = reference(ids).logits.double()
    assert (want - plain).abs().max() > 1e-3  # the adapters matter: the merge is not the base model
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    # mistakes are one line; an existing export is not replaced unless asked
    assert main(["export", "--model", str(run), "--output-dir", str(out), "--merge"]) == 2
    assert "--overwrite-output-dir" in capsys.readouterr().err
    assert main(["export", "--model", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "x")]) == 2
    assert "no such directory" in capsys.readouterr().err
    # without --merge: a clean copy of the adapter that loads from anywhere
    copy = tmp_path / "adapter"
    assert main(["export", "--model", str(run / "final"), "--output-dir", str(copy)]) == 0
    assert json.loads((copy / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)


# ---- DistillTrainer with nothing else given -----------------------------------------------------------------------

def test_distill_trainer_needs_only_model_teacher_args_data_and_tokenizer(toy_spider, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from kid.batching import DistillCollator
    from kid.data import load_spider
    from kid.trainer import DistillTrainer
    from kid.training import KIDConfig

    rows = load_spider(toy_spider["data"], toy_spider["db_dir"])  # kid.data rows: prompt / target, untokenized
    tokenizer = AutoTokenizer.from_pretrained(toy_spider["student"])
    args = KIDConfig(output_dir=str(tmp_path / "o"), method="kid", lora=False, max_steps=2, batch_size=2,
                     per_device_train_batch_size=1, logging_steps=1, save_strategy="no", disable_tqdm=True,
                     max_input_tokens=256, max_output_tokens=32, group_by_length=True)
    trainer = DistillTrainer(AutoModelForCausalLM.from_pretrained(toy_spider["student"]),
                             teacher=str(toy_spider["teacher"]), args=args, train_dataset=rows,
                             processing_class=tokenizer)
    assert isinstance(trainer.data_collator, DistillCollator)
    assert trainer.mask_token_id == tokenizer.mask_token_id  # the tokenizer's own mask token
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    assert {"input_ids", "labels", "length"} <= set(trainer.train_dataset.column_names)
    assert isinstance(trainer._get_train_sampler(), LengthGroupedSampler)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all_finite([h[k] for h in logs for k in ("loss", "kd", "mle")]) and logs[0]["kd"] > 0
    # the student by path too: loaded with the LoRA adapters the arguments ask for, its tokenizer with it
    args = KIDConfig(output_dir=str(tmp_path / "p"), method="sft", lora_r=4, lora_alpha=8, max_steps=1,
                     batch_size=1, per_device_train_batch_size=1, save_strategy="no", disable_tqdm=True,
                     max_input_tokens=256, max_output_tokens=32)
    trainer = DistillTrainer(str(toy_spider["student"]), args=args, train_dataset=rows)
    assert trainer.processing_class is not None and hasattr(trainer.model, "peft_config")
    trainer.train()


DDP_WORKER = '''
import faulthandler
import json
import sys

import torch.distributed as dist

faulthandler.dump_traceback_later(150, exit=True)  # a deadlock ends the worker with its stacks
dist.init_process_group("gloo")

from kid.cli import main
from kid.ex_eval import ExecutionAccuracyCallback
from tests.kid_tiny import end_worker

out, argv = sys.argv[1], json.loads(sys.argv[2])
gold = json.loads(sys.argv[3])
rank = dist.get_rank()
real_generate = ExecutionAccuracyCallback._generate
seen = []


def generate(self, trainer):
    decoded = real_generate(self, trainer)  # every process decodes its share; rank 0 gathers them
    step = trainer.state.global_step
    seen.append((step, None if decoded is None else len(decoded)))
    if decoded is None:
        return None
    k = {1: 6, 2: 1}[step]  # step 1 is the best
    return gold[:k] + ["SELECT name FROM nowhere"] * (len(gold) - k)


ExecutionAccuracyCallback._generate = generate
code = main(argv)
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"code": code, "seen": seen}, f)
if code == 0:
    end_worker()
sys.exit(code)
'''


@pytest.mark.slow  # one torchrun launch of two processes: ~30 s on 2 cores
def test_execution_accuracy_under_ddp(toy_spider, tmp_path):
    """Two processes (DDP, gloo): each decodes its share of the slice, rank 0 scores it in the background and
    broadcasts the score; both agree on the best checkpoint and load it."""
    from tests.kid_tiny import run_on_two_processes

    out = tmp_path / "run"
    argv = train_argv(toy_spider, out, "sft", "--eval-data-file", str(toy_spider["data"]), "--eval-strategy",
                      "steps", "--eval-steps", "1", "--save-steps", "1", "--load-best-model-at-end",
                      "--eval-max-new-tokens", "3")
    run_on_two_processes(DDP_WORKER, tmp_path, json.dumps(argv), json.dumps([sql for _, sql in QUESTIONS]),
                         timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["code"] for r in ranks] == [0, 0]
    assert ranks[0]["seen"] == [[1, 6], [2, 6]] and ranks[1]["seen"] == [[1, None], [2, None]]
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["device_info"]["world_size"] == 2
    assert [(e["step"], e["ex"]) for e in report["evaluations"]] == [(1, 1.0), (2, pytest.approx(1 / 6))]
    assert report["best_global_step"] == 1 and report["best_model_checkpoint"] == str(out / "checkpoint-1")
    best, final = _adapter_weights(out / "checkpoint-1"), _adapter_weights(out / "final")
    assert all(torch.equal(best[k], final[k]) for k in best)


def test_disable_dropout_from_flags_yaml_and_the_dataclasses(tmp_path):
    from kid.training import KIDConfig, TrainConfig, training_arguments

    out = str(tmp_path / "o")
    assert TrainConfig().disable_dropout is False and KIDConfig(output_dir=out).disable_dropout is False
    args = parse_kid_config(["--output-dir", out, "--disable-dropout"])
    assert args.disable_dropout is True and args.train_config().disable_dropout is True
    config = tmp_path / "run.yaml"
    config.write_text("disable-dropout: true\n")
    assert parse_kid_config(["--config", str(config), "--output-dir", out]).disable_dropout is True
    assert parse_kid_config(["--config", str(config), "--output-dir", out, "--no-disable-dropout"]).disable_dropout \
        is False
    assert training_arguments(TrainConfig(output_dir=out, disable_dropout=True)).disable_dropout is True


def test_disable_dropout_is_in_kid_train_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    assert "--disable-dropout" in capsys.readouterr().out
