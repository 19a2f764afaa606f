"""The GEMM-fused loss (backend "triton": kernels/distill_fused_forward.py, distill_fused_merge.py,
ops/distill_fused.py) against the float64 reference and against the cuBLAS + row-kernel path ("triton_rows"), under
the Triton interpreter.

Shapes are small and ragged against the interpreter's tiles (``fused_tiles.INTERPRETER``: 16 x 32 x 16, GROUP_M 2):
N = 21 is two row blocks, the last ragged; V = 203 is seven vocabulary blocks, the last ragged; H_s = 24 is not a
multiple of BLOCK_K, H_t = 32 is.  Tolerances as in test_distill.py: 1e-5 on the loss, 1e-4 on float32 gradients, 1e-2
on float16/bfloat16 ones (relative L2 against float64 on the same, already-rounded inputs).  bfloat16 operands are
upcast for the interpreter's dot (``DOT_FP32``), whose bf16 product is wrong: the bf16 tensor-core product itself is
a GPU check (``test_bf16_tensor_core_dot_on_gpu``).  The gradient of FKL, RKL and the cross-entropy alone is the
GEMM-fused A' kernel (ops/distill_fused_grad.py), that of JSD and TVD the row kernel on the stored tiles.
"""
import math

import pytest
import torch

import kidkernels
from kidkernels.reference import reference_fused_linear_cross_entropy, reference_fused_linear_distill_loss
from tests.conftest import DEVICE
from tests.helpers import TensorRecorder, assert_close, hidden_and_weight, rel_l2

triton = pytest.importorskip("triton")

from kidkernels.ops import distill_fused, fused_tiles, launches  # noqa: E402
from kidkernels.ops.config import NUM_STATS, TOP, DistillConfig  # noqa: E402
from kidkernels.ops.distill import DispatchOptions, linear_distill_chunks  # noqa: E402

# CPU tensors through the Triton interpreter (conftest.py switches it on when no GPU is the test device).
interpreter = pytest.mark.skipif(DEVICE != "cpu", reason="interpreter tests (CPU tensors)")

DIVERGENCES = ["fkl", "rkl", "jsd", "tvd"]
N, H_S, H_T, V = 21, 24, 32, 203
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(autouse=True)
def many_blocks(monkeypatch):
    """The dispatch widens the interpreter's tiles to at most 4 vocabulary blocks per call and merges 4 per step (fast
    for the other test files); here up to 8 blocks (V = 203: seven of 32 columns) are merged 2 per step, so that every
    call merges several blocks over several steps."""
    monkeypatch.setattr(distill_fused, "INTERPRETER_MAX_VOCAB_BLOCKS", 8)
    monkeypatch.setattr(distill_fused, "MERGE_INTERPRETER", distill_fused.MergeConfig(8, 2, 4))


def make_case(*, n=N, vocab=V, h_s=H_S, h_t=H_T, dtype=torch.float32, logit_std=3.0, bias=True, ignored=(2, 9),
              seed=0):
    g = torch.Generator().manual_seed(seed)
    xs, ws, bs = hidden_and_weight(n, h_s, vocab, logit_std=logit_std, dtype=dtype, generator=g, bias=bias)
    xt, wt, bt = hidden_and_weight(n, h_t, vocab, logit_std=logit_std * 1.2, dtype=dtype, generator=g, bias=bias)
    target = torch.randint(0, vocab, (n,), generator=g)
    for i in ignored:
        if i < n:
            target[i] = -100
    return dict(student_input=xs, student_weight=ws, teacher_input=xt, teacher_weight=wt, target=target,
                student_bias=bs, teacher_bias=bt)


def student_params(case):
    return [case[k] for k in ("student_input", "student_weight", "student_bias") if case[k] is not None]


def loss_and_grads(case, upstream=None, **options):
    """Loss and student gradients from a fresh copy of the case's student tensors."""
    case = dict(case, **{k: case[k].detach().clone().requires_grad_(True) for k in
                         ("student_input", "student_weight", "student_bias") if case[k] is not None})
    if options.get("backend") == "reference":
        options = {k: v for k, v in options.items() if k not in ("backend", "workspace_bytes")}
        loss = reference_fused_linear_distill_loss(**case, **options)
    else:
        loss = kidkernels.fused_linear_distill_loss(**case, **options)
    up = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    return loss, torch.autograd.grad(loss, student_params(case), up)


