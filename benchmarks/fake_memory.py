"""Peak GPU memory of a training step, counted on a CPU with fake tensors: no weights are allocated, no GPU is needed.

Three pieces, used together by :mod:`benchmarks.estimate_memory`:

* :func:`fake_causal_lm` builds a Hugging Face causal LM (optionally with LoRA) on the meta device and then gives
  every parameter and buffer fake CPU storage under a :class:`FakeTensorMode`, keeping tied weights tied (``to_empty``
  would untie them, and ``Module.to`` cannot swap fake parameters).
* :class:`LiveBytesTracker`, a dispatch mode stacked on the fake mode, counts the bytes of every live storage (sizes
  rounded up to the CUDA caching allocator's 512-byte blocks, as ``torch.cuda.max_memory_allocated`` counts them),
  the peak, and at the peak how many of the live bytes carry each label: what was live, not what was allocated.
  Labels come from the region an allocation happened in (weights, the loss, the lm_head's logits, ...), else
  "backward" inside the autograd engine, else "activations"; gradients and optimizer state are relabelled when they
  are known.  torch's own ``MemTracker`` crashes on frozen parameters and is far slower.
* :func:`cuda_like_execution` makes fake CPU tensors take the paths CUDA tensors would (a CPU build aborts inside
  autograd on fake CUDA tensors, so the tensors stay on the CPU and the op choices are routed instead):

  - ``F.scaled_dot_product_attention`` -> CUDA's flash attention (bf16/fp16, no mask) or memory-efficient attention
    (a mask, or float32), whose saved tensors are O(T) log-sum-exps; the CPU kernels differ;
  - ``F.dropout`` -> ``native_dropout`` with a bool mask, as CUDA's fused dropout (the CPU path keeps a mask in the
    input dtype: +2.8 GiB for the 0.5B LoRA student at micro-batch 4);
  - Hugging Face's SDPA mask code reads the padding mask's values to decide whether it may skip the mask (and never
    does so on fake tensors): with ``no_padding`` it answers as a real unpadded batch would (skip, ``is_causal``);
  - kidkernels takes its Triton backend (``KIDKERNELS_BACKEND=triton``; its kernels allocate nothing and are not
    launched on fake tensors: every buffer they write is allocated by the dispatch layer, which runs as on a GPU)
    and its products take ``mm(..., out_dtype=float32)`` as cuBLAS does, where the installed torch has it;
  - host reads of tensor values: kidkernels' input checks on CPU tensors read whether any target id is out of range;
    the inputs here are valid by construction, so the answer is "no" (any other read raises, naming its caller).

Everything here is an estimate of *allocated* memory; see :data:`NOT_MODELLED`.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import pkgutil
import sys
import weakref
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kidkernels.ops.custom_ops import python_impl

# The CUDA caching allocator hands out blocks in multiples of 512 bytes (max_memory_allocated counts the blocks).
ALLOCATOR_BLOCK_BYTES = 512

NOT_MODELLED = (
    "allocator fragmentation and reserved-but-unallocated memory (segment rounding to 2/20 MiB: "
    "torch.cuda.memory_reserved, and nvidia-smi, show more than the allocated bytes counted here)",
    "the CUDA context (about 0.5 GiB per process), cuBLAS/cuBLASLt workspaces (tens of MiB), attention kernels' "
    "internal workspaces, NCCL buffers",
    "padding: every sequence is prompt + answer tokens long, so attention takes flash attention with is_causal; a "
    "padded batch adds a [B, 1, T, T] mask and memory-efficient attention",
    "generation (GKD, ImitKD, f-distill) as one cached no-grad forward over prompt + max_new_tokens tokens (the KV "
    "cache at its final size, every answer max_new_tokens long); per-token cache growth and sampling buffers are not "
    "modelled",
    "full fine-tuning under bf16 autocast runs CPU autocast's op lists, which differ from CUDA's in a few "
    "elementwise ops",
)


_HOST_READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)


def is_fake(tensor) -> bool:
    return isinstance(tensor, FakeTensor)


class HostReadError(RuntimeError):
    """A tensor value was read on the host under fake tensors, where no value exists."""


# Callers (path suffixes) whose host reads have a known answer for valid inputs, and that answer.
HOST_READ_ANSWERS = {
    # The target range check: ``bool(bad.any())`` on CPU tensors (CUDA tensors get a device-side assert instead).
    os.path.join("kidkernels", "_validation.py"): False,
    os.path.join("kidkernels", "ops", "custom_ops.py"): False,
}


def _host_read_answer(tensor: torch.Tensor):
    this_file = os.path.abspath(__file__)
    frame = sys._getframe(2)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path != this_file and f"{os.sep}torch{os.sep}" not in path:
            for suffix, answer in HOST_READ_ANSWERS.items():
                if path.endswith(suffix):
                    return answer
            raise HostReadError(
                f"a tensor value ({tensor.dtype}, shape {tuple(tensor.shape)}) is read on the host at "
                f"{path}:{frame.f_lineno} ({frame.f_code.co_name}); fake tensors have no values.  The estimate "
                "cannot follow a data-dependent branch: add a known answer to HOST_READ_ANSWERS in "
                "benchmarks/fake_memory.py only if the answer is the same for every valid input")
        frame = frame.f_back
    raise HostReadError("a tensor value is read on the host under fake tensors")


# ---- live-bytes tracking ----------------------------------------------------------------------------------------

@dataclass
class _Block:
    nbytes: int
    label: str
    index: int  # allocation counter when it was allocated


@dataclass
class RegionRecord:
    """One call of a labelled region: live bytes on entry and the most seen inside it (``extra = peak - entry``)."""
    label: str
    name: str
    entry_bytes: int
    peak_bytes: int

    @property
    def extra_bytes(self) -> int:
        return self.peak_bytes - self.entry_bytes


@dataclass
class PeakRecord:
    bytes: int = 0
    by_label: dict = field(default_factory=dict)
    where: str = ""
    allocation_index: int = 0


def allocated_bytes(nbytes: int) -> int:
    """Bytes the CUDA caching allocator reports for a request of ``nbytes`` (0 stays 0)."""
    return -(-nbytes // ALLOCATOR_BLOCK_BYTES) * ALLOCATOR_BLOCK_BYTES


class LiveBytesTracker(TorchDispatchMode):
    """Live storage bytes of every tensor an aten op returns (and of tensors :meth:`register` is given), the peak,
    and the composition of the peak by label.

    Enter it *inside* the fake mode (``with fake_mode, tracker:``) so that it sees every op first.  Storages are
    followed through weak references: a storage counts until its last tensor (view or base) is gone.
    """

    def __init__(self):
        super().__init__()
        self._blocks: dict[int, _Block] = {}
        self.by_label: dict[str, int] = defaultdict(int)
        self.current = 0
        self.allocations = 0
        self.peak = PeakRecord()
        self.where = ""  # set by the driver: which micro-batch / step the run is in
        self._regions: list[RegionRecord] = []
        self.region_records: list[RegionRecord] = []
        self.largest = (0, "")  # the largest storage seen, and its label
        self.largest_by_label: dict[str, int] = defaultdict(int)

    # -- dispatch ----------------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # bool(t) arrives as is_nonzero inside a kidkernels op's body (below autograd, where it is not decomposed
        # into _local_scalar_dense): both are host reads.
        if func in _HOST_READS and is_fake(args[0]):
            return _host_read_answer(args[0])
        inner = python_impl(func)
        if inner is not None:
            # A kidkernels op registered with torch.library: run its body with this mode active, so that its
            # chunk buffers (the loss workspace) are counted, not only its outputs.
            with self:
                return inner(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf, None)
        return out

    def _label_now(self) -> str:
        if self._regions:
            return self._regions[-1].label
        if torch._C._current_graph_task_id() != -1:
            return "backward"
        return "activations"

    def _track(self, tensor: torch.Tensor, label: str | None) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._blocks:
            return
        nbytes = allocated_bytes(storage.nbytes())
        self.allocations += 1
        block = _Block(nbytes, label or self._label_now(), self.allocations)
        self._blocks[key] = block
        weakref.finalize(storage, self._release, key)
        if not nbytes:
            return
        self.current += nbytes
        self.by_label[block.label] += nbytes
        if nbytes > self.largest[0]:
            self.largest = (nbytes, block.label)
        if nbytes > self.largest_by_label[block.label]:
            self.largest_by_label[block.label] = nbytes
        for region in self._regions:
            region.peak_bytes = max(region.peak_bytes, self.current)
        if self.current > self.peak.bytes:
            self.peak = PeakRecord(self.current, dict(self.by_label), self._where_now(), self.allocations)

    def _release(self, key: int) -> None:
        block = self._blocks.pop(key, None)
        if block is not None and block.nbytes:
            self.current -= block.nbytes
            self.by_label[block.label] -= block.nbytes

    def _where_now(self) -> str:
        inside = " > ".join(r.name for r in self._regions)
        backward = torch._C._current_graph_task_id() != -1
        return " | ".join(p for p in (self.where, "autograd backward" if backward else "", inside) if p)

    # -- labels ------------------------------------------------------------------------------------------------
    def register(self, tensors, label: str) -> None:
        """Count tensors that already exist (e.g. parameters made before the tracker was entered) under ``label``,
        or relabel them if they are counted already."""
        for tensor in tensors:
            if tensor is None:
                continue
            key = tensor.untyped_storage()._cdata
            if key in self._blocks:
                self.relabel(tensor, label)
            else:
                self._track(tensor, label)

    def relabel(self, tensor: torch.Tensor, label: str) -> None:
        """Move a live tensor's bytes to ``label``, in the current counts and in the peak record (a block allocated
        before the peak and still alive was alive at the peak)."""
        block = self._blocks.get(tensor.untyped_storage()._cdata)
        if block is None or block.label == label:
            return
        self.by_label[block.label] -= block.nbytes
        self.by_label[label] += block.nbytes
        if block.index <= self.peak.allocation_index and block.nbytes:
            peak = self.peak.by_label
            peak[block.label] = peak.get(block.label, 0) - block.nbytes
            peak[label] = peak.get(label, 0) + block.nbytes
        block.label = label

    @contextlib.contextmanager
    def region(self, label: str, name: str | None = None):
        """Allocations inside are labelled ``label``; the call's entry and peak bytes are recorded."""
        record = RegionRecord(label, name or label, self.current, self.current)
        self._regions.append(record)
        try:
            yield record
        finally:
            self._regions.pop()
            self.region_records.append(record)

    def reset_peak(self) -> None:
        """Start a new measurement: the peak, the region records and the largest storage restart from now."""
        self.peak = PeakRecord(self.current, dict(self.by_label), self._where_now(), self.allocations)
        self.region_records = []
        self.largest = (0, "")
        self.largest_by_label = defaultdict(int)

    def live_by_label(self) -> dict[str, int]:
        return {k: v for k, v in self.by_label.items() if v}


