"""The GEMM-fused gradient kernel (kernels/distill_fused_grad.py, launcher ops/distill_fused_grad.py) under the
Triton interpreter: d(loss)/d(student logits) from hidden states, lm_head and the teacher's float32 tile, against
the float64 reference gradient and against today's row kernel (distill_grad_kernel) on the same statistics.

Statistics come from today's row statistics kernels (``distill_triton.fill_stats``) on the float32 logits torch
forms, as the fused forward leaves them.  Operands are float32 and float16 through the same kernel (the
interpreter's bfloat16 dot is wrong, so bfloat16 goes through ``DOT_FP32``; the bfloat16 tensor-core dot is a GPU
check owed).  Every output starts as a NaN sentinel, so an element the kernels do not write fails the comparison.
"""
import math

import pytest
import torch

from tests.conftest import DEVICE

pytest.importorskip("triton")
if DEVICE != "cpu":  # the shapes and tiles here are the interpreter's
    pytest.skip("interpreter tests", allow_module_level=True)

from kidkernels.ops import distill_triton, fused_tiles, launches  # noqa: E402
from kidkernels.ops.config import NUM_STATS, TOP, DistillConfig  # noqa: E402
from kidkernels.ops.distill_fused_grad import grad_tile_config, write_grad_fused  # noqa: E402
from kidkernels.reference import reference_distill_loss_from_logits  # noqa: E402

IGNORE = -100
# Against the float64 reference: float32, the logits' float32 accumulation (about 1e-6 of their size) carried
# through the softmax (measured: at most 5e-6 of a row's largest element, 2.5e-6 relative L2); float16 and bfloat16,
# the gradient rounded once to the output dtype (half an ulp: 2**-11, 2**-8 relative) on top of that.
REL_L2 = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Largest error of one element, relative to the row's largest gradient element.
ELEMENT = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make_inputs(rows, vocab, hidden, *, dtype=torch.float32, seed=0, spread=4.0, bias=True, teacher=True,
                target=True, ignored=(), row_weight="random"):
    """Hidden states ``[rows, hidden]`` and lm_head ``[vocab, hidden]`` whose logits have about ``spread`` std (rows
    scaled 0.3x to 1.7x), a bias, the teacher's float32 tile (the student's logits plus noise, at a shifted level),
    targets with ``ignored`` rows, and row weights (``"random"`` with a 0 among them, ``"broadcast"`` one value
    at stride 0, or None)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=g) * (0.3 + 1.4 * torch.rand(rows, 1, generator=g))).to(dtype)
    ws = (torch.randn(vocab, hidden, generator=g) * (spread / math.sqrt(hidden))).to(dtype)
    bs = (torch.randn(vocab, generator=g) * 0.5).to(dtype) if bias else None
    t = None
    if teacher:
        s = x.double() @ ws.double().T
        t = (1.3 * s + spread * torch.randn(rows, vocab, generator=g, dtype=torch.float64) + 7.0).float()
    tgt = None
    if target:
        tgt = torch.randint(0, vocab, (rows,), generator=g)
        tgt[list(ignored)] = IGNORE
    w = None
    if row_weight == "random":
        w = torch.rand(rows, generator=g) + 0.5
        if rows > 2:
            w[2] = 0.0
    elif row_weight == "broadcast":
        w = torch.full((1,), 0.37).expand(rows)
    return dict(x=x, ws=ws, bs=bs, teacher=t, target=tgt, row_weight=w)


def student_logits(inp, dtype=torch.float32):
    s = inp["x"].to(dtype) @ inp["ws"].to(dtype).T
    return s + inp["bs"].to(dtype) if inp["bs"] is not None else s


def row_stats(inp, cfg):
    """Complete row statistics of today's statistics kernels on the float32 logits."""
    stats = torch.full((NUM_STATS, inp["x"].shape[0]), math.nan)
    distill_triton.fill_stats(student_logits(inp), inp["teacher"], inp["target"], stats, cfg)
    return stats