def check(case, tol, upstream=None, *, rows=False, **options):
    """``backend="triton"`` within the tolerances of the float64 reference, and with ``rows`` of "triton_rows" (the
    cuBLAS + row-kernel path, float32 as well)."""
    ours, ours_grads = loss_and_grads(case, upstream, backend="triton", **options)
    ref, ref_grads = loss_and_grads(case, upstream, backend="reference", **options)
    assert_close(ours, ref, ours_grads, ref_grads, tol)
    if rows:
        other, other_grads = loss_and_grads(case, upstream, backend="triton_rows", **options)
        assert_close(ours, other.double(), ours_grads, [g.double() for g in other_grads], tol)
    return ours, ours_grads


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_divergence(divergence, dtype):
    """Temperature (the MLE term's own log-sum-exp), biases, ignored rows, H_s != H_t, ragged tiles; input dtype in,
    input dtype out."""
    case = make_case(dtype=dtype, seed=1)
    _, grads = check(case, GRAD_TOL[dtype], rows=True, divergence=divergence, beta=0.3, temperature=1.5,
                     mle_weight=0.6)
    assert [g.dtype for g in grads] == [dtype] * 3


# Different scales and caps per model (logits of spread 6 and 7: the caps of 5 and 7 bend most of them).
TRANSFORMS = dict(student_logit_scale=0.8, student_softcap=5.0, teacher_logit_scale=1.3, teacher_softcap=7.0)


@interpreter
@pytest.mark.parametrize("dtype, divergence", [(torch.float32, d) for d in DIVERGENCES]
                         + [(torch.float16, "rkl"), (torch.bfloat16, "jsd")],
                         ids=lambda v: DTYPE_IDS.get(v, v))
def test_logit_scale_and_softcap(divergence, dtype):
    """Each model's scale and softcap in the fused forward's epilogue (partial states, the target's logit), the A'
    gradient and the row passes over the stored (raw) tiles; TOP from the raw logits; a -inf student bias column
    inside the vocabulary (``-softcap`` after the cap) and the ragged last block (masked after the cap): against
    float64 and "triton_rows"."""
    case = make_case(dtype=dtype, seed=21, logit_std=6.0)
    case["student_bias"][[3, 100]] = -math.inf
    case["target"][case["target"] == 3] = 4
    case["target"][case["target"] == 100] = 101
    check(case, GRAD_TOL[dtype], rows=True, divergence=divergence, beta=0.3, temperature=1.5, mle_weight=0.6,
          **TRANSFORMS)


@interpreter
def test_saturated_softcap_and_one_side():
    """FKL + MLE: logits of spread 100 under caps of 5 (factors down to 0 in float32); the student's cap alone (T = 2);
    the teacher's scale alone."""
    divergence = "fkl"
    wide = make_case(seed=22, logit_std=100.0, bias=False)
    check(wide, 1e-4, divergence=divergence, beta=0.4, mle_weight=0.5, student_softcap=5.0, teacher_softcap=5.0)
    case = make_case(seed=23, logit_std=20.0)
    check(case, 1e-4, divergence=divergence, mle_weight=0.5, temperature=2.0, student_softcap=30.0)
    check(case, 1e-4, divergence=divergence, mle_weight=0.5, teacher_logit_scale=1.7)


@interpreter
def test_cross_entropy_with_scale_and_softcap():
    g = torch.Generator().manual_seed(24)
    x, w, b = hidden_and_weight(N, H_S, V, logit_std=20.0, generator=g, bias=True)
    target = torch.randint(0, V, (N,), generator=g)
    target[5] = -100
    params = [t.requires_grad_(True) for t in (x, w, b)]
    opts = dict(logit_scale=0.9, softcap=30.0)
    ours = kidkernels.fused_linear_cross_entropy(x, w, target, bias=b, backend="triton", **opts)
    ref = reference_fused_linear_cross_entropy(x, w, target, bias=b, **opts)
    assert_close(ours, ref, torch.autograd.grad(ours, params), torch.autograd.grad(ref, params), 1e-4)


@interpreter
def test_divergence_alone():
    """JSD at beta 0.5 without the MLE term; TVD without a target (every row counts).  (The ends of beta, FKL and
    RKL exactly, are test_distill.py's, which runs this path too.)"""
    case = make_case(seed=2, bias=False)
    check(case, 1e-4, divergence="jsd", beta=0.5)
    check(dict(case, target=None), 1e-4, divergence="tvd")


