"""Fused distillation loss against the float64 eager reference, on both backends.

Tolerances (relative L2 against float64 on the same, already-rounded inputs): 1e-5 on the loss, 1e-4 on float32
gradients, 1e-2 on bfloat16 gradients.  Inputs have a trained model's logit spread (std 2-5 across the vocabulary);
V = 1013 is not a multiple of any block size, and H_s != H_t throughout.
"""
import math

import pytest
import torch

import kidkernels
from kidkernels.ops import tiles
from kidkernels.reference import reference_distill_loss_from_logits, reference_fused_linear_distill_loss
from tests.conftest import BACKENDS as BACKENDS_AVAILABLE
from tests.helpers import TensorRecorder, assert_close, hidden_and_weight, rel_l2

DIVERGENCES = ["fkl", "rkl", "jsd", "tvd"]
N, H_S, H_T, V = 13, 16, 24, 1013
GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}


def make_case(*, n=N, h_s=H_S, h_t=H_T, vocab=V, dtype=torch.float32, device="cpu", logit_std=3.0, bias=True,
              ignored=(2, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ws, bs = hidden_and_weight(n, h_s, vocab, logit_std=logit_std, dtype=dtype, device=device, generator=g,
                                   bias=bias)
    xt, wt, bt = hidden_and_weight(n, h_t, vocab, logit_std=logit_std * 1.2, dtype=dtype, device=device,
                                   generator=g, bias=bias)
    target = torch.randint(0, vocab, (n,), generator=g)
    for i in ignored:
        if i < n:
            target[i] = -100
    for t in (xs, ws, bs):
        if t is not None:
            t.requires_grad_(True)
    return dict(student_input=xs, student_weight=ws, teacher_input=xt, teacher_weight=wt,
                target=target.to(device), student_bias=bs, teacher_bias=bt)


def run_both(case, upstream=None, **options):
    """Loss and student gradients from kidkernels and from the float64 reference, same inputs and upstream."""
    ours = kidkernels.fused_linear_distill_loss(**case, **options)
    ref_options = {k: v for k, v in options.items() if k not in ("backend", "workspace_bytes", "weight_grad_fp32")}
    ref = reference_fused_linear_distill_loss(**case, **ref_options)
    grads_of = [t for t in (case["student_input"], case["student_weight"], case["student_bias"]) if t is not None]
    up = torch.ones_like(ours) if upstream is None else upstream
    ours_grads = torch.autograd.grad(ours, grads_of, up)
    ref_grads = torch.autograd.grad(ref, grads_of, up.double())
    return ours, ref, ours_grads, ref_grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mle_weight", [0.0, 0.7], ids=["kd", "kd+mle"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_reference(backend, device, divergence, mle_weight, dtype):
    case = make_case(dtype=dtype, device=device)
    # T != 1 with the MLE term exercises its separate (untempered) log-sum-exp.
    temperature = 2.0 if mle_weight else 1.0
    out = run_both(case, divergence=divergence, mle_weight=mle_weight, temperature=temperature, backend=backend)
    assert_close(*out, GRAD_TOL[dtype])
    # input dtype in, input dtype out
    assert out[2][0].dtype == dtype and out[2][1].dtype == dtype


def test_float16_inputs(backend, device):
    case = make_case(dtype=torch.float16, device=device, seed=22)
    out = run_both(case, divergence="rkl", mle_weight=1.0, temperature=1.5, backend=backend)
    assert_close(*out, 1e-2)
    assert out[2][0].dtype == torch.float16 and out[2][1].dtype == torch.float16


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_beta(backend, device, beta):
    case = make_case(device=device, seed=1)
    assert_close(*run_both(case, divergence="jsd", beta=beta, mle_weight=0.3, backend=backend), 1e-4)


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_temperature(backend, device, divergence, temperature):
    case = make_case(device=device, seed=2, bias=False)
    assert_close(*run_both(case, divergence=divergence, temperature=temperature, mle_weight=0.5, backend=backend),
                 1e-4)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_row_losses(backend, device, reduction):
    case = make_case(device=device, seed=3)
    up = torch.randn(N, generator=torch.Generator().manual_seed(9)) if reduction == "none" else None
    ours, ref, og, rg = run_both(case, upstream=up, divergence="rkl", mle_weight=1.0, reduction=reduction,
                                 backend=backend)
    assert_close(ours, ref, og, rg, 1e-4)
    if reduction == "none":
        assert ours.shape == (N,)
        ignored = case["target"] == -100
        assert (ours[ignored] == 0).all()


@pytest.mark.parametrize("normalizer", [40, 7.5, "tensor"])
def test_normalizer(backend, device, normalizer):
    case = make_case(device=device, seed=4)
    value = torch.tensor(31.0, device=device) if normalizer == "tensor" else normalizer
    ours, ref, og, rg = run_both(case, divergence="fkl", mle_weight=1.0, normalizer=value, backend=backend)
    assert_close(ours, ref, og, rg, 1e-4)
    as_sum = kidkernels.fused_linear_distill_loss(**case, divergence="fkl", mle_weight=1.0, reduction="sum",
                                                 backend=backend)
    assert rel_l2(ours, as_sum / float(value)) < 1e-6


def test_return_parts(backend, device):
    case = make_case(device=device, seed=5)
    loss, kd, mle = kidkernels.fused_linear_distill_loss(**case, divergence="jsd", mle_weight=0.25, kd_weight=2.0,
                                                         return_parts=True, backend=backend)
    _, rkd, rmle = reference_fused_linear_distill_loss(**case, divergence="jsd", mle_weight=0.25, kd_weight=2.0,
                                                       return_parts=True)
    assert not kd.requires_grad and not mle.requires_grad and loss.requires_grad
    assert rel_l2(kd, rkd) <= 1e-5 and rel_l2(mle, rmle) <= 1e-5
    assert rel_l2(loss, 2.0 * kd + 0.25 * mle) <= 1e-6


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, device, reduction):
    case = make_case(device=device, ignored=range(N))
    loss = kidkernels.fused_linear_distill_loss(**case, mle_weight=1.0, reduction=reduction, backend=backend)
    assert torch.equal(loss, torch.zeros_like(loss))
    grads = torch.autograd.grad(loss.sum(), [case["student_input"], case["student_weight"], case["student_bias"]])
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_no_target_counts_every_row(backend, device):
    case = make_case(device=device, seed=6)
    case["target"] = None
    assert_close(*run_both(case, divergence="tvd", backend=backend), 1e-4)


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_n(backend, device, n):
    case = make_case(n=n, device=device, ignored=())
    if n == 0:
        loss = kidkernels.fused_linear_distill_loss(**case, mle_weight=1.0, backend=backend)
        assert loss.item() == 0.0
        loss.backward()
        assert case["student_input"].grad.shape == (0, H_S)
        assert torch.equal(case["student_weight"].grad, torch.zeros_like(case["student_weight"]))
        return
    assert_close(*run_both(case, divergence="rkl", mle_weight=1.0, backend=backend), 1e-4)


def test_leading_dims_are_flattened(backend, device):
    case = make_case(n=12, device=device, seed=7)
    shaped = dict(case)
    for key in ("student_input", "teacher_input"):
        shaped[key] = case[key].reshape(3, 4, -1)
    shaped["target"] = case["target"].reshape(3, 4)
    rows = kidkernels.fused_linear_distill_loss(**shaped, mle_weight=1.0, reduction="none", backend=backend)
    assert rows.shape == (3, 4)
    flat = kidkernels.fused_linear_distill_loss(**case, mle_weight=1.0, reduction="none", backend=backend)
    assert torch.allclose(rows.reshape(-1), flat, rtol=1e-6, atol=1e-7)


def test_many_chunks_and_tiles(backend, device, monkeypatch):
    """Row chunks of 3 and (Triton) vocabulary tiles of 256 with a ragged tail: the online updates across tiles
    and the accumulation of the weight gradient across chunks."""
    monkeypatch.setattr(tiles, "MAX_BLOCK_V", 256)
    case = make_case(device=device, seed=8)
    budget = 3 * V * 64  # a few rows at most, on either backend
    for divergence in DIVERGENCES:
        assert_close(*run_both(case, divergence=divergence, mle_weight=0.5, temperature=1.3, backend=backend,
                               workspace_bytes=budget), 1e-4)


def test_weight_grad_fp32_accumulation(backend, device):
    case = make_case(device=device, dtype=torch.bfloat16, seed=10)
    out = run_both(case, divergence="rkl", mle_weight=1.0, backend=backend, weight_grad_fp32=True,
                   workspace_bytes=4 * V * 16)
    assert_close(*out, 1e-2)
    assert out[2][1].dtype == torch.bfloat16


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_large_vocab_accuracy(backend, device, divergence):
    """Row sums over 32k terms: the loss stays within 1e-5 of float64 (a plain float32 dot product does not)."""
    n = 24 if backend == "torch" else 4
    case = make_case(n=n, h_s=64, h_t=96, vocab=32003, device=device, seed=20, ignored=(1,))
    ours, ref, og, rg = run_both(case, divergence=divergence, mle_weight=1.0, backend=backend, return_parts=False)
    assert_close(ours, ref, og, rg, 1e-4)
    parts = kidkernels.fused_linear_distill_loss(**case, divergence=divergence, mle_weight=1.0, backend=backend,
                                                 return_parts=True)
    ref_parts = reference_fused_linear_distill_loss(**case, divergence=divergence, mle_weight=1.0,
                                                    return_parts=True)
    for p, r in zip(parts[1:], ref_parts[1:]):
        assert rel_l2(p, r) <= 1e-5


@pytest.mark.parametrize("logit_std", [20.0, 60.0])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_spread(backend, device, divergence, logit_std):
    """Near one-hot distributions: probabilities underflow; the loss stays exact and every gradient finite."""
    case = make_case(device=device, logit_std=logit_std, seed=11)
    ours, ref, og, rg = run_both(case, divergence=divergence, mle_weight=1.0, backend=backend, beta=0.3)
    assert rel_l2(ours, ref) <= 1e-5
    for g in og:
        assert torch.isfinite(g).all()


def test_tvd_zero_subgradient_at_ties(backend, device):
    """Identical teacher and student: p == q everywhere, so TVD and its gradient are exactly 0."""
    case = make_case(device=device, h_t=H_S, seed=12, bias=False)
    case["teacher_input"] = case["student_input"].detach().clone()
    case["teacher_weight"] = case["student_weight"].detach().clone()
    loss = kidkernels.fused_linear_distill_loss(**case, divergence="tvd", backend=backend)
    gx, gw = torch.autograd.grad(loss, [case["student_input"], case["student_weight"]])
    assert loss.item() == 0.0
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gw, torch.zeros_like(gw))


