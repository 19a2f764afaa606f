"""Compile the Triton kernels exactly as kidkernels launches them, for a CUDA target, on a machine without a GPU,
and report each variant's registers, spills and shared memory from its cubin.

How the variants are found: the public ops (``fused_linear_distill_loss`` for every divergence, with and without
the MLE term, a target, biases, chunking and the "none" reduction; ``distill_loss``; ``fused_linear_cross_entropy``;
``fused_linear_entropy``; ``fused_linear_argmax``) run on small CPU tensors of realistic shape (hidden sizes that are
multiples of 64, V = 151,936 and an odd V) in float32, bfloat16 and float16, forward and backward, with every Triton
launch intercepted instead of run (``JITFunction.run``, and each config of an ``Autotuner``).  Each launch is
specialised the way Triton's JIT would specialise it on a GPU, by Triton's own binder when it is importable (16-byte
aligned pointers and integers divisible by 16 get the divisibility hint, integers are i32 or i64 by range, an integer
equal to 1 becomes a constant, constexprs, ``num_warps``/``num_stages``), so nothing here lists kernels or argument
signatures: a new kernel or argument is picked up from the launch code.  Each distinct specialisation is compiled with
``triton.compile(ASTSource(...))`` for ``GPUTarget("cuda", arch, 32)`` (sm_90a for ``--arch 90``), and
``cuobjdump -res-usage`` (shipped in the triton wheel) reads its registers, stack/local memory (spills) and static
shared memory from the cubin; Triton's dynamic shared memory comes from the compiled kernel's metadata.

A variant is *hot* when a training step on a bfloat16 model with Qwen's vocabulary (V = 151,936) launches it:
float32 logits in, bfloat16 gradient out, whether its chunk starts 16-byte aligned or not.  A hot variant that
spills fails the check (``--fail-on-spill any`` extends that to every variant).

    python tools/compile_kernels.py [--arch 90] [--quick] [--json PATH|-] [--table] [--fail-on-spill hot|any|none]

Exit status: 0 when every variant compiled and no checked variant spills; 1 when a launch could not be recorded, a
variant failed to compile or a checked variant spills; 2 for a bad command line.  ``--quick`` (used by the test
suite) runs the bfloat16 training step at V = 151,936 only: every divergence with the MLE term, the cross-entropy,
entropy and argmax, reverse KL over chunks that start at every alignment, and reverse KL and entropy with both
models' logits softcapped (the heaviest logit transform).  Works with Triton 3.6 and 3.9.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout: import this checkout's kidkernels
    sys.path.insert(0, str(ROOT))

QWEN_VOCAB = 151_936  # the hot vocabulary (Qwen1.5/2 tokenizers): a multiple of 16
ODD_VOCAB = 50_257  # GPT-2's: ragged last tile, V not divisible by 16
HIDDEN, TEACHER_HIDDEN = 64, 128  # multiples of 64, as real hidden sizes are; small so the CPU matmuls are cheap
ROWS = 32  # a multiple of 16: row strides of [*, N] buffers divisible by 16
DTYPES = ("bfloat16", "float32", "float16")
HOT_DTYPE = "bfloat16"
DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")


# ----------------------------------------------------------------------------------------------------------------
# Scenarios: calls of the public API whose launches are recorded
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Scenario:
    """One call of a public op (forward and, when ``grad``, backward) on CPU tensors."""
    name: str
    op: str  # "distill", "distill_logits", "cross_entropy", "entropy", "argmax"
    dtype: str
    vocab: int
    rows: int = ROWS
    divergence: str = "rkl"
    mle_weight: float = 0.0
    with_target: bool = True
    bias: bool = False
    reduction: str = "mean"
    grad: bool = True
    temperature: float = 1.0
    workspace_bytes: int | None = None  # 1: one row per chunk, so chunks start at every alignment
    softcap: float | None = None  # final-logit softcapping of every model (Gemma's 30), the heaviest transform

    @property
    def hot(self) -> bool:
        return self.dtype == HOT_DTYPE and self.vocab == QWEN_VOCAB


def _label(op, dtype, vocab, **kw):
    parts = [op] + [f"{k}={v}" for k, v in kw.items()] + [dtype, f"V={vocab}"]
    return " ".join(parts)


def scenarios(quick: bool) -> list[Scenario]:
    """The calls whose launches are compiled.  ``quick``: the hot bfloat16 training step only."""
    out: list[Scenario] = []
    dtypes = (HOT_DTYPE,) if quick else DTYPES
    vocabs = (QWEN_VOCAB,) if quick else (QWEN_VOCAB, ODD_VOCAB)
    for dtype in dtypes:
        for vocab in vocabs:
            def add(op, **kw):
                out.append(Scenario(_label(op, dtype, vocab, **kw), op, dtype, vocab, **kw))

            if quick:
                for divergence in DIVERGENCES:
                    add("distill", divergence=divergence, mle_weight=0.5)
                add("distill", divergence="rkl", mle_weight=0.5, rows=3, workspace_bytes=1)  # unaligned chunks
                add("distill", divergence="rkl", mle_weight=0.5, softcap=30.0)  # student and teacher capped
                add("cross_entropy")
                add("entropy", grad=False)
                add("entropy", grad=False, softcap=30.0)
                add("argmax", grad=False)
                continue
            for divergence in DIVERGENCES:
                add("distill", divergence=divergence, with_target=False)
                add("distill", divergence=divergence)
                add("distill", divergence=divergence, mle_weight=0.5)
                add("distill_logits", divergence=divergence, mle_weight=0.5)
            add("distill", divergence="rkl", mle_weight=0.5, bias=True)
            add("distill", divergence="rkl", mle_weight=0.5, temperature=2.0)
            add("distill", divergence="rkl", mle_weight=0.5, reduction="none")
            add("distill", divergence="rkl", mle_weight=0.5, grad=False)
            add("distill", divergence="rkl", mle_weight=0.5, rows=3, workspace_bytes=1)
            add("distill", divergence="jsd", mle_weight=0.5, rows=3, workspace_bytes=1)
            add("distill", divergence="rkl", mle_weight=0.5, rows=1)
            for divergence in DIVERGENCES:
                add("distill", divergence=divergence, mle_weight=0.5, softcap=30.0)
            add("cross_entropy")
            add("cross_entropy", softcap=30.0)
            add("cross_entropy", bias=True)
            add("cross_entropy", reduction="none")
            add("cross_entropy", grad=False)
            add("cross_entropy", rows=3, workspace_bytes=1)
            add("entropy", grad=False)
            add("entropy", grad=False, softcap=30.0)
            add("entropy", grad=False, temperature=2.0)
            add("entropy", grad=False, bias=True)
            add("entropy", grad=False, rows=3, workspace_bytes=1)
            add("argmax", grad=False)
    return out


def run_scenario(sc: Scenario) -> None:
    """Call the public op of ``sc`` (and its backward); the launches are intercepted by :func:`recording`."""
    import torch

    import kidkernels

    dtype = getattr(torch, sc.dtype)
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0, grad=False):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).requires_grad_(grad and sc.grad)

    n, vocab = sc.rows, sc.vocab
    target = None
    if sc.with_target:
        target = torch.randint(0, vocab, (n,), generator=gen)
        target[::7] = -100  # some ignored rows, as padded batches have
    opts: dict[str, Any] = {"backend": "triton"}
    if sc.workspace_bytes is not None:
        opts["workspace_bytes"] = sc.workspace_bytes
    grad_inputs = []
    with torch.set_grad_enabled(sc.grad):
        if sc.op in ("distill", "distill_logits", "cross_entropy"):
            opts["reduction"] = sc.reduction
        if sc.op == "distill":
            xs, ws = randn(n, HIDDEN, grad=True), randn(vocab, HIDDEN, scale=0.05, grad=True)
            xt, wt = randn(n, TEACHER_HIDDEN), randn(vocab, TEACHER_HIDDEN, scale=0.05)
            if sc.bias:
                opts.update(student_bias=randn(vocab, scale=0.1, grad=True), teacher_bias=randn(vocab, scale=0.1))
            if sc.softcap is not None:
                opts.update(student_softcap=sc.softcap, teacher_softcap=sc.softcap)
            loss = kidkernels.fused_linear_distill_loss(
                xs, ws, xt, wt, target, divergence=sc.divergence, mle_weight=sc.mle_weight,
                temperature=sc.temperature, **opts)
            grad_inputs = [xs, ws]
        elif sc.op == "distill_logits":
            s_logits, t_logits = randn(n, vocab, scale=2.0, grad=True), randn(n, vocab, scale=2.0)
            loss = kidkernels.distill_loss(s_logits, t_logits, target, divergence=sc.divergence,
                                           mle_weight=sc.mle_weight, temperature=sc.temperature, **opts)
            grad_inputs = [s_logits]
        elif sc.op == "cross_entropy":
            x, w = randn(n, HIDDEN, grad=True), randn(vocab, HIDDEN, scale=0.05, grad=True)
            if sc.bias:
                opts["bias"] = randn(vocab, scale=0.1, grad=True)
            loss = kidkernels.fused_linear_cross_entropy(x, w, target, softcap=sc.softcap, **opts)
            grad_inputs = [x, w]
        elif sc.op in ("entropy", "argmax"):
            x, w = randn(n, HIDDEN), randn(vocab, HIDDEN, scale=0.05)
            bias = randn(vocab, scale=0.1) if sc.bias else None
            if sc.op == "entropy":
                kidkernels.fused_linear_entropy(x, w, bias, temperature=sc.temperature, softcap=sc.softcap, **opts)
            else:
                kidkernels.fused_linear_argmax(x, w, bias, **opts)
            return
        else:
            raise ValueError(f"unknown op {sc.op!r}")
    if sc.grad:
        upstream = torch.ones_like(loss) if loss.dim() == 0 else torch.rand(loss.shape, generator=gen, dtype=loss.dtype)
        torch.autograd.backward(loss, upstream, inputs=grad_inputs)


# ----------------------------------------------------------------------------------------------------------------
# Recording launches and specialising them as the JIT would on a GPU
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Specialization:
    """What ``triton.compile`` needs for one launch: ``signature`` {name: type}, ``constexprs`` {path: value},
    ``attrs`` {path: [[attribute, value]]}, ``options`` (the backend's options dataclass)."""
    signature: dict
    constexprs: dict
    attrs: dict
    options: Any


def make_target(arch: int):
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", arch, 32)


@functools.lru_cache(maxsize=None)
def _backend(arch: int):
    from triton.compiler import make_backend

    return make_backend(make_target(arch))


def _launch_kwargs(kernel, kwargs: dict, arch: int) -> dict:
    """The keyword arguments ``JITFunction.run`` adds from Triton's knobs before it binds the arguments: ``debug``
    (3.6 and 3.9), ``instrumentation_mode`` (3.6 and 3.9), ``fpsan_homomorphic_casts`` (3.9), each where the
    backend's options have the field."""
    import triton

    kwargs = dict(kwargs)
    knobs = getattr(triton, "knobs", None)
    debug = bool(getattr(getattr(knobs, "runtime", None), "debug", False))
    kwargs["debug"] = kwargs.get("debug", getattr(kernel, "debug", None)) or debug
    fields = _option_fields(arch)
    compilation = getattr(knobs, "compilation", None)
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if name in fields and name not in kwargs and hasattr(compilation, name):
            kwargs[name] = getattr(compilation, name)
    return kwargs


@functools.lru_cache(maxsize=None)
def _option_fields(arch: int) -> frozenset:
    return frozenset(vars(_backend(arch).parse_options({})))


_BINDERS: dict = {}


def specialize_with_triton(kernel, args: tuple, kwargs: dict, arch: int) -> Specialization:
    """Triton's own launch-time specialisation (``create_function_from_signature`` and ``JITFunction._pack_args``,
    present in Triton 3.6 and 3.9): exactly what ``JITFunction.run`` computes before it compiles."""
    from triton.runtime.jit import create_function_from_signature

    backend = _backend(arch)
    key = (id(kernel), arch)
    if key not in _BINDERS:
        _BINDERS[key] = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = _launch_kwargs(kernel, kwargs, arch)
    bound_args, specialization, options = _BINDERS[key](*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    return Specialization(dict(signature), dict(constexprs), dict(attrs), options)


_TORCH_TO_TRITON = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int64": "i64", "int32": "i32",
    "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1", "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5",
}


def _specialize_arg(arg, is_const: bool, specialize: bool, align: bool) -> tuple:
    """One argument as the JIT types it on an NVIDIA GPU: ``(type, attribute)``; the attribute "D" marks a
    pointer 16-byte aligned or an integer divisible by 16."""
    if arg is None:
        return "constexpr", None
    if isinstance(arg, bool):
        return "u1", None
    if isinstance(arg, int):
        if specialize and arg == 1:
            return "constexpr", 1
        kind = "i32" if -2 ** 31 <= arg < 2 ** 31 else "i64" if -2 ** 63 <= arg < 2 ** 63 else "u64"
        return kind, "D" if specialize and align and arg % 16 == 0 else ""
    if isinstance(arg, float):
        return "fp32", None
    if hasattr(arg, "data_ptr") and hasattr(arg, "dtype"):
        dtype = _TORCH_TO_TRITON[str(arg.dtype).replace("torch.", "")]
        kind = ("*k" if is_const else "*") + dtype
        return kind, "D" if specialize and align and arg.data_ptr() % 16 == 0 else ""
    raise NotImplementedError(f"cannot specialise an argument of type {type(arg).__name__}")


def specialize_fallback(kernel, args: tuple, kwargs: dict, arch: int) -> Specialization:
    """The JIT's specialisation rules, written out, for a Triton whose binder internals differ from 3.6/3.9's.
    Flat (non-tuple) arguments only; the tests check it agrees with :func:`specialize_with_triton`."""
    backend = _backend(arch)
    kwargs = _launch_kwargs(kernel, kwargs, arch)
    names = [p.name for p in kernel.params]
    bound = kernel.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        value = bound.arguments[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)], attrs[(i,)] = "constexpr", value, []
            continue
        kind, attr = _specialize_arg(value, p.is_const, not p.do_not_specialize,
                                     not p.do_not_specialize_on_alignment)
        annotated = p.annotation_type if isinstance(p.annotation_type, str) and p.annotation_type else None
        if annotated:
            skip = annotated == "u1" or annotated[:2] in ("fp", "bf") or p.do_not_specialize
            kind, attr = (annotated, None) if skip else (annotated, attr)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[(i,)] = attr if attr is not None else value
            attrs[(i,)] = []
        elif isinstance(attr, str):
            attrs[(i,)] = backend.parse_attr(attr)
    options = backend.parse_options({k: v for k, v in kwargs.items() if k not in names})
    return Specialization(signature, constexprs, attrs, options)