@interpreter
def test_reductions_and_normalizer():
    """"none" (its backward recomputes the forward, with each row's upstream gradient), "sum", and "mean" over a
    normaliser tensor."""
    case = make_case(seed=3)
    up = torch.randn(N, generator=torch.Generator().manual_seed(4))
    rows, _ = check(case, 1e-4, upstream=up, divergence="rkl", mle_weight=1.0, reduction="none")
    assert rows.shape == (N,) and (rows[case["target"] == -100] == 0).all()
    check(case, 1e-4, divergence="fkl", mle_weight=1.0, reduction="sum")
    check(case, 1e-4, divergence="tvd", mle_weight=1.0, normalizer=torch.tensor(31.0))


@interpreter
@pytest.mark.parametrize("n, vocab", [(1, 5), (3, 32), (17, 33), (0, 40)],
                         ids=["N=1,V<BLOCK_N", "V=BLOCK_N", "V=BLOCK_N+1", "N=0"])
def test_ragged_edges(n, vocab):
    """A vocabulary smaller than one block, exactly one block, one column more; one row; no row at all."""
    case = make_case(n=n, vocab=vocab, ignored=(1,), seed=5)
    for divergence in ("rkl", "jsd"):
        if n == 0:
            loss, grads = loss_and_grads(case, backend="triton", divergence=divergence, mle_weight=0.5)
            assert loss.item() == 0.0 and grads[0].shape == (0, H_S)
            assert all(torch.equal(g, torch.zeros_like(g)) for g in grads[1:])
            continue
        check(case, 1e-4, divergence=divergence, mle_weight=0.5, temperature=0.7)


def forward_launches(fn):
    """The launches of the fused forward while ``fn`` runs (its grids, one per chunk)."""
    with launches.recording() as recorded:
        fn()
    return [r for r in recorded if r.kernel == "distill_fused_forward_kernel"]


@interpreter
def test_several_chunks():
    """Row chunks of whole row blocks (N = 37: 16 + 16 + 5 rows) and of one row each: each chunk's states merge on
    their own, the weight and bias gradients accumulate across chunks."""
    case = make_case(n=37, seed=6)
    tiles, _ = distill_fused.geometry(torch.device("cpu"), 37, V)
    num_blocks = triton.cdiv(V, tiles.block_n)
    assert (tiles.block_m, num_blocks) == (16, 7)
    for divergence, per_element in (("rkl", 4), ("jsd", 8)):  # float32: the gradient overwrites a tile
        budget = 16 * (V * per_element + distill_fused.NUM_PARTIALS * 4 * num_blocks) + 100  # 16 rows, not 17
        recorded = forward_launches(lambda: check(
            case, 1e-4, divergence=divergence, mle_weight=0.5, temperature=1.3, workspace_bytes=budget))
        assert [r.grid for r in recorded] == [(num_blocks,), (num_blocks,), (num_blocks,)]
    small = make_case(n=5, seed=7)
    recorded = forward_launches(lambda: check(small, 1e-4, divergence="tvd", mle_weight=0.5, workspace_bytes=1))
    assert len(recorded) == 5


@interpreter
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's exp/log of -inf lanes under the interpreter
def test_masked_columns():
    """-inf bias entries: at the same columns of both heads (a whole vocabulary block, scattered columns, the last
    column) the loss is that of the vocabulary without them and their gradient is exactly 0; in one model only, the
    divergence stays finite where the weighting model has no mass there, and is +inf (not NaN) where it does."""
    case = make_case(seed=8)
    masked = torch.zeros(V, dtype=torch.bool)
    masked[32:64] = True  # the whole of the second block
    masked[[3, 100, 101, 150, V - 1]] = True
    keep = (~masked).nonzero().squeeze(1)
    remap = torch.full((V,), -100, dtype=torch.int64)
    remap[keep] = torch.arange(keep.numel())
    target = torch.where(case["target"] == -100, -100, keep[torch.arange(N) * 7 % keep.numel()])
    both = dict(case, target=target, student_bias=case["student_bias"].masked_fill(masked, -math.inf),
                teacher_bias=case["teacher_bias"].masked_fill(masked, -math.inf))
    restricted = dict(case, student_weight=case["student_weight"][keep], teacher_weight=case["teacher_weight"][keep],
                      student_bias=case["student_bias"][keep], teacher_bias=case["teacher_bias"][keep],
                      target=torch.where(target == -100, -100, remap[target.clamp(min=0)]))
    for divergence in DIVERGENCES:
        ours, (gx, gw, gb) = loss_and_grads(both, backend="triton", divergence=divergence, mle_weight=0.5)
        ref, (rx, rw, rb) = loss_and_grads(restricted, backend="reference", divergence=divergence, mle_weight=0.5)
        assert rel_l2(ours, ref) <= 1e-5
        assert rel_l2(gx, rx) <= 1e-4 and rel_l2(gw[keep], rw) <= 1e-4 and rel_l2(gb[keep], rb) <= 1e-4
        assert torch.equal(gw[masked], torch.zeros_like(gw[masked]))
        assert torch.equal(gb[masked], torch.zeros_like(gb[masked]))
    for side, divergence in (("student", "rkl"), ("teacher", "jsd")):
        one = dict(case, **{f"{side}_bias": case[f"{side}_bias"].masked_fill(masked, -math.inf)})
        check(one, 1e-4, divergence=divergence, beta=0.3)
    one = dict(case, student_bias=case["student_bias"].masked_fill(masked, -math.inf))
    rows = kidkernels.fused_linear_distill_loss(**one, divergence="fkl", reduction="none", backend="triton")
    counted = case["target"] != -100
    assert torch.isinf(rows[counted]).all() and (rows[counted] > 0).all() and (rows[~counted] == 0).all()


