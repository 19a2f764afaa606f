"""Public API of KID's masking stage: per-token entropy and argmax fused with the lm_head, and position selection.

KID (Zhong et al., 2024) builds imperfect training data by choosing ``alpha`` of the target tokens, masking them,
letting the student predict them in one forward pass and writing the predictions into the gold sequence.  This module
gives the pieces that touch the vocabulary, without a ``[tokens x vocab]`` tensor:

- :func:`fused_linear_entropy`: entropy of the student's next-token distribution at each row ("hard"/"easy" scores);
- :func:`fused_linear_argmax`: the student's predicted token at each row;
- :func:`select_positions`: which positions to mask ("random", "uniform", "hard", "easy");
- :func:`fused_linear_select`: entropies then selection in one call.

Definitions: ``logits = input @ weight.T + bias`` formed in float32 (float64 for float64 inputs) and never rounded to
the input dtype; ``z = softcap * tanh(logit_scale * logits / softcap)`` the logits after the model's logit scale and
final-logit softcapping (``z = logit_scale * logits`` without a softcap; ``z = logits`` by default);
``entropy = -sum_v p_v log p_v`` (nats) with ``p = softmax(z / temperature)``; ``argmax`` of the untempered logits
with ``torch.argmax``'s rules (ties to the lowest index, a NaN wins), which neither the temperature nor the (strictly
increasing) scale and softcap move.  None of the outputs carries a gradient.
"""
from __future__ import annotations

import torch

from . import _validation as check
from ._backend import BACKENDS, resolve_backend
from .ops import custom_ops  # noqa: F401  (registers the ops)
from .ops.selection import STRATEGIES, select_positions_mask
from .ops.workspace import workspace_budget

__all__ = ["fused_linear_entropy", "fused_linear_argmax", "select_positions", "fused_linear_select", "STRATEGIES"]

_BACKEND_DOC = """
    backend: "triton", "triton_rows", "torch" or "auto" (default: ``KIDKERNELS_BACKEND``, else auto: Triton on CUDA,
        and on CPU under ``TRITON_INTERPRET=1``; PyTorch otherwise and for float64).  "triton": the lm_head product
        fused with the statistic, so the logits never reach memory (only per-row partial states of each block of
        128 vocabulary columns, 12 bytes for the entropy, 8 for the argmax).  "triton_rows" is the previous Triton
        path (cuBLAS logits, then row-per-program passes), kept as a reference for the benchmarks.
    workspace_bytes: bound on what one chunk of rows holds at once (default 512 MiB or
        ``KIDKERNELS_WORKSPACE_MB``): its partial states on "triton" (the default holds those of 37,000 rows at
        V = 151,936), its float32 logits (and the PyTorch backend's temporaries) otherwise; memory is this plus the
        O(N) outputs, whatever N is.
"""

_TRANSFORM_DOC = """
    logit_scale: the model's multiplier of its logits (Cohere's ``logit_scale``), a finite number > 0. Default 1.
    softcap: the model's final-logit softcapping (Gemma 2/3's ``final_logit_softcapping``), applied after the scale
        and before the temperature in float32; a finite number > 0, or None (default): off.
"""

_SELECTION_DOC = """
    Row ``i`` gets ``k_i = floor(alpha * n_i + 0.5)`` positions (round half up), ``n_i`` being its number of valid
    positions: 0 for ``alpha = 0``, all of them for ``alpha = 1``, none in a row without a valid position.  Only valid
    positions are ever chosen.  Strategies:

    - "random": a uniformly random ``k_i``-subset of the valid positions (float64 random keys, the ``k_i`` smallest).
      Reproducible with ``generator``: the same seed gives the same choice on the same device.  The generator may
      live on the tensors' device (best: no copy) or on the CPU, whose keys are then copied to the device (a
      host-to-device copy of ``B x T`` float64).  ``None`` uses PyTorch's default generator of that device.
    - "uniform": deterministic and evenly spaced: with ``r_0 < ... < r_{n-1}`` the row's valid positions, the picks
      are ``r_{floor((2j + 1) n / (2k))}`` for ``j = 0..k-1``, the centres of ``k`` equal parts of the row (one pick:
      the middle one, rank ``floor(n / 2)``); consecutive picks are ``floor(n/k)`` or ``ceil(n/k)`` ranks apart.
    - "hard": the ``k_i`` valid positions with the highest ``scores`` (highest entropy: least confident student).
    - "easy": the ``k_i`` with the lowest ``scores``.
    For "hard" and "easy" ties go to the earlier position, and NaN scores rank after every number in both.
"""


def _check_strategy(strategy) -> str:
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