def specialize(kernel, args: tuple, kwargs: dict, arch: int) -> Specialization:
    try:
        return specialize_with_triton(kernel, args, kwargs, arch)
    except (ImportError, AttributeError, TypeError):  # binder internals renamed in another Triton version
        return specialize_fallback(kernel, args, kwargs, arch)


@dataclasses.dataclass
class Variant:
    """One distinct compiled form of a kernel, with the scenarios that launch it."""
    kernel: Any  # the JITFunction
    spec: Specialization
    example_ints: dict  # {argument name: value} of the runtime integer arguments at the first launch
    scenarios: list = dataclasses.field(default_factory=list)
    hot: bool = False

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def num_warps(self) -> int:
        return self.spec.options.num_warps

    @property
    def num_stages(self) -> int:
        return self.spec.options.num_stages

    def key(self) -> tuple:
        s = self.spec
        return (id(self.kernel), tuple(s.signature.items()), tuple(sorted(s.constexprs.items())),
                tuple(sorted((k, repr(v)) for k, v in s.attrs.items() if v)), repr(sorted(vars(s.options).items())))

    def divisible(self) -> list[str]:
        """Arguments that carry the divisibility-16 hint (16-byte aligned pointers, integers divisible by 16)."""
        names = list(self.spec.signature)
        return [names[k[0]] for k, v in self.spec.attrs.items() if len(k) == 1 and any(
            a and a[0] == "tt.divisibility" for a in v)]

    def constexpr_values(self) -> dict:
        names = list(self.spec.signature)
        return {names[k[0]] if len(k) == 1 else f"{names[k[0]]}{list(k[1:])}": v
                for k, v in self.spec.constexprs.items()}

    def describe(self) -> str:
        """Short label: pointer dtypes, the declared constexprs, and what departs from "aligned, i32, /16"."""
        params = {p.name: p for p in self.kernel.params}
        sig, div = self.spec.signature, set(self.divisible())
        dtypes = []
        for t in sig.values():
            if t.startswith("*") and t.lstrip("*k") not in dtypes:
                dtypes.append(t.lstrip("*k"))
        parts = ["/".join(dtypes)]
        consts = self.constexpr_values()
        for name, value in consts.items():  # declared constexprs: flags that are on by name, others name=value
            if name in params and params[name].is_constexpr and value is not False:
                parts.append(name if value is True else f"{name}={value}")
        unaligned = [n for n, t in sig.items() if t.startswith("*") and n not in div]
        not16 = [n for n, t in sig.items() if t[:1] in "iu" and t != "u1" and n not in div
                 and self.example_ints.get(n, 0) >= 0]  # sizes and strides; a negative sentinel is no size
        wide = [n for n, t in sig.items() if t in ("i64", "u64")]
        ones = [n for n in consts if n in params and not params[n].is_constexpr and consts[n] == 1]
        for tag, items in (("unaligned", unaligned), ("not/16", not16), ("i64", wide), ("=1", ones)):
            if items:
                parts.append(f"{tag}:{','.join(items)}")
        return " ".join(parts)


