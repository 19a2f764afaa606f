"""kidkernels.integrations.trl against TRL's own ``_chunked_divergence_loss`` (trl 1.16, installed by the dev extra):
the same loss, entropy sum and count, the same gradients of the student's hidden states, lm_head weight and bias, and
a two-step ``DistillationTrainer`` run whose losses equal the unpatched run's.

Tolerances (relative L2): float32, 1e-5 on the loss and the entropy sum and 1e-5 on the gradients against TRL
(both are float32 computations of the same float32 logits, a few 1e-7 apart; measured up to 1e-6); both also within
1e-5 of the float64 reference.  bfloat16: TRL 1.16 forms the logits of bf16 inputs in float32 too (on CPU from
float32 copies, on CUDA by an fp32-output matmul), and so does kidkernels, so the loss and the entropy still agree to
float32 rounding (1e-5); the gradients are rounded to bfloat16 by both at the end (TRL rounds d(loss)/d(logits) to bf16
before its fp32-accumulated products, kidkernels writes it in bf16 too), and that rounding alone moves the float64
gradient by about 2e-3: each is within 2x that floor of the float64 reference, and they are within 4x of each other.
Measured here (seed 0): neither is consistently closer: kidkernels 2.2e-3 to 3.1e-3, TRL 2.0e-3 to 2.5e-3 on the
hidden-state gradient, both 2.2e-3 to 2.5e-3 on the weight's.
The backend is named ("torch", or "triton_rows" for one case): "triton" is to become the GEMM-fused kernels.
"""
from __future__ import annotations

import functools
import math
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("trl")

import trl.trainer.distillation_trainer as trl_distillation  # noqa: E402

from kidkernels.integrations import trl as kk_trl  # noqa: E402
from kidkernels.reference import reference_fused_linear_distill_loss, reference_fused_linear_entropy  # noqa: E402
from tests.conftest import DEVICE  # noqa: E402
from tests.helpers import rel_l2  # noqa: E402

TRL_LOSS = trl_distillation._chunked_divergence_loss
B, K, H_S, H_T, V = 3, 6, 16, 24, 1013


