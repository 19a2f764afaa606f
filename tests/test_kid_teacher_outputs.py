"""The teacher's answers generated once before training (kid.teacher_outputs, ``kid generate-teacher``) and
f-distill reading them: distinct prompts only, continued after an interruption, reused as is, refused when made
otherwise; training then never asks the teacher to generate; the paper preset."""
from __future__ import annotations

import json
import sqlite3

import pytest
import torch

import kid.rollout
from kid.batching import IGNORE_INDEX
from kid.cli import main
from kid.config import MethodConfig
from kid.rollout import GOLD, STUDENT, TEACHER, generate_answers
from kid.teacher_outputs import (
    META_NAME,
    OUTPUTS_NAME,
    attach_teacher_outputs,
    generate_teacher_outputs,
    load_teacher_outputs,
    prompt_key,
    prompt_of,
)
from kid.training import REPORT_NAME, run_training
from tests.kid_tiny import EOS, PAD, bpe_tokenizer, step_logs, tiny_examples, tiny_model, tiny_tokenizer, train_config


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")


@pytest.fixture(scope="module")
def teacher():
    return tiny_model(1, hidden=48, layers=2, init_std=0.2).eval().requires_grad_(False)


def _dataset(n=6, seed=0):
    from datasets import Dataset

    rows = tiny_examples(n, seed=seed)
    return Dataset.from_list(rows + rows[:2])  # two prompts twice: generated once


def _generate(teacher, dataset, out, **kwargs):
    return generate_teacher_outputs(teacher, dataset, out, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=5,
                                    batch_size=3, progress=False, **kwargs)


def test_outputs_are_the_teachers_greedy_answers_to_each_distinct_prompt(tmp_path, teacher):
    dataset = _dataset()
    meta = _generate(teacher, dataset, tmp_path / "out", settings={"teacher": "tiny"})
    assert meta["complete"] and meta["prompts"] == 6 and meta["teacher"] == "tiny"
    loaded_meta, outputs = load_teacher_outputs(tmp_path / "out")
    assert loaded_meta == meta and len(outputs) == 6
    assert len((tmp_path / "out" / OUTPUTS_NAME).read_text().splitlines()) == 6
    for example in dataset:
        prompt = prompt_of(example)
        ids = torch.tensor([prompt])
        expected = generate_answers(teacher, ids, torch.ones_like(ids), max_new_tokens=5, eos_token_id=EOS,
                                    pad_token_id=PAD, do_sample=False)[0]
        expected = expected[expected != IGNORE_INDEX].tolist()
        assert outputs[prompt_key(prompt)] == expected
        assert 1 <= len(expected) <= 5 and EOS not in expected[:-1]


def test_interrupted_generation_continues_and_a_finished_one_is_reused(tmp_path, teacher, monkeypatch):
    dataset = _dataset()
    out = tmp_path / "out"
    calls = []
    real = kid.teacher_outputs.generate_grouped

    def interrupted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(kid.teacher_outputs, "generate_grouped", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _generate(teacher, dataset, out)
    assert not json.loads((out / META_NAME).read_text())["complete"]
    with pytest.raises(ValueError, match="incomplete"):
        load_teacher_outputs(out)
    # a line cut by the interruption is dropped, not read as an answer
    with open(out / OUTPUTS_NAME, "a") as f:
        f.write('{"prompt": "abc", "ans')
    calls.clear()
    monkeypatch.setattr(kid.teacher_outputs, "generate_grouped", real)
    counting = []
    monkeypatch.setattr(kid.teacher_outputs, "generate_grouped",
                        lambda *a, **k: counting.append(len(a[1])) or real(*a, **k))
    meta = _generate(teacher, dataset, out)
    assert meta["complete"] and counting == [3]  # only the 3 prompts the first run did not finish
    _, outputs = load_teacher_outputs(out)
    assert len(outputs) == 6 and "abc" not in outputs
    # finished: reused without generating, as long as the settings are the same
    counting.clear()
    _generate(teacher, dataset, out)
    assert counting == []
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens\)"):
        generate_teacher_outputs(teacher, dataset, out, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=7,
                                 progress=False)
    generate_teacher_outputs(teacher, dataset, out, eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=7,
                             progress=False, overwrite=True)
    assert load_teacher_outputs(out)[0]["max_new_tokens"] == 7
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a teacher-output directory"):
        _generate(teacher, dataset, tmp_path / "other")