class Recorder:
    """Collects the distinct variants launched while :func:`recording` is active."""

    def __init__(self, arch: int, specializer: Callable = specialize):
        self.arch, self.specializer = arch, specializer
        self.variants: dict[tuple, Variant] = {}
        self.scenario: Scenario | None = None
        self.launches = 0

    def on_launch(self, kernel, args: tuple, kwargs: dict) -> None:
        spec = self.specializer(kernel, args, kwargs, self.arch)
        ints = {p.name: v for p, v in zip(kernel.params, _bound_values(kernel, args, kwargs))
                if not p.is_constexpr and isinstance(v, int) and not isinstance(v, bool)}
        variant = Variant(kernel, spec, ints)
        variant = self.variants.setdefault(variant.key(), variant)
        self.launches += 1
        if self.scenario is not None:
            if self.scenario.name not in variant.scenarios:
                variant.scenarios.append(self.scenario.name)
            variant.hot = variant.hot or self.scenario.hot


def _bound_values(kernel, args, kwargs) -> list:
    names = [p.name for p in kernel.params]
    bound = kernel.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    return [bound.arguments[n] for n in names]


def _import_all_kidkernels() -> None:
    """Import every kidkernels module now, so every ``@triton.jit`` kernel is a compilable ``JITFunction`` (a module
    first imported while the recorder sets TRITON_INTERPRET would make interpreter functions)."""
    import kidkernels

    for mod in pkgutil.walk_packages(kidkernels.__path__, "kidkernels."):
        importlib.import_module(mod.name)