def fused_grad(inp, cfg, stats, *, out_dtype=None, grad_out=None):
    rows, vocab = inp["x"].shape[0], inp["ws"].shape[0]
    if grad_out is None:
        grad_out = torch.full((rows, vocab), math.nan, dtype=out_dtype or inp["x"].dtype)
    write_grad_fused(inp["x"], inp["ws"], inp["bs"], inp["teacher"], inp["target"], stats, cfg, inp["row_weight"],
                     grad_out)
    return grad_out


def row_kernel_grad(inp, cfg, stats):
    """Today's path: distill_grad_kernel on the float32 logits, in the input dtype."""
    s = student_logits(inp)
    out = torch.full(s.shape, math.nan, dtype=inp["x"].dtype)
    distill_triton.write_grad(s, inp["teacher"], inp["target"], stats, cfg, inp["row_weight"], out)
    return out


def reference_grad(inp, cfg):
    """float64 autograd gradient of ``sum_i w_i loss_i`` w.r.t. the student logits (0 on ignored rows)."""
    s = student_logits(inp, torch.float64).requires_grad_(True)
    t = inp["teacher"].double() if inp["teacher"] is not None else s.detach()
    rows = reference_distill_loss_from_logits(
        s, t, inp["target"], divergence=cfg.divergence, beta=cfg.beta, temperature=cfg.temperature,
        kd_weight=cfg.kd_weight, mle_weight=cfg.mle_weight, ignore_index=cfg.ignore_index, reduction="none",
        student_logit_scale=cfg.student_logit_scale, student_softcap=cfg.student_softcap,
        teacher_logit_scale=cfg.teacher_logit_scale, teacher_softcap=cfg.teacher_softcap)
    w = inp["row_weight"].double() if inp["row_weight"] is not None else torch.ones_like(rows)
    (grad,) = torch.autograd.grad((rows * w).sum(), [s])
    return grad


def assert_close_grad(actual, expected, dtype):
    """Relative L2 error, and each element against its row's largest element (every element written: no NaN)."""
    assert not actual.isnan().any(), "elements not written"
    a, e = actual.double(), expected.double()
    err = (a - e).abs()
    scale = e.abs().amax(1, keepdim=True).clamp_min(1e-30)
    assert (err / scale).max().item() <= ELEMENT[dtype], (err / scale).max().item()
    denom = e.norm().item()
    assert (err.norm().item() / denom if denom > 0 else err.norm().item()) <= REL_L2[dtype]


def assert_matches_row_kernel(actual, rows_grad, dtype):
    """Against today's row kernel on the same statistics (its logits from cuBLAS-style float32 products, ours from
    the tile product): the float32 logits' error, and in a low-precision output at most one rounding step apart."""
    assert not actual.isnan().any() and not rows_grad.isnan().any()
    a, e = actual.double(), rows_grad.double()
    scale = e.abs().amax(1, keepdim=True)
    rounding = torch.finfo(dtype).eps * torch.maximum(a.abs(), e.abs()) if dtype != torch.float32 else 0.0
    assert ((a - e).abs() <= rounding + ELEMENT[torch.float32] * scale).all()


def config(divergence="rkl", *, beta=0.5, temperature=1.0, kd_weight=1.0, mle_weight=0.0, target=True, **transforms):
    """A loss configuration; ``transforms``: ``student_logit_scale``, ``student_softcap`` and the teacher's."""
    return DistillConfig(divergence, beta, temperature, kd_weight, mle_weight, IGNORE, target, **transforms)


def check(inp, cfg, dtype):
    stats = row_stats(inp, cfg)
    ours = fused_grad(inp, cfg, stats)
    ref = reference_grad(inp, cfg)
    assert_close_grad(ours, ref, dtype)
    assert_matches_row_kernel(ours, row_kernel_grad(inp, cfg, stats), dtype)
    if inp["target"] is not None:
        ignored = inp["target"] == IGNORE
        assert torch.equal(ours[ignored], torch.zeros_like(ours[ignored]))
    return ours, ref, stats


# ----------------------------------------------------------------------------------------- against the reference

