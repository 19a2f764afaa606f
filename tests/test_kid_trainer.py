"""kid.trainer.DistillTrainer and kid.training.run_training: exact gradient accumulation, bit-for-bit resume,
2-process DDP on CPU (gloo), and interruption by a signal."""
from __future__ import annotations

import json
import os
import signal
import textwrap

import pytest
import torch

from kid.batching import IGNORE_INDEX, DistillCollator
from kid.config import MethodConfig
from kid.training import REPORT_NAME, _StopOnSignal, run_training, training_arguments
from tests.kid_tiny import (
    MASK,
    PAD,
    all_finite,
    rel_err,
    run_on_two_processes,
    step_logs,
    tiny_dataset,
    tiny_examples,
    tiny_model,
    tiny_teacher,
    tiny_tokenizer,
    train_config,
)


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")


# ---- a. gradient accumulation -------------------------------------------------------------------------------------

def _grad_capture():
    """A Trainer callback that copies every parameter gradient just before the first optimizer step."""
    from transformers import TrainerCallback

    class GradCapture(TrainerCallback):
        grads: dict[str, torch.Tensor] = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    return GradCapture()


def _first_step_grads(tmp_path, method: MethodConfig, examples, micro_batch_size: int, **config_overrides
                      ) -> dict[str, torch.Tensor]:
    from datasets import Dataset

    from kid.trainer import DistillTrainer

    config = train_config(tmp_path / f"micro{micro_batch_size}", batch_size=4, micro_batch_size=micro_batch_size,
                          max_steps=1, **config_overrides)
    capture = _grad_capture()
    trainer = DistillTrainer(
        model=tiny_model(0), args=training_arguments(config, max_grad_norm=0.0), train_dataset=Dataset.from_list(
            examples), data_collator=DistillCollator(PAD, with_prompts=method.generates),
        processing_class=tiny_tokenizer(), method_config=method,
        teacher=tiny_teacher() if method.needs_teacher else None, mask_token_id=MASK, callbacks=[capture])
    assert trainer.args.gradient_accumulation_steps == 4 // micro_batch_size
    trainer.train()
    assert capture.grads, "no gradient captured"
    return capture.grads


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[n].flatten() for n in sorted(grads)])


@pytest.fixture(scope="module")
def uneven_examples():
    # Four sequences of clearly different prompt and answer lengths: a micro-batch of 2 pads to its own longest
    # sequence, a batch of 4 to the longest of all, so the two layouts pad differently.
    rows = tiny_examples(4, seed=7, prompt_len=(2, 12), answer_len=(1, 9))
    assert len({len(r["input_ids"]) for r in rows}) == 4
    assert len({sum(y != IGNORE_INDEX for y in r["labels"]) for r in rows}) > 1
    return rows


@pytest.mark.parametrize("method", [
    MethodConfig(method="sft"),
    MethodConfig(method="rkd"),
    # KID with strategy "uniform" and argmax predictions: the trainer seeds its generator per (seed, process,
    # optimizer step, micro-batch), so "random" selection would draw differently when the same rows are split into
    # two micro-batches instead of one.  "uniform" depends only on each row's own selectable count and the argmax
    # predictions only on the row's own masked sequence, so the imperfect data -- and hence the gradient -- must
    # not depend on the micro-batch layout.
    MethodConfig(method="kid", alpha=0.5, strategy="uniform"),
    # The generating methods: the step's answers are generated once for all its prompts (sorted by length), the
    # source draws follow the rows' order over the step, and the KD term is normalised by the step's KD tokens, so
    # the micro-batch layout changes neither the samples nor the gradient.
    MethodConfig(method="gkd", gkd_lambda=1.0, max_new_tokens=5),
    MethodConfig(method="imitkd", imitkd_gold_probability=0.5, max_new_tokens=5),
    MethodConfig(method="fdistill", max_new_tokens=5, normalization="sequence"),
], ids=lambda m: m.method)
def test_gradient_accumulation_is_exact(tmp_path, uneven_examples, method):
    accumulated = _first_step_grads(tmp_path, method, uneven_examples, micro_batch_size=2)
    single = _first_step_grads(tmp_path, method, uneven_examples, micro_batch_size=4)
    assert accumulated.keys() == single.keys() and "lm_head.weight" in single
    flat = _flat(single)
    assert torch.isfinite(flat).all() and flat.abs().sum() > 0
    assert rel_err(_flat(accumulated), flat) < 1e-5
    for name in single:
        assert rel_err(accumulated[name], single[name]) < 1e-4, name
    if method.method == "sft":
        # ... and both are the gradient of the token-mean cross-entropy of the whole batch, from the model's logits.
        model = tiny_model(0)
        batch = DistillCollator(PAD)(uneven_examples)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = logits[torch.arange(4)[:, None], batch["answer_index"] - 1]
        loss = torch.nn.functional.cross_entropy(rows.flatten(0, 1), batch["answer_labels"].flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="mean")
        loss.backward()
        reference = {n: p.grad for n, p in model.named_parameters()}
        assert rel_err(flat, _flat({n: reference[n] for n in single})) < 1e-5


