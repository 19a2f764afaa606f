"""Fused per-row entropy and argmax against the float64 reference, on both backends.

Tolerances: relative L2 <= 1e-5 for the entropy against float64 on the same (already rounded) inputs.  The argmax must
equal ``torch.argmax`` of the float64 logits, except on rows whose two largest float64 logits are closer than the
float32 rounding of the matmul (then the chosen logit must be within that distance of the maximum); rows with exact
ties (integer-valued inputs, duplicated weight rows) must pick the lowest index.  V = 1013 is not a multiple of any
block size, and the Triton tile is lowered to 256 (4 tiles, ragged tail) in most tests.
"""
import contextlib
import math
import os

import pytest
import torch
import triton
import triton.language as tl

import kidkernels
from kidkernels.kernels.online_softmax import finish_entropy, online_argmax_update, online_entropy_update
from kidkernels.ops import selection_fused, selection_triton, tiles
from kidkernels.reference import reference_fused_linear_argmax, reference_fused_linear_entropy, reference_linear_logits
from tests.helpers import TensorRecorder, hidden_and_weight, rel_l2

N, H, V = 11, 32, 1013
ENTROPY_TOL = 1e-5


@pytest.fixture
def small_tiles(monkeypatch):
    """Vocabulary tiles of 256 columns for the Triton launcher: V = 1013 then takes 3 full tiles and a ragged one."""
    monkeypatch.setattr(tiles, "MAX_BLOCK_V", 256)


