"""Logit scale and final-logit softcapping (``softcap * tanh(scale * x / softcap)``, before the temperature) in every
op that reads logits, against the float64 reference, on the PyTorch backend and the Triton row kernels.

The backends are named here ("torch", "triton_rows"; for entropy and argmax also "triton", the GEMM-fused selection
kernels, which apply the transform in their epilogue) rather than taken from the ``backend`` fixture.  Tolerances
are those of ``test_distill.py`` (relative L2 against float64 on the same rounded inputs: 1e-5 on values, 1e-4 on
float32 gradients, 1e-2 on bfloat16 ones).  The softcaps used (5 and 30, Gemma's value) put many logits in the
saturated part of the tanh, where the chain-rule factor is far from 1 and differs from column to column.
"""
import importlib.util
import math

import pytest
import torch

import kidkernels
from kidkernels.kernels.logit_transform import transform_logits_and_slope
from kidkernels.ops import tiles
from kidkernels.ops.config import LogitTransform
from kidkernels.ops.logit_transform import transform_logits, transform_slope
from kidkernels.reference import (
    reference_distill_loss_from_logits,
    reference_fused_linear_cross_entropy,
    reference_fused_linear_entropy,
    reference_logit_transform,
)
from tests.helpers import assert_close, hidden_and_weight, rel_l2
from tests.test_distill import GRAD_TOL, H_S, V, make_case, run_both

TRANSFORM_BACKENDS = ["torch"] + (["triton_rows"] if importlib.util.find_spec("triton") is not None else [])
# The GEMM-fused selection kernels (backend "triton") apply the transform in their epilogue.
SELECTION_BACKENDS = TRANSFORM_BACKENDS + (["triton"] if "triton_rows" in TRANSFORM_BACKENDS else [])
DIVERGENCES = ["fkl", "rkl", "jsd", "tvd"]
BOTH = dict(student_logit_scale=0.8, student_softcap=5.0, teacher_logit_scale=1.3, teacher_softcap=7.0)


@pytest.fixture(params=TRANSFORM_BACKENDS)
def tbackend(request, monkeypatch):
    if request.param != "torch":
        monkeypatch.setattr(tiles, "MAX_BLOCK_V", 256)  # V = 1013: 3 full tiles and a ragged one
    return request.param


@pytest.fixture(params=SELECTION_BACKENDS)
def sbackend(request, monkeypatch):
    if request.param == "triton_rows":
        monkeypatch.setattr(tiles, "MAX_BLOCK_V", 256)
    return request.param


# ---- the per-element helpers ---------------------------------------------------------------------------------

EDGE_VALUES = [0.0, -0.0, 1e-30, -1e-12, 1e-6, 1e-3, 0.1, 1.0, -3.0, 10.0, 29.9, 100.0, 1000.0, -1000.0]


