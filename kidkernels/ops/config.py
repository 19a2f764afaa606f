"""Validated, hashable options of a distillation loss call, as the dispatch layer sees them.

The cross-entropy alone (supervised fine-tuning) is the same loss with no teacher: :meth:`DistillConfig.cross_entropy`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
DIVERGENCE_CODE = {name: code for code, name in enumerate(DIVERGENCES)}
REDUCTIONS = ("mean", "sum", "none")

# Rows of the per-row statistics array shared by the backends (see kidkernels/kernels/distill_forward.py).
LSE_STUDENT, LSE_TEACHER, LSE_CE, KD, CE, CENTER = range(6)
NUM_STATS = 6


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
    # (KD and CENTER are 0, LSE_TEACHER is not written).  Needs a target and kd_weight == 0.
    has_teacher: bool = True

    def __post_init__(self):
        if not self.has_teacher and (not self.has_target or self.kd_weight != 0.0):
            raise ValueError("a loss without a teacher is the MLE term alone: it needs a target and kd_weight=0")

    @classmethod
    def cross_entropy(cls, ignore_index: int) -> DistillConfig:
        """The cross-entropy of the (untempered) student logits alone: mle_weight 1, no teacher, no divergence (the
        divergence fields are placeholders that nothing reads)."""
        return cls("fkl", 0.5, 1.0, 0.0, 1.0, ignore_index, True, has_teacher=False)

    @property
    def code(self) -> int:
        return DIVERGENCE_CODE[self.divergence]

    @property
    def inv_temp(self) -> float:
        return 1.0 / self.temperature

    @property
    def computes_ce(self) -> bool:
        """The per-row cross-entropy is computed whenever there is a target (reported even at mle_weight=0)."""
        return self.has_target

    @property
    def ce_in_grad(self) -> bool:
        return self.has_target and self.mle_weight != 0.0

    @property
    def separate_ce_lse(self) -> bool:
        """The MLE term reads untempered logits: it needs its own log-sum-exp unless T == 1."""
        return self.has_target and self.temperature != 1.0

    @property
    def log_beta(self) -> float:
        return math.log(self.beta)

    @property
    def log_one_minus_beta(self) -> float:
        return math.log1p(-self.beta)