@contextlib.contextmanager
def poisoned_empty(monkeypatch):
    """Every ``torch.empty`` inside is filled with NaN (floats) or -7 (integers): an output element that no kernel
    wrote shows up as NaN or -7 instead of passing on leftover memory."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        elif not t.is_complex() and t.dtype != torch.bool:
            t.fill_(-7)
        return t

    with monkeypatch.context() as m:
        m.setattr(torch, "empty", empty)
        yield


def make_case(*, n=N, hidden=H, vocab=V, dtype=torch.float32, device="cpu", logit_std=3.0, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return hidden_and_weight(n, hidden, vocab, logit_std=logit_std, dtype=dtype, device=device, generator=g,
                             bias=bias)


def assert_argmax_ok(ours, x, w, b):
    """Equal to the float64 argmax, except where the float64 top-2 gap is below the float32 rounding of the logits."""
    logits = reference_linear_logits(x, w, b).reshape(-1, w.shape[0]).cpu()
    ours = ours.reshape(-1).cpu()
    assert ours.dtype == torch.int64
    expected = logits.argmax(-1)
    top2 = logits.topk(2, dim=-1).values if logits.shape[1] > 1 else logits.repeat(1, 2)
    # |fp32 logit - fp64 logit| <= ~H eps32 sum|x w|: 1e-5 of the logit scale bounds it with a wide margin.
    tol = 1e-5 * (1.0 + logits.abs().amax(-1)) * math.sqrt(w.shape[1])
    clear = (top2[:, 0] - top2[:, 1]) > tol
    assert torch.equal(ours[clear], expected[clear]), (ours, expected)
    chosen = logits.gather(1, ours.clamp(0, logits.shape[1] - 1)[:, None]).squeeze(1)
    assert ((ours >= 0) & (ours < logits.shape[1])).all()
    assert (chosen >= top2[:, 0] - tol).all()


# ------------------------------------------------------------------------------------------------ accuracy

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_entropy_matches_reference(backend, device, small_tiles, monkeypatch, dtype, bias, temperature):
    x, w, b = make_case(dtype=dtype, device=device, bias=bias, logit_std=2.0 + 3.0 * bias)
    with poisoned_empty(monkeypatch):
        ours = kidkernels.fused_linear_entropy(x, w, b, temperature=temperature, backend=backend)
    ref = reference_fused_linear_entropy(x, w, b, temperature=temperature)
    assert ours.dtype == torch.float32 and ours.shape == (N,) and ours.device == x.device
    assert rel_l2(ours, ref) <= ENTROPY_TOL, rel_l2(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_argmax_matches_reference(backend, device, small_tiles, monkeypatch, dtype):
    x, w, b = make_case(n=16, dtype=dtype, device=device, logit_std=4.0, seed=1)
    with poisoned_empty(monkeypatch):
        ours = kidkernels.fused_linear_argmax(x, w, b, backend=backend)
    assert ours.shape == (16,) and ours.device == x.device
    assert_argmax_ok(ours, x, w, b)


def test_float16_input(backend, device, small_tiles):
    x, w, b = make_case(dtype=torch.float16, device=device, seed=2)
    assert rel_l2(kidkernels.fused_linear_entropy(x, w, b, backend=backend),
                  reference_fused_linear_entropy(x, w, b)) <= ENTROPY_TOL
    assert_argmax_ok(kidkernels.fused_linear_argmax(x, w, b, backend=backend), x, w, b)


def test_float64_input_uses_torch_path_and_stays_float64(device):
    x, w, b = make_case(dtype=torch.float64, device=device, seed=3)
    ours = kidkernels.fused_linear_entropy(x, w, b, temperature=0.7)
    assert ours.dtype == torch.float64
    assert rel_l2(ours, reference_fused_linear_entropy(x, w, b, temperature=0.7)) <= 1e-12
    assert torch.equal(kidkernels.fused_linear_argmax(x, w, b), reference_fused_linear_argmax(x, w, b))


@pytest.mark.parametrize("logit_std", [20.0, 60.0])
def test_extreme_spread(backend, device, small_tiles, logit_std):
    """Very peaked distributions: finite entropies (some near 0) still within tolerance, argmax exact."""
    x, w, b = make_case(n=16, device=device, logit_std=logit_std, seed=4)
    ours = kidkernels.fused_linear_entropy(x, w, b, backend=backend)
    ref = reference_fused_linear_entropy(x, w, b)
    assert torch.isfinite(ours).all()
    assert rel_l2(ours, ref) <= ENTROPY_TOL, rel_l2(ours, ref)
    assert (ours >= 0).all()
    assert_argmax_ok(kidkernels.fused_linear_argmax(x, w, b, backend=backend), x, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_exact_ties_go_to_lowest_index(backend, device, small_tiles, dtype):
    """Integer-valued inputs make every logit exact in float32 whatever the summation order, so ties are real ties:
    the argmax must be torch.argmax's (the lowest index) exactly, including ties across vocabulary tiles."""
    g = torch.Generator().manual_seed(5)
    # 0/1 entries: a row's maximum sum(x) is reached by every weight row that covers x's ones (about V / 2^8 >= 3)
    x = torch.randint(0, 2, (12, 8), generator=g).float()
    w = torch.randint(0, 2, (V, 8), generator=g).float()
    w[700] = w[3]  # a duplicated row: same logit in tiles 0 and 2
    x[0] = 0.0  # every logit 0: the argmax is 0 and the entropy is log V
    x, w = x.to(dtype=dtype, device=device), w.to(dtype=dtype, device=device)
    logits = reference_linear_logits(x, w)
    n_max = (logits == logits.amax(-1, keepdim=True)).sum(-1)
    assert (n_max > 1).all(), "the construction must make ties in every row"
    ours = kidkernels.fused_linear_argmax(x, w, backend=backend)
    assert torch.equal(ours.cpu(), logits.argmax(-1).cpu())
    assert int(ours[0]) == 0
    entropy = kidkernels.fused_linear_entropy(x, w, backend=backend)
    assert abs(float(entropy[0]) - math.log(V)) <= 1e-5 * math.log(V)
    assert rel_l2(entropy, reference_fused_linear_entropy(x, w)) <= ENTROPY_TOL


