"""torch.compile(fullgraph=True) of a caller of each public op: one graph, no graph break, with and without
torch.autocast, and the eager result, forward and backward.

Every public op calls one op registered with torch.library (kidkernels.ops.custom_ops), opaque to Dynamo and
AOTAutograd, with a fake implementation for tracing and a registered backward.  This runs on CPU with the PyTorch
backend (Dynamo never looks inside the ops, so the Triton backend is the same graph); "aot_eager" traces the forward
and the backward through AOTAutograd without code generation, and one case goes through the default inductor
backend.  Graph breaks are counted with ``torch._dynamo.explain``.
"""
import pytest
import torch
import torch._dynamo as dynamo

import kidkernels
from tests.helpers import hidden_and_weight

N, H_S, H_T, V = 6, 16, 24, 257


def graph_breaks(fn, *args):
    dynamo.reset()
    explained = dynamo.explain(fn)(*args)
    return explained.graph_count, explained.graph_break_count, [str(r.reason) for r in explained.break_reasons]


def inputs(seed=0, n=N):
    g = torch.Generator().manual_seed(seed)
    xs, ws, bs = hidden_and_weight(n, H_S, V, logit_std=3.0, generator=g, bias=True)
    xt, wt, bt = hidden_and_weight(n, H_T, V, logit_std=3.0, generator=g, bias=True)
    target = torch.randint(0, V, (n,), generator=g)
    target[2] = -100
    for t in (xs, ws, bs):
        t.requires_grad_(True)
    return xs, ws, bs, xt, wt, bt, target


def maybe_autocast(autocast):
    return torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)


def distill(xs, ws, bs, xt, wt, bt, target, autocast=False, reduction="mean"):
    with maybe_autocast(autocast):
        loss = kidkernels.fused_linear_distill_loss(xs, ws, xt, wt, target, divergence="jsd", beta=0.3,
                                                    temperature=1.5, mle_weight=0.5, student_bias=bs,
                                                    teacher_bias=bt, reduction=reduction, backend="torch")
        return loss.sum() * 2.0


def cross_entropy(xs, ws, bs, xt, wt, bt, target, autocast=False, reduction="mean"):
    with maybe_autocast(autocast):
        return kidkernels.fused_linear_cross_entropy(xs, ws, target, bias=bs, reduction=reduction,
                                                     normalizer=torch.tensor(4.0), backend="torch").sum()


def from_logits(xs, ws, bs, xt, wt, bt, target, autocast=False, reduction="mean"):
    with maybe_autocast(autocast):
        student = xs @ ws.t() + bs  # under autocast: bfloat16 logits, read as they are
        teacher = (xt @ wt.t()).detach()
        return kidkernels.distill_loss(student, teacher, target, divergence="rkl", mle_weight=0.5,
                                       reduction=reduction, backend="torch").sum()


LOSSES = {"fused_linear_distill_loss": distill, "fused_linear_cross_entropy": cross_entropy,
          "distill_loss": from_logits}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_losses_compile_to_one_graph(name, reduction, autocast):
    fn = LOSSES[name]
    args = inputs()
    graphs, breaks, reasons = graph_breaks(lambda *a: fn(*a, autocast=autocast, reduction=reduction), *args)
    assert (graphs, breaks) == (1, 0), reasons
    eager = fn(*args, autocast=autocast, reduction=reduction)
    eager_grads = torch.autograd.grad(eager, args[:3])
    dynamo.reset()
    compiled = torch.compile(lambda *a: fn(*a, autocast=autocast, reduction=reduction), fullgraph=True,
                             backend="aot_eager")
    out = compiled(*args)
    grads = torch.autograd.grad(out, args[:3])
    assert torch.allclose(out, eager, rtol=1e-6, atol=1e-7)
    for g, e in zip(grads, eager_grads):
        assert g.dtype == e.dtype and torch.allclose(g, e, rtol=1e-5, atol=1e-7)


def test_default_backend_inductor():
    """The default torch.compile backend (inductor, which generates the code around the op) gives the eager loss and
    gradients too."""
    args = inputs(seed=1)
    eager = distill(*args)
    eager_grads = torch.autograd.grad(eager, args[:3])
    dynamo.reset()
    compiled = torch.compile(distill, fullgraph=True)
    out = compiled(*args)
    grads = torch.autograd.grad(out, args[:3])
    assert torch.allclose(out, eager, rtol=1e-6, atol=1e-7)
    for g, e in zip(grads, eager_grads):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("how", ["dynamic=True", "mark_dynamic"])