@contextlib.contextmanager
def recording(recorder: Recorder):
    """Intercept every Triton launch (record it, run nothing) while the block runs.

    kidkernels sends CPU tensors to its Triton path only under the interpreter (TRITON_INTERPRET=1), so the variable
    is set for the block; the kernels were created beforehand as ``JITFunction``s, whose ``run`` is replaced here.
    The GEMM-fused kernels choose their tiles and dot flags by whether their tensors' device runs under the
    interpreter (``kidkernels.ops.fused_tiles.on_interpreter``): for the block it answers no, so that what is
    compiled is what a GPU launches (GPU tiles, bf16 operands on the tensor cores).
    """
    from triton.runtime import autotuner
    from triton.runtime.jit import JITFunction

    from kidkernels.ops import fused_tiles

    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every Triton with an interpreter has it
        InterpretedFunction = None

    def jit_run(self, *args, grid, warmup, **kwargs):
        recorder.on_launch(self, args, kwargs)
        return None

    def autotuner_run(self, *args, **kwargs):
        # Every config the autotuner would benchmark is a variant that gets compiled at the first launch.
        self.nargs = dict(zip(self.arg_names, args))
        try:
            configs = self.prune_configs(kwargs)
        except Exception:  # pruning that needs real data: keep every config
            configs = self.configs
        for config in configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())
        self.nargs = None
        return None

    def interpreted_run(self, *args, **kwargs):
        raise RuntimeError(f"kernel {getattr(self.fn, '__qualname__', self)} was created under the Triton interpreter; "
                           "run the compile tool in a process where TRITON_INTERPRET was not set when it was defined")

    saved = [(JITFunction, "run", JITFunction.run), (autotuner.Autotuner, "run", autotuner.Autotuner.run),
             (fused_tiles, "on_interpreter", fused_tiles.on_interpreter)]
    if InterpretedFunction is not None:
        saved.append((InterpretedFunction, "run", InterpretedFunction.run))
    previous_env = os.environ.get("TRITON_INTERPRET")
    JITFunction.run = jit_run
    autotuner.Autotuner.run = autotuner_run
    fused_tiles.on_interpreter = lambda device: False
    if InterpretedFunction is not None:
        InterpretedFunction.run = interpreted_run
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield recorder
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)
        if previous_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous_env


