"""Provider registry: each provider turns the same input tensors into one call of an op, so that every provider of a
case is timed on identical inputs in the same run.

A provider's builder for an op returns a :data:`Call` ``(function, args, kwargs)``; :func:`make_step` wraps it into
the zero-argument step the harness times (forward, plus ``.backward()`` for ``fwd_bwd``).  Providers:

- ``kidkernels``: the library under test (never allocates a ``[tokens x vocab]`` tensor); on CUDA its default backend,
  the GEMM-fused kernels.
- ``kidkernels_rows``: kidkernels' previous Triton path (``backend="triton_rows"``: cuBLAS writes float32 logits chunk
  by chunk, row-per-program Triton passes read them back), kept as the reference the fused kernels must beat until
  they are measured on a GPU (CUDA only).
- ``eager``: :mod:`kidkernels.reference` with ``dtype=torch.float32``, the float32-softmax loss a user would write
  (its matmuls run in float32 too, as written there).
- ``eager_lowp_mm``: the same float32 loss on logits from a matmul in the input dtype (bf16), as Liger's and TRL's
  reference losses do; only where the input dtype is not float32 (otherwise it is ``eager``).
- ``compile``: ``torch.compile`` of ``eager`` (fresh compilation per case; a compile failure is recorded as an
  error, ``KIDKERNELS_BENCH_NO_COMPILE=1`` records it as skipped).
- ``liger``: Liger-Kernel's Triton ``LigerFusedLinearJSD`` (FKL, RKL, JSD; no MLE term: it times the divergence
  alone); ``liger_chunked``: its chunked ``LigerFusedLinearJSDLoss`` (divergence + cross-entropy, torch.compile per
  chunk).  Both need CUDA and ``pip install liger-kernel``; otherwise recorded as skipped with the reason.
- ``trl``: TRL's own ``trl.trainer.distillation_trainer._chunked_divergence_loss`` (trl 1.16, what its
  ``DistillationTrainer`` runs: FKL at beta 0, RKL at beta 1, generalized JSD between), on the same tensors as one
  ``[1, N]`` completion, every position counted; its chunked PyTorch tiles on CPU, its Triton tiles on CUDA.  No MLE
  term (``includes_mle`` false), and it also returns the student's entropy sum, as the trainer needs; the
  ``kidkernels_trl`` provider is the same function patched by :mod:`kidkernels.integrations.trl` (the loss, plus the
  entropy from a second pass), the like-for-like comparison.  Needs ``pip install trl``.

The MLE-only path (``cross_entropy``: :func:`kidkernels.fused_linear_cross_entropy`, SFT) has its own peers, each
recorded as skipped with the reason where it is missing:

- ``torch_lce``: PyTorch's own ``torch.nn.functional.linear_cross_entropy`` (PyTorch 2.13+) on its chunked path
  (``options=torch.nn.LinearCrossEntropyOptions()``, the automatic chunking; ``options=None`` would be plain
  ``linear`` + ``cross_entropy``).  Skipped on the project's GPU machine, whose torch is 2.11 (a CUDA torch cannot
  travel there as a wheel): see ``benchmarks/README.md``;
- ``liger_flce``: Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` (CUDA);
- ``cce``: Apple's Cut Cross-Entropy, ``cut_cross_entropy.linear_cross_entropy`` with its defaults (the "cce"
  Triton implementation, gradient filtering ``filter_eps="high"``; CUDA, ``pip install cut-cross-entropy``);
- ``eager_lowp_mm``: Hugging Face's way (``ForCausalLMLoss``): logits in the input dtype, upcast, ``cross_entropy``.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch

import kidkernels
from kidkernels.reference import (
    reference_distill_loss_from_logits,
    reference_fused_linear_argmax,
    reference_fused_linear_cross_entropy,
    reference_fused_linear_distill_loss,
    reference_fused_linear_entropy,
)

from .harness import ProviderUnavailable, compile_disabled

Call = tuple[Callable, tuple, dict]

# Liger's generalized JSD is beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q, P the teacher and
# Q the student (liger_kernel/ops/jsd.py: X = student log-probs, Y = teacher log-probs); beta = 0 is forward
# KL(P || Q), beta = 1 reverse KL(Q || P) (the Triton kernel's and chunked_loss/jsd_loss.py's special cases).  Same
# mixture convention as kidkernels' "jsd", so its beta passes through unchanged.
LIGER_BETA = {"fkl": lambda beta: 0.0, "rkl": lambda beta: 1.0, "jsd": lambda beta: beta}


# ---- problems: the inputs of one case ------------------------------------------------------------------------

def _randn(shape, scale, *, generator, device, dtype):
    return (torch.randn(shape, generator=generator, device=device) * scale).to(dtype)


@dataclass
class DistillProblem:
    """Inputs of the fused distillation loss: hidden states and lm_head weights whose logits have a trained
    model's spread (std about 3 for the student and 4 for the teacher), gold targets, and the loss options."""
    student_input: torch.Tensor
    student_weight: torch.Tensor
    teacher_input: torch.Tensor
    teacher_weight: torch.Tensor
    target: torch.Tensor
    divergence: str
    with_grad: bool
    options: dict = field(default_factory=dict)

    @classmethod
    def create(cls, n, h_s, h_t, v, divergence, *, with_grad, device, dtype, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        make = functools.partial(_randn, generator=g, device=device, dtype=dtype)
        xs, ws = make((n, h_s), 1.0), make((v, h_s), 3.0 / h_s ** 0.5)
        xt, wt = make((n, h_t), 1.0), make((v, h_t), 4.0 / h_t ** 0.5)
        target = torch.randint(0, v, (n,), generator=g, device=device)
        xs.requires_grad_(with_grad)
        ws.requires_grad_(with_grad)
        options = dict(divergence=divergence, beta=0.5, temperature=1.0, kd_weight=1.0, mle_weight=1.0)
        return cls(xs, ws, xt, wt, target, divergence, with_grad, options)

    @property
    def tensors(self) -> tuple:
        return self.student_input, self.student_weight, self.teacher_input, self.teacher_weight, self.target

    def reset(self) -> None:
        self.student_input.grad = self.student_weight.grad = None


@dataclass
class CrossEntropyProblem:
    """Inputs of the MLE term alone: ``[N, H]`` hidden states, a ``[V, H]`` head with a trained model's logit
    spread, targets with every seventh row ignored (-100)."""
    input: torch.Tensor
    weight: torch.Tensor
    target: torch.Tensor
    with_grad: bool

    @classmethod
    def create(cls, n, h, v, *, with_grad, device, dtype, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        make = functools.partial(_randn, generator=g, device=device, dtype=dtype)
        x, w = make((n, h), 1.0), make((v, h), 3.0 / h ** 0.5)
        target = torch.randint(0, v, (n,), generator=g, device=device)
        target[::7] = -100
        x.requires_grad_(with_grad)
        w.requires_grad_(with_grad)
        return cls(x, w, target, with_grad)

    def reset(self) -> None:
        self.input.grad = self.weight.grad = None


@dataclass
class LinearProblem:
    """Inputs of the entropy and argmax kernels: ``[N, H]`` hidden states and a ``[V, H]`` head."""
    input: torch.Tensor
    weight: torch.Tensor
    with_grad: bool = False

    @classmethod
    def create(cls, n, h, v, *, device, dtype, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        make = functools.partial(_randn, generator=g, device=device, dtype=dtype)
        return cls(make((n, h), 1.0), make((v, h), 3.0 / h ** 0.5))

    def reset(self) -> None:
        pass


@dataclass
class SelectProblem:
    """Inputs of KID's selection stage: answer-span hidden states ``[B, T, H]``, the head, and the valid mask (every
    answer position but the last, the EOS)."""
    hidden: torch.Tensor
    weight: torch.Tensor
    valid: torch.Tensor
    alpha: float = 0.2
    with_grad: bool = False

    @classmethod
    def create(cls, batch, length, h, v, *, device, dtype, seed=0):
        g = torch.Generator(device=device).manual_seed(seed)
        make = functools.partial(_randn, generator=g, device=device, dtype=dtype)
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        valid[:, -1] = False
        return cls(make((batch, length, h), 1.0), make((v, h), 3.0 / h ** 0.5), valid)

    def reset(self) -> None:
        pass


# ---- builders ------------------------------------------------------------------------------------------------

def _kidkernels_distill(p: DistillProblem) -> Call:
    return kidkernels.fused_linear_distill_loss, p.tensors, dict(p.options)


def _eager_distill(p: DistillProblem) -> Call:
    return reference_fused_linear_distill_loss, p.tensors, dict(p.options, dtype=torch.float32)


def _lowp_logits_distill_loss(student_input, student_weight, teacher_input, teacher_weight, target, **options):
    """The float32 reference loss on logits formed by matmuls in the input dtype (rounded to it)."""
    with torch.no_grad():
        teacher_logits = teacher_input @ teacher_weight.t()
    return reference_distill_loss_from_logits(student_input @ student_weight.t(), teacher_logits, target,
                                              dtype=torch.float32, **options)


def _eager_lowp_mm_distill(p: DistillProblem) -> Call:
    return _lowp_logits_distill_loss, p.tensors, dict(p.options)


def _liger_distill(p: DistillProblem) -> Call:
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss = LigerFusedLinearJSD(jsd_beta=LIGER_BETA[p.divergence](p.options["beta"]), ignore_index=-100,
                               temperature=p.options["temperature"])
    return loss, p.tensors, {}


def _liger_chunked_distill(p: DistillProblem) -> Call:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=p.options["mle_weight"], weight_soft_loss=p.options["kd_weight"],
                                   beta=LIGER_BETA[p.divergence](p.options["beta"]), ignore_index=-100,
                                   temperature=p.options["temperature"], compiled=True, chunk_size=1024)
    return loss, p.tensors, {}


def _trl_beta(p: DistillProblem) -> float:
    return LIGER_BETA[p.divergence](p.options["beta"])  # TRL's beta: the same convention as Liger's and kidkernels'


def _trl_call(function, p: DistillProblem) -> Call:
    """One call of a function with TRL's ``_chunked_divergence_loss`` signature on the problem's tensors, as a single
    completion ``[1, N]`` with every position counted; the step differentiates the loss (the first result)."""
    xs, ws, xt, wt, _target = p.tensors
    mask = torch.ones(1, xs.shape[0], device=xs.device)

    def loss(xs, ws, xt, wt):
        return function(xs[None], xt[None], ws, wt, mask, _trl_beta(p), temperature=p.options["temperature"])[0]

    return loss, (xs, ws, xt, wt), {}


def _trl_distill(p: DistillProblem) -> Call:
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    return _trl_call(_chunked_divergence_loss, p)


def _kidkernels_trl_distill(p: DistillProblem) -> Call:
    from kidkernels.integrations.trl import chunked_divergence_loss

    return _trl_call(chunked_divergence_loss, p)


def _kidkernels_cross_entropy(p: CrossEntropyProblem) -> Call:
    return kidkernels.fused_linear_cross_entropy, (p.input, p.weight, p.target), {}


def _eager_cross_entropy(p: CrossEntropyProblem) -> Call:
    return reference_fused_linear_cross_entropy, (p.input, p.weight, p.target), dict(dtype=torch.float32)


def _hf_style_cross_entropy(input, weight, target):
    """Logits from a matmul in the input dtype, upcast to float32, then ``cross_entropy`` (HF ForCausalLMLoss)."""
    return torch.nn.functional.cross_entropy((input @ weight.t()).float(), target, ignore_index=-100)


def _eager_lowp_mm_cross_entropy(p: CrossEntropyProblem) -> Call:
    return _hf_style_cross_entropy, (p.input, p.weight, p.target), {}


def _torch_linear_cross_entropy(p: CrossEntropyProblem) -> Call:
    options = torch.nn.LinearCrossEntropyOptions()
    return torch.nn.functional.linear_cross_entropy, (p.input, p.weight, p.target), dict(options=options)


def _liger_fused_linear_cross_entropy(p: CrossEntropyProblem) -> Call:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100)
    return loss, (p.weight, p.input, p.target), {}  # Liger takes the weight first


def _cut_cross_entropy(p: CrossEntropyProblem) -> Call:
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy, (p.input, p.weight, p.target), dict(ignore_index=-100)


def _kidkernels_entropy(p: LinearProblem) -> Call:
    return kidkernels.fused_linear_entropy, (p.input, p.weight), {}


def _eager_entropy(p: LinearProblem) -> Call:
    return reference_fused_linear_entropy, (p.input, p.weight), dict(dtype=torch.float32)


def _kidkernels_argmax(p: LinearProblem) -> Call:
    return kidkernels.fused_linear_argmax, (p.input, p.weight), {}


def _eager_argmax(p: LinearProblem) -> Call:
    return reference_fused_linear_argmax, (p.input, p.weight), dict(dtype=torch.float32)


def _kidkernels_select_hard(p: SelectProblem) -> Call:
    return kidkernels.fused_linear_select, (p.hidden, p.weight, p.valid, p.alpha, "hard"), {}


def _eager_select_hard_positions(hidden, weight, valid, alpha):
    """Entropies from the full float32 logits, then the same selection."""
    scores = reference_fused_linear_entropy(hidden, weight, dtype=torch.float32)
    return kidkernels.select_positions(valid, alpha, "hard", scores=scores)


def _eager_select_hard(p: SelectProblem) -> Call:
    return _eager_select_hard_positions, (p.hidden, p.weight, p.valid, p.alpha), {}


def _kidkernels_select_random(p: SelectProblem) -> Call:
    generator = torch.Generator(device=p.valid.device).manual_seed(0)
    return kidkernels.select_positions, (p.valid, p.alpha, "random"), dict(generator=generator)


def _compiled(eager_builder: Callable[..., Call]) -> Callable[..., Call]:
    """torch.compile of what ``eager_builder`` calls, compiled afresh for each case (no cache carried over)."""
    def build(problem) -> Call:
        if compile_disabled():
            raise ProviderUnavailable("KIDKERNELS_BENCH_NO_COMPILE=1")
        function, args, kwargs = eager_builder(problem)
        torch._dynamo.reset()  # each case compiles on its own; no recompile limit reached across cases
        return torch.compile(function, dynamic=False), args, kwargs
    return build


# ---- availability --------------------------------------------------------------------------------------------

def _always_available(device: torch.device) -> None:
    pass


def _liger_available(device: torch.device) -> None:
    if importlib.util.find_spec("liger_kernel") is None:
        raise ProviderUnavailable("liger-kernel is not installed (pip install liger-kernel)")
    if device.type != "cuda":
        raise ProviderUnavailable("Liger-Kernel's kernels need CUDA tensors")


def _liger_compiled_available(device: torch.device) -> None:
    _liger_available(device)
    if compile_disabled():
        raise ProviderUnavailable("KIDKERNELS_BENCH_NO_COMPILE=1 (Liger's chunked loss compiles each chunk)")


def _trl_available(device: torch.device) -> None:
    if importlib.util.find_spec("trl") is None:
        raise ProviderUnavailable("trl is not installed (pip install 'trl>=1.16')")
    from trl.trainer import distillation_trainer

    if not hasattr(distillation_trainer, "_chunked_divergence_loss"):
        raise ProviderUnavailable("this trl has no DistillationTrainer._chunked_divergence_loss (trl 1.16+)")


def _torch_lce_available(device: torch.device) -> None:
    if not (hasattr(torch.nn.functional, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        raise ProviderUnavailable(f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy "
                                  "with LinearCrossEntropyOptions (PyTorch 2.13+)")


def _cce_available(device: torch.device) -> None:
    if importlib.util.find_spec("cut_cross_entropy") is None:
        raise ProviderUnavailable("cut-cross-entropy is not installed (pip install cut-cross-entropy)")
    if device.type != "cuda":
        raise ProviderUnavailable("Cut Cross-Entropy's Triton kernels need CUDA tensors")


def _rows_backend(builder: Callable[..., Call]) -> Callable[..., Call]:
    """The kidkernels ``builder`` with ``backend="triton_rows"``."""
    def build(p) -> Call:
        function, args, kwargs = builder(p)
        return function, args, dict(kwargs, backend="triton_rows")
    return build


def _cuda_only(device: torch.device) -> None:
    if device.type != "cuda":
        raise ProviderUnavailable("backend 'triton_rows' is the CUDA path of cuBLAS logits + Triton row passes")


# ---- the registry --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Provider:
    name: str
    builders: dict[str, Callable[..., Call]]  # op -> builder(problem) -> Call
    check: Callable[[torch.device], None] = _always_available  # raises ProviderUnavailable
    divergences: tuple[str, ...] | None = None  # distillation divergences supported (None: all)
    includes_mle: bool = True  # whether its distillation loss includes the MLE term
    may_fail: bool = False  # whether an exception of it is a result (compile failure) rather than a bug
    low_precision_only: bool = False  # a variant that differs from another provider only for bf16/fp16 inputs
    compiled: bool = False  # runs torch.compile'd code (no dispatch-mode tensor tracking around it)

    def supports(self, op: str, divergence: str | None = None) -> bool:
        return op in self.builders and (divergence is None or self.divergences is None
                                        or divergence in self.divergences)

    def build_step(self, op: str, problem, device: torch.device) -> Callable[[], None]:
        self.check(device)
        return make_step(self.builders[op](problem), problem.with_grad)


def make_step(call: Call, with_grad: bool) -> Callable[[], None]:
    """One forward (and backward) call.  Forward-only steps run under ``torch.no_grad()`` on inputs that do not
    require gradients: what inference (KID's masking pass) does."""
    function, args, kwargs = call
    if with_grad:
        def step():
            function(*args, **kwargs).backward()
    else:
        def step():
            with torch.no_grad():
                function(*args, **kwargs)
    return step


PROVIDERS: dict[str, Provider] = {p.name: p for p in (
    Provider("kidkernels", {"distill": _kidkernels_distill, "cross_entropy": _kidkernels_cross_entropy,
                            "entropy": _kidkernels_entropy, "argmax": _kidkernels_argmax,
                            "select_hard": _kidkernels_select_hard, "select_random": _kidkernels_select_random}),
    Provider("kidkernels_rows", {op: _rows_backend(builder) for op, builder in (
        ("distill", _kidkernels_distill), ("cross_entropy", _kidkernels_cross_entropy),
        ("entropy", _kidkernels_entropy), ("argmax", _kidkernels_argmax))}, check=_cuda_only),
    Provider("eager", {"distill": _eager_distill, "cross_entropy": _eager_cross_entropy, "entropy": _eager_entropy,
                       "argmax": _eager_argmax, "select_hard": _eager_select_hard}),
    Provider("eager_lowp_mm", {"distill": _eager_lowp_mm_distill, "cross_entropy": _eager_lowp_mm_cross_entropy},
             low_precision_only=True),
    Provider("compile", {"distill": _compiled(_eager_distill), "cross_entropy": _compiled(_eager_cross_entropy),
                         "entropy": _compiled(_eager_entropy), "argmax": _compiled(_eager_argmax)},
             may_fail=True, compiled=True),
    Provider("torch_lce", {"cross_entropy": _torch_linear_cross_entropy}, check=_torch_lce_available),
    Provider("liger_flce", {"cross_entropy": _liger_fused_linear_cross_entropy}, check=_liger_available),
    Provider("cce", {"cross_entropy": _cut_cross_entropy}, check=_cce_available),
    Provider("liger", {"distill": _liger_distill}, check=_liger_available, divergences=("fkl", "rkl", "jsd"),
             includes_mle=False),
    Provider("liger_chunked", {"distill": _liger_chunked_distill}, check=_liger_compiled_available,
             divergences=("fkl", "rkl", "jsd"), compiled=True),
    Provider("trl", {"distill": _trl_distill}, check=_trl_available, divergences=("fkl", "rkl", "jsd"),
             includes_mle=False),
    Provider("kidkernels_trl", {"distill": _kidkernels_trl_distill}, check=_trl_available,
             divergences=("fkl", "rkl", "jsd"), includes_mle=False),
)}


def providers_for(op: str, divergence: str | None = None, *, dtype: torch.dtype,
                  with_compile: bool = True) -> list[str]:
    """Names of the providers that implement ``op`` (and ``divergence``) for inputs of ``dtype``, in registry
    order; ``with_compile=False`` leaves out torch.compile (shapes where compiling would cost too long)."""
    return [name for name, p in PROVIDERS.items()
            if p.supports(op, divergence) and (with_compile or name != "compile")
            and not (p.low_precision_only and dtype == torch.float32)]