def make_inputs(dtype, *, seed=0, bias=True, device=DEVICE):
    """Inputs on the test device (CPU: TRL's torch tile path; CUDA: its Triton kernels)."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, K, H_S, generator=g).to(dtype)
    ht = torch.randn(B, K, H_T, generator=g).to(dtype)
    ws = (torch.randn(V, H_S, generator=g) * (4.0 / H_S ** 0.5)).to(dtype)
    wt = (torch.randn(V, H_T, generator=g) * (5.0 / H_T ** 0.5)).to(dtype)
    bs = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    bt = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    # ragged completions: row 0 ends early, row 1 has a masked tool turn in the middle, row 2 is a float mask
    mask = torch.ones(B, K)
    mask[0, 4:] = 0
    mask[1, 1:3] = 0
    mask[2] = torch.tensor([1.0, 0.5, 1.0, 1.0, 0.0, 1.0])  # TRL counts every nonzero entry as 1
    return tuple(t.to(device) if t is not None else None for t in (hs, ht, ws, wt, bs, bt, mask))


def run(function, inputs, beta, **options):
    """``(loss, entropy_sum, count, d hidden, d weight, d bias)`` of one call with fresh leaves."""
    hs, ht, ws, wt, bs, bt, mask = inputs
    h, w = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    b = bs.clone().requires_grad_(True) if bs is not None else None
    loss, entropy_sum, count = function(h, ht, w, wt, mask, beta, student_lm_head_bias=b, teacher_lm_head_bias=bt,
                                        **options)
    loss.backward()
    return loss, entropy_sum, count, h.grad, w.grad, (b.grad if b is not None else None)


def reference(inputs, beta, *, num_items_in_batch=None, student_logit_scale=1.0, teacher_logit_scale=1.0,
              student_final_logit_softcapping=None, teacher_final_logit_softcapping=None, temperature=1.0):
    """The float64 definition: the divergence summed over the counted positions, over the count (or
    ``num_items_in_batch``); the tempered student entropy summed; gradients by autograd."""
    hs, ht, ws, wt, bs, bt, mask = inputs
    valid = mask.reshape(-1) != 0
    h = hs.double().requires_grad_(True)
    w = ws.double().requires_grad_(True)
    b = bs.double().requires_grad_(True) if bs is not None else None
    transforms = dict(student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
                      student_softcap=student_final_logit_softcapping, teacher_softcap=teacher_final_logit_softcapping)
    total = reference_fused_linear_distill_loss(
        h.reshape(-1, H_S)[valid], w, ht.reshape(-1, H_T)[valid], wt, None, divergence="jsd", beta=beta,
        temperature=temperature, reduction="sum", student_bias=b, teacher_bias=bt, **transforms)
    denom = float(num_items_in_batch) if num_items_in_batch is not None else max(int(valid.sum()), 1)
    loss = total / denom
    loss.backward()
    entropy = reference_fused_linear_entropy(hs.reshape(-1, H_S)[valid], ws, bs, temperature=temperature,
                                             logit_scale=student_logit_scale,
                                             softcap=student_final_logit_softcapping).sum()
    return loss, entropy, int(valid.sum()), h.grad, w.grad, (b.grad if b is not None else None)


def ours(backend):
    def function(*args, **kwargs):
        return kk_trl.chunked_divergence_loss(*args, backend=backend, **kwargs)
    return function


CASES = {
    # beta, options, backend
    "fkl-plain": (0.0, dict(), "torch"),
    "jsd-T2-capped-scaled": (0.5, dict(temperature=2.0, student_final_logit_softcapping=30.0,
                                       teacher_logit_scale=0.5, num_items_in_batch=torch.tensor(23.0)), "torch"),
    "rkl-T0.7-scaled-capped": (1.0, dict(temperature=0.7, student_logit_scale=1.3,
                                         teacher_final_logit_softcapping=20.0, num_items_in_batch=17), "torch"),
    "jsd0.3-everything": (0.3, dict(temperature=1.5, student_logit_scale=0.8, student_final_logit_softcapping=5.0,
                                    teacher_logit_scale=1.2, teacher_final_logit_softcapping=7.0), "torch"),
    "jsd-triton-rows": (0.5, dict(temperature=1.5, student_final_logit_softcapping=10.0), "triton_rows"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_trl_and_the_reference(case, dtype):
    beta, options, backend = CASES[case]
    if backend == "triton_rows":
        pytest.importorskip("triton")
        if dtype == torch.bfloat16 and DEVICE == "cpu":
            # The Triton interpreter truncates float32 -> bfloat16 stores (compiled kernels round to nearest), so the
            # row kernel's bf16 gradient is off by up to twice the rounding floor this test holds to (measured 4.5x on
            # the bias): bf16 is compared on the torch backend here, the row kernels' bf16 in test_logit_transform.
            pytest.skip("bf16 at the rounding floor needs compiled Triton (the interpreter truncates bf16 stores)")
    inputs = make_inputs(dtype, bias=case != "fkl-plain")
    theirs = run(TRL_LOSS, inputs, beta, **options)
    mine = run(ours(backend), inputs, beta, **options)
    ref = reference(inputs, beta, **options)
    loss, entropy, count, *grads = mine
    assert loss.dtype == theirs[0].dtype == torch.float32 and loss.dim() == 0
    assert entropy.dtype == torch.float32 and not entropy.requires_grad
    assert count.dtype == theirs[2].dtype == torch.int64 and int(count) == int(theirs[2]) == ref[2] == 13
    for value, name in ((0, "loss"), (1, "entropy sum")):
        assert rel_l2(mine[value], theirs[value]) <= 1e-5, name
        assert rel_l2(mine[value], ref[value]) <= 1e-5 and rel_l2(theirs[value], ref[value]) <= 1e-5, name
    for g_mine, g_theirs, g_ref in zip(grads, theirs[3:], ref[3:]):
        if g_ref is None:
            assert g_mine is None and g_theirs is None
            continue
        assert g_mine.dtype == g_theirs.dtype == dtype and g_mine.shape == g_theirs.shape
        if dtype == torch.float32:
            assert rel_l2(g_mine, g_theirs) <= 1e-5
            assert rel_l2(g_mine, g_ref) <= 1e-5 and rel_l2(g_theirs, g_ref) <= 1e-5
        else:
            floor = rel_l2(g_ref.to(dtype), g_ref)  # the rounding of the exact gradient to bf16
            assert rel_l2(g_mine, g_ref) <= 2 * floor and rel_l2(g_theirs, g_ref) <= 2 * floor
            assert rel_l2(g_mine, g_theirs) <= 4 * floor
    # masked positions get no gradient
    masked = (inputs[-1] == 0)
    assert (mine[3][masked] == 0).all()


def test_fully_masked_batch_is_zero_like_trl():
    inputs = make_inputs(torch.float32)
    inputs = (*inputs[:-1], torch.zeros_like(inputs[-1]))
    mine, theirs = run(ours("torch"), inputs, 0.5), run(TRL_LOSS, inputs, 0.5)
    for a, b in zip(mine, theirs):
        assert torch.equal(a.float(), b.float()) and float(a.abs().sum()) == 0.0


def test_dtensor_heads_are_gathered_once():
    """FSDP2 hands TRL DTensor lm_head weights: a single-process gloo mesh, the student head ``Shard(0)``, the
    teacher's ``Replicate``; the gradients come back as DTensors equal to TRL's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed, not yet initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        hs, ht, ws, wt, bs, bt, mask = make_inputs(torch.float32, device="cpu")
        results = []
        for function in (TRL_LOSS, ours("torch")):
            w = torch.nn.Parameter(distribute_tensor(ws.clone(), mesh, [Shard(0)]))
            b = torch.nn.Parameter(distribute_tensor(bs.clone(), mesh, [Shard(0)]))
            h = hs.clone().requires_grad_(True)
            loss, entropy, count = function(h, ht, w, distribute_tensor(wt, mesh, [Replicate()]), mask, 0.5,
                                            student_lm_head_bias=b,
                                            teacher_lm_head_bias=distribute_tensor(bt, mesh, [Replicate()]))
            loss.backward()
            assert type(w.grad).__name__ == "DTensor"
            results.append((loss, entropy, count, h.grad, w.grad.full_tensor(), b.grad.full_tensor()))
        for a, b in zip(*results):
            assert rel_l2(a.float(), b.float()) <= 1e-5
    finally:
        dist.destroy_process_group()


