"""The objectives on a student sharded by FSDP2 (``fully_shard``), on two CPU processes with gloo.

The Trainer cannot drive FSDP here: accelerate turns FSDP on only for accelerators (on CPU it falls back to DDP), so
the worker shards the model itself, as accelerate does on a GPU, and runs the trainer's per-micro-batch objective
(``kid.methods.compute_objective``).  Each process takes a different half of the batch; the loss is normalised
by the count over both halves and multiplied by the process count (FSDP averages gradients), as the trainer does.
The gradient FSDP leaves on each shard must equal the sum of the two halves' gradients computed on an unsharded
copy of the model.  Layouts:

* ``root``: the decoder layers and the root wrapped, root defaults (its parameters stay gathered after the forward,
  as with ``fully_shard`` and accelerate): the lm_head is read as a full tensor after the forward;
* ``resharded``: the lm_head in its own unit and every unit resharded after the forward: the lm_head has to be
  gathered again to be read, and the root (whose output the loss bypasses) for the backward.
"""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from kid.models import LMHead, lm_head_of
from tests.kid_tiny import run_on_two_processes

WORKER = textwrap.dedent('''
    import faulthandler
    import json
    import random
    import sys

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from kid.batching import DistillCollator
    from kid.config import MethodConfig
    from kid.methods import DistillContext, compute_objective
    from kid.models import LoraOptions, apply_lora, is_fsdp_sharded, lm_head_of
    from tests.kid_tiny import EOS, MASK, PAD, end_worker, tiny_examples, tiny_model, tiny_teacher

    faulthandler.dump_traceback_later(120, exit=True)  # a deadlock shows its stacks instead of hanging
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    halves = [tiny_examples(3, seed=10 + r) for r in range(world)]
    collate = DistillCollator(PAD, with_prompts=True)
    normalizer = sum(sum(t != -100 for t in e["labels"]) for half in halves for e in half)
    teacher = tiny_teacher().eval().requires_grad_(False)
    CASES = {
        "sft": MethodConfig(method="sft"),
        "rkd": MethodConfig(method="rkd"),
        "kid_hard": MethodConfig(method="kid", alpha=0.5, strategy="hard"),
        "kid_random_gold_mle": MethodConfig(method="kid", alpha=0.5, strategy="random", mle_input="gold"),
        "gkd_generated": MethodConfig(method="gkd", gkd_lambda=1.0, max_new_tokens=4),
    }


    def student(lora):
        model = tiny_model(0, layers=2, init_std=0.2)
        if lora:
            model = apply_lora(model, LoraOptions(r=4, alpha=8, dropout=0.0))
        return model


    def shard(model, layout):
        core = model.get_base_model() if hasattr(model, "get_base_model") else model
        for layer in core.model.layers:
            fully_shard(layer, mesh=mesh)
        if layout == "resharded":
            fully_shard(core.lm_head, mesh=mesh, reshard_after_forward=True)
            fully_shard(model, mesh=mesh, reshard_after_forward=True)
        else:
            fully_shard(model, mesh=mesh)
        return model


    def objective(model, method, r, scale):
        batch = collate(halves[r])
        ctx = DistillContext(config=method, student=model, student_head=lm_head_of(model), teacher=teacher,
                             teacher_head=lm_head_of(teacher), eos_token_id=EOS, pad_token_id=PAD,
                             mask_token_id=MASK, generator=torch.Generator().manual_seed(100 + r),
                             rng=random.Random(0))  # host draws: the same on every process
        torch.manual_seed(1000 + r)  # generation samples from the global generator
        parts = compute_objective(ctx, batch, torch.tensor(normalizer))
        (parts.loss * scale).backward()
        return float(parts.loss)


    results = {}
    layout, lora = sys.argv[2], sys.argv[3] == "lora"
    for name, method in CASES.items():
        reference = student(lora)
        ref_losses = [objective(reference, method, r, 1.0) for r in range(world)]
        sharded = shard(student(lora), layout)
        assert is_fsdp_sharded(sharded)
        loss = objective(sharded, method, rank, float(world))
        worst, checked = 0.0, 0
        for (n_ref, p_ref), (n, p) in zip(reference.named_parameters(), sharded.named_parameters()):
            assert n_ref == n, (n_ref, n)
            if not p.requires_grad:
                assert p.grad is None and p_ref.grad is None, n
                continue
            assert isinstance(p, DTensor), n
            grad = p.grad.full_tensor()
            scale = p_ref.grad.abs().max().clamp(min=1e-30)
            worst = max(worst, float((grad - p_ref.grad).abs().max() / scale))
            checked += 1
        # after the backward every unit is sharded again, the lm_head included
        head = (sharded.get_base_model() if lora else sharded).lm_head.weight
        results[name] = {"loss": loss, "ref_loss": ref_losses[rank], "worst": worst, "checked": checked,
                         "head_resharded": isinstance(head, DTensor)}
    (open(sys.argv[1] + f"/rank{rank}.json", "w")).write(json.dumps(results))
    end_worker()
''')


@pytest.mark.slow  # two processes, each importing torch and transformers: ~20 s per layout on 2 cores
@pytest.mark.parametrize("layout,lora", [("root", "full"), ("resharded", "full"), ("root", "lora")])
def test_objectives_on_an_fsdp2_sharded_student(tmp_path, layout, lora):
    run_on_two_processes(WORKER, tmp_path, layout, lora)
    for rank in (0, 1):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(results) == 5
        for name, r in results.items():
            # this half's loss equals the unsharded model's on the same half
            assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5), (name, r)
            assert r["worst"] < 1e-5 and r["checked"] > 0, (name, r)
            assert r["head_resharded"], (name, r)
            if lora == "lora":
                assert r["checked"] == 2 * 2 * 7  # A and B of 7 linear layers per decoder layer, lm_head frozen


# ---- single process: how the lm_head is read ------------------------------------------------------------------

def test_lm_head_of_reads_the_parameter_at_each_access():
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(8, 11, bias=True)
    model.get_output_embeddings = lambda: model.lm_head
    head = lm_head_of(model, vocab_size=7)
    assert head.num_rows == 7 and head.dtype == torch.float32
    assert head.weight.shape == (7, 8) and head.bias.shape == (7,)
    assert head.weight.data_ptr() == model.lm_head.weight.data_ptr()  # a view, not a copy
    replacement = torch.nn.Parameter(torch.randn(11, 8, dtype=torch.float64))
    model.lm_head.weight = replacement  # what FSDP does around each forward
    assert head.dtype == torch.float64 and torch.equal(head.weight, replacement[:7])


def test_lm_head_of_refuses_a_sharded_flat_weight():
    # FSDP1 with the lm_head in its own unit leaves a 1-D shard behind after the forward
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(8, 11, bias=False)
    model.get_output_embeddings = lambda: model.lm_head
    head = lm_head_of(model)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(44))
    with pytest.raises(RuntimeError, match="sharded"):
        head.weight


def test_lm_head_holds_tensors_or_a_module():
    weight = torch.randn(5, 3)
    head = LMHead(weight, None)
    assert head.weight is weight and head.bias is None and head.num_rows == 5
    with pytest.raises(TypeError):
        LMHead()
