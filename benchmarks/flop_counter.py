"""A dispatch-level counter of matrix-product FLOPs: every ``mm``, ``addmm``, ``addmm_``, ``bmm``, ``baddbmm``,
``addbmm``, ``mv``, ``addmv``, ``dot`` and ``_scaled_mm`` an aten call runs, in every overload (``out=``, in place,
``out_dtype=``), counted as 2 x (multiply-adds).

``torch.utils.flop_counter.FlopCounterMode`` counts ``addmm`` but not the in-place ``addmm_`` (nor ``mm(...,
out_dtype=)``), which chunked losses use to accumulate a weight gradient; this counter exists so that the FLOP
identities of the cost model can be tested exactly (``tests/test_flop_identity.py``).  kidkernels' registered ops
(``torch.library``) are opened: the products inside them are counted.  Products done inside a Triton kernel
(``tl.dot``: the GEMM-fused kernels) are no aten calls: they are counted from the FLOPs their launchers declare to
:func:`kidkernels.ops.launches.launch` (recorded while the counter is active, as ``"triton.<kernel name>"``).  It
works on real and on fake tensors.
"""
from __future__ import annotations

from collections import Counter
from math import prod

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kidkernels.ops import launches
from kidkernels.ops.custom_ops import python_impl

aten = torch.ops.aten


def _mm(a, b):  # [M, K] @ [K, N]
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _bmm(a, b):  # [B, M, K] @ [B, K, N]
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _mv(a, v):  # [M, K] @ [K]
    return 2 * a.shape[0] * a.shape[1]


def _dot(a, b):
    return 2 * a.shape[0]


def _matmul(a, b):  # broadcasting matmul, should it ever reach dispatch (it decomposes above it)
    if a.dim() == 1 and b.dim() == 1:
        return _dot(a, b)
    m = a.shape[-2] if a.dim() > 1 else 1
    n = b.shape[-1] if b.dim() > 1 else 1
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]) if a.dim() > 2 or b.dim() > 2 else ()
    return 2 * prod(batch) * m * a.shape[-1] * n


def _linear(x, w, *rest):  # x [..., K] @ w.T [K, N]
    return 2 * prod(x.shape[:-1]) * x.shape[-1] * w.shape[0]


# op overload packet -> (FLOPs from the positional tensor operands, index of the first matrix operand)
_FORMULAS = {
    aten.mm: (_mm, 0),
    aten.addmm: (_mm, 1),
    aten.addmm_: (_mm, 1),
    aten._addmm_activation: (_mm, 1),
    aten.bmm: (_bmm, 0),
    aten.baddbmm: (_bmm, 1),
    aten.baddbmm_: (_bmm, 1),
    aten.addbmm: (_bmm, 1),
    aten.addbmm_: (_bmm, 1),
    aten.mv: (_mv, 0),
    aten.addmv: (_mv, 1),
    aten.addmv_: (_mv, 1),
    aten.dot: (_dot, 0),
    aten.vdot: (_dot, 0),
    aten._scaled_mm: (_mm, 0),
    aten.matmul: (_matmul, 0),
    aten.linear: (_linear, 0),
}


def matmul_operands(func, args) -> tuple | None:
    """The two matrix operands among the positional ``args`` of aten overload ``func`` (None: not a product)."""
    entry = _FORMULAS.get(func.overloadpacket)
    if entry is None:
        return None
    first = entry[1]
    return tuple(args[first:first + 2])


def matmul_flops(func, args) -> int | None:
    """FLOPs of one call of aten overload ``func`` on positional ``args``: 2 x its multiply-adds, or None for an op
    that is not a matrix product."""
    operands = matmul_operands(func, args)
    return None if operands is None else _FORMULAS[func.overloadpacket][0](*operands)


class MatmulFlopCounter(TorchDispatchMode):
    """``with MatmulFlopCounter() as counter: ...``; then ``counter.total`` (FLOPs) and ``counter.by_op``
    (``Counter`` of FLOPs per overload name, e.g. ``"aten.addmm_.default"``) and ``counter.calls``."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.by_op: Counter = Counter()
        self.calls: Counter = Counter()
        self._recordings: list = []  # one launch recording per (re-)entry of the mode

    def _add(self, name: str, flops: int) -> None:
        self.total += flops
        self.by_op[name] += flops
        self.calls[name] += 1

    def __enter__(self):
        # Inside a dry run the launches stay unlaunched; a re-entry (below, around a registered op) records its own
        # launches, which the enclosing recording then does not see: each launch is counted once.
        recording = launches.recording(dry_run=launches.is_dry_run())
        self._recordings.append((recording, recording.__enter__()))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            recording, records = self._recordings.pop()
            recording.__exit__(None, None, None)
            for record in records:
                self._add(f"triton.{record.kernel}", record.flops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inner = python_impl(func)
        if inner is not None:
            # A kidkernels op registered with torch.library: count the products inside it.
            with self:
                return inner(*args, **(kwargs or {}))
        flops = matmul_flops(func, args)
        if flops is not None:
            self._add(str(func), flops)
        return func(*args, **(kwargs or {}))