def test_teacher_gets_no_gradient(backend, device):
    case = make_case(device=device, seed=13)
    case["teacher_input"].requires_grad_(True)
    case["teacher_weight"].requires_grad_(True)
    loss = kidkernels.fused_linear_distill_loss(**case, mle_weight=1.0, backend=backend)
    loss.backward()
    assert case["teacher_input"].grad is None and case["teacher_weight"].grad is None
    assert case["student_weight"].grad is not None


def test_no_gradient_work_under_no_grad(backend, device, monkeypatch):
    """Inference (torch.no_grad) on student tensors that require grad: the gradients are never formed."""
    from kidkernels.ops import distill

    calls = []
    real = distill.linear_distill_chunks
    monkeypatch.setattr(distill, "linear_distill_chunks", lambda *a, **k: calls.append(k) or real(*a, **k))
    case = make_case(device=device, seed=23)
    with torch.no_grad():
        loss = kidkernels.fused_linear_distill_loss(**case, mle_weight=1.0, backend=backend)
    assert not loss.requires_grad
    assert calls and not any(k.get(flag) for k in calls for flag in ("grad_input", "grad_weight", "grad_bias"))
    with_grad = kidkernels.fused_linear_distill_loss(**case, mle_weight=1.0, backend=backend)
    assert calls[-1]["grad_input"] and calls[-1]["grad_weight"] and calls[-1]["grad_bias"]
    assert torch.equal(loss, with_grad.detach())