# ---- the patch -----------------------------------------------------------------------------------------------

def test_patch_replaces_the_function_the_trainer_calls_and_undoes():
    original = trl_distillation._chunked_divergence_loss
    handle = kk_trl.patch_distillation_trainer(backend="torch")
    try:
        assert handle.active and trl_distillation._chunked_divergence_loss is not original
        assert getattr(trl_distillation._chunked_divergence_loss, "__kidkernels__", False)
        assert "active" in repr(handle) and handle.trl_version in repr(handle)
        with kk_trl.patch_distillation_trainer() as inner:  # nests: a patch of the patch
            assert inner.active and not handle.active
        assert handle.active
    finally:
        handle.undo()
    assert trl_distillation._chunked_divergence_loss is original and not handle.active
    handle.undo()  # idempotent
    with kk_trl.patch_distillation_trainer():
        pass
    assert trl_distillation._chunked_divergence_loss is original


def test_patched_call_goes_to_trl_for_options_kidkernels_does_not_take(monkeypatch):
    calls = []

    @functools.wraps(TRL_LOSS)  # the signature the patch checks
    def spy(*args, **kwargs):
        calls.append(args)
        return TRL_LOSS(*args, **kwargs)

    monkeypatch.setattr(trl_distillation, "_chunked_divergence_loss", spy)
    inputs = make_inputs(torch.float32)
    with kk_trl.patch_distillation_trainer(backend="torch"):
        patched = trl_distillation._chunked_divergence_loss
        run(patched, inputs, 0.5)
        assert calls == []
        with pytest.warns(UserWarning, match="runs TRL's own"):
            run(patched, inputs, 0.5, student_logit_scale=0.0)
        assert len(calls) == 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            run(patched, inputs, 0.5, teacher_final_logit_softcapping=-1.0)
        assert len(calls) == 2


