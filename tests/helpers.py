"""Helpers for the kernel tests: error measures and inputs with a trained model's spread of logits."""
from __future__ import annotations

import math

import torch

from kidkernels.ops.custom_ops import python_impl


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative L2 error ``||actual - expected|| / ||expected||`` in float64 (absolute when expected is 0)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (a.shape, e.shape)
    assert torch.isfinite(a).all(), "non-finite values in the result"
    denom = e.norm().item()
    err = (a - e).norm().item()
    return err / denom if denom > 0 else err


def hidden_and_weight(n: int, hidden: int, vocab: int, *, logit_std: float, dtype=torch.float32, device="cpu",
                      generator: torch.Generator | None = None, bias: bool = False):
    """Hidden states ``[n, hidden]`` and a weight ``[vocab, hidden]`` whose logits have about ``logit_std`` spread
    across the vocabulary, with rows of varied scale (0.5x to 1.5x), rounded to ``dtype``; plus a ``[vocab]`` bias."""
    g = generator
    x = torch.randn(n, hidden, generator=g) * (0.5 + torch.rand(n, 1, generator=g))
    w = torch.randn(vocab, hidden, generator=g) * (logit_std / math.sqrt(hidden))
    b = torch.randn(vocab, generator=g) * 0.5 if bias else None
    to = dict(dtype=dtype, device=device)
    return x.to(**to), w.to(**to), (b.to(**to) if b is not None else None)


def _storage(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return id(t)


def _flat(args, kwargs):
    for a in list(args) + list((kwargs or {}).values()):
        if isinstance(a, (list, tuple)):
            yield from a
        else:
            yield a


class TensorRecorder:
    """Records every aten op run inside it and the largest tensor any op allocated, in bytes (views and in-place
    results, which share an input's storage, allocate nothing; ``allocations`` lists the others).

    Used to prove that no ``[N, V]`` tensor is ever allocated (``max_bytes``; bytes rather than elements, since the
    Triton interpreter views buffers as uint8) and that no value is read back to the
    host (``host_reads``: calls of ``aten._local_scalar_dense`` and ``aten.is_nonzero``, which ``.item()``, ``bool(t)``
    and friends go through).
    The ops inside kidkernels' registered ops are recorded as well (see ``kidkernels.ops.custom_ops.python_impl``).
    """

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        recorder = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                inner = python_impl(func)
                if inner is not None:
                    # A kidkernels op registered with torch.library is one node to the dispatcher: run its Python
                    # implementation with this mode active again, so that the ops inside it are recorded too.
                    with self:
                        out = inner(*args, **(kwargs or {}))
                else:
                    out = func(*args, **(kwargs or {}))
                recorder.ops.append(str(func))
                # Views and in-place results share an input's storage: only new storage is an allocation.
                inputs = {_storage(a) for a in _flat(args, kwargs) if isinstance(a, torch.Tensor)}
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and _storage(t) not in inputs:
                        nbytes = t.numel() * t.element_size()
                        recorder.max_bytes = max(recorder.max_bytes, nbytes)
                        recorder.allocations.append((str(func), nbytes, t.dtype))
                return out

        self._mode = _Mode()
        self.ops: list[str] = []
        self.allocations: list[tuple[str, int, torch.dtype]] = []
        self.max_bytes = 0

    @property
    def host_reads(self) -> int:
        # bool(t) reaches a dispatch mode as is_nonzero (its item() is not dispatched again), .item() as
        # _local_scalar_dense.
        return sum(any(name in op for name in ("_local_scalar_dense", "is_nonzero", "aten.item")) for op in self.ops)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def assert_close(ours, ref, ours_grads, ref_grads, grad_tol, loss_tol=1e-5):
    """A float32 loss within ``loss_tol`` and finite gradients within ``grad_tol`` (relative L2) of the reference."""
    assert ours.dtype == torch.float32
    assert rel_l2(ours, ref) <= loss_tol, (ours, ref)
    for g, r in zip(ours_grads, ref_grads):
        assert torch.isfinite(g).all()
        assert rel_l2(g, r) <= grad_tol, rel_l2(g, r)