@pytest.mark.parametrize("scale, softcap", [(1.0, 30.0), (0.7, 5.0), (2.5, None)])
def test_helpers_match_float64_tanh(scale, softcap):
    """Both helpers (Triton under the interpreter, PyTorch) give z and dz/dx within a few float32 ulps of float64,
    relatively, from 1e-30 to saturation; -inf maps to -softcap with slope 0, NaN stays NaN."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, z_ptr, slope_ptr, n, scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               BLOCK: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        z, slope = transform_logits_and_slope(tl.load(x_ptr + cols, mask=mask, other=0.0), scale, softcap,
                                              HAS_SCALE, HAS_SOFTCAP)
        tl.store(z_ptr + cols, z, mask=mask)
        tl.store(slope_ptr + cols, z * 0.0 + slope, mask=mask)

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(EDGE_VALUES), torch.randn(200, generator=g) * 40])
    x64 = x.double()
    u = x64 * scale / (softcap or 1.0)
    z_ref = softcap * torch.tanh(u) if softcap else x64 * scale
    slope_ref = scale / torch.cosh(u) ** 2 if softcap else torch.full_like(x64, scale)  # 1 - tanh^2 loses it
    if x.device.type == "cpu" and not kidkernels._backend.triton_interpreter_enabled():
        pytest.skip("needs TRITON_INTERPRET=1 on CPU")
    z, slope = torch.empty_like(x), torch.empty_like(x)
    kernel[(1,)](x, z, slope, x.numel(), scale, softcap or 1.0, HAS_SCALE=scale != 1.0,
                 HAS_SOFTCAP=softcap is not None, BLOCK=256)
    t = LogitTransform(scale, softcap)
    for name, zz, ss in (("triton", z, slope), ("torch", transform_logits(x, t), transform_slope(x, t))):
        nonzero = z_ref != 0
        assert ((zz.double() - z_ref).abs() / z_ref.abs())[nonzero].max() <= 4e-7, name
        assert (zz[~nonzero] == 0).all(), name
        # relative to float64 on the same float32 inputs; where the slope is below 1e-20 the input's own rounding
        # (scale * x / softcap rounded) dominates: an absolute check there
        big = slope_ref > 1e-20
        assert ((ss.double() - slope_ref).abs() / slope_ref)[big].max() <= 1e-5, name
        assert ((ss.double() - slope_ref).abs()[~big] <= 1e-20).all(), name
    if softcap:
        # into saturation (exp(-2r) denormal, then 0): never beyond the cap, never decreasing
        dense = torch.linspace(-300.0 * softcap, 300.0 * softcap, 4001)
        z_dense = torch.empty_like(dense)
        kernel[(1,)](dense, z_dense, torch.empty_like(dense), dense.numel(), scale, softcap, HAS_SCALE=scale != 1.0,
                     HAS_SOFTCAP=True, BLOCK=4096)
        assert (z_dense.abs() <= softcap).all() and (z_dense[1:] >= z_dense[:-1]).all()
        special = torch.tensor([float("-inf"), float("inf"), float("nan")])
        z_special, slope_special = torch.empty_like(special), torch.empty_like(special)
        kernel[(1,)](special, z_special, slope_special, 3, scale, softcap, HAS_SCALE=scale != 1.0, HAS_SOFTCAP=True,
                     BLOCK=4)
        for zt, st in ((transform_logits(special, t), transform_slope(special, t)), (z_special, slope_special)):
            assert zt[0] == -softcap and zt[1] == softcap and math.isnan(zt[2])
            assert math.isnan(zt[2]) and math.isnan(st[2])
        assert (transform_slope(special, t)[:2] == 0).all()


# ---- the fused loss ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_fused_loss_matches_reference(tbackend, device, divergence, dtype):
    """Both models transformed (different scales and caps), the MLE term on (it reads the untempered transformed
    student logits: T = 1.5 exercises its separate log-sum-exp), biases, ignored rows: values and the gradients of the
    student's hidden states, weight and bias."""
    case = make_case(dtype=dtype, device=device, seed=3, logit_std=6.0)
    out = run_both(case, divergence=divergence, mle_weight=0.5, temperature=1.5, beta=0.3, backend=tbackend, **BOTH)
    assert_close(*out, GRAD_TOL[dtype])
    assert out[2][0].dtype == dtype and out[2][1].dtype == dtype


@pytest.mark.parametrize("options", [dict(student_softcap=30.0), dict(teacher_softcap=30.0),
                                     dict(student_logit_scale=0.25), dict(teacher_logit_scale=4.0)],
                         ids=["student-cap", "teacher-cap", "student-scale", "teacher-scale"])