# ---- models with fake weights -----------------------------------------------------------------------------------

@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def materialize_fake(module: torch.nn.Module, fake_mode: FakeTensorMode | None) -> torch.nn.Module:
    """Give every parameter and buffer of a meta-device ``module`` fake CPU storage, in place (``fake_mode`` None:
    real, uninitialised CPU storage, for comparisons with a real run).  A tensor shared by several modules (tied
    embeddings) stays one tensor."""
    replaced: dict[int, torch.Tensor] = {}
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        for sub in module.modules():
            for name, param in list(sub._parameters.items()):
                if param is None:
                    continue
                if id(param) not in replaced:
                    data = torch.empty(param.shape, dtype=param.dtype, device="cpu")
                    replaced[id(param)] = torch.nn.Parameter(data, requires_grad=param.requires_grad)
                sub._parameters[name] = replaced[id(param)]
            for name, buffer in list(sub._buffers.items()):
                if buffer is None:
                    continue
                if id(buffer) not in replaced:
                    replaced[id(buffer)] = torch.empty(buffer.shape, dtype=buffer.dtype, device="cpu")
                sub._buffers[name] = replaced[id(buffer)]
    return module


def fake_causal_lm(config, *, dtype: torch.dtype, fake_mode: FakeTensorMode | None, lora=None,
                   gradient_checkpointing: bool = False, train: bool = True):
    """A ``transformers`` causal LM of ``config`` with fake CPU weights in ``dtype`` (SDPA attention, no KV cache by
    default), LoRA adapters from ``lora`` (:class:`kid.models.LoraOptions`: peft, adapters in float32) if given,
    Hugging Face gradient checkpointing (non-reentrant, as ``kid train`` sets it) if asked."""
    from transformers import AutoModelForCausalLM

    config.use_cache = False
    config._attn_implementation = "sdpa"
    with torch.device("meta"), default_dtype(dtype):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
        if lora is not None:
            from kid.models import apply_lora

            model = apply_lora(model, lora)
    materialize_fake(model, fake_mode)
    if gradient_checkpointing:
        with _quiet_warnings():  # transformers 5 renames it activation_checkpointing_enable; the old name stays
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if train:
        model.train()
    else:
        model.eval().requires_grad_(False)
    return model


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