def test_dynamic_shapes(how):
    """torch.compile(dynamic=True), or the rows marked dynamic: a full graph and the eager result at two numbers of
    rows (under dynamic=True Dynamo may trace the options' Python floats as symbolic floats: the public API's
    validation must take them)."""
    dynamic = True if how == "dynamic=True" else None
    for name, fn in sorted(LOSSES.items()):
        dynamo.reset()
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
        for n in (6, 9):
            args = inputs(seed=n, n=n)
            if how == "mark_dynamic":
                for t in args:
                    dynamo.mark_dynamic(t, 0)
            out = compiled(*args)
            grads = torch.autograd.grad(out, args[:3])
            eager = fn(*args)
            eager_grads = torch.autograd.grad(eager, args[:3])
            assert torch.allclose(out, eager, rtol=1e-6, atol=1e-7), name
            for g, e in zip(grads, eager_grads):
                assert torch.allclose(g, e, rtol=1e-5, atol=1e-7), name
    dynamo.reset()
    xs, ws, bs = (t.detach() for t in inputs(seed=2)[:3])
    compiled = torch.compile(selection_calls, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for got, want in zip(compiled(xs, ws, bs), selection_calls(xs, ws, bs)):
        assert torch.equal(got, want)


def selection_calls(xs, ws, bs, autocast=False):
    valid = torch.ones(2, 3, dtype=torch.bool)
    valid[1, 2] = False
    with maybe_autocast(autocast):
        entropy = kidkernels.fused_linear_entropy(xs, ws, bs, temperature=1.5, backend="torch")
        argmax = kidkernels.fused_linear_argmax(xs, ws, bs, backend="torch")
        hard = kidkernels.fused_linear_select(xs.reshape(2, 3, -1), ws, valid, 0.5, "hard", bs, backend="torch")
        uniform = kidkernels.fused_linear_select(xs.reshape(2, 3, -1), ws, valid, 0.5, "uniform", bs,
                                                 backend="torch")
        # "random" draws from the default generator here: Dynamo cannot carry a torch.Generator object into a graph
        # (an explicit generator= is a graph break there, see the README)
        rand = kidkernels.select_positions(valid, 1.0, "random")
        return entropy, argmax, hard, uniform, rand


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "autocast"])
def test_selection_ops_compile_to_one_graph(autocast):
    xs, ws, bs = (t.detach() for t in inputs(seed=2)[:3])
    graphs, breaks, reasons = graph_breaks(lambda *a: selection_calls(*a, autocast=autocast), xs, ws, bs)
    assert (graphs, breaks) == (1, 0), reasons
    eager = selection_calls(xs, ws, bs, autocast=autocast)
    dynamo.reset()
    compiled = torch.compile(lambda *a: selection_calls(*a, autocast=autocast), fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(xs, ws, bs), eager):
        assert got.dtype == want.dtype and torch.equal(got, want)


def opcheck_cases():
    """``(op, args)`` for every op kidkernels registers (kidkernels.ops.custom_ops), small shapes: the loss from
    hidden states in every reduction, bfloat16 and the cross-entropy alone included, the loss from logits, both
    backward ops and the two selection statistics."""
    ops = torch.ops.kidkernels
    xs, ws, bs, xt, wt, bt, target = inputs(seed=3)
    tail = ("torch", 1 << 20)
    cases = []
    for reduction in ("mean", "sum", "none"):
        cases.append((ops.linear_distill.default, (xs, ws, bs, xt, wt, bt, target, None, None, "jsd", 0.3, 1.5, 1.0,
                                                   0.5, -100, V, reduction, *tail, True, True, True, True)))
    low = [t.detach().to(torch.bfloat16) for t in (xs, ws, bs, xt, wt, bt)]
    for t in low[:3]:
        t.requires_grad_(True)
    cases.append((ops.linear_distill.default, (*low, target, torch.tensor(4.0), None, "rkl", 0.5, 1.0, 1.0, 0.5,
                                               -100, V, "mean", *tail, True, True, True, True)))
    cases.append((ops.linear_distill.default, (xs, ws, bs, None, None, None, target, None, 3.0, "fkl", 0.5, 1.0, 0.0,
                                               1.0, -100, V, "sum", *tail, False, True, True, False)))
    plain = [t.detach() for t in (xs, ws, bs, xt, wt, bt)]
    cases.append((ops.linear_distill_backward.default, (*plain, target, torch.linspace(0.5, 1.5, N), "tvd", 0.5, 1.0,
                                                        1.0, 0.5, -100, V, *tail, True, True, True, True)))
    student = (plain[0] @ plain[1].t()).requires_grad_(True)
    teacher = plain[3] @ plain[4].t()
    for reduction in ("mean", "none"):
        cases.append((ops.distill_logits.default, (student, teacher, target, None, None, "rkl", 0.5, 1.0, 1.0, 0.5,
                                                   -100, V, reduction, *tail)))
    _, _, _, stats = ops.distill_logits(student.detach(), teacher, target, None, None, "rkl", 0.5, 1.0, 1.0, 0.5,
                                        -100, V, "none", *tail)
    cases.append((ops.distill_logits_backward.default, (student.detach(), teacher, target, stats, torch.ones(N),
                                                        "rkl", 0.5, 1.0, 1.0, 0.5, -100, V, *tail)))
    cases.append((ops.linear_entropy.default, (plain[0], plain[1], plain[2], 0.5, *tail)))
    cases.append((ops.linear_argmax.default, (plain[0], plain[1], None, *tail)))
    return cases


def test_registered_ops_pass_opcheck():
    """torch.library.opcheck of every registered op: schema, autograd registration, fake tensors and AOTAutograd
    (static and dynamic shapes) against eager.  A backward that mutates what its forward saved fails the last."""
    cases = opcheck_cases()
    from kidkernels.ops.custom_ops import _PYTHON_IMPLS

    assert {op._schema.name for op, _ in cases} == set(_PYTHON_IMPLS)  # every registered op
    for op, args in cases:
        torch.library.opcheck(op, args)