@interpreter
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_spread_across_blocks(divergence):
    """Logits of std 20, and each model's mass in a different vocabulary block, more than 103 above the rest (the
    merge's rescale of the other blocks underflows to 0 in float32); N = 37 in one chunk: three row blocks, a full
    GROUP_M group of two and a ragged one."""
    case = make_case(n=37, seed=9, logit_std=20.0)
    case["student_bias"] = case["student_bias"].clone()
    case["teacher_bias"] = case["teacher_bias"].clone()
    case["student_bias"][64:96] += 110.0
    case["teacher_bias"][0:32] += 110.0
    check(case, 1e-4, divergence=divergence, mle_weight=0.5, beta=0.3)


def dispatch_stats(case, cfg, backend, *, grad=False, row_weight=None, **chunk_options):
    """``(stats, dx, dw, db)`` of the dispatch layer, all rows."""
    has_teacher = cfg.has_teacher
    out = linear_distill_chunks(
        case["student_input"], case["student_weight"], case["student_bias"],
        case["teacher_input"] if has_teacher else None, case["teacher_weight"] if has_teacher else None,
        case["teacher_bias"] if has_teacher else None, case["target"], cfg,
        DispatchOptions("mean", backend, chunk_options.get("workspace_bytes", 1 << 30)),
        grad_input=grad, grad_weight=grad, grad_bias=grad, row_weight=row_weight)
    return out


@interpreter
def test_ties_in_the_top_column():
    """The student's largest logit tied between two columns of one block and a third in a later block (identical
    weight rows and biases): TOP is the lowest of them, as in the row kernel, and the gradient (written there as
    minus the sum of the row's other elements) stays exact."""
    case = make_case(seed=10)
    ws, bs = case["student_weight"].clone(), case["student_bias"].clone()
    for column in (6, 70):
        ws[column], bs[column] = ws[5], bs[5]
    bs[[5, 6, 70]] += 30.0
    case = dict(case, student_weight=ws, student_bias=bs)
    cfg = DistillConfig("rkl", 0.5, 1.0, 1.0, 0.5, -100, True)
    stats = dispatch_stats(case, cfg, "triton")[0]
    rows_stats = dispatch_stats(case, cfg, "triton_rows")[0]
    counted = case["target"] != -100
    assert stats[TOP, counted].tolist() == [5.0] * int(counted.sum())
    assert torch.equal(stats[TOP], rows_stats[TOP])
    check(case, 1e-4, divergence="rkl", mle_weight=0.5)


