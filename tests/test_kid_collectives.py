"""The generating methods run the same collectives on every process: two CPU processes (gloo, torchrun) train GKD
(lambda 0.5), ImitKD and f-distill on different data per process, with the student sharded by FSDP2 and replicated
by DDP.

Under FSDP every student forward -- each decoding step of ``generate`` included -- all-gathers parameters, so the
processes must run exactly the same student forwards; under DDP the training passes (each followed by its backward
and all-reduce) must match.  Drawing the data sources per process (gold or generated, teacher or student) breaks
both: under FSDP the processes wait on each other forever (here: the faulthandler timeout ends the worker and the
test fails), under DDP the pass counts differ.  The worker records every training step's student forwards and
this process's sources; the test checks the processes did the same passes while their own rows differed.

The Trainer cannot shard with FSDP on CPU (accelerate shards only on accelerators), so the FSDP part shards the
student with ``fully_shard`` and drives ``DistillTrainer.get_batch_samples`` / ``training_step`` itself, as the
Trainer's loop does; the DDP part runs ``kid.training.run_training``.
"""
from __future__ import annotations

import json
import textwrap

import pytest

from tests.kid_tiny import run_on_two_processes

WORKER = textwrap.dedent('''
    import faulthandler
    import json
    import os
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist

    faulthandler.dump_traceback_later(100, exit=True)  # a deadlock ends the worker with its stacks
    dist.init_process_group("gloo")

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import kid.trainer
    from kid.batching import DistillCollator
    from kid.config import MethodConfig
    from kid.training import run_training, training_arguments
    from tests.kid_tiny import MASK, PAD, end_worker, tiny_dataset, tiny_examples, tiny_model, tiny_teacher, \\
        tiny_tokenizer, \\
        train_config

    out = Path(sys.argv[1])
    rank, world = dist.get_rank(), dist.get_world_size()
    METHODS = {
        "gkd": MethodConfig(method="gkd", gkd_lambda=0.5, max_new_tokens=3),
        "imitkd": MethodConfig(method="imitkd", imitkd_gold_probability=0.75, max_new_tokens=3),
        "fdistill": MethodConfig(method="fdistill", max_new_tokens=3),
    }
    forwards = {"grad": 0, "no_grad": 0}
    trace = []


    def count(_module, _args):
        forwards["grad" if torch.is_grad_enabled() else "no_grad"] += 1


    original_step = kid.trainer.DistillTrainer.training_step


    def recorded_step(self, model, inputs, *args, **kwargs):
        before = dict(forwards)
        ref = inputs.get("_kid_step")
        loss = original_step(self, model, inputs, *args, **kwargs)
        rollout = getattr(getattr(ref, "step", None), "rollout", None)
        plan = rollout.plans[ref.index] if rollout is not None else None
        trace.append({"grad": forwards["grad"] - before["grad"], "no_grad": forwards["no_grad"] - before["no_grad"],
                      "sources": plan.sources if plan is not None else None,
                      "two_pass": plan.kd_batch is not None if plan is not None else None,
                      "loss_finite": bool(torch.isfinite(loss).all())})
        return loss


    kid.trainer.DistillTrainer.training_step = recorded_step


    def student():
        model = tiny_model(0, layers=2, init_std=0.2)
        model.model.register_forward_pre_hook(count)
        return model


    results = {}
    # ---- FSDP2: the student sharded over the two processes, the Trainer's step driven here -------------------
    mesh = init_device_mesh("cpu", (world,))
    for name, method in METHODS.items():
        model = student()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        config = train_config(out / f"fsdp_{name}", batch_size=8, micro_batch_size=2, max_steps=3)
        args = training_arguments(config, world_size=world)
        trainer = kid.trainer.DistillTrainer(model=model, args=args, data_collator=None,
                                             processing_class=tiny_tokenizer(), method_config=method,
                                             teacher=tiny_teacher(), mask_token_id=MASK)
        assert args.gradient_accumulation_steps == 2
        collate = DistillCollator(PAD, with_prompts=True)
        rows = tiny_examples(12, seed=10 + rank)
        trace.clear()
        for step in range(3):
            micro = [collate(rows[step * 4 + 2 * m: step * 4 + 2 * m + 2]) for m in range(2)]
            batches, items = trainer.get_batch_samples(iter(micro), 2, args.device)
            for batch in batches:
                trainer.training_step(model, batch, items)
            grads = [p.grad.full_tensor() for p in model.parameters() if p.grad is not None]
            assert grads and all(torch.isfinite(g).all() for g in grads)
            model.zero_grad()
            trainer.state.global_step += 1
        results[f"fsdp_{name}"] = list(trace)
        print(f"fsdp {name} rank {rank} ok", flush=True)

    # ---- DDP through the Trainer (run_training) ---------------------------------------------------------------
    for name, method in METHODS.items():
        trace.clear()
        config = train_config(out / f"ddp_{name}", batch_size=8, micro_batch_size=2, max_steps=3, lora=True,
                              lora_r=4, lora_alpha=8, lora_dropout=0.0)
        report = run_training(config, method, student=student(), teacher=tiny_teacher(), tokenizer=tiny_tokenizer(),
                              train_dataset=tiny_dataset(48, seed=20), write_final=False)
        trainer = report.pop("_trainer")
        assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel"
        params = torch.cat([p.detach().flatten() for p in trainer.model.parameters() if p.requires_grad])
        gathered = [torch.empty_like(params) for _ in range(world)]
        dist.all_gather(gathered, params)
        assert torch.equal(gathered[0], gathered[1]), f"{name}: the ranks' weights differ"
        results[f"ddp_{name}"] = list(trace)
        print(f"ddp {name} rank {rank} ok", flush=True)

    (out / f"trace{rank}.json").write_text(json.dumps(results))
    end_worker()
''')