def test_module_matches_function(backend, device):
    case = make_case(device=device, seed=14)
    module = kidkernels.FusedLinearDistillLoss(divergence="fkl", mle_weight=0.5, temperature=1.5, backend=backend)
    target = case.pop("target")
    sb, tb = case.pop("student_bias"), case.pop("teacher_bias")
    a = module(*case.values(), target, student_bias=sb, teacher_bias=tb)
    b = kidkernels.fused_linear_distill_loss(*case.values(), target, divergence="fkl", mle_weight=0.5,
                                             temperature=1.5, student_bias=sb, teacher_bias=tb, backend=backend)
    assert torch.equal(a, b)
    assert "fkl" in repr(module)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_gradcheck_float64(divergence):
    """Autograd's numerical check of the hand-written backward (float64 runs on the PyTorch backend)."""
    g = torch.Generator().manual_seed(15)
    xs = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    ws = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bs = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    xt = torch.randn(4, 3, dtype=torch.float64, generator=g)
    wt = torch.randn(11, 3, dtype=torch.float64, generator=g)
    target = torch.tensor([3, -100, 0, 10])

    def f(xs, ws, bs):
        return kidkernels.fused_linear_distill_loss(xs, ws, xt, wt, target, divergence=divergence, mle_weight=0.5,
                                                    temperature=1.5, beta=0.3, student_bias=bs, reduction="none")

    assert torch.autograd.gradcheck(f, (xs, ws, bs))


