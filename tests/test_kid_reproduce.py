"""kid reproduce: the table arithmetic, the input checks (one line, exit 2, before any slow work), and the whole
protocol at its smoke scale on the real (shrunk) SmolLM2 with one failed method that a re-run retries alone.

The smoke test is the heavy one: about a minute on 2 idle cores (two to three on busy ones), plus the session's
SmolLM2 conversion if no other test made it.
"""
import json
import math

import pytest

from kid.cli import main
from kid.reproduce import (
    PAPER_METHOD_OPTIONS,
    SCALES,
    TABLE_METHODS,
    Protocol,
    format_table,
    load_examples,
    method_config,
    summarize,
)
from tests.smollm2_models import require_smollm2, session_models_dir


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")  # the interpreter is far too slow for a 49,152 vocabulary


def _record(method, seed, ex, runtime):
    return {"method": method, "seed": seed, "train_runtime_s": runtime,
            "ex": {name: {"ex": value} for name, value in ex.items()}}


def test_summary_means_spreads_paired_gains_and_latency():
    records = [
        _record("teacher", 0, {"a": 0.5, "b": 0.3}, 10.0),
        _record("sft", 1, {"a": 0.20, "b": 0.10}, 10.0),
        _record("sft", 2, {"a": 0.30, "b": 0.20}, 20.0),
        _record("kid", 1, {"a": 0.25, "b": 0.15}, 25.0),
        _record("kid", 2, {"a": 0.30, "b": 0.30}, 40.0),
        {"method": "gkd", "seed": 1, "failed": "RuntimeError: x"},
    ]
    rows = {r["method"]: r for r in summarize(records, ["a", "b"], [1, 2])}
    assert list(rows) == ["teacher", "sft", "kid"]  # failed runs have no row; the paper's order
    kid = rows["kid"]
    assert kid["a"][0] == pytest.approx(27.5) and kid["a"][1] == pytest.approx(math.sqrt(12.5))
    assert kid["average"][0] == pytest.approx((20 + 30) / 2)
    # Gains paired by seed: seed 1: 20 - 15 = 5; seed 2: 30 - 25 = 5.
    assert kid["gain_vs_sft"][0] == pytest.approx(5.0) and kid["gain_vs_sft"][1] == pytest.approx(0.0)
    assert kid["latency_vs_sft"][0] == pytest.approx((2.5 + 2.0) / 2)
    assert rows["sft"]["latency_vs_sft"][0] == 1.0 and rows["teacher"]["seeds"] == [0]
    assert rows["teacher"]["a"] == (50.0, None)  # one run: no spread
    text = format_table(summarize(records, ["a", "b"], [1, 2]), ["a", "b"])
    assert "| KID | 27.5 ± 3.5 | 22.5 ± 10.6 | 25.0 ± 7.1 | 5.0 ± 0.0 | 2.25x ± 0.35 | 1,2 |" in text
    assert "| Teacher (SFT) | 50.0 | 30.0 | 40.0 | - | - | 0 |" in text