def test_one_side_at_a_time(tbackend, device, options):
    case = make_case(device=device, seed=4, logit_std=20.0)  # logits of tens: Gemma's cap of 30 bends them
    assert_close(*run_both(case, divergence="jsd", beta=0.5, mle_weight=0.3, backend=tbackend, **options), 1e-4)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_reductions_and_the_recomputing_backward(tbackend, device, reduction):
    """"none" goes through the backward op that recomputes the logits: it must apply the transform too."""
    case = make_case(device=device, seed=5)
    up = torch.randn(13, generator=torch.Generator().manual_seed(1)).to(device) if reduction == "none" else None
    assert_close(*run_both(case, upstream=up, divergence="rkl", mle_weight=1.0, reduction=reduction,
                           backend=tbackend, **BOTH), 1e-4)


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd"])
def test_saturated_softcap_and_a_confident_student(tbackend, device, divergence):
    """Where tanh saturates: logits of spread 200 under a cap of 5 (most columns sit at +-5 with slopes down to 1e-30
    and below).  And rows where the student is confident (one logit 12 or 25 above the rest, caps 30 and 20): there
    the gradient of the top column is written last, as minus the sum of the others *with respect to z* times the top
    column's own factor (about 0.85 and 0.29, the others' about 1), which the element-wise check of that column
    catches if it is done with respect to the raw logits instead.  The value of the most confident case (about 1e-3 to
    1e-5, a difference of probabilities close to 1) is resolved by float32 inputs only to about 1e-4 relative, with or
    without a transform: its gradient is checked, its value is not."""
    wide = make_case(device=device, seed=6, logit_std=200.0, bias=False)
    assert_close(*run_both(wide, divergence=divergence, beta=0.4, mle_weight=0.5, backend=tbackend,
                           student_softcap=5.0, teacher_softcap=5.0), 1e-4)
    for spike, cap, check_value in ((12.0, 30.0, True), (25.0, 20.0, False)):
        g = torch.Generator().manual_seed(7)
        s = torch.randn(6, V, generator=g) * 2
        top = torch.randint(0, V, (6,), generator=g)
        s[torch.arange(6), top] += spike
        t = torch.randn(6, V, generator=g) * 2
        t[torch.arange(6), top] += spike - 2.0
        s = s.to(device).requires_grad_(True)
        t, top = t.to(device), top.to(device)
        opts = dict(divergence=divergence, beta=0.4, mle_weight=0.5, student_softcap=cap, teacher_softcap=cap)
        ours = kidkernels.distill_loss(s, t, top, backend=tbackend, **opts)
        ref = reference_distill_loss_from_logits(s, t, top, **opts)
        if check_value:
            assert rel_l2(ours, ref) <= 1e-5
        (gs,) = torch.autograd.grad(ours, [s])
        (rs,) = torch.autograd.grad(ref, [s])
        assert rel_l2(gs, rs) <= 1e-5
        rows = torch.arange(6, device=device)
        top_ours, top_ref = gs[rows, top].double(), rs[rows, top]
        assert ((top_ours - top_ref).abs() <= 1e-5 * top_ref.abs()).all(), (spike, top_ours, top_ref)


def test_softcap_none_and_scale_one_are_off(tbackend, device):
    """The defaults are exactly the untransformed loss (bit for bit, values and gradients)."""
    case = make_case(device=device, seed=8)
    params = [case["student_input"], case["student_weight"], case["student_bias"]]
    plain = kidkernels.fused_linear_distill_loss(**case, divergence="jsd", mle_weight=0.5, temperature=1.3,
                                                 backend=tbackend)
    off = kidkernels.fused_linear_distill_loss(**case, divergence="jsd", mle_weight=0.5, temperature=1.3,
                                               backend=tbackend, student_softcap=None, teacher_softcap=None,
                                               student_logit_scale=1.0, teacher_logit_scale=1)
    assert torch.equal(plain, off)
    for a, b in zip(torch.autograd.grad(plain, params), torch.autograd.grad(off, params)):
        assert torch.equal(a, b)