# ---------------------------------------------------------------------------------------------------- logits API

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_distill_loss_from_logits(backend, device, divergence, dtype):
    g = torch.Generator().manual_seed(16)
    s = (torch.randn(2, 5, V, generator=g) * 3).to(dtype=dtype, device=device).requires_grad_(True)
    t = (torch.randn(2, 5, V, generator=g) * 4).to(dtype=dtype, device=device)
    target = torch.randint(0, V, (2, 5), generator=g).to(device)
    target[0, 1] = -100
    opts = dict(divergence=divergence, mle_weight=0.5, temperature=1.5)
    ours = kidkernels.distill_loss(s, t, target, backend=backend, **opts)
    ref = reference_distill_loss_from_logits(s, t, target, **opts)
    assert rel_l2(ours, ref) <= 1e-5
    (gs,) = torch.autograd.grad(ours, [s])
    (rs,) = torch.autograd.grad(ref, [s])
    assert gs.dtype == dtype and gs.shape == s.shape
    assert rel_l2(gs, rs) <= GRAD_TOL[dtype]


def test_distill_loss_none_reduction(backend, device):
    g = torch.Generator().manual_seed(17)
    s = (torch.randn(6, V, generator=g) * 3).to(device).requires_grad_(True)
    t = (torch.randn(6, V, generator=g) * 3).to(device)
    up = torch.randn(6, generator=g).to(device)
    ours = kidkernels.distill_loss(s, t, divergence="jsd", reduction="none", backend=backend)
    ref = reference_distill_loss_from_logits(s, t, divergence="jsd", reduction="none")
    assert rel_l2(ours, ref) <= 1e-5
    assert rel_l2(torch.autograd.grad(ours, [s], up)[0], torch.autograd.grad(ref, [s], up.double())[0]) <= 1e-4


# ------------------------------------------------------------------------------------------- memory and syncs

def test_no_tokens_by_vocab_tensor(backend, device):
    """Forward plus backward at a size where one [N, V] tensor would dominate: no op ever produces a tensor larger
    than the workspace budget, whatever N is.  (Smaller N under the slow Triton interpreter.)"""
    n, vocab, hidden = (2048, 4099, 32) if backend == "torch" or device.type == "cuda" else (256, 2053, 16)
    case = make_case(n=n, h_s=hidden, h_t=hidden, vocab=vocab, device=device, seed=18, ignored=())
    full_bytes = n * vocab * 4
    budget = full_bytes // 16
    with TensorRecorder() as rec:
        loss = kidkernels.fused_linear_distill_loss(**case, mle_weight=1.0, backend=backend, workspace_bytes=budget)
        loss.backward()
    assert rec.max_bytes <= budget, f"largest tensor {rec.max_bytes} bytes, budget {budget}, N*V fp32 {full_bytes}"
    assert torch.isfinite(case["student_weight"].grad).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_host_reads_in_forward_or_backward(backend, device, reduction):
    """The dispatch layer never reads a tensor value back to the host (no .item(), no branch on a tensor)."""
    from kidkernels.ops.config import DistillConfig
    from kidkernels.ops.distill import DispatchOptions, LinearDistillFunction

    case = make_case(device=device, seed=19)
    cfg = DistillConfig("jsd", 0.5, 1.5, 1.0, 1.0, -100, True)
    opts = DispatchOptions(reduction, backend, 1 << 20)
    with TensorRecorder() as rec:
        loss, _, _ = LinearDistillFunction.apply(
            case["student_input"], case["student_weight"], case["student_bias"], case["teacher_input"],
            case["teacher_weight"], case["teacher_bias"], case["target"], None, cfg, opts)
        loss.sum().backward()
    assert rec.host_reads == 0


# ------------------------------------------------------------------------------------------------- bad input

def _bad(**changes):
    case = make_case(n=4, ignored=())
    case.update(changes)
    return case