def test_method_table_is_the_papers_configurations(tmp_path):
    """The paper preset of kid.config, with the scale's rollout length and f-distill's cached teacher outputs."""
    from kid.config import MethodConfig

    assert set(PAPER_METHOD_OPTIONS) == set(TABLE_METHODS)
    scale = SCALES["gpu"]
    configs = {m: method_config(m, scale) for m in TABLE_METHODS}
    assert all(configs[m].method == m and configs[m].preset == "paper" for m in TABLE_METHODS)
    gkd = configs["gkd"]
    assert (gkd.kd_divergence, gkd.gkd_lambda, gkd.mle_weight) == ("rkl", 1.0, 0.0)
    assert (configs["kid"].alpha, configs["kid"].strategy, configs["kid"].kd_divergence) == (0.2, "random", "rkl")
    fdistill, imitkd = configs["fdistill"], configs["imitkd"]
    assert (fdistill.kd_divergence, fdistill.top_p, fdistill.fdistill_teacher_probability) == ("tvd", 0.9, 0.5)
    assert (imitkd.kd_divergence, imitkd.top_k, imitkd.imitkd_gold_probability) == ("fkl", 5, "linear")
    for m in ("sft", "fkd", "rkd", "kid"):
        assert configs[m].mle_weight == 1.0  # the MLE term on the gold-data methods only
    for m in ("fdistill", "imitkd", "gkd"):
        assert configs[m].mle_weight == 0.0
        assert configs[m].max_new_tokens == scale.rollout_new_tokens != MethodConfig.max_new_tokens
        # the rollout length is not undone by the preset: everything else is the preset's own
        assert {k: v for k, v in configs[m].to_dict().items() if k not in ("max_new_tokens", "teacher_outputs")} \
            == {k: v for k, v in MethodConfig(m, preset="paper", teacher_outputs="x" if m == "fdistill" else None)
                .to_dict().items()
                if k not in ("max_new_tokens", "teacher_outputs")}
    for m in TABLE_METHODS:
        if m not in ("fdistill", "imitkd", "gkd"):
            assert configs[m].max_new_tokens == MethodConfig.max_new_tokens
    assert fdistill.teacher_outputs == "teacher_outputs"  # relative to the protocol's directory, in the settings
    protocol = Protocol(tmp_path / "run", scale="smoke", progress=False)
    assert protocol.method_config("fdistill").teacher_outputs == str(tmp_path / "run" / "teacher_outputs")
    assert protocol.settings()["teacher_outputs"] == {"dir": "teacher_outputs", "do_sample": False, "num_beams": 1,
                                                      "max_new_tokens": SCALES["smoke"].rollout_new_tokens}


