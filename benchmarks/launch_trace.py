"""The launch sequence of a piece of PyTorch code, recorded on ``meta`` tensors: what the roofline (``roofline.py``)
prices.  Nothing runs: no GPU is needed, and a paper-size case is recorded in a second.

Two sources of launches are interleaved in the order they happen:

* Triton launches of kidkernels, recorded by :func:`kidkernels.ops.launches.recording` (``dry_run=True``) with the
  FLOPs and HBM bytes their launchers count from the kernels' loads and stores;
* aten ops, recorded by :class:`LaunchTrace` (a ``TorchDispatchMode``), priced from their operands:

  - matrix products (``mm``, ``addmm``, ``bmm``, ... in every overload: ``benchmarks/flop_counter.py``): 2 x the
    multiply-adds; bytes: every operand read once, the result written once (``addmm(acc, a, b, out=acc)`` reads and
    writes ``acc``);
  - views, ``empty`` allocations, ``detach``: nothing (no kernel);
  - fills, copies and factories (``zero_``, ``fill_``, ``copy_``, ``zeros``, ``*_like``): the output written (a
    copy also reads its source);
  - gathers (``gather``, ``index_select``, ``nll_loss_forward``): the index and one input element per output
    element; ``nll_loss_backward``: the gradient it writes (its ``self`` argument only gives the shape);
    scatters into a tensor (``scatter_add_``, ``index_put_``): the updated elements only;
  - every other op (elementwise, reductions, softmax and their backwards): one launch that reads every tensor
    argument once and writes every output once (no fusion, no cache reuse across launches).

  A tensor's bytes are those of the memory it spans (a broadcast, stride-0 dimension counts once).  kidkernels' ops
  registered with ``torch.library`` are opened (their Python implementation runs under the mode), so the products
  and passes inside them are seen.

Host reads (``.item()``, ``bool(tensor)``) have no value on meta tensors: a trace is given an ``answer_host_read``
callback for the reads the traced code is known to make (e.g. "is the upstream gradient 1?"), and records each
one (a host synchronisation on a GPU); any other read raises :class:`HostReadError`.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmarks.flop_counter import matmul_flops, matmul_operands
from kidkernels.ops import launches as kk_launches
from kidkernels.ops.custom_ops import python_impl

aten = torch.ops.aten

_HOST_READS = (aten._local_scalar_dense.default, aten.is_nonzero.default, aten.equal.default)

# No kernel: allocations and aliases (view ops are recognised by ``func.is_view``).
_FREE = {aten.empty, aten.empty_strided, aten.empty_like, aten.new_empty, aten.new_empty_strided, aten.detach,
         aten.lift_fresh, aten.alias, aten.resize_, aten.set_, aten._assert_tensor_metadata}
# The first argument is only the destination (or gives the shape): written, not read.
_WRITE_ONLY_FIRST = {aten.fill_, aten.zero_, aten.copy_, aten.zeros_like, aten.ones_like, aten.full_like,
                     aten.rand_like, aten.randn_like, aten.uniform_, aten.normal_, aten.random_, aten.bernoulli_,
                     aten.exponential_}
# Read the index and one element of the first argument per output element.
_GATHERS = {aten.gather, aten.index_select, aten.index, aten.nll_loss_forward, aten.take}
# Update the elements the index names in a tensor (the first argument), read the index and the source.
_SCATTERS_IN_PLACE = {aten.scatter_add_, aten.scatter_, aten.index_put_, aten.index_add_, aten.index_fill_}

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32", torch.float64: "f64",
                torch.int64: "i64", torch.int32: "i32", torch.bool: "bool", torch.uint8: "u8", torch.int8: "i8"}


class HostReadError(RuntimeError):
    """The traced code read a tensor value on the host that the trace has no answer for."""


@dataclass(frozen=True)
class Launch:
    """One kernel launch: ``label`` (the group it is listed under), ``source`` ("triton" or "aten"), its matmul FLOPs,
    HBM bytes (reads plus writes) and whether its products run in float32 (``matmul_dtype``)."""
    label: str
    source: str
    flops: int
    hbm_bytes: int
    matmul_dtype: str | None = None


def span_bytes(t: torch.Tensor) -> int:
    """Bytes of the memory ``t`` spans: its elements, a stride-0 (broadcast) dimension counted once."""
    if t.numel() == 0:
        return 0
    return t.element_size() * prod(size for size, stride in zip(t.shape, t.stride()) if stride != 0)


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _tensors(values) -> list[torch.Tensor]:
    return [v for v in tree_leaves(values) if isinstance(v, torch.Tensor)]


class LaunchTrace(TorchDispatchMode):
    """Record every launch of the code run inside it (see the module docstring); use through :func:`trace`.

    ``names``: input tensors to call by name in the labels ({"x_s": tensor, ...}; their views too, by storage);
    ``dims``: sizes to write symbolically in the labels' shapes ({"V": 151936, ...}).  A first dimension is written
    symbolically only when it is one of ``row_dims`` (default "N" and "V"); any other but 1 is written "r",
    the rows of a chunk, so that the chunks of a loop share a label (and a chunk of 1,024 rows is not called H_s).
    """

    def __init__(self, triton_records: list, *, names: dict[str, torch.Tensor] | None = None,
                 dims: dict[str, int] | None = None, row_dims=("N", "V"), answer_host_read: Callable | None = None):
        super().__init__()
        self.launches: list[Launch] = []
        self.host_reads: list[str] = []
        self._triton_records = triton_records
        self._seen = 0
        self._names = {self._storage_key(t): name for name, t in (names or {}).items()}
        # The first name given for a size wins (dicts keep their order).
        self._dims = {}
        for name, size in (dims or {}).items():
            self._dims.setdefault(size, name)
        self._row_dims = tuple(row_dims)
        self._answer = answer_host_read

    @staticmethod
    def _storage_key(t: torch.Tensor):
        return StorageWeakRef(t.untyped_storage())

    def flush(self) -> None:
        """Move the Triton launches recorded since the last aten op into :attr:`launches` (in order).  A Triton
        launch's products (``tl.dot``) are priced at the bf16 rate: the roofline's inputs are bf16."""
        for record in self._triton_records[self._seen:]:
            self.launches.append(Launch(record.kernel, "triton", record.flops, record.hbm_bytes,
                                        "bf16" if record.flops else None))
        self._seen = len(self._triton_records)

    def describe(self, t: torch.Tensor) -> str:
        """A tensor in a label: its input name, else dtype and symbolic shape (``^T``: a transposed view)."""
        if t.dim() == 2 and t.stride(0) < t.stride(1) and t.shape[0] > 1:  # a transposed view
            return self.describe(t.t()) + "^T"
        name = self._names.get(self._storage_key(t))
        if name is not None:
            return name

        def dim(i: int, size: int) -> str:
            if i == 0 and self._dims.get(size) not in self._row_dims:  # the rows: of a chunk, unless N (or V) of them
                return "1" if size == 1 else "r"
            return self._dims.get(size, str(size))

        return f"{dtype_name(t.dtype)}[{','.join(dim(i, s) for i, s in enumerate(t.shape))}]"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inner = python_impl(func)
        if inner is not None:  # a kidkernels op: record what runs inside it
            with self:
                return inner(*args, **kwargs)
        self.flush()
        if func in _HOST_READS:
            return self._host_read(func, args)
        out = func(*args, **kwargs)
        launch = self._price(func, args, kwargs, out)
        if launch is not None:
            self.launches.append(launch)
        return out

    def _host_read(self, func, args):
        what = f"{func.overloadpacket.__name__}({', '.join(self.describe(t) for t in _tensors(args))})"
        value = self._answer(func, args) if self._answer is not None else None
        if value is None:
            raise HostReadError(f"host read {what} on meta tensors, with no known answer")
        self.host_reads.append(what)
        return value

    def _price(self, func, args, kwargs, out) -> Launch | None:
        packet = func.overloadpacket
        if func.is_view or packet in _FREE:
            return None
        outputs = _tensors(out)
        inputs = _tensors((args, {k: v for k, v in kwargs.items() if k != "out"}))
        name = str(func).removesuffix(".default")
        flops = matmul_flops(func, args)
        if flops is not None:
            a, b = matmul_operands(func, args)
            label = f"{name} {self.describe(a)} @ {self.describe(b)} -> {self.describe(outputs[0])}"
            nbytes = sum(span_bytes(t) for t in inputs) + sum(span_bytes(t) for t in outputs)
            return Launch(label, "aten", flops, nbytes, dtype_name(a.dtype))
        if packet in _WRITE_ONLY_FIRST:
            reads = inputs[1:] if args and isinstance(args[0], torch.Tensor) else inputs
            nbytes = sum(span_bytes(t) for t in reads) + sum(span_bytes(t) for t in outputs)
        elif packet in _GATHERS:
            index_bytes = sum(span_bytes(t) for t in inputs[1:])
            if packet is aten.nll_loss_forward:  # one input element per target
                gathered = inputs[1].numel() * inputs[0].element_size()
            else:
                gathered = outputs[0].numel() * inputs[0].element_size()
            nbytes = gathered + index_bytes + sum(span_bytes(t) for t in outputs)
        elif packet is aten.nll_loss_backward:  # grad_output, self (its shape only), target, weight, total_weight
            nbytes = sum(span_bytes(t) for t in inputs if t is not args[1]) + sum(span_bytes(t) for t in outputs)
        elif packet in _SCATTERS_IN_PLACE:
            rest = inputs[1:]
            touched = max((t.numel() for t in rest), default=0) * inputs[0].element_size()
            nbytes = sum(span_bytes(t) for t in rest) + 2 * touched
        else:
            nbytes = sum(span_bytes(t) for t in inputs) + sum(span_bytes(t) for t in outputs)
        shown = outputs[0] if outputs else (inputs[0] if inputs else None)
        label = name if shown is None else f"{name} -> {self.describe(shown)}"
        return Launch(label, "aten", 0, nbytes)


@dataclass
class Trace:
    """The launches of one traced call, in order, and the host reads it made."""
    launches: list[Launch]
    host_reads: list[str]


def trace(fn: Callable[[], object], *, names=None, dims=None, answer_host_read=None) -> Trace:
    """Run ``fn`` (on meta tensors) in a dry run of kidkernels' launches under a :class:`LaunchTrace`."""
    with kk_launches.recording(dry_run=True) as triton_records:
        mode = LaunchTrace(triton_records, names=names, dims=dims, answer_host_read=answer_host_read)
        with mode:
            fn()
        mode.flush()
    return Trace(mode.launches, mode.host_reads)