CASES = [  # (divergence, beta, temperature, mle_weight)
    ("fkl", 0.5, 2.0, 0.5),
    ("rkl", 0.5, 2.0, 0.5),
    ("jsd", 0.3, 2.0, 0.5),
    ("tvd", 0.5, 2.0, 0.5),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("divergence,beta,temperature,mle_weight", CASES, ids=[c[0] for c in CASES])
def test_matches_reference_and_row_kernel(divergence, beta, temperature, mle_weight, dtype):
    """Every divergence with the MLE term at T = 2 (the CE's own log-sum-exp), biases, ignored rows, random row
    weights with a 0: ragged R = 37 and V = 101 over 3 x 4 tiles, K = 48 (a multiple of BLOCK_K)."""
    inp = make_inputs(37, 101, 48, dtype=dtype, seed=1, ignored=(0, 5, 36))
    check(inp, config(divergence, beta=beta, temperature=temperature, mle_weight=mle_weight), dtype)


@pytest.mark.parametrize("divergence,beta", [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.0), ("jsd", 0.1), ("jsd", 0.9),
                                             ("jsd", 1.0), ("tvd", 0.5)])
def test_every_beta_at_unit_temperature(divergence, beta):
    """T = 1 (the MLE term's softmax is q), K = 45 (ragged K steps), no bias, a stride-0 row weight; JSD at beta 0
    and 1 is forward and reverse KL."""
    inp = make_inputs(21, 70, 45, seed=2, bias=False, ignored=(3,), row_weight="broadcast")
    check(inp, config(divergence, beta=beta, mle_weight=0.7), torch.float32)


@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd"])
def test_no_target_no_mle(divergence):
    """No target at all (every row counts, no MLE term), no row weight, T = 0.7."""
    inp = make_inputs(19, 45, 32, seed=3, target=False, row_weight=None)
    check(inp, config(divergence, beta=0.4, temperature=0.7, target=False), torch.float32)