def test_missing_or_changed_function_is_a_clear_error(monkeypatch):
    import trl

    monkeypatch.delattr(trl_distillation, "_chunked_divergence_loss")
    with pytest.raises(RuntimeError, match=rf"trl {trl.__version__}: .* has no _chunked_divergence_loss"):
        kk_trl.patch_distillation_trainer()
    monkeypatch.setattr(trl_distillation, "_chunked_divergence_loss",
                        lambda student_hidden_states, teacher_hidden_states, mask, beta: None, raising=False)
    with pytest.raises(RuntimeError, match=rf"trl {trl.__version__}: .*changed its signature.*found \(student_hidden"):
        kk_trl.patch_distillation_trainer()
    with pytest.raises(ValueError, match="backend"):
        kk_trl.patch_distillation_trainer(backend="cuda")


def test_importing_kidkernels_imports_neither_trl_nor_transformers():
    code = ("import sys, kidkernels, kidkernels.integrations, kidkernels.integrations.trl, kidkernels.integrations.hf; "
            "bad = [m for m in ('trl', 'transformers') if m in sys.modules]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---- a DistillationTrainer run -------------------------------------------------------------------------------

def _two_steps(tmp_path, patched: bool):
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from tests.kid_tiny import tiny_model, tiny_tokenizer

    student = tiny_model(0, hidden=32, layers=1, init_std=0.2)
    teacher = tiny_model(1, hidden=48, layers=2, init_std=0.2)
    tokenizer = tiny_tokenizer()
    tokenizer.padding_side = "left"
    prompts = [" ".join(f"t{(7 * i + 5 * j) % 60 + 3}" for j in range(3 + i % 4)) for i in range(8)]
    args = DistillationConfig(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, max_completion_length=6, bf16=False,
        gradient_checkpointing=False, report_to=[], logging_steps=1, save_strategy="no", use_cpu=True, seed=0,
        beta=0.5, temperature=1.3, learning_rate=1e-2, generation_kwargs={"do_sample": False}, disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                                  processing_class=tokenizer)
    if patched:
        with kk_trl.patch_distillation_trainer(backend="torch"):
            trainer.train()
    else:
        trainer.train()
    return [h for h in trainer.state.log_history if "loss" in h]


def test_distillation_trainer_two_steps_match(tmp_path, monkeypatch):
    """Tiny Qwen2 student (H 32) and teacher (H 48, two layers) built from config, greedy on-policy completions,
    JSD beta 0.5 at T 1.3: the patched run's logged losses and entropies equal the unpatched run's, and the loss
    went through kidkernels (counted)."""
    import kidkernels

    plain = _two_steps(tmp_path / "plain", patched=False)
    calls = []
    real = kidkernels.fused_linear_distill_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(kidkernels, "fused_linear_distill_loss", counting)
    patched = _two_steps(tmp_path / "patched", patched=True)
    assert len(calls) == 2 and len(plain) == len(patched) == 2
    for a, b in zip(plain, patched):
        assert math.isfinite(a["loss"]) and a["loss"] > 0
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
        assert abs(a["entropy"] - b["entropy"]) <= 1e-5 * abs(a["entropy"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(a["grad_norm"])