@pytest.mark.parametrize("changes, options, error, words", [
    (dict(student_input=torch.randn(16)), {}, ValueError, "at least 2 dimensions"),
    (dict(student_weight=torch.randn(V, H_S, 1)), {}, ValueError, "2-D"),
    (dict(teacher_input=torch.randn(5, H_T)), {}, ValueError, "rows"),
    (dict(student_weight=torch.randn(V, H_S + 1)), {}, ValueError, "hidden size"),
    (dict(teacher_weight=torch.randn(V + 1, H_T)), {}, ValueError, f"V={V + 1}"),
    (dict(student_bias=torch.randn(V - 1)), {}, ValueError, "student_bias"),
    (dict(target=torch.tensor([1.0, 2.0, 3.0, 4.0])), {}, TypeError, "integer"),
    (dict(target=torch.tensor([1, 2, 3])), {}, ValueError, "one entry per row"),
    (dict(target=torch.tensor([1, 2, V, 4])), {}, ValueError, "outside"),
    (dict(target=torch.tensor([1, -1, 3, 4])), {}, ValueError, "outside"),
    (dict(target=None), dict(mle_weight=1.0), ValueError, "needs a target"),
    ({}, dict(temperature=0.0), ValueError, "temperature"),
    ({}, dict(temperature=-1.0), ValueError, "temperature"),
    ({}, dict(temperature=math.inf), ValueError, "temperature"),
    ({}, dict(temperature=math.nan), ValueError, "temperature"),
    ({}, dict(beta=0.0), ValueError, "beta"),
    ({}, dict(beta=1.0), ValueError, "beta"),
    ({}, dict(beta=1.5), ValueError, "beta"),
    ({}, dict(divergence="kl"), ValueError, "divergence"),
    ({}, dict(reduction="avg"), ValueError, "reduction"),
    ({}, dict(normalizer=0), ValueError, "normalizer"),
    ({}, dict(backend="cuda"), ValueError, "backend"),
    (dict(student_input=torch.randn(4, H_S, dtype=torch.float64)), {}, TypeError, "must match"),
    (dict(student_input=torch.randn(4, H_S).to("meta")), {}, ValueError, "same device"),
])
def test_bad_input_raises_clear_error(changes, options, error, words):
    with pytest.raises(error, match=words):
        kidkernels.fused_linear_distill_loss(**_bad(**changes), **options)


def test_logits_api_bad_input():
    s, t = torch.randn(3, 10), torch.randn(3, 11)
    with pytest.raises(ValueError, match="V=10.*V=11"):
        kidkernels.distill_loss(s, t)
    with pytest.raises(ValueError, match="rows"):
        kidkernels.distill_loss(s, torch.randn(4, 10))
    with pytest.raises(TypeError, match="torch.Tensor"):
        kidkernels.distill_loss(s.tolist(), s)


def test_forced_triton_without_interpreter_is_explained(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    case = make_case(n=2, ignored=())
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kidkernels.fused_linear_distill_loss(**case, backend="triton")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the divergence of -inf logits is NaN; only lse is checked
def test_lse_update_with_leading_masked_tile(monkeypatch, device):
    """A vocabulary whose first tile is entirely -inf (a masked range): the kernels' log-sum-exps stay exact."""
    from kidkernels.ops import distill_torch
    from kidkernels.ops.config import LSE_STUDENT, LSE_TEACHER, NUM_STATS, DistillConfig

    if "triton" not in BACKENDS_AVAILABLE:
        pytest.skip("triton not installed")
    from kidkernels.ops import distill_triton

    monkeypatch.setattr(tiles, "MAX_BLOCK_V", 256)
    g = torch.Generator().manual_seed(21)
    s, t = torch.randn(3, V, generator=g) * 3, torch.randn(3, V, generator=g) * 3
    s[:, :300] = float("-inf")
    t[:, :300] = float("-inf")
    cfg = DistillConfig("fkl", 0.5, 1.0, 1.0, 0.0, -100, False)
    stats = torch.full((NUM_STATS, 3), float("nan"), device=device)
    expected = torch.full((NUM_STATS, 3), float("nan"))
    distill_triton.stats_and_value(s.to(device), t.to(device), None, stats, cfg)
    distill_torch.stats_and_value(s, t, None, expected, cfg)
    for row in (LSE_STUDENT, LSE_TEACHER):
        assert torch.allclose(stats[row].cpu(), expected[row], rtol=1e-6)