@pytest.mark.parametrize("method", [MethodConfig(method="sft"), MethodConfig(method="kid", alpha=0.5,
                                                                             strategy="uniform")],
                         ids=lambda m: m.method)
def test_gradient_checkpointing_gives_the_same_gradient(tmp_path, uneven_examples, method):
    # Activation checkpointing recomputes the student's layers in backward; the KID stage's no-grad passes run in
    # eval mode in between.  The gradient must not change.
    plain = _first_step_grads(tmp_path / "plain", method, uneven_examples, micro_batch_size=2)
    checkpointed = _first_step_grads(tmp_path / "ckpt", method, uneven_examples, micro_batch_size=2,
                                     gradient_checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    assert rel_err(_flat(checkpointed), _flat(plain)) < 1e-5


# ---- b. resume ------------------------------------------------------------------------------------------------------

def _run(output_dir, method: MethodConfig, *, steps=6, resume=None, write_final=False, **cfg):
    options = dict(batch_size=4, micro_batch_size=2, max_steps=steps, save_steps=2, save_total_limit=10, resume=resume)
    config = train_config(output_dir, **{**options, **cfg})
    return run_training(config, method, student=tiny_model(0), teacher=tiny_teacher() if method.needs_teacher else None,
                        tokenizer=tiny_tokenizer(), train_dataset=tiny_dataset(12, seed=4), write_final=write_final)


@pytest.mark.parametrize("method", [MethodConfig(method="kid", alpha=0.5, strategy="random"),
                                    MethodConfig(method="sft")], ids=lambda m: m.method)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, method):
    # 12 examples, 4 per step: 3 steps per epoch, so the checkpoint at step 2 is mid-epoch (the Trainer must skip
    # the batches already seen and restore the sampler's RNG) and the run crosses into a second epoch.
    full = _run(tmp_path / "full", method)
    checkpoint = tmp_path / "full" / "checkpoint-2"
    assert checkpoint.is_dir() and (tmp_path / "full" / "checkpoint-6").is_dir()
    resumed = _run(tmp_path / "resumed", method, resume=str(checkpoint))
    assert resumed["global_steps"] == full["global_steps"] == 6
    full_logs = {h["step"]: h for h in step_logs(full)}
    # the resumed log history starts with the checkpoint's (steps 1-2), then the steps trained after resuming
    resumed_logs = {h["step"]: h for h in step_logs(resumed) if h["step"] > 2}
    assert sorted(resumed_logs) == [3, 4, 5, 6]
    kid_keys = ("kid_changed", "kid_chosen") if method.method == "kid" else ()
    for step, h in resumed_logs.items():
        for key in ("loss", "kd", "mle") + kid_keys:
            assert h[key] == pytest.approx(full_logs[step][key], rel=1e-5, abs=1e-7), (step, key)
    # the losses changed from step to step: the comparison is not of constants
    assert len({round(h["loss"], 6) for h in resumed_logs.values()}) == 4
    # KID's diagnostics in the report: the means over every log line, the checkpoint's included
    for key in kid_keys:
        assert resumed[key] == pytest.approx(sum(h[key] for h in step_logs(resumed)) / 6, abs=1e-4)
        assert 0 < resumed[key] <= 1
    if not kid_keys:
        assert "kid_changed" not in resumed and "kid_chosen" not in resumed


# ---- c. DDP on two CPU processes -----------------------------------------------------------------------------------

