"""Optional integrations with other libraries' training code.  Nothing here is imported by ``import kidkernels``, and
each module imports the library it integrates with only when it is used:

- :mod:`kidkernels.integrations.trl`: :func:`~kidkernels.integrations.trl.patch_distillation_trainer` puts kidkernels
  under TRL's ``DistillationTrainer`` in one line.
- :mod:`kidkernels.integrations.hf`: the hidden states of a Hugging Face causal LM at the positions that carry labels,
  without the model ever computing logits, ready for :func:`kidkernels.fused_linear_distill_loss`.
"""
