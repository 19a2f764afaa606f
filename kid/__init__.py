"""kid: text-to-SQL data, CodeS-style prompts, safe execution-accuracy evaluation and
generation for knowledge distillation of LLMs (KID, Zhong et al., EMNLP Findings 2024).

Submodules:

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