@pytest.mark.slow  # one torchrun launch of two processes: ~40 s on 2 cores
def test_generating_methods_run_the_same_collectives_on_every_process(tmp_path):
    proc = run_on_two_processes(WORKER, tmp_path, timeout=300)
    traces = [json.loads((tmp_path / f"trace{r}.json").read_text()) for r in (0, 1)]
    for key in traces[0]:
        assert f"{key.replace('_', ' ', 1)} rank 0 ok" in proc.stdout
        t0, t1 = traces[0][key], traces[1][key]
        assert len(t0) == len(t1) == 6, key  # 3 steps of 2 micro-batches
        assert all(s["loss_finite"] for s in t0 + t1)
        # the same student passes on both processes, micro-batch by micro-batch
        assert [s["grad"] for s in t0] == [s["grad"] for s in t1], key
        assert [s["two_pass"] for s in t0] == [s["two_pass"] for s in t1], key
        if key.startswith("fsdp"):  # every forward, generation steps included, is a collective there
            assert [s["no_grad"] for s in t0] == [s["no_grad"] for s in t1], key
        # ... although their own rows did not come from the same sources (else the test would prove nothing)
        own = [[s["sources"] for s in t] for t in (t0, t1)]
        if key.endswith("gkd"):  # one draw per (global) micro-batch: a mix of generated and gold micro-batches
            assert {s["two_pass"] for s in t0} == {True, False}, key
        else:
            students = [[sources.count("student") for sources in t] for t in own]
            assert students[0] != students[1], (key, own)
        if key.endswith("imitkd"):
            # a micro-batch that is all gold on one process but not on the other (two passes on both), and a step
            # in which one process has no student row at all (it generates for a prompt of its own and drops it)
            assert any((a == 0) != (b == 0) for a, b in zip(*students)), (key, own)
            per_step = [[sum(s[i:i + 2]) for i in (0, 2, 4)] for s in students]
            assert any((a == 0) != (b == 0) for a, b in zip(*per_step)), (key, own)