@interpreter
@pytest.mark.parametrize("divergence", DIVERGENCES + ["ce"])
def test_every_output_written(divergence):
    """From NaN-filled statistics and dx, the fused dispatch writes every statistic of every row (the cross-entropy
    alone: all but the teacher's) and every element of dx, as the row kernels do: the same statistics (TOP exactly),
    dx, dw and db; a target outside the vocabulary (which validation stops before any kernel) gives a NaN CE."""
    from kidkernels.ops.config import CE, LOGZ_TEACHER, MAX_TEACHER

    case = make_case(seed=11)
    cfg = DistillConfig.cross_entropy(-100) if divergence == "ce" else \
        DistillConfig(divergence, 0.3, 1.5, 1.0, 0.5, -100, True)
    teacher = [case[k] if cfg.has_teacher else None for k in ("teacher_input", "teacher_weight", "teacher_bias")]
    row_weight = torch.linspace(0.5, 1.5, N)
    stats = torch.full((NUM_STATS, N), math.nan)
    dx = torch.full((N, H_S), math.nan)
    dw, db = torch.zeros(V, H_S), torch.zeros(V)
    distill_fused.fused_distill_chunks(case["student_input"], case["student_weight"], case["student_bias"], *teacher,
                                       case["target"], cfg, 1 << 30, stats, dx=dx, dw=dw, db=db,
                                       row_weight=row_weight)
    want = dispatch_stats(case, cfg, "triton_rows", grad=True, row_weight=row_weight)
    if not cfg.has_teacher:
        stats[[MAX_TEACHER, LOGZ_TEACHER]] = want[0][[MAX_TEACHER, LOGZ_TEACHER]] = 0.0
    assert torch.isfinite(stats).all() and torch.isfinite(dx).all()
    assert torch.equal(stats[TOP], want[0][TOP])
    assert torch.allclose(stats, want[0], rtol=1e-5, atol=1e-6)
    for got, ref in zip((dx, dw, db), want[1:]):
        assert rel_l2(got, ref) <= 1e-5
    bad = dict(case, target=case["target"].clone())
    bad["target"][4] = V + 3
    stats = torch.full((NUM_STATS, N), math.nan)
    distill_fused.fused_distill_chunks(bad["student_input"], bad["student_weight"], bad["student_bias"], *teacher,
                                       bad["target"], cfg, 1 << 30, stats)
    assert math.isnan(stats[CE, 4]) and torch.isfinite(stats[CE, [i for i in range(N) if i != 4]]).all()


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_cross_entropy(dtype):
    """The cross-entropy alone takes the fused path with one accumulator and no teacher tile: against float64 and
    "triton_rows", bias, ignored rows, ragged tiles; "none" with its recomputing backward."""
    g = torch.Generator().manual_seed(12)
    x, w, b = hidden_and_weight(N, H_S, V, logit_std=3.0, dtype=dtype, generator=g, bias=True)
    target = torch.randint(0, V, (N,), generator=g)
    target[[0, 11]] = -100
    up = torch.randn(N, generator=g)
    reductions = ("mean", "none") if dtype == torch.float32 else ("mean",)
    for reduction in reductions:
        results = []
        for backend in ("triton", "reference", "triton_rows"):
            params = [t.clone().requires_grad_(True) for t in (x, w, b)]
            fn = reference_fused_linear_cross_entropy if backend == "reference" else \
                lambda *a, **k: kidkernels.fused_linear_cross_entropy(*a, backend=backend, **k)
            loss = fn(params[0], params[1], target, bias=params[2], reduction=reduction)
            upstream = up.to(loss.dtype) if reduction == "none" else torch.ones_like(loss)
            results.append((loss, torch.autograd.grad(loss, params, upstream)))
        (ours, ours_grads), (ref, ref_grads), (rows, rows_grads) = results
        assert_close(ours, ref, ours_grads, ref_grads, GRAD_TOL[dtype])
        assert_close(ours, rows.double(), ours_grads, [g.double() for g in rows_grads], GRAD_TOL[dtype])
        assert [g.dtype for g in ours_grads] == [dtype] * 3


@interpreter
@pytest.mark.parametrize("divergence", ["rkl", "ce"])
def test_no_tile_without_gradient(divergence):
    """Evaluation (no gradient) of FKL/RKL and the cross-entropy alone stores no tile at all: the largest tensor the
    call allocates is the partial states, well below one [rows, V] float32 chunk."""
    case = make_case(n=40, vocab=512, seed=13)
    tiles, _ = distill_fused.geometry(torch.device("cpu"), 40, 512)
    num_blocks = triton.cdiv(512, tiles.block_n)
    with torch.no_grad(), TensorRecorder() as rec:
        if divergence == "ce":
            kidkernels.fused_linear_cross_entropy(case["student_input"], case["student_weight"], case["target"],
                                                  bias=case["student_bias"], backend="triton")
        else:
            kidkernels.fused_linear_distill_loss(**case, divergence=divergence, mle_weight=0.5, backend="triton")
    assert rec.max_bytes == distill_fused.NUM_PARTIALS * num_blocks * 40 * 4 < 40 * 512 * 4


