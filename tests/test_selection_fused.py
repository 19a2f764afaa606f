"""The GEMM-fused selection kernels (backend "triton": kernels/select_tiles.py, kernels/select_merge.py,
ops/selection_fused.py) under the Triton interpreter, against the float64 reference.

The interpreter's tiles are 16 x 32 x 16 (``fused_tiles.INTERPRETER``), so V = 101 is four vocabulary blocks with a
ragged last one, V = 17 is less than one block, N = 37 three row blocks with a ragged last one (and a ragged GROUP_M
group), and H = 24 is not a multiple of BLOCK_K.  The merge reduces 8 blocks per loop step, so V = 300 (10 blocks)
takes two steps.  float32 and float16 operands go through the kernels as on a GPU; bfloat16 operands are upcast
before the dot (``DOT_FP32``: the interpreter's bf16 ``tl.dot`` multiplies raw bit patterns), so the bf16
tensor-core product itself is a check owed to a GPU (``KIDKERNELS_TEST_DEVICE=cuda`` runs this file there).

Every output is pre-filled with a sentinel and every buffer the dispatch allocates is poisoned (NaN, -7), so an
element no kernel wrote, or a partial state read before it was stored, fails the comparison.
"""
import math

import pytest
import torch

from kidkernels.ops import fused_tiles, launches, selection_fused
from kidkernels.ops.config import IDENTITY, LogitTransform
from kidkernels.ops.selection import linear_row_statistic
from kidkernels.reference import reference_fused_linear_entropy, reference_linear_logits
from tests.conftest import DEVICE
from tests.helpers import TensorRecorder, rel_l2
from tests.test_entropy_argmax import assert_argmax_ok, poisoned_empty

pytest.importorskip("triton")
pytestmark = pytest.mark.filterwarnings(
    # The interpreter evaluates finish_entropy on the masked lanes past the last row too (log 0, 0 / 0): never stored.
    "ignore:divide by zero encountered in log:RuntimeWarning",
    "ignore:invalid value encountered in divide:RuntimeWarning",
    # exp of the wrapped-around garbage columns of a ragged tile, masked out afterwards; tl.max of a row of NaN.
    "ignore:overflow encountered in exp:RuntimeWarning",
    "ignore:All-NaN slice encountered:RuntimeWarning",
)

ENTROPY_TOL = 1e-5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
SENTINEL = {"entropy": math.nan, "argmax": -7}
DEFAULT_BUDGET = 512 << 20


def inputs(n, hidden, vocab, *, dtype=torch.float32, row_scales=(0.5, 1.0, 2.0), logit_std=3.0, bias=True, seed=0):
    """x ``[n, hidden]``, w ``[vocab, hidden]`` (logits of spread about ``logit_std`` times a row scale cycling
    through ``row_scales``), bias ``[vocab]`` float32 or None; rounded to ``dtype`` on the test device."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor(row_scales).repeat(n // len(row_scales) + 1)[:n, None]
    x = torch.randn(n, hidden, generator=g) * scales
    w = torch.randn(vocab, hidden, generator=g) * (logit_std / math.sqrt(hidden))
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    return x.to(DEVICE, dtype), w.to(DEVICE, dtype), (b.to(DEVICE) if b is not None else None)


def fused(statistic, x, w, b=None, *, temperature=1.0, workspace_bytes=DEFAULT_BUDGET, monkeypatch=None,
          transform=IDENTITY):
    """``selection_fused.fill_row_statistic`` into an output pre-filled with the sentinel, every allocation inside
    poisoned (when ``monkeypatch`` is given)."""
    dtype = torch.float32 if statistic == "entropy" else torch.int64
    out = torch.full((x.shape[0],), SENTINEL[statistic], dtype=dtype, device=x.device)
    args = (x, w, b, statistic, 1.0 / temperature, out, workspace_bytes, transform)
    if monkeypatch is None:
        selection_fused.fill_row_statistic(*args)
    else:
        with poisoned_empty(monkeypatch):
            selection_fused.fill_row_statistic(*args)
    return out


def budget_for_rows(rows, vocab, statistic):
    """A workspace that holds the partial states of ``rows`` rows."""
    blocks = math.ceil(vocab / fused_tiles.tile_config(fused_tiles.SELECTION, torch.device(DEVICE)).block_n)
    return rows * blocks * selection_fused.STATE_BYTES[statistic]


def check_entropy(ours, x, w, b, temperature=1.0, transform=IDENTITY):
    ref = reference_fused_linear_entropy(x, w, b, temperature=temperature, logit_scale=transform.scale,
                                         softcap=transform.softcap)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert rel_l2(ours, ref) <= ENTROPY_TOL, rel_l2(ours, ref)
    assert (ours >= 0).all()


# ------------------------------------------------------------------------------------------------ accuracy

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("n, hidden, vocab", [(37, 24, 101), (16, 32, 96), (1, 24, 17), (5, 8, 1)])
def test_ragged_shapes_match_reference(monkeypatch, dtype, n, hidden, vocab):
    """Ragged N and V (V < BLOCK_N, V = 1, N = 1), K a multiple of BLOCK_K or not, bias and temperature: every row
    within float32 accumulation error of float64, the argmax equal to float64's (up to float32 near-ties)."""
    x, w, b = inputs(n, hidden, vocab, dtype=dtype, seed=n + vocab)
    entropy = fused("entropy", x, w, b, temperature=1.7, monkeypatch=monkeypatch)
    check_entropy(entropy, x, w, b, temperature=1.7)
    if vocab == 1:
        assert entropy.eq(0).all()
    argmax = fused("argmax", x, w, b, monkeypatch=monkeypatch)
    assert_argmax_ok(argmax, x, w, b)