def test_missing_prompts_are_counted(tmp_path, teacher):
    _generate(teacher, _dataset(), tmp_path / "out")
    _, outputs = load_teacher_outputs(tmp_path / "out")
    with pytest.raises(ValueError, match="3 of 3 training prompts have no cached teacher output"):
        attach_teacher_outputs(_dataset(3, seed=9).select(range(3)), outputs)


def test_fdistill_reads_the_cached_answers_and_never_asks_the_teacher_to_generate(tmp_path, teacher, monkeypatch):
    dataset = _dataset(8, seed=2)
    _generate(teacher, dataset, tmp_path / "teacher_out")
    _, outputs = load_teacher_outputs(tmp_path / "teacher_out")
    method = MethodConfig(method="fdistill", preset="paper", teacher_outputs=str(tmp_path / "teacher_out"),
                          max_new_tokens=5)
    assert (method.top_p, method.mle_weight, method.kd_divergence) == (0.9, 0.0, "tvd")
    generated_by = []
    real = kid.rollout.generate_answers

    def watch(model, *args, **kwargs):
        generated_by.append("teacher" if model is teacher else "student")
        assert kwargs["top_p"] == 0.9
        return real(model, *args, **kwargs)

    monkeypatch.setattr(kid.rollout, "generate_answers", watch)
    kd_batches = []
    real_rollout = kid.rollout.rollout_step

    def keep(ctx, batches, **kwargs):
        result = real_rollout(ctx, batches, **kwargs)
        kd_batches.extend(zip(batches, result.plans))
        return result

    monkeypatch.setattr("kid.trainer.rollout_step", keep)
    config = train_config(tmp_path / "run", max_steps=3)
    report = run_training(config, method, student=tiny_model(0), teacher=teacher, tokenizer=tiny_tokenizer(),
                          train_dataset=dataset, write_final=False)
    assert report["global_steps"] == 3 and generated_by and set(generated_by) == {"student"}
    assert all(h["mle"] == 0 and h["kd"] > 0 for h in step_logs(report))
    teacher_rows = 0
    for batch, plan in kd_batches:
        labels = plan.kd_batch["answer_labels"]
        for r, source in enumerate(plan.sources):
            assert source in (TEACHER, STUDENT) and source != GOLD
            if source == TEACHER:
                prompt = batch["prompt_input_ids"][r][batch["prompt_attention_mask"][r].bool()].tolist()
                assert labels[r][labels[r] != IGNORE_INDEX].tolist() == outputs[prompt_key(prompt)][:5]
                teacher_rows += 1
    assert teacher_rows > 0


def test_method_config_presets():
    paper = {m: MethodConfig(method=m, preset="paper", teacher_outputs="x" if m == "fdistill" else None)
             for m in ("gkd", "imitkd", "fdistill", "kid", "rkd")}
    assert (paper["gkd"].gkd_lambda, paper["gkd"].kd_divergence, paper["gkd"].mle_weight) == (1.0, "rkl", 0.0)
    assert (paper["imitkd"].top_k, paper["imitkd"].mle_weight, paper["imitkd"].kd_divergence) == (5, 0.0, "fkl")
    assert (paper["fdistill"].top_p, paper["fdistill"].mle_weight) == (0.9, 0.0)
    assert paper["kid"].mle_weight == paper["rkd"].mle_weight == 1.0
    default = MethodConfig(method="gkd")
    assert (default.gkd_lambda, default.kd_divergence, default.mle_weight, default.top_k, default.top_p) == (
        0.5, "jsd", 1.0, 0, 1.0)
    # what the user sets wins over the preset; strings (YAML, flags) are numbers
    mixed = MethodConfig(method="gkd", preset="paper", gkd_lambda="0.25", mle_weight="0.5", top_k="4")
    assert (mixed.gkd_lambda, mixed.mle_weight, mixed.top_k, mixed.gkd_divergence) == (0.25, 0.5, 4, "rkl")
    assert MethodConfig.from_mapping(mixed.to_dict()) == mixed
    with pytest.raises(ValueError, match="reads the teacher's outputs generated once before training"):
        MethodConfig(method="fdistill", preset="paper")
    MethodConfig(method="fdistill", preset="paper", fdistill_teacher_probability=0.0)  # no teacher row: fine
    for options, message in [({"preset": "tables"}, "preset must be one of"),
                             ({"normalization": "batch"}, "normalization must be one of"),
                             ({"top_k": -1}, "top_k must be >= 0"), ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
                             ({"top_k": "many"}, "top_k must be an integer"),
                             ({"generation_batch_size": -2}, "generation_batch_size must be >= 0"),
                             ({"method": "rkd", "teacher_outputs": "x"}, "read by method 'fdistill' only")]:
        with pytest.raises(ValueError, match=message):
            MethodConfig(**options)