DDP_WORKER = textwrap.dedent('''
    import faulthandler
    import json
    import os
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from kid.config import MethodConfig
    from kid.training import close_distributed, run_training
    from tests.kid_tiny import all_finite, end_worker, step_logs, tiny_dataset, tiny_model, tiny_teacher, \\
        tiny_tokenizer, \\
        train_config

    faulthandler.dump_traceback_later(60, exit=True)  # a deadlock shows its stacks instead of hanging
    out = Path(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # kid; then gkd with lambda 0.5: each process draws for itself whether a micro-batch is generated, so the
    # processes run different numbers of student forwards per micro-batch (this deadlocked while DDP broadcast
    # buffers at every forward).
    runs = {"kid": MethodConfig(method="kid", alpha=0.5),
            "gkd": MethodConfig(method="gkd", gkd_lambda=0.5, max_new_tokens=4)}
    for name, method in runs.items():
        config = train_config(out / name, batch_size=4, micro_batch_size=1, max_steps=3, lora=True, lora_r=4,
                              lora_alpha=8, lora_dropout=0.0)
        report = run_training(config, method, student=tiny_model(0), teacher=tiny_teacher(), tokenizer=tiny_tokenizer(),
                              train_dataset=tiny_dataset(16, seed=1), write_final=False)
        trainer = report.pop("_trainer")
        assert world == 2 and trainer.args.world_size == 2, trainer.args.world_size
        assert trainer.args.gradient_accumulation_steps == 2, trainer.args.gradient_accumulation_steps
        assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel", type(trainer.model_wrapped)
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        logs = step_logs(report)
        assert len(logs) == 3 and all_finite([h[k] for h in logs for k in ("loss", "kd", "mle")]), logs
        # the logged parts are those of the loss, over both processes (kd_weight = mle_weight = 1)
        for h in logs:
            assert abs(h["loss"] - (h["kd"] + h["mle"])) <= 1e-3 * h["loss"], h
        params = {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        flat = torch.cat([params[n].flatten() for n in sorted(params)])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert torch.equal(gathered[0], gathered[1]), f"{name}: the ranks' trainable parameters differ"
        torch.save(params, out / f"{name}_params{rank}.pt")
        (out / f"{name}_report{rank}.json").write_text(json.dumps(report, default=str))
        dist.barrier()
        print(f"{name} rank {rank} ok", flush=True)
    close_distributed()  # without it gloo's threads can abort the interpreter at exit (SIGABRT, seen in CI)
    assert not dist.is_initialized()
    end_worker()
''')


@pytest.mark.slow  # ~30 s on 2 cores: two processes each import torch and transformers, two short runs
def test_ddp_two_cpu_processes(tmp_path):
    proc = run_on_two_processes(DDP_WORKER, tmp_path, timeout=180)
    for name in ("kid", "gkd"):
        assert f"{name} rank 0 ok" in proc.stdout and f"{name} rank 1 ok" in proc.stdout
        p0, p1 = (torch.load(tmp_path / f"{name}_params{r}.pt") for r in (0, 1))
        assert p0.keys() == p1.keys() and all("lora_" in n for n in p0)
        assert all(torch.equal(p0[n], p1[n]) for n in p0)
        assert any(p0[n].abs().sum() > 0 for n in p0 if "lora_B" in n)  # trained (LoRA B starts at zero)
        report = json.loads((tmp_path / name / REPORT_NAME).read_text())  # written by rank 0
        assert report["global_steps"] == 3 and report["method"] == name and not report["interrupted"]
        assert all_finite([h["loss"] for h in step_logs(report)])
        # both ranks logged the same (process-averaged) values
        r0, r1 = (json.loads((tmp_path / f"{name}_report{r}.json").read_text()) for r in (0, 1))
        for key in ("loss", "kd", "mle") + (("kid_changed", "kid_chosen") if name == "kid" else ()):
            assert [h[key] for h in step_logs(r0)] == pytest.approx([h[key] for h in step_logs(r1)], rel=1e-6)


# ---- d. interruption -----------------------------------------------------------------------------------------------

def test_stop_on_signal_handler():
    previous = signal.getsignal(signal.SIGINT)
    stopper = _StopOnSignal()
    with stopper:
        assert signal.getsignal(signal.SIGINT) is not previous
        os.kill(os.getpid(), signal.SIGTERM)
        assert stopper.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # a second signal: stop at once
    assert signal.getsignal(signal.SIGINT) is previous


