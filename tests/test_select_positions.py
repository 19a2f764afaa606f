"""Position selection of KID's masking stage: counts, strategies, reproducibility, and the fused entry point.

Deterministic strategies are compared with the row-by-row Python reference; "random" is checked by its properties
(exact counts, only valid positions, same seed same choice, frequencies close to uniform over many draws).
"""
import math

import pytest
import torch

import kidkernels
from kidkernels.reference import reference_fused_linear_entropy, reference_select_positions
from tests.helpers import TensorRecorder, hidden_and_weight

STRATEGIES = ["random", "uniform", "hard", "easy"]
ALPHAS = [0.0, 1e-3, 0.05, 0.2, 0.5, 0.77, 1.0]


def random_valid(b, t, *, seed, device="cpu"):
    """Bool ``[b, t]`` with varied densities per row; row 0 has no valid position, row 1 exactly one."""
    g = torch.Generator().manual_seed(seed)
    density = torch.rand(b, 1, generator=g)
    valid = torch.rand(b, t, generator=g) < density
    valid[0] = False
    valid[1] = False
    valid[1, t // 3] = True
    if b > 2:
        valid[2] = True
    return valid.to(device)


def tied_scores(shape, *, seed, device="cpu"):
    """Scores with many exact ties (4 distinct values) and a few NaNs."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, shape, generator=g).float() * 0.5
    scores[torch.rand(shape, generator=g) < 0.05] = math.nan
    return scores.to(device)


def expected_counts(valid, alpha):
    return torch.tensor([min(n, math.floor(alpha * n + 0.5)) for n in valid.sum(1).tolist()])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_counts_and_validity(device, strategy):
    valid = random_valid(48, 37, seed=0, device=device)
    scores = tied_scores(valid.shape, seed=1, device=device)
    for alpha in ALPHAS:
        chosen = kidkernels.select_positions(valid, alpha, strategy, scores=scores,
                                             generator=torch.Generator(device=device).manual_seed(2))
        assert chosen.dtype == torch.bool and chosen.shape == valid.shape and chosen.device == valid.device
        assert not (chosen & ~valid).any(), "an invalid position was chosen"
        assert torch.equal(chosen.sum(1).cpu(), expected_counts(valid.cpu(), alpha)), alpha
    assert not kidkernels.select_positions(valid, 0.0, strategy, scores=scores).any()
    assert torch.equal(kidkernels.select_positions(valid, 1.0, strategy, scores=scores), valid)


def test_count_rounds_half_up():
    valid = torch.zeros(4, 10, dtype=torch.bool)
    for i, n in enumerate([2, 10, 5, 3]):
        valid[i, :n] = True
    # 0.25 * 2 = 0.5 -> 1; 0.25 * 10 = 2.5 -> 3; 0.25 * 5 = 1.25 -> 1; 0.25 * 3 = 0.75 -> 1
    assert kidkernels.select_positions(valid, 0.25, "uniform").sum(1).tolist() == [1, 3, 1, 1]
    # a tiny alpha chooses nothing until alpha * n reaches 0.5
    assert kidkernels.select_positions(valid, 0.049, "random").sum(1).tolist() == [0, 0, 0, 0]
    assert kidkernels.select_positions(valid, 0.05, "random").sum(1).tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize("strategy", ["hard", "easy"])
def test_hard_and_easy_match_brute_force(device, strategy):
    """The top (hard) / bottom (easy) scores of each row; ties to the earlier position, NaN scores last, and scores
    at invalid positions (including extreme ones) never matter."""
    valid = random_valid(40, 29, seed=3, device=device)
    scores = tied_scores(valid.shape, seed=4, device=device)
    scores[~valid] = -1e30 if strategy == "easy" else 1e30
    for alpha in ALPHAS:
        chosen = kidkernels.select_positions(valid, alpha, strategy, scores=scores)
        assert torch.equal(chosen.cpu(), reference_select_positions(valid.cpu(), alpha, strategy, scores.cpu()))


def test_hard_and_easy_small_example():
    valid = torch.tensor([[True, True, False, True, True, True]])
    scores = torch.tensor([[1.0, 3.0, 9.0, 3.0, 0.5, 1.0]])
    # alpha 0.4 of 5 valid -> 2 positions
    assert kidkernels.select_positions(valid, 0.4, "hard", scores=scores).nonzero()[:, 1].tolist() == [1, 3]
    assert kidkernels.select_positions(valid, 0.4, "easy", scores=scores).nonzero()[:, 1].tolist() == [0, 4]
    # 3 positions: the tie of 1.0 at positions 0 and 5 goes to 0
    assert kidkernels.select_positions(valid, 0.6, "hard", scores=scores).nonzero()[:, 1].tolist() == [0, 1, 3]
    assert kidkernels.select_positions(valid, 0.6, "easy", scores=scores).nonzero()[:, 1].tolist() == [0, 4, 5]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_scores_of_any_float_dtype(device, dtype):
    valid = random_valid(6, 20, seed=5, device=device)
    scores = tied_scores(valid.shape, seed=6, device=device).to(dtype)
    chosen = kidkernels.select_positions(valid, 0.3, "hard", scores=scores)
    assert torch.equal(chosen.cpu(), reference_select_positions(valid.cpu(), 0.3, "hard", scores.cpu()))


def test_uniform_matches_rule_and_is_evenly_spaced(device):
    valid = random_valid(40, 53, seed=7, device=device)
    for alpha in ALPHAS:
        chosen = kidkernels.select_positions(valid, alpha, "uniform")
        assert torch.equal(chosen.cpu(), reference_select_positions(valid.cpu(), alpha, "uniform"))
        assert torch.equal(chosen, kidkernels.select_positions(valid, alpha, "uniform"))  # deterministic
        for row_valid, row_chosen in zip(valid.cpu(), chosen.cpu()):
            n = int(row_valid.sum())
            ranks = (row_valid.cumsum(0) - 1)[row_chosen].tolist()  # ranks among the valid positions
            k = len(ranks)
            if k >= 2:
                gaps = {b - a for a, b in zip(ranks, ranks[1:])}
                assert gaps <= {n // k, -(-n // k)}, (n, k, ranks)


def test_uniform_small_examples():
    valid = torch.ones(1, 10, dtype=torch.bool)
    picks = lambda alpha, v=valid: kidkernels.select_positions(v, alpha, "uniform").nonzero()[:, 1].tolist()  # noqa
    assert picks(0.1) == [5]  # one pick: the middle
    assert picks(0.2) == [2, 7]  # the centres of two halves
    assert picks(0.5) == [1, 3, 5, 7, 9]
    holes = torch.tensor([[False, True, False, True, True, False, False, True]])  # valid ranks 0..3 at 1, 3, 4, 7
    assert picks(0.5, holes) == [3, 7]  # ranks 1 and 3


def test_random_is_reproducible(device):
    valid = random_valid(16, 50, seed=8, device=device)

    def draw(seed, gen_device=device):
        g = torch.Generator(device=gen_device).manual_seed(seed)
        return kidkernels.select_positions(valid, 0.3, "random", generator=g)

    assert torch.equal(draw(11), draw(11))
    assert not torch.equal(draw(11), draw(12))
    # a CPU generator works for tensors on any device (its keys are copied to the device)
    cpu_draw = draw(11, "cpu")
    assert torch.equal(cpu_draw, draw(11, "cpu")) and cpu_draw.device == valid.device
    assert torch.equal(cpu_draw.sum(1), draw(12).sum(1))


def test_random_is_roughly_uniform(device):
    """4000 independent rows of the same 16 valid positions (of 24), k = 4: each valid position is chosen about
    1000 times (binomial sd 27); the bounds are +-15% (5.5 sd), with a fixed seed."""
    valid = torch.zeros(4000, 24, dtype=torch.bool)
    positions = [0, 1, 2, 4, 5, 7, 8, 10, 11, 13, 15, 17, 18, 20, 22, 23]
    valid[:, positions] = True
    g = torch.Generator(device=device).manual_seed(9)
    chosen = kidkernels.select_positions(valid.to(device), 0.25, "random", generator=g).cpu()
    counts = chosen.sum(0)
    assert counts[~valid[0]].sum() == 0
    assert ((counts[positions] - 1000).abs() <= 150).all(), counts[positions]
    # the rows differ from each other: far more than a handful of distinct subsets
    assert len({tuple(r) for r in chosen[:300].nonzero()[:, 1].reshape(300, 4).tolist()}) > 250


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", [(0, 7), (3, 0), (1, 1)])
def test_degenerate_shapes(device, strategy, shape):
    valid = torch.ones(shape, dtype=torch.bool, device=device)
    scores = torch.zeros(shape, device=device)
    chosen = kidkernels.select_positions(valid, 1.0, strategy, scores=scores)
    assert chosen.shape == shape and torch.equal(chosen, valid)


def test_no_host_reads(device):
    valid = random_valid(8, 30, seed=10, device=device)
    scores = tied_scores(valid.shape, seed=11, device=device)
    with TensorRecorder() as rec:
        for strategy in STRATEGIES:
            kidkernels.select_positions(valid, 0.2, strategy, scores=scores)
    assert rec.host_reads == 0


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(valid=torch.ones(2, 5, dtype=torch.int64)), TypeError, "bool"),
    (dict(valid=torch.ones(2, 5)), TypeError, "bool"),
    (dict(valid=[[True]]), TypeError, "torch.Tensor"),
    (dict(valid=torch.ones(10, dtype=torch.bool)), ValueError, r"2-D \[B, T\]"),
    (dict(valid=torch.ones(2, 5, 1, dtype=torch.bool)), ValueError, r"2-D \[B, T\]"),
    (dict(alpha=-0.1), ValueError, "alpha"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(alpha=math.nan), ValueError, "alpha"),
    (dict(alpha=math.inf), ValueError, "alpha"),
    (dict(alpha="0.2"), TypeError, "alpha"),
    (dict(alpha=torch.tensor(0.2)), TypeError, "alpha"),
    (dict(strategy="Hard"), ValueError, "strategy"),
    (dict(strategy="topk"), ValueError, "strategy"),
    (dict(strategy=None), ValueError, "strategy"),
    (dict(scores=None), ValueError, "needs scores"),
    (dict(scores=torch.zeros(2, 6)), ValueError, "shape"),
    (dict(scores=torch.zeros(10)), ValueError, "shape"),
    (dict(scores=torch.zeros(2, 5, dtype=torch.int64)), TypeError, "floating"),
    (dict(scores=torch.zeros(2, 5, device="meta")), ValueError, "same device"),
    (dict(generator=123), TypeError, "Generator"),
])
def test_bad_input_raises_clear_error(kwargs, error, words):
    args = dict(valid=torch.ones(2, 5, dtype=torch.bool), alpha=0.2, strategy="hard", scores=torch.zeros(2, 5))
    args.update(kwargs)
    with pytest.raises(error, match=words):
        kidkernels.select_positions(args.pop("valid"), args.pop("alpha"), args.pop("strategy"), **args)


def test_easy_needs_scores_too():
    with pytest.raises(ValueError, match="needs scores"):
        kidkernels.select_positions(torch.ones(2, 5, dtype=torch.bool), 0.2, "easy")


# --------------------------------------------------------------------------------------------- fused_linear_select

B, T, H, V = 3, 5, 16, 300


def make_select_case(device, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x, w, b = hidden_and_weight(B * T, H, V, logit_std=3.0, dtype=dtype, device=device, generator=g, bias=True)
    valid = random_valid(B, T, seed=seed + 1, device=device)
    return x.reshape(B, T, H), w, b, valid


@pytest.mark.parametrize("strategy", ["hard", "easy"])
def test_fused_select_equals_entropies_then_select(backend, device, strategy):
    x, w, b, valid = make_select_case(device, seed=12, dtype=torch.bfloat16)
    for alpha in (0.0, 0.4, 1.0):
        fused = kidkernels.fused_linear_select(x, w, valid, alpha, strategy, b, temperature=1.5, backend=backend)
        scores = kidkernels.fused_linear_entropy(x, w, b, temperature=1.5, backend=backend)
        assert scores.shape == (B, T)
        assert torch.equal(fused, kidkernels.select_positions(valid, alpha, strategy, scores=scores))
        # ... and the float64 entropies choose the same positions (no near-ties at this size)
        ref_scores = reference_fused_linear_entropy(x, w, b, temperature=1.5)
        assert torch.equal(fused.cpu(), reference_select_positions(valid.cpu(), alpha, strategy, ref_scores.cpu()))


class UntouchableTensor(torch.Tensor):
    """A tensor with shape, dtype and device but no data: any operation on it raises."""

    @staticmethod
    def __new__(cls, shape, dtype=torch.float32, device="cpu"):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise AssertionError(f"an untouchable tensor was used by {func}")


@pytest.mark.parametrize("strategy", ["random", "uniform"])
def test_fused_select_random_and_uniform_never_read_input_or_weight(device, strategy):
    valid = random_valid(B, T, seed=13, device=device)
    x, w = UntouchableTensor((B, T, H), device=device), UntouchableTensor((V, H), device=device)
    g1 = torch.Generator(device=device).manual_seed(14)
    g2 = torch.Generator(device=device).manual_seed(14)
    fused = kidkernels.fused_linear_select(x, w, valid, 0.5, strategy, generator=g1)
    assert torch.equal(fused, kidkernels.select_positions(valid, 0.5, strategy, generator=g2))
    with pytest.raises(AssertionError, match="untouchable"):  # the guard itself works
        kidkernels.fused_linear_select(x, w, valid, 0.5, "hard", backend="torch")


@pytest.mark.parametrize("changes, error, words", [
    (dict(input=torch.randn(B * T, H)), ValueError, r"3-D \[B, T, H\]"),
    (dict(input=torch.randn(B, T + 1, H)), ValueError, r"\[B, T\]"),
    (dict(weight=torch.randn(V, H + 1)), ValueError, "hidden size"),
    (dict(weight=torch.randn(V, H, dtype=torch.float64)), TypeError, "must match"),
    (dict(valid=torch.ones(B, T)), TypeError, "bool"),
    (dict(alpha=2.0), ValueError, "alpha"),
    (dict(strategy="middle"), ValueError, "strategy"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(bias=torch.randn(V + 1)), ValueError, "bias"),
    (dict(weight=torch.randn(V, H).to("meta")), ValueError, "same device"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_fused_select_bad_input(changes, error, words):
    args = dict(input=torch.randn(B, T, H), weight=torch.randn(V, H), valid=torch.ones(B, T, dtype=torch.bool),
                alpha=0.2, strategy="random")
    args.update(changes)
    with pytest.raises(error, match=words):
        kidkernels.fused_linear_select(**args)