def record(scenario_list: list[Scenario], arch: int, specializer: Callable = specialize,
           progress: Callable[[str], None] | None = None) -> list[Variant]:
    """Run every scenario with launches intercepted; return the distinct variants in first-launch order."""
    _import_all_kidkernels()
    recorder = Recorder(arch, specializer)
    with recording(recorder):
        for sc in scenario_list:
            recorder.scenario = sc
            before = recorder.launches
            if progress:
                progress(sc.name)
            try:
                run_scenario(sc)
            except Exception as exc:
                raise RuntimeError(f"scenario {sc.name!r} failed while recording: {type(exc).__name__}: {exc}") from exc
            if recorder.launches == before:
                raise RuntimeError(f"scenario {sc.name!r} launched no Triton kernel (did the dispatch pick the "
                                   "PyTorch backend?)")
    return list(recorder.variants.values())


# ----------------------------------------------------------------------------------------------------------------
# Compiling and reading the cubin
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Resources:
    """Per-thread registers, per-thread stack frame and local memory (bytes; nonzero in a Triton kernel means
    spilled registers), the spill instructions (STL/LDL) in the SASS, and per-block shared memory (bytes)."""
    regs: int
    stack: int
    local: int
    static_shared: int  # as cuobjdump reports it: 1,024 B on sm_90 for each kernel here that uses shared memory at
    # all (the 1 KiB per block that CUDA reserves on sm_80 and later), 0 otherwise
    dynamic_shared: int  # Triton's allocation, passed at launch
    spill_instructions: int = 0

    @property
    def spill_bytes(self) -> int:
        return self.stack + self.local

    @property
    def spills(self) -> bool:
        return self.spill_bytes > 0 or self.spill_instructions > 0

    @property
    def smem(self) -> int:
        return self.static_shared + self.dynamic_shared