def test_infinite_and_nan_logits(backend, device, small_tiles):
    """A -inf bias (masked vocabulary entries, a whole first tile of them) has probability 0 and changes nothing
    else; a NaN logit makes the entropy NaN and wins the argmax (the first NaN), as in torch."""
    x, w, b = make_case(n=4, device=device, seed=6)
    b[:300] = -math.inf  # tile 0 (256 columns) entirely -inf, then part of tile 1
    b[600:620] = -math.inf
    ours = kidkernels.fused_linear_entropy(x, w, b, backend=backend)
    assert rel_l2(ours, reference_fused_linear_entropy(x, w, b)) <= ENTROPY_TOL
    assert torch.equal(kidkernels.fused_linear_argmax(x, w, b, backend=backend).cpu(),
                       reference_fused_linear_argmax(x, w, b).cpu())
    b = torch.zeros_like(b)
    b[900], b[700] = math.nan, math.nan
    assert torch.isnan(kidkernels.fused_linear_entropy(x, w, b, backend=backend)).all()
    assert kidkernels.fused_linear_argmax(x, w, b, backend=backend).tolist() == [700] * 4


def _chunk_impl(backend):
    from kidkernels.ops import selection_torch

    return selection_triton if backend == "triton" else selection_torch


def test_per_chunk_pass_on_crafted_logits(backend, device, small_tiles):
    """The per-chunk pass alone, on logits built to hit the tile logic: maxima tied across tiles, in the ragged last
    lane, a constant row, a row of -inf but one entry, a first tile of -inf, and a row shifted by -1000."""
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(8, V, generator=g, dtype=torch.float64) * 3
    peak = 50.0
    logits[0, [300, 800]] = peak  # tie across tiles 1 and 3: 300 wins
    logits[1, V - 1] = peak  # the last lane of the ragged tail
    logits[2, [0, V - 1]] = peak  # first and last column
    logits[3] = 1.25  # constant row: argmax 0, entropy log V
    logits[4] = -math.inf
    logits[4, 517] = 2.0  # one finite entry: entropy 0
    logits[5, :256] = -math.inf  # the whole first tile is -inf
    logits[6] -= 1000.0  # very negative logits: only the running max may shift them
    logits[7, 256:512] = peak  # a whole tile tied: its first column
    expected_argmax = logits.argmax(-1)
    expected_entropy = torch.special.entr(torch.softmax(logits / 1.3, -1)).sum(-1)
    logits32 = logits.float().to(device)
    entropy = torch.full((8,), math.nan, device=device)
    argmax = torch.full((8,), -7, dtype=torch.int64, device=device)
    _chunk_impl(backend).entropy(logits32.clone(), 1 / 1.3, entropy)
    _chunk_impl(backend).argmax(logits32.clone(), argmax)
    assert torch.equal(argmax.cpu(), expected_argmax)
    assert [int(argmax[i]) for i in (0, 1, 2, 3, 4, 7)] == [300, V - 1, 0, 0, 517, 256]
    assert rel_l2(entropy, expected_entropy) <= ENTROPY_TOL
    assert abs(float(entropy[3]) - math.log(V)) <= 1e-6 * math.log(V) and float(entropy[4]) == 0.0


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs CUDA or the Triton interpreter")
@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp of the discarded padding
def test_online_softmax_helpers_with_any_padding(block):
    """The shared helpers directly, over several tiles: online_entropy_update must ignore masked lanes whatever the
    load put there (here 0.0, above every logit of a row shifted by -1000), and online_argmax_update must keep the
    first of tied maxima across tiles."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(13)
    vocab = 203
    x = (torch.randn(vocab, generator=g, dtype=torch.float64) * 4 - 1000.0)
    x[[37, 150]] = x.max() + 1.0
    out = torch.full((2,), math.nan, device=dev)
    idx = torch.full((1,), -7, dtype=torch.int64, device=dev)
    _helpers_kernel[(1,)](x.float().to(dev), out, idx, vocab, BLOCK=block)
    expected = torch.special.entr(torch.softmax(x, -1)).sum()
    assert abs(float(out[0]) - float(expected)) <= ENTROPY_TOL * float(expected)
    assert int(idx[0]) == 37


@triton.jit
def _helpers_kernel(x_ptr, out_ptr, idx_ptr, V, BLOCK: tl.constexpr):
    m = float("-inf")
    z = 0.0
    acc = 0.0
    best_val = float("-inf")
    best_idx = 0
    for v0 in range(0, V, BLOCK):
        cols = v0 + tl.arange(0, BLOCK)
        mask = cols < V
        zero_padded = tl.load(x_ptr + cols, mask=mask, other=0.0)
        m, z, acc = online_entropy_update(m, z, acc, zero_padded, mask)
        best_val, best_idx = online_argmax_update(best_val, best_idx, tl.where(mask, zero_padded, float("-inf")),
                                                  cols)
    tl.store(out_ptr, finish_entropy(z, acc))
    tl.store(idx_ptr, best_idx.to(tl.int64))


# ---------------------------------------------------------------------------------------------- shapes, edges

@pytest.mark.parametrize("vocab", [1, 17, 1013])
def test_tiny_n_and_vocab(backend, device, vocab):
    x, w, b = make_case(n=1, hidden=8, vocab=vocab, device=device, seed=7)
    ours = kidkernels.fused_linear_entropy(x, w, b, backend=backend)
    assert ours.shape == (1,)
    assert rel_l2(ours, reference_fused_linear_entropy(x, w, b)) <= ENTROPY_TOL or vocab == 1
    if vocab == 1:
        assert float(ours[0]) == 0.0
    assert_argmax_ok(kidkernels.fused_linear_argmax(x, w, b, backend=backend), x, w, b)


def test_empty_input(backend, device):
    x, w, b = make_case(n=0, device=device)
    assert kidkernels.fused_linear_entropy(x, w, b, backend=backend).shape == (0,)
    out = kidkernels.fused_linear_argmax(x.reshape(0, 3, H), w, b, backend=backend)
    assert out.shape == (0, 3) and out.dtype == torch.int64


def test_leading_dims_are_kept(backend, device):
    x, w, b = make_case(n=12, device=device, seed=8)
    x3 = x.reshape(3, 4, H)
    ours = kidkernels.fused_linear_entropy(x3, w, b, backend=backend)
    assert ours.shape == (3, 4)
    assert rel_l2(ours.reshape(-1), reference_fused_linear_entropy(x, w, b)) <= ENTROPY_TOL
    # a non-contiguous input (stride along H != 1) is accepted
    xt = x.t().contiguous().t()
    assert torch.equal(kidkernels.fused_linear_argmax(xt, w, b, backend=backend).cpu(),
                       kidkernels.fused_linear_argmax(x, w, b, backend=backend).cpu())


def test_many_chunks(backend, device, small_tiles):
    """Row chunks of a few rows (a small workspace): same results as one chunk."""
    x, w, b = make_case(n=13, device=device, seed=9)
    budget = 3 * V * 4 * 3  # 3 rows of float32 logits (torch backend: 1 row, with its temporaries)
    ours = kidkernels.fused_linear_entropy(x, w, b, temperature=1.3, backend=backend, workspace_bytes=budget)
    assert rel_l2(ours, reference_fused_linear_entropy(x, w, b, temperature=1.3)) <= ENTROPY_TOL
    assert_argmax_ok(kidkernels.fused_linear_argmax(x, w, b, backend=backend, workspace_bytes=budget), x, w, b)


def test_outputs_carry_no_gradient(backend, device):
    x, w, b = make_case(n=3, device=device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    ours = kidkernels.fused_linear_entropy(x, w, b, backend=backend)
    assert not ours.requires_grad


def test_backend_env_forces_torch(device, monkeypatch):
    monkeypatch.setenv("KIDKERNELS_BACKEND", "torch")

    def fail(*args, **kwargs):
        raise AssertionError("the Triton launcher ran although KIDKERNELS_BACKEND=torch")

    monkeypatch.setattr(selection_triton, "entropy", fail)
    monkeypatch.setattr(selection_fused, "fill_row_statistic", fail)
    x, w, b = make_case(n=2, device=device)
    assert kidkernels.fused_linear_entropy(x, w, b).shape == (2,)


# ----------------------------------------------------------------------------------------- memory and syncs

@pytest.mark.parametrize("which", ["entropy", "argmax"])
def test_no_tokens_by_vocab_tensor(backend, device, which):
    """At a size where one [N, V] tensor would dominate, no op produces more than a chunk of rows (the workspace)."""
    n, vocab, hidden = 64, 1013, 4  # the weight (and its views: H x V elements) is smaller than a chunk
    x, w, b = make_case(n=n, hidden=hidden, vocab=vocab, device=device, seed=10)
    budget = 2 * vocab * 4 * 3  # Triton: 6 rows of float32 logits; PyTorch: 2 rows and their temporaries
    fn = kidkernels.fused_linear_entropy if which == "entropy" else kidkernels.fused_linear_argmax
    with TensorRecorder() as rec:  # sees the ops inside the registered kidkernels op too
        out = fn(x, w, b, backend=backend, workspace_bytes=budget)
    assert out.shape == (n,)
    assert n * vocab * 4 >= 8 * rec.max_bytes, f"largest tensor {rec.max_bytes} bytes vs N*V*4 = {n * vocab * 4}"
    assert rec.max_bytes <= budget


def test_no_host_reads(backend, device):
    """The dispatch never reads a tensor value back to the host (the interpreter itself does, to run kernels)."""
    if backend == "triton" and not device.type == "cuda":
        pytest.skip("the Triton interpreter copies kernel arguments through the host")
    x, w, b = make_case(n=5, device=device, seed=11)
    with TensorRecorder() as rec:
        kidkernels.fused_linear_entropy(x, w, b, backend=backend, workspace_bytes=3 * V * 12)
        kidkernels.fused_linear_argmax(x, w, b, backend=backend, workspace_bytes=3 * V * 12)
    assert rec.host_reads == 0


# ---------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, kwargs, error, words", [
    ((torch.randn(16), torch.randn(V, H)), {}, ValueError, "at least 2 dimensions"),
    ((torch.randn(4, H), torch.randn(V, H, 1)), {}, ValueError, "2-D"),
    ((torch.randn(4, H), torch.randn(V, H + 1)), {}, ValueError, "hidden size"),
    ((torch.randn(4, H), torch.randn(0, H)), {}, ValueError, "V = 0"),
    ((torch.randn(4, H), torch.randn(V, H), torch.randn(V - 1)), {}, ValueError, "bias"),
    ((torch.randn(4, H), torch.randn(V, H, dtype=torch.bfloat16)), {}, TypeError, "must match"),
    ((torch.randint(0, 3, (4, H)), torch.randn(V, H)), {}, TypeError, "float32"),
    ((torch.randn(4, H).tolist(), torch.randn(V, H)), {}, TypeError, "torch.Tensor"),
    ((torch.randn(4, H), torch.randn(V, H).to("meta")), {}, ValueError, "same device"),
    ((torch.randn(4, H), torch.randn(V, H)), dict(temperature=0.0), ValueError, "temperature"),
    ((torch.randn(4, H), torch.randn(V, H)), dict(temperature=math.nan), ValueError, "temperature"),
    ((torch.randn(4, H), torch.randn(V, H)), dict(backend="cuda"), ValueError, "backend"),
])
@pytest.mark.parametrize("fn", [kidkernels.fused_linear_entropy, kidkernels.fused_linear_argmax],
                         ids=["entropy", "argmax"])
def test_bad_input_raises_clear_error(fn, args, kwargs, error, words):
    if "temperature" in kwargs and fn is kidkernels.fused_linear_argmax:
        pytest.skip("the argmax takes no temperature")
    with pytest.raises(error, match=words):
        fn(*args, **kwargs)


def test_forced_triton_without_interpreter_is_explained(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b = make_case(n=2)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kidkernels.fused_linear_entropy(x, w, b, backend="triton")