@pytest.mark.parametrize("chunk_rows", [16, 5])
def test_many_vocabulary_blocks_and_row_chunks(monkeypatch, chunk_rows):
    """V = 300 (10 blocks, two merge steps) and N = 21 over chunks of 16 rows (whole row blocks) and of 5 (partial row
    blocks, wrapped-around rows), no bias: the same results as in one chunk."""
    n, hidden, vocab = 21, 16, 300
    x, w, _ = inputs(n, hidden, vocab, seed=3)
    entropy_budget = budget_for_rows(chunk_rows, vocab, "entropy")
    cfg = fused_tiles.tile_config(fused_tiles.SELECTION, x.device)
    assert selection_fused.partial_chunk_rows(n, math.ceil(vocab / cfg.block_n), "entropy", entropy_budget,
                                              cfg.block_m) == chunk_rows or cfg.block_m > 16
    with launches.recording() as records:
        entropy = fused("entropy", x, w, temperature=0.8, workspace_bytes=entropy_budget, monkeypatch=monkeypatch)
    assert len(records) == 2 * math.ceil(n / chunk_rows)
    check_entropy(entropy, x, w, None, temperature=0.8)
    argmax = fused("argmax", x, w, workspace_bytes=budget_for_rows(chunk_rows, vocab, "argmax"),
                   monkeypatch=monkeypatch)
    assert_argmax_ok(argmax, x, w, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_extreme_spreads(dtype):
    """Rows whose logits spread from 0.001 (nearly uniform: entropy log V) to 400 (one-hot: entropy ~0)."""
    n, hidden, vocab = 12, 32, 203
    x, w, b = inputs(n, hidden, vocab, dtype=dtype, row_scales=(1e-3, 0.3, 3.0, 30.0, 100.0, 130.0), bias=False,
                     seed=4)
    entropy = fused("entropy", x, w, b)
    ref = reference_fused_linear_entropy(x, w, b)
    assert torch.isfinite(entropy).all() and (entropy >= 0).all()
    assert (entropy.double().cpu() - ref.cpu()).abs().max() <= 1e-5 * math.log(vocab)
    assert ref[0] > 0.99 * math.log(vocab) and ref[5] < 1e-3  # the rows are what they claim
    assert_argmax_ok(fused("argmax", x, w, b), x, w, b)


def test_infinite_columns_including_a_whole_block(monkeypatch):
    """A -inf bias (masked vocabulary entries) over the whole first block, the whole third block, scattered columns
    and the ragged tail's columns: probability 0, nothing else changes; a vocabulary that is -inf but for one column
    has entropy 0 and that argmax; an all -inf vocabulary gives NaN entropy and argmax 0, as torch does."""
    n, hidden, vocab = 20, 16, 150
    x, w, b = inputs(n, hidden, vocab, seed=5)
    b[:32] = -math.inf
    b[64:96] = -math.inf
    b[[100, 101, 140, 149]] = -math.inf
    check_entropy(fused("entropy", x, w, b, temperature=1.3, monkeypatch=monkeypatch), x, w, b, temperature=1.3)
    assert torch.equal(fused("argmax", x, w, b, monkeypatch=monkeypatch).cpu(),
                       reference_linear_logits(x, w, b).argmax(-1).cpu())
    one = torch.full_like(b, -math.inf)
    one[77] = 0.0
    assert fused("entropy", x, w, one).eq(0).all()
    assert fused("argmax", x, w, one).eq(77).all()
    none = torch.full_like(b, -math.inf)
    assert fused("entropy", x, w, none).isnan().all()
    assert fused("argmax", x, w, none).eq(0).all()
    assert torch.argmax(reference_linear_logits(x, w, none), -1).eq(0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_exact_ties_go_to_lowest_index(dtype):
    """Integer-valued operands make every logit exact whatever the summation order: ties within a block, across
    blocks (a duplicated weight row three blocks on) and across merge steps must go to the lowest column; a row of
    equal logits has argmax 0 and entropy log V."""
    g = torch.Generator().manual_seed(6)
    n, hidden, vocab = 18, 8, 400
    x = torch.randint(0, 2, (n, hidden), generator=g).float()
    w = torch.randint(0, 2, (vocab, hidden), generator=g).float()
    w[5] = w[2] = 4.0  # maximal for every row with a one: column 2, tied with 5 in block 0
    w[300] = 4.0  # tied again in block 9 (second merge step)
    x[1] = 0.0  # all logits 0
    x[2, :] = 0.0
    x[2, 0] = 1.0
    w[[3, 200]] = 0.0
    w[[3, 200], 0] = 9.0  # row 2's maximum: column 3, tied with 200 (block 6)
    x, w = x.to(DEVICE, dtype), w.to(DEVICE, dtype)
    logits = reference_linear_logits(x, w)
    assert ((logits == logits.amax(-1, keepdim=True)).sum(-1) > 1).all(), "every row must hold a tie"
    argmax = fused("argmax", x, w)
    assert torch.equal(argmax.cpu(), logits.argmax(-1).cpu())
    assert argmax[1] == 0 and argmax[2] == 3 and argmax[0] == 2
    entropy = fused("entropy", x, w)
    assert abs(float(entropy[1]) - math.log(vocab)) <= 1e-6 * math.log(vocab)
    check_entropy(entropy, x, w, None)


def test_nan_logits_win_the_argmax():
    """A NaN logit makes the row's entropy NaN and wins the argmax, the first NaN even when a larger number comes
    before it or another NaN sits in an earlier-merged block; rows without NaN are unaffected."""
    n, hidden, vocab = 6, 16, 300
    x, w, b = inputs(n, hidden, vocab, seed=7)
    b[10] = 1e4  # the largest number, before every NaN
    b[250] = b[70] = math.nan  # two NaNs in blocks 7 and 2: column 70 wins
    assert fused("entropy", x, w, b).isnan().all()
    assert fused("argmax", x, w, b).eq(70).all()
    x[3] = math.nan  # a whole row of NaN: its first column, as torch.argmax
    b = torch.zeros_like(b)
    assert fused("argmax", x, w, b).tolist() == torch.argmax(reference_linear_logits(x, w, b), -1).tolist()
    entropy = fused("entropy", x, w, b)
    assert entropy[3].isnan() and torch.isfinite(entropy[[0, 1, 2, 4, 5]]).all()


@pytest.mark.parametrize("dtype, scale, softcap", [
    (torch.float32, 0.6, None), (torch.float32, 1.7, 30.0), (torch.float16, 1.0, 5.0), (torch.bfloat16, 1.7, 30.0),
], ids=["fp32-scale", "fp32-both30", "fp16-cap5", "bf16-both30"])
def test_logit_scale_and_softcap(monkeypatch, dtype, scale, softcap):
    """The model's scale and softcap in the epilogue (after the bias, before the temperature): ragged 37 x 101 over
    3 x 4 tiles, logits of spread about 25 (a cap of 5 saturates most of them, 30 bends the tails), -inf bias columns
    inside the vocabulary (``-softcap`` after the cap, as in the reference; still probability 0 without one) and the
    lanes past the vocabulary (garbage the cap would make finite: masked after it).  The argmax stays that of the raw
    logits, transform or not."""
    transform = LogitTransform(scale, softcap)
    x, w, b = inputs(37, 24, 101, dtype=dtype, logit_std=25.0, seed=11)
    b[[0, 40, 100]] = -math.inf
    entropy = fused("entropy", x, w, b, temperature=1.7, monkeypatch=monkeypatch, transform=transform)
    check_entropy(entropy, x, w, b, temperature=1.7, transform=transform)
    plain = fused("entropy", x, w, b, temperature=1.7)
    assert ((entropy - plain).abs() / plain.abs()).min() > 0.01  # the transform was applied to every row
    argmax = fused("argmax", x, w, b, monkeypatch=monkeypatch, transform=transform)
    assert torch.equal(argmax, fused("argmax", x, w, b))
    assert_argmax_ok(argmax, x, w, b)


# ---------------------------------------------------------------------------------------------- launches, memory

def test_empty_input_launches_nothing():
    x, w, b = inputs(0, 8, 50, seed=8)
    with launches.recording() as records:
        assert fused("entropy", x, w, b).shape == (0,)
        assert fused("argmax", x, w, b).shape == (0,)
    assert records == []


@pytest.mark.parametrize("statistic", ["entropy", "argmax"])
def test_dry_run_on_meta_tensors_records_every_launch(statistic):
    """The dispatch (from ``linear_row_statistic``) runs on meta tensors without reading a value: per chunk one GEMM
    launch with the product's FLOPs and one merge launch, whose HBM bytes count the operands once and the partial
    states written and read."""
    cfg = fused_tiles.tile_config(fused_tiles.SELECTION, torch.device("meta"))
    assert cfg == fused_tiles.SELECTION  # meta tensors stand for the GPU launch
    n, hidden, vocab = 5 * cfg.block_m + 7, 64, 1000
    x = torch.empty(n, hidden, device="meta", dtype=torch.bfloat16)
    w = torch.empty(vocab, hidden, device="meta", dtype=torch.bfloat16)
    b = torch.empty(vocab, device="meta", dtype=torch.float32)
    blocks = math.ceil(vocab / cfg.block_n)
    state = selection_fused.STATE_BYTES[statistic]
    # 2.5 row blocks of partials: chunks of two whole row blocks.
    budget = (2 * cfg.block_m + cfg.block_m // 2) * blocks * state
    with launches.recording(dry_run=True) as records:
        out = linear_row_statistic(x, w, b, statistic=statistic, inv_temp=1.0, backend="triton",
                                   workspace_bytes=budget)
    assert out.device.type == "meta" and out.shape == (n,)
    chunks = [2 * cfg.block_m, 2 * cfg.block_m, cfg.block_m + 7]
    assert [r.kernel for r in records] == [f"{statistic}_tiles_kernel", f"merge_{statistic}_kernel"] * len(chunks)
    gemms, merges = records[::2], records[1::2]
    assert sum(r.flops for r in gemms) == 2 * n * vocab * hidden and all(r.flops == 0 for r in merges)
    for rows, gemm, merge in zip(chunks, gemms, merges):
        assert gemm.grid == (math.ceil(rows / cfg.block_m) * blocks,)
        assert gemm.hbm_bytes == (rows + vocab) * hidden * 2 + vocab * 4 + rows * blocks * state
        assert merge.hbm_bytes == rows * blocks * state + rows * out.element_size()


@pytest.mark.parametrize("statistic", ["entropy", "argmax"])
def test_allocates_nothing_of_rows_by_vocab_size(statistic):
    """Through the public op, every tensor created is recorded: at N = 64, V = 600 the [N, V] float32 logits would be
    150 KiB, and the largest allocation is one buffer of partial states (N x 19 blocks); with a small workspace, no
    more than the workspace."""
    import kidkernels

    n, hidden, vocab = 64, 4, 600
    x, w, b = inputs(n, hidden, vocab, seed=9)
    fn = kidkernels.fused_linear_entropy if statistic == "entropy" else kidkernels.fused_linear_argmax
    blocks = math.ceil(vocab / fused_tiles.tile_config(fused_tiles.SELECTION, x.device).block_n)
    # The largest partial buffer: entropy's three float32 planes, or argmax's float32 values (int32 indices alike).
    largest_partials = n * blocks * (12 if statistic == "entropy" else 4)
    for budget in (DEFAULT_BUDGET, budget_for_rows(40, vocab, statistic)):
        with TensorRecorder() as rec:
            out = fn(x, w, b, backend="triton", workspace_bytes=budget)
        assert out.shape == (n,)
        if budget == DEFAULT_BUDGET:
            assert rec.max_bytes == largest_partials, rec.allocations  # the recorder sees the partials
        assert rec.max_bytes <= min(budget, largest_partials), (rec.max_bytes, budget)
        assert n * vocab * 4 >= 10 * rec.max_bytes, (rec.max_bytes, n * vocab * 4)


def test_triton_rows_backend_keeps_the_row_kernels(monkeypatch):
    """backend "triton" takes the fused path (no cuBLAS logits), "triton_rows" today's (no fused launch); both agree
    with the reference."""
    import kidkernels
    from kidkernels.ops import selection_triton

    x, w, b = inputs(9, 16, 101, seed=10)
    calls = []
    real_rows = selection_triton.entropy
    monkeypatch.setattr(selection_triton, "entropy", lambda *a: (calls.append("rows"), real_rows(*a))[1])
    with launches.recording() as records:
        fused_out = kidkernels.fused_linear_entropy(x, w, b, backend="triton")
    assert calls == [] and [r.kernel for r in records] == ["entropy_tiles_kernel", "merge_entropy_kernel"]
    with launches.recording() as records:
        rows_out = kidkernels.fused_linear_entropy(x, w, b, backend="triton_rows")
    assert calls == ["rows"] and not any("tiles" in r.kernel for r in records)
    check_entropy(fused_out, x, w, b)
    check_entropy(rows_out, x, w, b)
    assert_argmax_ok(kidkernels.fused_linear_argmax(x, w, b, backend="triton_rows"), x, w, b)