def cuobjdump_path() -> str:
    import triton

    try:
        path = triton.knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except AttributeError:
        pass
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found (looked for {path}); set TRITON_CUOBJDUMP_PATH")
    return str(path)


_RES_LINE = re.compile(r"Function\s+(\S+?):?\s*\n\s*(.*)")


def parse_res_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump -res-usage`` output -> {function name: {"REG": n, "STACK": n, "SHARED": n, "LOCAL": n, ...}}."""
    out = {}
    for name, fields in _RES_LINE.findall(text):
        out[name.rstrip(":")] = {k: int(v) for k, v in re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", fields)}
    return out


def read_resources(cubin: bytes, function: str, dynamic_shared: int) -> Resources:
    """Registers, spills and shared memory of ``function`` in ``cubin``, read with ``cuobjdump``."""
    tool = cuobjdump_path()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    table = parse_res_usage(usage)
    if function not in table:
        if len(table) != 1:
            raise RuntimeError(f"cuobjdump reports no function {function!r}: {usage}")
        function = next(iter(table))
    res = table[function]
    spill_ops = len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\b", sass))
    return Resources(regs=res.get("REG", 0), stack=res.get("STACK", 0), local=res.get("LOCAL", 0),
                     static_shared=res.get("SHARED", 0), dynamic_shared=int(dynamic_shared),
                     spill_instructions=spill_ops)


def compile_variant(kernel, spec: Specialization, arch: int):
    """``triton.compile`` of one specialisation: what ``JITFunction.run`` compiles at its first launch."""
    import triton
    from triton.compiler import ASTSource

    src = ASTSource(kernel, spec.signature, spec.constexprs, spec.attrs)
    return triton.compile(src, target=make_target(arch), options=vars(spec.options))


@dataclasses.dataclass
class Result:
    variant: Variant
    resources: Resources | None = None
    error: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        v, r = self.variant, self.resources
        return {
            "kernel": v.name, "module": v.kernel.fn.__module__, "variant": v.describe(), "hot": v.hot,
            "num_warps": v.num_warps, "num_stages": v.num_stages, "signature": v.spec.signature,
            "constexprs": {k: (val if isinstance(val, (bool, int, float, str, type(None))) else repr(val))
                           for k, val in v.constexpr_values().items()},
            "divisible_by_16": v.divisible(), "example_ints": v.example_ints, "scenarios": v.scenarios,
            "regs": r.regs if r else None, "stack_bytes": r.stack if r else None,
            "local_bytes": r.local if r else None, "spill_bytes": r.spill_bytes if r else None,
            "spill_instructions": r.spill_instructions if r else None, "spills": r.spills if r else None,
            "static_shared_bytes": r.static_shared if r else None,
            "dynamic_shared_bytes": r.dynamic_shared if r else None, "smem_bytes": r.smem if r else None,
            "compile_seconds": round(self.seconds, 3), "error": self.error,
        }


def compile_all(variants: list[Variant], arch: int, progress: Callable[[str], None] | None = None) -> list[Result]:
    """Compile every variant and read its resources; on Ctrl-C, stop and return what was compiled so far."""
    results = []
    for i, v in enumerate(variants, 1):
        if progress:
            progress(f"[{i}/{len(variants)}] {v.name} {v.describe()}")
        start = time.perf_counter()
        try:
            compiled = compile_variant(v.kernel, v.spec, arch)
            meta = compiled.metadata
            name = getattr(meta, "name", v.name)
            res = read_resources(compiled.asm["cubin"], name, getattr(meta, "shared", 0))
            results.append(Result(v, res, seconds=time.perf_counter() - start))
        except KeyboardInterrupt:
            print(f"interrupted: {len(results)} of {len(variants)} variants compiled, reporting those",
                  file=sys.stderr)
            break
        except Exception as exc:  # report which variant failed and go on; main() exits non-zero
            msg = f"{type(exc).__name__}: {exc}".strip()
            results.append(Result(v, error=msg.splitlines()[0][:500], seconds=time.perf_counter() - start))
    return results


def check(results: list[Result], fail_on_spill: str = "hot") -> list[str]:
    """The problems that fail the tool: compile errors, and spills in the checked variants ("hot", "any", "none")."""
    problems = []
    for r in results:
        v = r.variant
        if r.error is not None:
            problems.append(f"compile failed: {v.name} [{v.describe()}]: {r.error}")
        elif r.resources.spills and (fail_on_spill == "any" or (fail_on_spill == "hot" and v.hot)):
            problems.append(f"{'hot ' if v.hot else ''}variant spills: {v.name} [{v.describe()}] "
                            f"{r.resources.spill_bytes} B stack/local, {r.resources.spill_instructions} spill "
                            f"instructions, {r.resources.regs} registers, num_warps={v.num_warps}")
    return problems


def format_table(results: list[Result]) -> str:
    head = ("kernel", "variant", "warps", "regs", "spill B", "SMEM B", "hot")
    rows = []
    for r in results:
        v, res = r.variant, r.resources
        if res is None:
            nums = ("FAILED", "-", "-")
        else:
            nums = (str(res.regs), str(res.spill_bytes), str(res.smem))
        rows.append((v.name, v.describe(), str(v.num_warps), *nums, "yes" if v.hot else ""))
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    right = {2, 3, 4, 5}

    def line(row):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([line(head), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def prepare_process() -> None:
    """Compile mode for Triton: kernels defined from here on are JITFunctions (the variable is read at decoration)."""
    os.environ.pop("TRITON_INTERPRET", None)
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for Hopper (sm_90a)")
    parser.add_argument("--quick", action="store_true", help="the hot bfloat16 training step only (seconds)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH ('-': standard output)")
    parser.add_argument("--table", action="store_true", help="print the table (the default unless --json -)")
    parser.add_argument("--fail-on-spill", choices=("hot", "any", "none"), default="hot",
                        help="which variants fail the check when they spill (default: hot)")
    parser.add_argument("--list", action="store_true", help="record and list the variants, compile nothing")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on standard error")
    args = parser.parse_args(argv)
    if not 50 <= args.arch <= 199:
        parser.error(f"--arch must be a CUDA compute capability such as 80, 90 or 100, got {args.arch}")
    if args.json and args.json != "-" and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json: directory of {args.json} does not exist")

    prepare_process()
    import triton

    log = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    start = time.perf_counter()
    scenario_list = scenarios(args.quick)
    try:
        variants = record(scenario_list, args.arch, progress=lambda name: log(f"recording: {name}"))
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.list:
        for v in variants:
            print(f"{v.name}  warps={v.num_warps}  {v.describe()}  {'hot' if v.hot else ''}".rstrip())
        print(f"{len(variants)} variants from {len(scenario_list)} scenarios")
        return 0
    results = compile_all(variants, args.arch, progress=lambda msg: log(f"compiling {msg}"))
    problems = check(results, args.fail_on_spill)
    if len(results) < len(variants):
        problems.append(f"interrupted: {len(variants) - len(results)} variants not compiled")
    elapsed = time.perf_counter() - start
    summary = (f"compiled {sum(r.error is None for r in results)} of {len(variants)} kernel variants "
               f"({sum(r.variant.hot for r in results)} hot) from {len(scenario_list)} scenarios for sm_{args.arch} "
               f"with triton {triton.__version__} in {elapsed:.1f} s")
    if args.json:
        payload = {"triton": triton.__version__, "arch": args.arch, "quick": args.quick,
                   "fail_on_spill": args.fail_on_spill, "scenarios": [s.name for s in scenario_list],
                   "variants": [r.as_dict() for r in results], "problems": problems}
        text = json.dumps(payload, indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    if args.table or args.json != "-":
        print(format_table(results))
        print(summary)
    else:
        print(summary, file=sys.stderr)
    for p in problems:
        print(f"FAILED {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