def _check_alpha(alpha) -> float:
    return check.check_number("alpha", alpha, low=0.0, high=1.0, low_open=False, high_open=False)


def _check_valid(valid) -> None:
    if not isinstance(valid, torch.Tensor):
        raise TypeError(f"valid must be a torch.Tensor of dtype bool, got {type(valid).__name__}")
    if valid.dtype != torch.bool:
        raise TypeError(f"valid must be a bool tensor (True where a position may be chosen), got dtype {valid.dtype}")
    if valid.dim() != 2:
        raise ValueError(f"valid must be 2-D [B, T], got shape {tuple(valid.shape)}")


def _check_scores(scores, strategy: str, valid: torch.Tensor) -> None:
    if scores is None:
        if strategy in ("hard", "easy"):
            raise ValueError(f"strategy {strategy!r} needs scores (e.g. the entropies of fused_linear_entropy), "
                             "got None")
        return
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got dtype {scores.dtype}")
    if scores.shape != valid.shape:
        raise ValueError(f"scores must have the shape of valid {tuple(valid.shape)}, got {tuple(scores.shape)}")


def _check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type not in ("cpu", device.type):
        raise ValueError(f"generator is on {generator.device} but the tensors are on {device}; use a generator on "
                         f"{device.type} or on the CPU")


def _check_temperature(temperature) -> float:
    return check.check_number("temperature", temperature, low=0.0)


def _prepare_linear(input, weight, bias):
    """Validate the matmul operands; return ``(x [N, H], weight [V, H] contiguous, leading shape)``."""
    check.check_float_tensor("input", input)
    leading_shape = tuple(input.shape[:-1])
    x = check.flatten_rows("input", input)
    check.check_weight("weight", weight, x.shape[1], "input")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0): entropy and argmax need V >= 1")
    if x.dtype != weight.dtype:
        raise TypeError(f"input is {x.dtype} but weight is {weight.dtype}; they must match")
    check.check_bias("bias", bias, weight.shape[0])
    check.check_devices(input=input, weight=weight, bias=bias)
    return x, weight.contiguous(), leading_shape


def _linear_stats(input, weight, bias, *, temperature, statistic, backend, workspace_bytes, transform):
    x, weight, leading_shape = _prepare_linear(input, weight, bias)
    bias = bias.detach() if bias is not None else None
    backend = resolve_backend(backend, x.device, x.dtype)
    workspace_bytes = workspace_budget(workspace_bytes)
    if statistic == "entropy":
        out = torch.ops.kidkernels.linear_entropy(x.detach(), weight.detach(), bias, 1.0 / temperature, backend,
                                                  workspace_bytes, *transform)
    else:
        out = torch.ops.kidkernels.linear_argmax(x.detach(), weight.detach(), bias, backend, workspace_bytes)
    return out.reshape(leading_shape)


def _check_transform(logit_scale, softcap) -> tuple[float, float | None]:
    return check.check_logit_transform("logit_scale", logit_scale, "softcap", softcap)


def fused_linear_entropy(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                         temperature: float = 1.0, backend: str | None = None,
                         workspace_bytes: int | None = None, logit_scale: float = 1.0,
                         softcap: float | None = None) -> torch.Tensor:
    """Entropy (nats) of ``softmax(z / temperature)``, ``z`` the logits ``input @ weight.T + bias`` after the
    model's ``logit_scale`` and ``softcap``, for each row, in one pass over the vocabulary per row (running max and
    rescaled sums), without the ``[N, V]`` logits.

    input: ``[..., H]`` hidden states (float32, bfloat16, float16 or float64), leading dims flattened to N rows.
    weight: ``[V, H]`` lm_head weight of the same dtype; bias: ``[V]`` of any float dtype, or None.
    temperature: T > 0. Default 1.
    Returns ``[...]`` (the input's leading shape; ``[N]`` for 2-D input) float32 (float64 for float64 inputs).
    """
    temperature = _check_temperature(temperature)
    transform = _check_transform(logit_scale, softcap)
    return _linear_stats(input, weight, bias, temperature=temperature, statistic="entropy", backend=backend,
                         workspace_bytes=workspace_bytes, transform=transform)


def fused_linear_argmax(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                        backend: str | None = None, workspace_bytes: int | None = None, logit_scale: float = 1.0,
                        softcap: float | None = None) -> torch.Tensor:
    """Index of the largest logit of ``input @ weight.T + bias`` for each row (the greedy next token), without the
    ``[N, V]`` logits.  Ties go to the lowest index and a NaN logit counts as the largest, as in ``torch.argmax``.

    input: ``[..., H]``; weight: ``[V, H]`` of the same dtype; bias: ``[V]`` or None.
    logit_scale, softcap: validated as for :func:`fused_linear_entropy`, and taken so that one set of model options
        fits every call; they never change the result (a positive scale and a softcap are strictly increasing, so
        the argmax is that of the raw logits, computed exactly even where a float32 softcap would saturate to ties).
    Returns ``[...]`` (the input's leading shape) int64.
    """
    transform = _check_transform(logit_scale, softcap)
    return _linear_stats(input, weight, bias, temperature=1.0, statistic="argmax", backend=backend,
                         workspace_bytes=workspace_bytes, transform=transform)