def test_interrupt_saves_a_checkpoint_and_resume_finishes(tmp_path, monkeypatch):
    from transformers import TrainerCallback

    import kid.trainer

    class SignalAtStep2(TrainerCallback):
        sent = False

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2 and not self.sent:
                # only if run_training's handler is in place (else SIGINT would stop pytest itself)
                assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler
                type(self).sent = True
                os.kill(os.getpid(), signal.SIGINT)

    class Trainer(kid.trainer.DistillTrainer):
        def __init__(self, *args, callbacks=None, **kwargs):
            super().__init__(*args, callbacks=list(callbacks or []) + [SignalAtStep2()], **kwargs)

    monkeypatch.setattr(kid.trainer, "DistillTrainer", Trainer)
    out = tmp_path / "run"
    method = MethodConfig(method="kid", alpha=0.5)
    first = _run(out, method, steps=8, write_final=True, save_steps=100)
    assert SignalAtStep2.sent
    # The stop callback runs before ours at each step end: it sees the request at the end of step 3, asks the
    # Trainer to save and stop there.
    stopped_at = first["global_steps"]
    assert stopped_at == 3 and first["interrupted"]
    assert json.loads((out / REPORT_NAME).read_text())["interrupted"] is True
    assert (out / f"checkpoint-{stopped_at}").is_dir()
    assert not (out / "final").exists()  # an interrupted run writes no final model

    monkeypatch.setattr(kid.trainer, "DistillTrainer", kid.trainer.DistillTrainer.__mro__[1])
    resumed = _run(out, method, steps=8, write_final=True, save_steps=100, resume=True)
    assert resumed["global_steps"] == 8 and not resumed["interrupted"]
    assert [h["step"] for h in step_logs(resumed)] == list(range(1, 9))  # the checkpoint's history, then the rest
    assert (out / "final").is_dir() and (out / "checkpoint-8").is_dir()
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["interrupted"] is False and report["global_steps"] == 8
    # resume=True with no checkpoint is a clear error
    with pytest.raises(ValueError, match="no checkpoint"):
        _run(tmp_path / "empty", method, steps=2, resume=True)


# ---- e. one optimizer step: evaluation, generation, throughput ------------------------------------------------------

def _trainer(output_dir, method: MethodConfig, *, steps=4, eval_steps=None, micro_batch_size=2, callbacks=(),
             **overrides):
    from kid.trainer import DistillTrainer

    config = train_config(output_dir, batch_size=4, micro_batch_size=micro_batch_size, max_steps=steps)
    extra = dict(eval_strategy="steps", eval_steps=eval_steps, per_device_eval_batch_size=2) if eval_steps else {}
    args = training_arguments(config, **extra, **overrides)
    return DistillTrainer(model=tiny_model(0), args=args, train_dataset=tiny_dataset(12, seed=4),
                          eval_dataset=tiny_dataset(2, seed=9) if eval_steps else None,
                          data_collator=DistillCollator(PAD, with_prompts=method.generates),
                          processing_class=tiny_tokenizer(), method_config=method,
                          teacher=tiny_teacher() if method.needs_teacher else None, mask_token_id=MASK,
                          callbacks=list(callbacks))


@pytest.mark.parametrize("method", [MethodConfig(method="kid", alpha=0.5, strategy="random"),
                                    MethodConfig(method="gkd", gkd_lambda=0.5, max_new_tokens=3)],
                         ids=lambda m: m.method)
def test_evaluation_during_training_changes_nothing_training_draws(tmp_path, method):
    # KID's random selection is seeded per (seed, process, step, micro-batch), GKD's gold-or-generated draws per
    # (seed, step) and its samples come from the global RNG: an evaluate() after every step (each runs the
    # objective, KID stage and generation included, and a data loader) must leave all of them alone, so the
    # training losses are those of a run without evaluation -- and a run resumed from a checkpoint, which has not
    # evaluated before it, repeats the original.
    plain = _trainer(tmp_path / "plain", method, steps=3)
    plain.train()
    evaluated = _trainer(tmp_path / "eval", method, steps=3, eval_steps=1)
    evaluated.train()
    evals = [h for h in evaluated.state.log_history if "eval_loss" in h]
    assert len(evals) == 3 and all_finite([h["eval_loss"] for h in evals])
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (plain, evaluated)]
    assert len(losses[0]) == 3 and len(set(losses[0])) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_generation_once_per_optimizer_step_and_the_time_split(tmp_path, monkeypatch):
    import kid.rollout

    calls = []
    real = kid.rollout.generate_answers

    def counting(model, prompt_ids, *args, **kwargs):
        calls.append((prompt_ids.shape[0], kwargs.get("merge_lora")))
        return real(model, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(kid.rollout, "generate_answers", counting)
    method = MethodConfig(method="gkd", gkd_lambda=1.0, max_new_tokens=4)
    trainer = _trainer(tmp_path / "gkd", method, steps=3, micro_batch_size=1)  # 4 micro-batches per step
    assert trainer.args.gradient_accumulation_steps == 4
    trainer.train()
    # one student generate per optimizer step, for the step's 4 prompts (not one per micro-batch of 1)
    assert calls == [(4, True)] * 3
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["generation_s"] > 0 and 1 <= h["gen_len"] <= 4 for h in logs), logs
    split = trainer.report_fields()
    assert split["generation_time_s"] > 0 and split["training_time_s"] > 0
    assert 0 < split["generation_fraction"] < 1


