"""Validated, hashable options of a distillation loss call, as the dispatch layer sees them.

The cross-entropy alone (supervised fine-tuning) is the same loss with no teacher: :meth:`DistillConfig.cross_entropy`.
Each model's logits may first go through a :class:`LogitTransform` (a logit scale, then final-logit softcapping), as
Cohere and Gemma 2/3 models apply it to their logits before the softmax.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# Rows of the per-row statistics array shared by the backends: defined once, in kernels/stats_layout.py.
from ..kernels.stats_layout import (  # noqa: F401
    CE,
    CENTER,
    CENTER_2,
    KD,
    LOGZ_STUDENT,
    LOGZ_TEACHER,
    LSE_CE,
    MAX_STUDENT,
    MAX_TEACHER,
    MAX_VOCAB,
    NUM_STATS,
    TOP,
)

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
DIVERGENCE_CODE = {name: code for code, name in enumerate(DIVERGENCES)}
REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True)
class LogitTransform:
    """The per-element map a model applies to its raw logits ``x = h @ W.T + b`` before any softmax, in the compute
    dtype::

        z = softcap * tanh(scale * x / softcap)      (softcap None: z = scale * x)

    in that order (TRL's and Hugging Face's: the scale first, then the cap), and *before* the temperature of the
    divergence (which then reads ``z / T``) and the cross-entropy (which reads ``z``).  ``scale`` > 0 (Cohere's
    ``logit_scale``), ``softcap`` > 0 or None (Gemma's ``final_logit_softcapping``); both finite, validated by the
    public API.  The value and the derivative ``dz/dx`` live in one place per backend: ``kernels/logit_transform.py``
    (Triton) and ``ops/logit_transform.py`` (PyTorch).  Being strictly increasing, it never moves an argmax.
    """
    scale: float = 1.0
    softcap: float | None = None

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    @property
    def has_scale(self) -> bool:
        return self.scale != 1.0

    @property
    def has_softcap(self) -> bool:
        return self.softcap is not None

    @property
    def softcap_value(self) -> float:
        """The cap as a float for a kernel argument (1.0, unused, without one)."""
        return self.softcap if self.softcap is not None else 1.0


IDENTITY = LogitTransform()


@dataclass(frozen=True)
class DistillConfig:
    divergence: str
    beta: float
    temperature: float
    kd_weight: float
    mle_weight: float
    ignore_index: int
    has_target: bool
    # False: no teacher logits at all (the MLE term alone); the kernels skip the teacher log-sum-exp and the divergence
    # (KD and the centers are 0, the teacher rows are not written).  Needs a target and kd_weight == 0.
    has_teacher: bool = True
    # Each model's logit scale and softcap, applied to its logits before the temperature (see LogitTransform and the
    # properties below; plain numbers here, so that torch.compile traces a DistillConfig built by the public API).
    student_logit_scale: float = 1.0
    student_softcap: float | None = None
    teacher_logit_scale: float = 1.0
    teacher_softcap: float | None = None

    def __post_init__(self):
        if not self.has_teacher and (not self.has_target or self.kd_weight != 0.0):
            raise ValueError("a loss without a teacher is the MLE term alone: it needs a target and kd_weight=0")

    @classmethod
    def cross_entropy(cls, ignore_index: int, logit_scale: float = 1.0, softcap: float | None = None) -> DistillConfig:
        """The cross-entropy of the (untempered, scaled and capped) student logits alone: mle_weight 1, no teacher, no
        divergence (the divergence fields are placeholders that nothing reads)."""
        return cls("fkl", 0.5, 1.0, 0.0, 1.0, ignore_index, True, has_teacher=False, student_logit_scale=logit_scale,
                   student_softcap=softcap)

    @property
    def student_transform(self) -> LogitTransform:
        return LogitTransform(self.student_logit_scale, self.student_softcap)

    @property
    def teacher_transform(self) -> LogitTransform:
        return LogitTransform(self.teacher_logit_scale, self.teacher_softcap)

    @property
    def capped(self) -> bool:
        """Whether either model's logits are softcapped (the fused kernels then take narrower tiles)."""
        return self.student_transform.has_softcap or self.teacher_transform.has_softcap

    @property
    def effective_divergence(self) -> str:
        """The divergence the kernels compute: "jsd" at beta 0 is forward KL and at beta 1 reverse KL (TRL's
        convention: the mixture form tends to 0 at both ends, as beta KL(p||q) and (1-beta) KL(q||p))."""
        if self.divergence == "jsd" and self.beta in (0.0, 1.0):
            return "fkl" if self.beta == 0.0 else "rkl"
        return self.divergence

    @property
    def code(self) -> int:
        return DIVERGENCE_CODE[self.effective_divergence]

    @property
    def one_pass(self) -> bool:
        """One statistics pass gives the value (FKL, RKL, the cross-entropy alone); JSD and TVD need a second."""
        return not self.has_teacher or self.effective_divergence in ("fkl", "rkl")

    @property
    def inv_temp(self) -> float:
        return 1.0 / self.temperature

    @property
    def ce_in_grad(self) -> bool:
        return self.has_target and self.mle_weight != 0.0

    @property
    def separate_ce_lse(self) -> bool:
        """The MLE term reads untempered logits: it needs its own log-sum-exp unless T == 1."""
        return self.has_target and self.temperature != 1.0

    @property
    def log_beta(self) -> float:
        """log(beta) for the mixture of "jsd" (0, unused, where beta is 0 or 1 and the divergence is a KL)."""
        return math.log(self.beta) if 0.0 < self.beta < 1.0 else 0.0

    @property
    def log_one_minus_beta(self) -> float:
        return math.log1p(-self.beta) if 0.0 < self.beta < 1.0 else 0.0