def select_positions(valid: torch.Tensor, alpha: float, strategy: str, *, scores: torch.Tensor | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Choose the positions KID masks: returns a bool ``[B, T]`` mask on ``valid``'s device.

    valid: bool ``[B, T]``, True where a position may be chosen (e.g. the target tokens, EOS excluded).
    alpha: fraction to choose, a Python number in [0, 1].
    strategy: "random", "uniform", "hard" or "easy".
    scores: float ``[B, T]`` on the same device, required by "hard" and "easy" (e.g. the student's entropies);
        values at invalid positions are ignored; ignored by "random" and "uniform".
    generator: ``torch.Generator`` for "random" (see below); ignored by the other strategies.
    The work is a few sorts/cumulative sums over ``[B, T]`` on the device, with no host synchronisation.
    """
    _check_valid(valid)
    alpha = _check_alpha(alpha)
    strategy = _check_strategy(strategy)
    _check_scores(scores, strategy, valid)
    check.check_devices(valid=valid, scores=scores)
    _check_generator(generator, valid.device)
    return select_positions_mask(valid, alpha, strategy, scores, generator)


def fused_linear_select(input: torch.Tensor, weight: torch.Tensor, valid: torch.Tensor, alpha: float,
                        strategy: str, bias: torch.Tensor | None = None, *, temperature: float = 1.0,
                        generator: torch.Generator | None = None, backend: str | None = None,
                        workspace_bytes: int | None = None, logit_scale: float = 1.0,
                        softcap: float | None = None) -> torch.Tensor:
    """KID's selection stage in one call: bool ``[B, T]`` mask of the positions to mask.

    input: ``[B, T, H]`` student hidden states whose next-token distributions score the positions of ``valid``
    (bool ``[B, T]``); weight ``[V, H]``, bias ``[V]``: the student's lm_head.  For "hard" and "easy" this is
    ``select_positions(valid, alpha, strategy, scores=fused_linear_entropy(input, weight, bias,
    temperature=temperature, logit_scale=logit_scale, softcap=softcap))``; for "random" and "uniform" neither
    ``input`` nor ``weight`` is read (only their shapes, dtypes and devices are checked).

    The entropy is computed for all ``B x T`` rows, valid or not (compacting the valid rows would need their count on
    the host): pass the hidden states of the answer span only, not of the prompt, to keep the matmul small.
    """
    _check_valid(valid)
    alpha = _check_alpha(alpha)
    strategy = _check_strategy(strategy)
    temperature = _check_temperature(temperature)
    _check_transform(logit_scale, softcap)
    check.check_float_tensor("input", input)
    if input.dim() != 3:
        raise ValueError(f"input must be 3-D [B, T, H], got shape {tuple(input.shape)}")
    if tuple(input.shape[:2]) != tuple(valid.shape):
        raise ValueError(f"input's [B, T] = {tuple(input.shape[:2])} differs from valid's {tuple(valid.shape)}")
    check.check_weight("weight", weight, input.shape[2], "input")
    if input.dtype != weight.dtype:
        raise TypeError(f"input is {input.dtype} but weight is {weight.dtype}; they must match")
    check.check_bias("bias", bias, weight.shape[0])
    check.check_devices(input=input, weight=weight, valid=valid, bias=bias)
    _check_generator(generator, valid.device)
    if backend is not None and str(backend).strip().lower() not in BACKENDS:
        raise ValueError(f"backend= must be one of {BACKENDS}, got {backend!r}")
    scores = None
    if strategy in ("hard", "easy"):
        scores = fused_linear_entropy(input, weight, bias, temperature=temperature, backend=backend,
                                      workspace_bytes=workspace_bytes, logit_scale=logit_scale, softcap=softcap)
    return select_positions_mask(valid, alpha, strategy, scores, generator)


fused_linear_entropy.__doc__ += _TRANSFORM_DOC + _BACKEND_DOC
fused_linear_argmax.__doc__ += _BACKEND_DOC
select_positions.__doc__ += _SELECTION_DOC
fused_linear_select.__doc__ += _SELECTION_DOC + _TRANSFORM_DOC + _BACKEND_DOC