def test_kd_alone_with_target():
    """A target that only marks ignored rows (mle_weight 0): the MLE term is compiled out."""
    inp = make_inputs(17, 50, 32, seed=4, ignored=(1, 2))
    check(inp, config("rkl", temperature=1.5), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cross_entropy_alone(dtype):
    """No teacher (the teacher pointer is never read): the cross-entropy's gradient, biases, ignored rows, weights."""
    inp = make_inputs(37, 101, 48, dtype=dtype, seed=5, teacher=False, ignored=(4, 30))
    check(inp, DistillConfig.cross_entropy(IGNORE), dtype)
    inp["row_weight"] = torch.full((1,), 2.5).expand(37)
    check(inp, DistillConfig.cross_entropy(IGNORE), dtype)


def test_bfloat16_operands_through_dot_fp32():
    """bfloat16 hidden states and lm_head (upcast for the interpreter's dot), bfloat16 gradient."""
    assert fused_tiles.dot_flags(torch.bfloat16, torch.device("cpu"))["DOT_FP32"]
    inp = make_inputs(37, 101, 48, dtype=torch.bfloat16, seed=6, ignored=(7,))
    check(inp, config("rkl", temperature=2.0, mle_weight=0.5), torch.bfloat16)


def confident_student(seed):
    """``(inputs, hot)``: 6 rows over V = 300 whose student logit at ``hot[i]`` is raised by 35 (its lead over the
    others 11 to 21), a teacher close to the student (noise 0.3), the targets at ``hot``, no row weight."""
    inp = make_inputs(6, 300, 32, seed=seed, spread=2.0, row_weight=None)
    hot = torch.tensor([5, 40, 99, 150, 201, 299])
    w_hot = inp["ws"][hot]
    inp["x"] = inp["x"] + (35.0 / w_hot.pow(2).sum(1))[:, None] * w_hot  # row i's logit at hot[i] up by 35
    noise = torch.randn(6, 300, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    inp["teacher"] = (student_logits(inp).double() + 0.3 * noise).float()
    inp["target"] = hot.clone()
    return inp, hot


def grad_away_from_top(inp, cfg, hot):
    """``(ours, ref, stats, others)``: the fused and the float64 gradients, TOP checked to be ``hot`` and every
    element but TOP (``others``) checked against the reference."""
    stats = row_stats(inp, cfg)
    assert torch.equal(stats[TOP].long(), hot)
    ours = fused_grad(inp, cfg, stats)
    ref = reference_grad(inp, cfg)
    others = torch.ones_like(ref, dtype=torch.bool)
    others[torch.arange(len(hot)), hot] = False
    assert_close_grad(torch.where(others, ours.double(), ref), ref, torch.float32)
    return ours, ref, stats, others


# ---------------------------------------------------------------------------------- logit scale and softcap

# Different scales and caps per model; with logits of spread 6 (the teacher's tile about 1.3x that, 7 above), the
# teacher's cap of 7 saturates much of its tile and the student's cap of 5 bends its tails.
BOTH = dict(student_logit_scale=0.8, student_softcap=5.0, teacher_logit_scale=1.3, teacher_softcap=7.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_logit_transform_matches_reference(dtype):
    """Both models scaled and capped (the student tile from the accumulator, the raw teacher tile as read), RKL + MLE
    at T = 2, biases, ignored rows, random row weights: against float64 and against the row kernel, which applies the
    same transform to the float32 logits (bfloat16 through DOT_FP32)."""
    inp = make_inputs(37, 101, 48, dtype=dtype, seed=20, spread=6.0, ignored=(0, 5, 36))
    check(inp, config("rkl", temperature=2.0, mle_weight=0.5, **BOTH), dtype)


@pytest.mark.parametrize("divergence, transforms", [
    ("fkl", dict(student_softcap=5.0)),
    ("rkl", dict(student_logit_scale=0.4)),  # the top column's factor is the constant scale
    ("fkl", dict(teacher_logit_scale=2.0, teacher_softcap=7.0)),  # the student's tile untouched, its factor 1
    ("ce", dict(student_logit_scale=1.5, student_softcap=5.0)),  # no teacher
], ids=["student-cap", "student-scale", "teacher-only", "ce"])
def test_one_side_at_a_time(divergence, transforms):
    inp = make_inputs(21, 70, 45, seed=21, spread=6.0, ignored=(3,), teacher=divergence != "ce")
    cfg = DistillConfig.cross_entropy(IGNORE, transforms["student_logit_scale"], transforms["student_softcap"]) \
        if divergence == "ce" else config(divergence, temperature=1.5, mle_weight=0.5, **transforms)
    check(inp, cfg, torch.float32)


def test_saturated_softcap():
    """Logits of spread about 100 under caps of 5: most columns at +-5, their factors below 1e-4 and down to 1e-75
    (0 in float32), FKL + MLE; and -inf student bias columns (z = -5, factor 0: gradient exactly 0 there)."""
    inp = make_inputs(19, 90, 32, seed=22, spread=100.0, ignored=(4,))
    inp["bs"][[7, 64]] = -math.inf
    inp["target"] = torch.where(torch.isin(inp["target"], torch.tensor([7, 64])), 8, inp["target"])
    cfg = config("fkl", temperature=1.3, mle_weight=0.5, student_softcap=5.0, teacher_softcap=5.0)
    ours, ref, _ = check(inp, cfg, torch.float32)
    assert torch.equal(ours[:, [7, 64]], torch.zeros(19, 2))
    slope = 1.0 / torch.cosh(student_logits(inp, torch.float64) / 5.0) ** 2
    assert (slope < 1e-4).double().mean() > 0.7 and (slope < 1e-45).any()  # as saturated as claimed


def test_softcap_top_column_factor():
    """A confident student (its largest logit 35 above the others) under a cap of 30: TOP is written as minus the sum
    of the others' gradients with respect to z, times TOP's own factor (about 0.3 against the others' 0.9 to 1).
    It matches the float64 reference as the untransformed TOP does (the logits' float32 error times the others'
    mass, here times the factor); summing the stored gradients (w.r.t. the raw logits) instead is off by 30% to
    130%."""
    inp, hot = confident_student(23)
    rows = torch.arange(6)
    cfg = config("fkl", temperature=1.0, mle_weight=1.0, student_softcap=30.0, teacher_softcap=30.0)
    ours, ref, _, others = grad_away_from_top(inp, cfg, hot)
    s64 = student_logits(inp, torch.float64)
    top_factor = 1.0 / torch.cosh(s64[rows, hot] / 30.0) ** 2
    assert (top_factor < 0.4).all(), top_factor
    z64 = 30.0 * torch.tanh(s64 / 30.0)
    logit_err = (student_logits(inp).double() - s64).abs().amax(1)
    q, p = torch.softmax(z64, 1), torch.softmax(30.0 * torch.tanh(inp["teacher"].double() / 30.0), 1)
    mass = torch.where(others, 2 * q + p, 0.0).sum(1)
    top_err = (ours[rows, hot].double() - ref[rows, hot]).abs()
    assert (top_err <= 4 * logit_err * mass * top_factor).all(), (top_err, logit_err * mass * top_factor)
    assert (top_err <= 1e-4 * ref[rows, hot].abs()).all()
    raw_sum = -torch.where(others, ours.double(), 0.0).sum(1)
    assert ((raw_sum - ref[rows, hot]).abs() > 0.3 * ref[rows, hot].abs()).all()


# ----------------------------------------------------------------------------------------------------- edges

@pytest.mark.parametrize("rows,vocab", [(1, 20), (1, 101), (16, 32), (5, 1)], ids=["R1-V<BN", "R1", "whole", "V1"])
def test_edge_shapes(rows, vocab):
    """One row, a vocabulary smaller than BLOCK_N, exactly one tile, a vocabulary of one column."""
    inp = make_inputs(rows, vocab, 16, seed=7, row_weight=None)
    check(inp, config("rkl", temperature=1.5, mle_weight=0.5), torch.float32)


def test_all_rows_ignored_and_empty_chunk():
    """Every row ignored: the gradient is all 0 and the fix-up writes nothing; zero rows: nothing launched."""
    inp = make_inputs(9, 40, 16, seed=8, ignored=range(9))
    cfg = config("fkl", mle_weight=0.5)
    ours = fused_grad(inp, cfg, row_stats(inp, cfg))
    assert torch.equal(ours, torch.zeros_like(ours))
    empty = make_inputs(0, 40, 16, seed=8, row_weight=None)
    with launches.recording() as recorded:
        assert fused_grad(empty, cfg, torch.zeros(NUM_STATS, 0)).shape == (0, 40)
    assert recorded == []


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's exp/log of -inf under the interpreter
@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd"])
def test_minus_inf_columns(divergence):
    """-inf at the same columns of both models (a -inf student bias, a whole tile of 32 included): exactly 0 there,
    the reference elsewhere; and -inf in the teacher alone where the divergence stays finite (not RKL)."""
    inp = make_inputs(13, 110, 32, seed=9, ignored=(2,))
    masked = torch.zeros(110, dtype=torch.bool)
    masked[32:64] = True
    masked[[3, 77, 109]] = True
    inp["bs"][masked] = -math.inf
    inp["teacher"][:, masked] = -math.inf
    keep = ~masked
    inp["target"] = torch.where(inp["target"] == IGNORE, IGNORE, keep.nonzero()[inp["target"] % keep.sum()].squeeze(1))
    cfg = config(divergence, beta=0.3, temperature=1.5, mle_weight=0.5)
    stats = row_stats(inp, cfg)
    ours = fused_grad(inp, cfg, stats)
    assert torch.equal(ours[:, masked], torch.zeros_like(ours[:, masked]))
    restricted = dict(inp, ws=inp["ws"][keep], bs=inp["bs"][keep], teacher=inp["teacher"][:, keep])
    remap = torch.cumsum(keep.long(), 0) - 1
    restricted["target"] = torch.where(inp["target"] == IGNORE, IGNORE, remap[inp["target"].clamp(min=0)])
    assert_close_grad(ours[:, keep], reference_grad(restricted, cfg), torch.float32)
    assert_matches_row_kernel(ours, row_kernel_grad(inp, cfg, stats), torch.float32)
    if divergence != "rkl":
        teacher_only = make_inputs(13, 110, 32, seed=10, ignored=(2,))
        teacher_only["teacher"][:, masked] = -math.inf
        check(teacher_only, cfg, torch.float32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the ignored row's meaningless values overflow (masked)
@pytest.mark.parametrize("divergence", ["fkl", "rkl", "jsd", "tvd"])
def test_extreme_spreads(divergence):
    """Rows whose logits spread from 0.05 to 60 (std), over 10 vocabulary blocks."""
    inp = make_inputs(8, 300, 32, seed=11, spread=1.0, ignored=(6,))
    inp["x"] = inp["x"] * torch.tensor([0.05, 0.5, 2.0, 8.0, 20.0, 60.0, 1.0, 30.0])[:, None]
    noise = torch.randn(8, 300, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    inp["teacher"] = (student_logits(inp).double() * 1.1 + noise).float()
    check(inp, config(divergence, beta=0.3, temperature=1.3, mle_weight=0.5), torch.float32)


def test_confident_student_top_column():
    """A confident student (its largest logit 11 to 21 above the rest), FKL + MLE with the target at the top: the TOP
    element, written as minus the sum of the others, is within the float32 logits' error of the float64 reference
    (that error times the others' probability mass); the per-element formula (the same kernel told TOP is elsewhere)
    loses it to the rounding of terms close to 1 (q_top - p_top, softmax_top - 1)."""
    inp, hot = confident_student(12)
    rows = torch.arange(6)
    s = student_logits(inp)
    lead = s[rows, hot] - s.scatter(1, hot[:, None], -math.inf).max(1).values
    assert (lead > 10).all(), lead
    cfg = config("fkl", temperature=1.0, mle_weight=1.0)
    ours, ref, stats, others = grad_away_from_top(inp, cfg, hot)
    # The TOP element: the logits' float32 error (per row) times the other columns' mass in its three terms.
    s64 = student_logits(inp, torch.float64)
    logit_err = (s.double() - s64).abs().amax(1)
    q, p = torch.softmax(s64, 1), torch.softmax(inp["teacher"].double(), 1)
    mass = torch.where(others, 2 * q + p, 0.0).sum(1)
    top_err = (ours[rows, hot].double() - ref[rows, hot]).abs()
    assert (top_err <= 4 * logit_err * mass).all(), (top_err, logit_err * mass)
    elsewhere = stats.clone()
    elsewhere[TOP] = ((hot + 1) % 300).float()
    naive = fused_grad(inp, cfg, elsewhere)
    naive_err = (naive[rows, hot].double() - ref[rows, hot]).abs()
    assert (naive_err > 100 * top_err).all(), (naive_err, top_err)


def test_grad_out_aliases_the_teacher_tile():
    """float32: grad_out written over the teacher tile gives the same gradient, element for element."""
    for cfg in (config("rkl", temperature=2.0, mle_weight=0.5), config("tvd", mle_weight=0.5)):
        inp = make_inputs(37, 101, 48, seed=13, ignored=(1, 20))
        stats = row_stats(inp, cfg)
        separate = fused_grad(inp, cfg, stats)
        tile = inp["teacher"].clone()
        fused_grad(dict(inp, teacher=tile), cfg, stats, grad_out=tile)
        assert torch.equal(tile, separate)


def test_dry_run_on_meta_tensors():
    """On meta tensors at the hot shape nothing runs and the two launches are recorded with the GPU tiles, the
    matmul FLOPs and the HBM bytes counted from the loads and stores."""
    rows, vocab, hidden = 423, 151_936, 1_024
    meta = dict(device="meta")
    cfg = config("rkl", mle_weight=0.5)
    grad_out = torch.empty(rows, vocab, dtype=torch.bfloat16, **meta)
    with launches.recording(dry_run=True) as recorded:
        write_grad_fused(torch.empty(rows, hidden, dtype=torch.bfloat16, **meta),
                         torch.empty(vocab, hidden, dtype=torch.bfloat16, **meta), None,
                         torch.empty(rows, vocab, **meta), torch.empty(rows, dtype=torch.int64, **meta),
                         torch.empty(NUM_STATS, rows, **meta), cfg, torch.empty(1, **meta).expand(rows), grad_out)
    tiles = grad_tile_config(torch.device("meta"))
    assert tiles == fused_tiles.LOSS_GRAD
    blocks = math.ceil(vocab / tiles.block_n)
    assert [r.kernel for r in recorded] == ["distill_fused_grad_kernel", "distill_fused_top_kernel"]
    main, top = recorded
    assert main.grid == (math.ceil(rows / tiles.block_m) * blocks,)
    assert main.flops == 2 * rows * vocab * hidden and top.flops == 0
    operands = (rows + vocab) * hidden * 2
    per_row = 7 * 4 + 8  # seven statistics rows, the target
    assert main.hbm_bytes == operands + rows * vocab * (4 + 2) + rows * per_row + 4 + rows * blocks * 4
    assert top.hbm_bytes == rows * blocks * 4 + rows * (4 + 8 + 2)
    assert dict(main.meta)["BLOCK_N"] == tiles.block_n
    assert dict(main.meta)["DOT_FP32"] is False  # the GPU multiplies bfloat16 on the tensor cores
    # Softcaps: the narrower tiles (the epilogue's extra live values), and the top column's factor, 4 B per row,
    # written by the tile kernel and read by the fix-up.
    capped = config("rkl", mle_weight=0.5, student_softcap=30.0, teacher_softcap=30.0)
    with launches.recording(dry_run=True) as recorded:
        write_grad_fused(torch.empty(rows, hidden, dtype=torch.bfloat16, **meta),
                         torch.empty(vocab, hidden, dtype=torch.bfloat16, **meta), None,
                         torch.empty(rows, vocab, **meta), torch.empty(rows, dtype=torch.int64, **meta),
                         torch.empty(NUM_STATS, rows, **meta), capped, torch.empty(1, **meta).expand(rows), grad_out)
    capped_tiles = grad_tile_config(torch.device("meta"), capped)
    assert capped_tiles == fused_tiles.LOSS_GRAD_SOFTCAP and capped_tiles.block_n < tiles.block_n
    capped_blocks = math.ceil(vocab / capped_tiles.block_n)
    main, top = recorded
    assert main.grid == (math.ceil(rows / capped_tiles.block_m) * capped_blocks,)
    assert dict(main.meta)["BLOCK_N"] == capped_tiles.block_n
    assert main.hbm_bytes == (operands + rows * vocab * (4 + 2) + rows * per_row + 4 + rows * capped_blocks * 4
                              + 4 * rows)
    assert top.hbm_bytes == rows * capped_blocks * 4 + rows * (4 + 8 + 2 + 4)
    assert dict(main.meta)["S_HAS_SOFTCAP"] and dict(top.meta)["S_HAS_SOFTCAP"]


def test_bad_layouts_are_refused():
    inp = make_inputs(4, 20, 16, seed=14)
    cfg = config("rkl")
    stats = row_stats(inp, cfg)
    with pytest.raises(ValueError, match="teacher_tile"):
        write_grad_fused(inp["x"], inp["ws"], None, None, inp["target"], stats, cfg, None, torch.empty(4, 20))
    with pytest.raises(ValueError, match="grad_out"):
        write_grad_fused(inp["x"], inp["ws"], None, inp["teacher"], inp["target"], stats, cfg, None,
                         torch.empty(20, 4).T)
    wide = torch.empty(4, 2 ** 31 // 16 + 20, device="meta")[:, :20]  # a row stride beyond the 32-bit tile offsets
    with pytest.raises(ValueError, match="row stride"):
        write_grad_fused(inp["x"].to("meta"), inp["ws"].to("meta"), None, wide, inp["target"].to("meta"),
                         stats.to("meta"), cfg, None, torch.empty(4, 20, device="meta"))