def test_chunk_rows():
    """Rows per chunk: per row V x (4 B per tile + the gradient unless it overwrites a float32 tile) + the partial
    states; a multiple of BLOCK_M where one fits; at least 1; at most N."""
    vocab, blocks = 151_936, 1_187
    per_row = lambda per_element: vocab * per_element + distill_fused.NUM_PARTIALS * 4 * blocks  # noqa: E731
    rows = distill_fused.fused_chunk_rows
    budget = 512 << 20
    assert rows(10 ** 6, vocab, torch.bfloat16, budget, tiles=1, grad_buffer=True, num_blocks=blocks,
                block_m=128) == (budget // per_row(6)) // 128 * 128 == 512
    assert rows(10 ** 6, vocab, torch.float32, budget, tiles=1, grad_buffer=True, num_blocks=blocks,
                block_m=128) == (budget // per_row(4)) // 128 * 128
    assert rows(10 ** 6, vocab, torch.float32, budget, tiles=0, grad_buffer=True, num_blocks=blocks,
                block_m=128) == (budget // per_row(4)) // 128 * 128
    assert rows(10 ** 6, vocab, torch.bfloat16, budget, tiles=2, grad_buffer=True, num_blocks=blocks,
                block_m=128) == (budget // per_row(10)) // 128 * 128
    assert rows(10 ** 6, vocab, torch.bfloat16, 100 * per_row(6), tiles=1, grad_buffer=True, num_blocks=blocks,
                block_m=128) == 100  # fewer than BLOCK_M fit: as many as fit
    assert rows(10 ** 6, vocab, torch.bfloat16, 1, tiles=1, grad_buffer=True, num_blocks=blocks, block_m=128) == 1
    assert rows(7, vocab, torch.bfloat16, budget, tiles=0, grad_buffer=False, num_blocks=blocks, block_m=128) == 7


@pytest.mark.parametrize("divergence", ["rkl", "ce"])
def test_dry_run_on_meta_tensors(divergence):
    """The dispatch runs on meta tensors in a dry run (no value read, nothing launched), recording the GPU's launches
    with their costs: at the paper shape, bf16, 2 chunks of 512 rows and one of 24 at the default 512 MiB."""
    n, h_s, h_t, vocab = 1048, 1024, 4096, 151_936
    meta = dict(device="meta", dtype=torch.bfloat16)
    xs, ws = torch.empty(n, h_s, **meta), torch.empty(vocab, h_s, **meta)
    xt, wt = torch.empty(n, h_t, **meta), torch.empty(vocab, h_t, **meta)
    target = torch.empty(n, device="meta", dtype=torch.int64)
    cfg = DistillConfig.cross_entropy(-100) if divergence == "ce" else DistillConfig("rkl", 0.5, 1.0, 1.0, 0.5, -100,
                                                                                     True)
    if divergence == "ce":
        xt = wt = None
    stats = torch.empty(NUM_STATS, n, device="meta")
    with launches.recording(dry_run=True) as recorded:
        distill_fused.fused_distill_chunks(xs, ws, None, xt, wt, None, target, cfg, 512 << 20, stats,
                                           dx=torch.empty_like(xs), dw=torch.zeros(vocab, h_s, device="meta"),
                                           row_weight=torch.empty(n, device="meta"))
    forward = [r for r in recorded if r.kernel == "distill_fused_forward_kernel"]
    merge = [r for r in recorded if r.kernel == "distill_fused_merge_kernel"]
    blocks = triton.cdiv(vocab, fused_tiles.LOSS_FORWARD.block_n)
    chunks = [512, 512, 24] if divergence == "rkl" else [n]
    assert [r.grid for r in forward] == [(triton.cdiv(rows, 128) * blocks,) for rows in chunks]
    hidden = h_s + (h_t if divergence == "rkl" else 0)
    assert [r.flops for r in forward] == [2 * rows * vocab * hidden for rows in chunks]
    assert all(r.hbm_bytes >= vocab * hidden * 2 for r in forward)  # at least the weights
    assert len(merge) == len(chunks) and all(r.flops == 0 and r.hbm_bytes > 0 for r in merge)
    assert dict(forward[0].meta)["BLOCK_M"] == 128 and dict(forward[0].meta)["STORE_TEACHER"] == (divergence == "rkl")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU check owed: the bf16 tensor-core tl.dot (the "
                    "interpreter's bf16 dot is wrong, so CPU runs upcast bf16 operands)")
def test_bf16_tensor_core_dot_on_gpu():  # pragma: no cover - needs a GPU
    for divergence in DIVERGENCES:
        case = {k: (v.cuda() if v is not None else None) for k, v in make_case(dtype=torch.bfloat16, seed=14).items()}
        check(case, 1e-2, rows=True, divergence=divergence, mle_weight=0.5, temperature=1.5)
