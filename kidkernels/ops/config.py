"""Validated, hashable options of a distillation loss call, as the dispatch layer sees them."""
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