# ---- the command line ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """Spider-format data on one toy database, and a tiny student and teacher saved with a tokenizer that knows
    the data's words."""
    from kid.data import load_spider

    root = tmp_path_factory.mktemp("toy")
    db = root / "database" / "toy" / "toy.sqlite"
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, age INTEGER)")
        con.executemany("INSERT INTO singer VALUES (?, ?, ?)", [(1, "Joe", 52), (2, "Ann", 29)])
    questions = [("How many singers are there?", "SELECT count(*) FROM singer"),
                 ("List the names of all singers.", "SELECT name FROM singer"),
                 ("What is the average age of singers?", "SELECT avg(age) FROM singer"),
                 ("Show the names of singers older than 30.", "SELECT name FROM singer WHERE age > 30")]
    data = root / "train.json"
    data.write_text(json.dumps([{"db_id": "toy", "question": q, "query": s} for q, s in questions]))
    rows = load_spider(data, root / "database")
    tokenizer = bpe_tokenizer([r["prompt"] + " " + r["target"] for r in rows])
    for name, seed, size in (("student", 0, {}), ("teacher", 1, {"hidden": 48, "layers": 2})):
        tiny_model(seed, vocab=len(tokenizer), **size).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def test_generate_teacher_then_train_fdistill_with_the_paper_preset(toy, tmp_path, capsys):
    out = tmp_path / "teacher_outputs"
    common = ["--data-file", str(toy / "train.json"), "--db-dir", str(toy / "database"), "--max-input-tokens",
              "256", "--max-output-tokens", "32"]
    argv = ["generate-teacher", "--teacher", str(toy / "teacher"), "--tokenizer", str(toy / "student"),
            "--out", str(out), "--max-new-tokens", "8", "--batch-size", "3", "--no-progress", *common]
    assert main(argv) == 0
    assert "answers to 4 prompts" in capsys.readouterr().out
    meta, outputs = load_teacher_outputs(out)
    assert len(outputs) == 4 and meta["teacher"] == str(toy / "teacher")
    assert main(argv) == 0  # reused, without loading the teacher
    assert "already holds the answers to all 4 prompts" in capsys.readouterr().out
    # other settings: one line, exit 2, before loading anything
    assert main(argv + ["--num-beams", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kid generate-teacher: error:") and "other settings (num_beams)" in err
    train = ["train", "--student", str(toy / "student"), "--teacher", str(toy / "teacher"), "--method", "fdistill",
             "--preset", "paper", "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2",
             "--micro-batch-size", "1", "--lora-r", "4", "--lora-alpha", "8", "--logging-steps", "1",
             "--no-progress", "--max-new-tokens", "8", *common]
    assert main(train) == 2  # the paper's f-distill needs the teacher's outputs
    assert "kid generate-teacher" in capsys.readouterr().err
    assert main(train + ["--teacher-outputs", str(out)]) == 0
    report = json.loads((tmp_path / "run" / REPORT_NAME).read_text())
    assert report["method_config"]["teacher_outputs"] == str(out) and report["method_config"]["top_p"] == 0.9
    assert report["global_steps"] == 2 and report["generation_time_s"] >= 0 and "training_time_s" in report
    assert all("gen_len" in h and "generation_s" in h for h in step_logs(report))
    assert main(train + ["--teacher-outputs", str(tmp_path / "nowhere")]) == 2
    assert "no teacher outputs" in capsys.readouterr().err
