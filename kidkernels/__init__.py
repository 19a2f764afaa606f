"""kidkernels: fused kernels for knowledge distillation of causal language models.

Public API (a contract):

- :func:`fused_linear_distill_loss`, :class:`FusedLinearDistillLoss`: divergence (FKL, RKL, JSD, TVD) plus MLE from
  hidden states and lm_head weights, never holding the tokens x vocab logits.
- :func:`distill_loss`: the same loss from logits the caller already holds.
- :func:`fused_linear_cross_entropy`, :class:`FusedLinearCrossEntropyLoss`: the MLE term alone (supervised
  fine-tuning) from hidden states and an lm_head weight, with no teacher matmul.
- :func:`fused_linear_entropy`, :func:`fused_linear_argmax`, :func:`select_positions`, :func:`fused_linear_select`:
  KID's masking stage.

Each calls ops registered with ``torch.library`` (:mod:`kidkernels.ops.custom_ops`): ``torch.compile(fullgraph=True)``
of a caller compiles to one graph.
"""
from .loss import (
    FusedLinearCrossEntropyLoss,
    FusedLinearDistillLoss,
    distill_loss,
    fused_linear_cross_entropy,
    fused_linear_distill_loss,
)
from .selection import fused_linear_argmax, fused_linear_entropy, fused_linear_select, select_positions

__version__ = "0.1.0"

__all__ = [
    "fused_linear_distill_loss", "FusedLinearDistillLoss", "distill_loss",
    "fused_linear_cross_entropy", "FusedLinearCrossEntropyLoss",
    "fused_linear_entropy", "fused_linear_argmax", "select_positions", "fused_linear_select",
    "__version__",
]