def test_a_scale_is_a_temperature(tbackend, device):
    """Without a cap and without the MLE term, scaling both models' logits by c is dividing the temperature by c."""
    case = make_case(device=device, seed=9)
    scaled = kidkernels.fused_linear_distill_loss(**case, divergence="tvd", temperature=2.0, backend=tbackend,
                                                  student_logit_scale=0.5, teacher_logit_scale=0.5)
    tempered = kidkernels.fused_linear_distill_loss(**case, divergence="tvd", temperature=4.0, backend=tbackend)
    assert rel_l2(scaled, tempered) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_distill_loss_from_logits(tbackend, device, dtype):
    g = torch.Generator().manual_seed(10)
    s = (torch.randn(2, 5, V, generator=g) * 12).to(dtype=dtype, device=device).requires_grad_(True)
    t = (torch.randn(2, 5, V, generator=g) * 15).to(dtype=dtype, device=device)
    target = torch.randint(0, V, (2, 5), generator=g).to(device)
    target[1, 3] = -100
    opts = dict(divergence="rkl", mle_weight=0.5, temperature=2.0, **BOTH)
    ours = kidkernels.distill_loss(s, t, target, backend=tbackend, **opts)
    ref = reference_distill_loss_from_logits(s, t, target, **opts)
    assert rel_l2(ours, ref) <= 1e-5
    (gs,) = torch.autograd.grad(ours, [s])
    (rs,) = torch.autograd.grad(ref, [s])
    assert gs.dtype == dtype and rel_l2(gs, rs) <= GRAD_TOL[dtype]


def test_module_carries_the_options(tbackend, device):
    case = make_case(device=device, seed=11)
    module = kidkernels.FusedLinearDistillLoss(divergence="fkl", mle_weight=0.5, backend=tbackend, **BOTH)
    inputs = [case[k] for k in ("student_input", "student_weight", "teacher_input", "teacher_weight")]
    a = module(*inputs, case["target"], student_bias=case["student_bias"], teacher_bias=case["teacher_bias"])
    b = kidkernels.fused_linear_distill_loss(**case, divergence="fkl", mle_weight=0.5, backend=tbackend, **BOTH)
    assert torch.equal(a, b)
    assert "student_softcap=5.0" in repr(module)
    assert "softcap" not in repr(kidkernels.FusedLinearDistillLoss())


@pytest.mark.parametrize("divergence", ["rkl", "jsd"])
def test_gradcheck_float64(divergence):
    """Autograd's numerical check of the hand-written backward with both transforms (float64: PyTorch backend)."""
    g = torch.Generator().manual_seed(12)
    xs = (torch.randn(4, 5, dtype=torch.float64, generator=g) * 3).requires_grad_(True)
    ws = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bs = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    xt = torch.randn(4, 3, dtype=torch.float64, generator=g)
    wt = torch.randn(11, 3, dtype=torch.float64, generator=g)
    target = torch.tensor([3, -100, 0, 10])

    def f(xs, ws, bs):
        return kidkernels.fused_linear_distill_loss(xs, ws, xt, wt, target, divergence=divergence, mle_weight=0.5,
                                                    temperature=1.5, beta=0.3, student_bias=bs, reduction="none",
                                                    **dict(BOTH, student_softcap=2.0))

    assert torch.autograd.gradcheck(f, (xs, ws, bs))


# ---- cross-entropy, entropy, argmax, selection ---------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cross_entropy(tbackend, device, dtype):
    g = torch.Generator().manual_seed(13)
    x, w, b = hidden_and_weight(13, H_S, V, logit_std=20.0, dtype=dtype, device=device, generator=g, bias=True)
    target = torch.randint(0, V, (13,), generator=g).to(device)
    target[4] = -100
    params = [t.requires_grad_(True) for t in (x, w, b)]
    opts = dict(logit_scale=0.9, softcap=30.0)
    ours = kidkernels.fused_linear_cross_entropy(x, w, target, bias=b, backend=tbackend, **opts)
    ref = reference_fused_linear_cross_entropy(x, w, target, bias=b, **opts)
    assert_close(ours, ref, torch.autograd.grad(ours, params), torch.autograd.grad(ref, params), GRAD_TOL[dtype])
    module = kidkernels.FusedLinearCrossEntropyLoss(backend=tbackend, **opts)
    assert torch.equal(module(x, w, target, bias=b), ours) and "softcap=30.0" in repr(module)
    # the MLE term of the distillation loss reads the same transformed (untempered) logits
    xt, wt, _ = hidden_and_weight(13, 7, V, logit_std=3.0, dtype=dtype, device=device, generator=g)
    as_mle = kidkernels.fused_linear_distill_loss(x, w, xt, wt, target, student_bias=b, kd_weight=0.0,
                                                  mle_weight=1.0, temperature=2.0, backend=tbackend,
                                                  student_logit_scale=0.9, student_softcap=30.0)
    assert rel_l2(as_mle, ours) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("softcap", [None, 5.0, 30.0])