# ---- CUDA's op choices for fake CPU tensors ---------------------------------------------------------------------

def _cuda_sdpa(original):
    @functools.wraps(original)
    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not is_fake(query):
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeats = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
        if attn_mask is None and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] <= 256:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, dropout_p, is_causal, False, scale=scale)[0]
        bias = attn_mask
        if bias is not None and bias.dtype == torch.bool:
            # SDPA turns a boolean mask into an additive one in the query's dtype before the kernel, on CUDA too.
            bias = torch.zeros(bias.shape, dtype=query.dtype).masked_fill_(bias.logical_not(), float("-inf"))
        if bias is not None:
            bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, needs_grad, dropout_p, is_causal, scale=scale)[0]
    return sdpa


def _cuda_dropout(original):
    @functools.wraps(original)
    def dropout(input, p=0.5, training=True, inplace=False):
        if not is_fake(input) or not training or p == 0.0 or input.numel() == 0:
            return original(input, p, training, inplace)
        out = torch.ops.aten.native_dropout(input, p, True)[0]  # CUDA's fused dropout: output and a bool mask
        if inplace:
            return input.copy_(out)
        return out
    return dropout


def _unpadded_mask_skip(original):
    """Hugging Face's "may the causal mask be skipped for SDPA" test, answered for fake padding masks as for a
    real batch without padding (it reads the mask's values, which fake tensors do not have)."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def skip(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = bound.arguments
        padding_mask = values.get("padding_mask", values.get("attention_mask"))
        if padding_mask is None or not is_fake(padding_mask):
            return original(*args, **kwargs)
        local = values.get("local_attention_size")
        kv_length, q_length = values.get("kv_length"), values.get("q_length", values.get("query_length"))
        if local is not None and kv_length is not None and kv_length >= local:
            return False
        return bool(q_length == 1 or kv_length == q_length or values.get("q_offset", 0) == 0)
    return skip


def _import_all(package_name: str) -> None:
    """Import every module of a package (so that Triton decorates its kernels before TRITON_INTERPRET is set)."""
    package = importlib.import_module(package_name)
    for info in pkgutil.walk_packages(package.__path__, package_name + "."):
        importlib.import_module(info.name)


def _noop_launch_on_fake(original_getitem):
    @functools.wraps(original_getitem)
    def getitem(self, grid):
        launch = original_getitem(self, grid)

        def run(*args, **kwargs):
            if any(is_fake(a) for a in list(args) + list(kwargs.values())):
                return None  # the kernel only writes buffers the caller allocated: nothing to count
            return launch(*args, **kwargs)
        return run
    return getitem


def _triton_kernel_classes():
    classes = []
    with contextlib.suppress(ImportError):
        from triton.runtime import jit

        classes += [jit.KernelInterface, jit.JITFunction]
    with contextlib.suppress(ImportError):
        from triton.runtime import autotuner

        classes += [autotuner.Autotuner, autotuner.Heuristics]
    with contextlib.suppress(ImportError):
        from triton.runtime import interpreter

        classes.append(interpreter.InterpretedFunction)
    return [c for c in classes if "__getitem__" in c.__dict__]


def mm_out_dtype_on_cuda() -> bool:
    """Whether the installed torch has ``torch.mm(..., out_dtype=)`` and ``torch.addmm(..., out_dtype=, out=)``
    (cuBLAS then writes float32 logits and accumulates the weight gradient in float32 in place)."""
    return all(hasattr(op, name) for op in (torch.ops.aten.mm, torch.ops.aten.addmm) for name in ("dtype", "dtype_out"))


ROUTES = ("attention", "dropout", "mask_skip", "kidkernels")


@contextlib.contextmanager
def cuda_like_execution(routes=ROUTES):
    """Route fake CPU tensors to CUDA's op choices (module docstring), those named in ``routes`` (default all);
    yields the list of notes on what could not be routed (e.g. an internal kidkernels or transformers name that
    moved).  "mask_skip" assumes unpadded batches; real tensors are never rerouted."""
    unknown = set(routes) - set(ROUTES)
    if unknown:
        raise ValueError(f"unknown routes {sorted(unknown)}; choose from {ROUTES}")
    notes: list[str] = []
    patches: list[tuple[object, str, object]] = []

    def patch(owner, name: str, make, description: str):
        original = getattr(owner, name, None)
        if original is None:
            notes.append(f"not routed ({description}): {getattr(owner, '__name__', owner)}.{name} not found")
            return
        patches.append((owner, name, original))
        setattr(owner, name, make(original))

    _import_all("kidkernels")
    if "attention" in routes:
        patch(torch.nn.functional, "scaled_dot_product_attention", _cuda_sdpa, "SDPA -> CUDA flash/efficient")
    if "dropout" in routes:
        patch(torch.nn.functional, "dropout", _cuda_dropout, "dropout -> native_dropout with a bool mask")
    if "mask_skip" in routes:
        try:
            import transformers.masking_utils as masking
        except ImportError:
            notes.append("not routed: transformers.masking_utils missing (older transformers)")
        else:
            patch(masking, "_ignore_causal_mask_sdpa", _unpadded_mask_skip, "HF causal-mask skip, unpadded batch")
    saved_env = {k: os.environ.get(k) for k in ("KIDKERNELS_BACKEND", "TRITON_INTERPRET")}
    if "kidkernels" in routes:
        for cls in _triton_kernel_classes():
            patches.append((cls, "__getitem__", cls.__dict__["__getitem__"]))
            setattr(cls, "__getitem__", _noop_launch_on_fake(cls.__dict__["__getitem__"]))
        try:
            from kidkernels.ops import gemm
        except ImportError:
            notes.append("not routed: kidkernels.ops.gemm not found (kidkernels' products take their CPU path)")
        else:
            if mm_out_dtype_on_cuda():
                # CUDA's float32-output products (mm and addmm with out_dtype, the bias or the float32
                # weight-gradient accumulator in the product), which the CPU build lacks.
                patch(gemm, "_probe", lambda original: (lambda device_type, dtype, op: True),
                      "kidkernels products with mm/addmm(out_dtype=float32)")
            else:
                notes.append("this torch has no mm(out_dtype=): kidkernels' upcast-block fallback is counted, as "
                             "on a GPU with this torch")
        os.environ.update(KIDKERNELS_BACKEND="triton", TRITON_INTERPRET="1")
    try:
        yield notes
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)