@pytest.mark.parametrize("argv, message", [
    (["--scale", "gpu"], "--scale gpu needs --spider-dir"),
    (["--methods", "sft,bogus"], "bogus"),
    (["--seeds", "1", "1"], "repeated seeds"),
    (["--spider-dir", "/nonexistent/spider"], "Spider directory not found"),
    (["--spider-dk", "dk.json"], "need --spider-dir"),
    (["--student-steps", "0"], "student_steps must be >= 1"),
    (["--eval-examples", "0"], "eval_examples must be >= 1"),
    (["--eval-examples", "-2"], "eval_examples must be >= 1"),
    (["--train-examples", "0"], "train_examples must be >= 1"),
    (["--time-limit", "-5"], "--time-limit must be >= 0"),
    (["--time-limit", "nan"], "--time-limit must be >= 0"),
    (["--models-dir", "{tmp}/a-file"], "--models-dir"),
    (["--spider-dir", "{tmp}/spider"], "none of the 1 examples"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    (tmp_path / "a-file").write_text("x")
    spider = tmp_path / "spider"  # every file there, but no example's database
    (spider / "database").mkdir(parents=True)
    for name in ("train_spider.json", "dev.json", "tables.json"):
        (spider / name).write_text(json.dumps([{"db_id": "missing", "question": "q", "query": "SELECT 1"}]))
    assert main(["reproduce", "--out-dir", str(out), *[a.replace("{tmp}", str(tmp_path)) for a in argv]]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()  # nothing made before the check


def test_a_mistake_leaves_an_earlier_run_untouched(tmp_path, capsys):
    """A bad flag on a re-run is refused before anything is written: the settings of the run it would continue
    stay those of its first run (a later correct command still continues it)."""
    run = tmp_path / "run"
    run.mkdir()
    Protocol(run, scale="smoke", progress=False)._save_settings()
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["reproduce", "--out-dir", str(run), "--eval-examples", "0"]) == 2
    assert "eval_examples must be >= 1" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    Protocol(run, scale="smoke", progress=False)  # the same settings: accepted


def test_refuses_a_foreign_directory_and_other_settings(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("x")
    assert main(["reproduce", "--out-dir", str(tmp_path)]) == 2
    assert "holds no kid reproduce run" in capsys.readouterr().err
    run = tmp_path / "run"
    protocol = Protocol(run, scale="smoke", progress=False)
    run.mkdir()
    protocol._save_settings()
    assert main(["reproduce", "--out-dir", str(run), "--student-steps", "5"]) == 2
    err = capsys.readouterr().err
    assert "other settings (student_steps)" in err
    Protocol(run, scale="smoke", seeds=[1, 2], methods=["sft", "kid"])  # seeds and methods may change


def test_load_examples_in_worker_processes_equals_the_loader(tmp_path):
    from kid.data import load_spider
    from kid.demo import demo_slice_paths

    paths = demo_slice_paths()
    serial = load_spider(paths.heldout_file, paths.db_dir, paths.tables_file)
    parallel = load_examples("spider", paths.heldout_file, paths.db_dir, paths.tables_file, tmp_path / "chunks",
                             chunk=20, workers=2)
    assert parallel.to_list() == serial.to_list()
    assert not (tmp_path / "chunks").exists()  # the chunk files and their scratch folder are removed


def test_smoke_protocol_survives_failures_and_a_rerun_retries_only_them(tmp_path_factory, tmp_path, monkeypatch,
                                                                        capsys):
    require_smollm2()
    models = session_models_dir(tmp_path_factory)
    out = tmp_path / "reproduce"
    argv = ["reproduce", "--scale", "smoke", "--out-dir", str(out), "--models-dir", str(models), "--no-progress"]
    trained, evaluated, teacher_generations = [], [], []
    original_train, original_eval = Protocol.train_run, Protocol.evaluate_run
    import kid.teacher_outputs

    original_generate = kid.teacher_outputs.generate_teacher_outputs

    def train_run(self, run_dir, method, **kwargs):
        trained.append(method if run_dir.parent.name != "reproduce" else "teacher")
        if inject and method == "fkd":  # the teacher and SFT are done: the table so far is on disk already
            partial = json.loads((out / "reproduce_report.json").read_text())
            assert partial["in_progress"] and not partial["complete"]
            assert [r["method"] for r in partial["runs"]] == ["teacher", "sft"]
            assert "In progress: 2 run(s)" in (out / "reproduce_table.md").read_text()
        if inject and method in ("rkd", "fdistill"):
            raise RuntimeError("injected training failure")
        return original_train(self, run_dir, method, **kwargs)

    def generate_teacher_outputs(teacher, dataset, out_dir, **kwargs):
        teacher_generations.append(len(dataset))
        return original_generate(teacher, dataset, out_dir, **kwargs)

    def evaluate_run(self, run_dir, base_dir):
        evaluated.append(run_dir.name)
        if inject and run_dir.name == "kid":
            raise RuntimeError("injected evaluation failure")
        return original_eval(self, run_dir, base_dir)

    monkeypatch.setattr(Protocol, "train_run", train_run)
    monkeypatch.setattr(Protocol, "evaluate_run", evaluate_run)
    monkeypatch.setattr(kid.teacher_outputs, "generate_teacher_outputs", generate_teacher_outputs)

    inject = True
    assert main(argv) == 1  # failed runs: exit status 1, every other run done
    assert "3 run(s) failed" in capsys.readouterr().err
    assert trained == ["teacher", "sft", "fkd", "rkd", "kid", "gkd", "imitkd", "fdistill"]
    # f-distill's teacher answers: generated once, after the teacher's SFT, for the training prompts.
    smoke = SCALES["smoke"]
    assert teacher_generations == [smoke.train_examples]
    meta = json.loads((out / "teacher_outputs" / "meta.json").read_text())
    assert meta["complete"] and meta["prompts"] == smoke.train_examples
    assert (meta["max_new_tokens"], meta["do_sample"], meta["teacher"]) == (smoke.rollout_new_tokens, False,
                                                                             "teacher_sft/final")
    lines = (out / "teacher_outputs" / "outputs.jsonl").read_text().splitlines()
    assert len(lines) == smoke.train_examples
    assert all(1 <= len(json.loads(line)["answer"]) <= smoke.rollout_new_tokens for line in lines)
    status = {m: json.loads((out / "seed1" / m / "status.json").read_text()) for m in TABLE_METHODS}
    assert status["rkd"]["state"] == "failed" and "injected training failure" in status["rkd"]["error"]
    assert "injected training failure" in (out / "seed1" / "rkd" / "error.txt").read_text()
    assert status["kid"]["state"] == "failed" and status["kid"]["trained"] is True
    assert status["fdistill"]["state"] == "failed"
    assert all(status[m]["state"] == "done" for m in TABLE_METHODS if m not in ("rkd", "kid", "fdistill"))
    report = json.loads((out / "reproduce_report.json").read_text())
    assert report["complete"] is False and {(f["method"], f["seed"]) for f in report["failed"]} == {
        ("rkd", 1), ("kid", 1), ("fdistill", 1)}
    assert [r["method"] for r in report["table"]] == ["teacher", "sft", "fkd", "imitkd", "gkd"]
    assert report["teacher_outputs"]["prompts"] == smoke.train_examples

    inject = False
    trained.clear()
    evaluated.clear()
    teacher_generations.clear()
    assert main(argv) == 0
    assert trained == ["rkd", "fdistill"]  # the only runs not trained before
    assert sorted(evaluated) == ["fdistill", "kid", "rkd"]  # kid was trained: evaluated only
    assert teacher_generations == []  # the teacher's answers are reused
    fdistill = json.loads((out / "seed1" / "fdistill" / "run_report.json").read_text())["method_config"]
    assert (fdistill["preset"], fdistill["teacher_outputs"]) == ("paper", str(out / "teacher_outputs"))
    report = json.loads((out / "reproduce_report.json").read_text())
    assert report["complete"] is True and report["failed"] == [] and report["stopped"] is None
    assert report["in_progress"] is False
    assert [r["method"] for r in report["table"]] == ["teacher", *TABLE_METHODS]
    for run in report["runs"]:
        result = run["ex"]["demo-heldout"]
        assert result["total"] == smoke.eval_examples and 0 <= result["correct"] <= result["total"]
        assert result["ex"] == pytest.approx(result["correct"] / result["total"])
        assert run["global_steps"] == (smoke.teacher_steps if run["method"] == "teacher" else smoke.student_steps)
        saved = json.loads((out / ("teacher_sft" if run["method"] == "teacher" else f"seed1/{run['method']}")
                            / "eval_demo-heldout.json").read_text())
        assert len(saved["report"]["examples"]) == smoke.eval_examples
    rows = {r["method"]: r for r in report["table"]}
    assert rows["sft"]["latency_vs_sft"][0] == 1.0 and rows["gkd"]["latency_vs_sft"][0] > 0
    assert report["device"].startswith("cpu") and report["versions"]["torch"]
    assert report["settings"]["method_configs"]["gkd"]["gkd_lambda"] == 1.0
    assert report["models"]["student"]["layers"] == [0] and report["models"]["teacher"]["layers"] == [0, 29]
    assert report["train_examples"] == smoke.train_examples and report["timings_s"]["total_s"] > 0
    table = (out / "reproduce_table.md").read_text()
    assert table.startswith("| Method | demo-heldout EX | Avg | Gain vs SFT | Latency vs SFT | seeds |")
    assert (out / "reproduce_plot.png").stat().st_size > 1000
    # Students train LoRA adapters at smoke scale (the teacher every weight): the adapters are what is kept.
    assert (out / "seed1" / "kid" / "final" / "adapter_config.json").is_file()
    assert (out / "teacher_sft" / "final" / "model.safetensors").is_file()
    assert not list(out.glob("**/checkpoint-*"))  # no end-of-run checkpoints


def test_a_copy_without_git_names_the_commit_recorded_when_it_was_prepared(tmp_path, monkeypatch):
    """The GPU machine gets the source without .git: tools/gpu_reproduce_prepare.sh records the commit in a file
    that travels, and the reports read it from $KID_SOURCE_COMMIT_FILE."""
    from kid import run_report

    stamp = tmp_path / "COMMIT.json"
    stamp.write_text(json.dumps({"commit": "0123abc", "dirty": True, "recorded_at": "2026-12-02T01:00:00"}))
    monkeypatch.setenv(run_report.SOURCE_COMMIT_FILE_ENV, str(stamp))
    recorded = run_report.recorded_commit()
    assert recorded["commit"] == "0123abc" and recorded["dirty"] is True and str(stamp) in recorded["source"]
    monkeypatch.setenv(run_report.SOURCE_COMMIT_FILE_ENV, str(tmp_path / "missing.json"))
    assert run_report.recorded_commit() is None


def test_a_finished_run_keeps_no_checkpoint_and_nothing_else_is_removed(tmp_path):
    from kid.reproduce import remove_checkpoints

    run = tmp_path / "seed1" / "kid"
    for name in ("checkpoint-3", ".checkpoint-4.staging", "checkpoint-notes", "final"):
        (run / name).mkdir(parents=True)
    (run / "status.json").write_text("{}")
    (run / "checkpoint-7").write_text("a file, not a checkpoint")
    assert remove_checkpoints(tmp_path / "seed1" / "kid") == [".checkpoint-4.staging", "checkpoint-3"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-7", "checkpoint-notes", "final", "status.json"]
    (run / "final").rmdir()
    (run / "checkpoint-9").mkdir()
    assert remove_checkpoints(run) == []  # not final yet: the checkpoint is what a re-run continues from


def test_models_are_replaced_only_in_kids_cache_and_a_run_continues_only_with_its_own(tmp_path, monkeypatch):
    from kid import pretrained

    calls = []
    monkeypatch.setattr(pretrained, "convert_smollm2", lambda out=None, **kw: tmp_path / "full")
    monkeypatch.setattr(pretrained, "read_stamp", lambda path: {"kind": "shrink", "layers": str(path)})

    def shrink_model(source, out, layers, *, replace_stale=False, **kw):
        calls.append(replace_stale)
        if not replace_stale:
            raise ValueError(f"{out} holds a different conversion: choose another output directory, or pass "
                             "--force (force=True) to replace it")
        return out
    monkeypatch.setattr(pretrained, "shrink_model", shrink_model)
    monkeypatch.setenv("KID_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    run.mkdir()
    protocol = Protocol(run, scale="smoke", progress=False)
    protocol._save_settings()
    protocol.prepare_models()
    assert calls == [True, True]  # kid's own cache: a stale conversion is replaced
    assert (run / "reproduce_models.json").is_file()
    mine = Protocol(tmp_path / "run2", scale="smoke", progress=False, models_dir=tmp_path / "my-models")
    (tmp_path / "run2").mkdir()
    with pytest.raises(ValueError, match="--models-dir .*holds a different conversion; choose another --models-dir"):
        mine.prepare_models()  # the user's directory: refused, not overwritten
    monkeypatch.setattr(pretrained, "read_stamp", lambda path: {"kind": "shrink", "layers": "changed"})
    with pytest.raises(ValueError, match="was started with other student and teacher models"):
        Protocol(run, scale="smoke", progress=False).prepare_models()


def test_an_interrupted_run_says_how_kid_reproduce_continues(tmp_path, monkeypatch):
    """kid reproduce has no --resume: while its runs train, the trainer's signal message says to re-run."""
    import kid.training as training
    from kid.reproduce import ProtocolInterrupted

    hints = []

    def run_training(config, method, **kwargs):
        hints.append(training.RESUME_HINT)
        return {"interrupted": True, "signal": "SIGTERM"}

    monkeypatch.setattr(training, "run_training", run_training)
    protocol = Protocol(tmp_path / "run", scale="smoke", progress=False)
    protocol.tokenizer = protocol.train_dataset = None
    with pytest.raises(ProtocolInterrupted, match="re-run the command to continue") as stopped:
        protocol.train_run(tmp_path / "run" / "seed1" / "sft", "sft", student=tmp_path, teacher=None, seed=1,
                           steps=2, learning_rate=1e-4, lora=True)
    assert stopped.value.signal_name == "SIGTERM"  # kid reproduce exits 143 for it, as kid train does
    assert hints == ["re-run the same kid reproduce command to continue"]
    assert training.RESUME_HINT == "resume with --resume"  # kid train's, restored