def test_entropy(sbackend, device, dtype, softcap):
    g = torch.Generator().manual_seed(14)
    x, w, b = hidden_and_weight(11, 32, V, logit_std=25.0, dtype=dtype, device=device, generator=g, bias=True)
    opts = dict(temperature=1.7, logit_scale=0.6, softcap=softcap)
    ours = kidkernels.fused_linear_entropy(x, w, b, backend=sbackend, **opts)
    ref = reference_fused_linear_entropy(x, w, b, **opts)
    assert ours.dtype == torch.float32 and rel_l2(ours, ref) <= 1e-5


def test_argmax_and_selection(sbackend, device):
    """The argmax is that of the raw logits whatever the (increasing) transform, even where a float32 softcap
    saturates two logits to the same value; the selection's entropies take the transform."""
    g = torch.Generator().manual_seed(15)
    x, w, b = hidden_and_weight(11, 32, V, logit_std=3.0, device=device, generator=g, bias=True)
    w[7:9] = 0.0
    b[7], b[8] = 1000.0, 1001.0  # 5 * tanh(200.0) == 5 * tanh(200.2) == 5.0 in float32
    plain = kidkernels.fused_linear_argmax(x, w, b, backend=sbackend)
    assert (plain == 8).all()
    assert torch.equal(kidkernels.fused_linear_argmax(x, w, b, backend=sbackend, logit_scale=0.2, softcap=5.0), plain)
    valid = torch.ones(1, 11, dtype=torch.bool, device=device)
    opts = dict(logit_scale=0.6, softcap=5.0)
    mask = kidkernels.fused_linear_select(x[None], w, valid, 0.4, "hard", b, backend=sbackend, **opts)
    scores = reference_fused_linear_entropy(x, w, b, **opts).float()[None]
    assert torch.equal(mask.cpu(), kidkernels.select_positions(valid, 0.4, "hard", scores=scores.to(device)).cpu())


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                                        (math.nan, ValueError), (True, TypeError), ("2", TypeError)])
def test_bad_scale_or_softcap_is_a_clear_error(bad, error):
    case = make_case(n=3, ignored=())
    x, w = case["student_input"], case["student_weight"]
    target = torch.tensor([1, 2, 3])
    calls = [
        ("student_logit_scale", lambda v: kidkernels.fused_linear_distill_loss(**case, student_logit_scale=v)),
        ("teacher_softcap", lambda v: kidkernels.fused_linear_distill_loss(**case, teacher_softcap=v)),
        ("student_softcap", lambda v: kidkernels.distill_loss(torch.randn(2, 5), torch.randn(2, 5),
                                                              student_softcap=v)),
        ("softcap", lambda v: kidkernels.fused_linear_cross_entropy(x, w, target, softcap=v)),
        ("logit_scale", lambda v: kidkernels.fused_linear_entropy(x, w, logit_scale=v)),
        ("logit_scale", lambda v: kidkernels.fused_linear_argmax(x, w, logit_scale=v)),
        ("teacher_logit_scale", lambda v: kidkernels.FusedLinearDistillLoss(teacher_logit_scale=v)),
    ]
    for name, call in calls:
        with pytest.raises(error, match=name):
            call(bad)


def test_reference_transform_is_the_definition():
    x = torch.tensor([-50.0, -1.0, 0.0, 2.0, 80.0], dtype=torch.float64)
    assert torch.equal(reference_logit_transform(x), x)
    assert torch.allclose(reference_logit_transform(x, logit_scale=2.0, softcap=10.0), 10 * torch.tanh(x / 5),
                          rtol=1e-15, atol=0)