def test_tokens_per_s_counts_the_passes_that_train(tmp_path):
    # A generating method trains on two student passes: the KD pass over the generated batch (prompt + generated
    # answer) and the MLE pass over the gold batch.  Both count, not the gold batch alone.
    method = MethodConfig(method="gkd", gkd_lambda=1.0, max_new_tokens=6)
    trainer = _trainer(tmp_path / "tok", method)
    batch = DistillCollator(PAD, with_prompts=True)(tiny_examples(2, seed=5))
    [tagged], _ = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    trainer.training_step(trainer.model, tagged)
    kd_batch = tagged["_kid_step"].step.rollout.plans[0].kd_batch
    expected = int(kd_batch["attention_mask"].sum() + batch["attention_mask"].sum())
    assert int(kd_batch["attention_mask"].sum()) != int(batch["attention_mask"].sum())
    assert int(trainer._metric_sums["tokens"]) == expected


def test_kid_changed_and_chosen_are_logged_from_the_stage_counts(tmp_path, monkeypatch):
    # kid_changed: the chosen slots whose token changed over the chosen slots; kid_chosen: the chosen slots per
    # target token; both over the logging window's micro-batches, recounted here from what the stage returned.
    import kid.methods

    seen = []
    real = kid.methods.make_imperfect

    def recording(student, batch, *args, **kwargs):
        out = real(student, batch, *args, **kwargs)
        seen.append((int(out.chosen.sum()), int(out.changed.sum()),
                     int((batch["answer_labels"] != IGNORE_INDEX).sum())))
        return out

    monkeypatch.setattr(kid.methods, "make_imperfect", recording)
    trainer = _trainer(tmp_path / "kid", MethodConfig(method="kid", alpha=0.5), steps=3, logging_steps=1)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and len(seen) == 6  # two micro-batches per optimizer step
    for h, (a, b) in zip(logs, zip(seen[0::2], seen[1::2])):
        chosen, changed, targets = (x + y for x, y in zip(a, b))
        assert chosen > 0
        assert h["kid_changed"] == pytest.approx(changed / chosen, abs=1e-4)
        assert h["kid_chosen"] == pytest.approx(chosen / targets, abs=1e-4)
    # the other methods log neither
    rkd = _trainer(tmp_path / "rkd", MethodConfig(method="rkd"), steps=1, logging_steps=1)
    rkd.train()
    assert not any(k.startswith("kid_") for h in rkd.state.log_history for k in h)


@pytest.mark.parametrize("disable", [True, False], ids=["disable_dropout", "dropout"])
def test_disable_dropout_makes_the_train_mode_passes_identical(tmp_path, disable):
    # KIDConfig.disable_dropout (TrainConfig's, kid train --disable-dropout): the student's LoRA dropout and the
    # teacher's attention dropout off; without it two train-mode passes of the student draw different masks.
    from kid.models import LoraOptions, apply_lora
    from kid.trainer import DistillTrainer

    student = apply_lora(tiny_model(0), LoraOptions(4, 8, 0.5))
    with torch.no_grad():  # LoRA B starts at zero: the adapters (and their dropout) would add nothing
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    teacher = tiny_teacher()
    for m in teacher.modules():
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.3
    args = training_arguments(train_config(tmp_path, lora=True, lora_dropout=0.5, disable_dropout=disable))
    assert args.disable_dropout is disable
    trainer = DistillTrainer(model=student, args=args, train_dataset=tiny_dataset(4), processing_class=tiny_tokenizer(),
                             method_config=MethodConfig(method="kid"), teacher=teacher, mask_token_id=MASK)
    batch = DistillCollator(PAD)(tiny_examples(2, seed=3))
    trainer.model.train()
    with torch.no_grad():
        first, second = (trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       output_hidden_states=True).hidden_states[-1] for _ in range(2))
    assert torch.equal(first, second) is disable
    rates = {m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == ({0.0} if disable else {0.5})
    attention = {m.attention_dropout for m in trainer.teacher.modules() if hasattr(m, "attention_dropout")}
    assert attention == ({0.0} if disable else {0.3})
