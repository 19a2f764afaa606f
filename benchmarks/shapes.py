"""The case lists of every scale.  A case id names its family, so ``-k`` selects a reduced run:

- ``paper``: the KID paper's loss shape, N = 2,048 target tokens (batch 16 x 128), H_s = 1,024 (Qwen1.5-0.5B),
  H_t = 4,096 (Qwen1.5-7B), V = 151,936, every divergence;
- ``liger``: Liger-Kernel's published fused-linear-JSD shapes, N = 1,024 ... 8,192, teacher H = 4,096, student
  H = 2,048, V = 128,256, for FKL, RKL and JSD (what Liger supports);
- ``sweepN``: the paper's hidden sizes and vocabulary with N up to 16,384 (reverse KL: KID's divergence);
- ``sweepV``: the paper's N and hidden sizes with V = 32,000 and 256,000 (151,936 is the ``paper`` case).

On a GPU the whole list takes longer than one 10-minute command (torch.compile alone compiles each case); run it in
parts, e.g. ``-k paper``, ``-k liger``, ``-k sweep``, ``-k step``, and merge the JSON files with ``report.py``.
The ``cpu`` and ``smoke`` scales run the same families at small sizes (ids ``cpu-...`` and ``smoke-...``).
"""
from __future__ import annotations

from dataclasses import dataclass

ALL_DIVERGENCES = ("fkl", "rkl", "jsd", "tvd")
LIGER_DIVERGENCES = ("fkl", "rkl", "jsd")


@dataclass(frozen=True)
class DistillShape:
    """One shape of the fused distillation loss and the divergences it is run with."""
    family: str
    n: int
    h_s: int
    h_t: int
    v: int
    divergences: tuple[str, ...] = ("rkl",)
    # Divergences the torch.compile provider runs with here (None: all); each case is a fresh compilation.
    compile_divergences: tuple[str, ...] | None = None

    def compiles(self, divergence: str) -> bool:
        return self.compile_divergences is None or divergence in self.compile_divergences

    @property
    def id(self) -> str:
        return f"{self.family}-N{self.n}-Hs{self.h_s}-Ht{self.h_t}-V{self.v}"


@dataclass(frozen=True)
class LinearShape:
    """One shape of the entropy / argmax / selection kernels: N rows of hidden size H against a ``[V, H]`` head."""
    family: str
    n: int
    h: int
    v: int
    compile: bool = True

    @property
    def id(self) -> str:
        return f"{self.family}-N{self.n}-H{self.h}-V{self.v}"


@dataclass(frozen=True)
class SelectShape:
    """A ``[B, T]`` answer span for position selection (KID: batch 16 x 128 target tokens)."""
    family: str
    batch: int
    length: int
    h: int
    v: int

    @property
    def id(self) -> str:
        return f"{self.family}-B{self.batch}-T{self.length}-H{self.h}-V{self.v}"


@dataclass(frozen=True)
class ModelShape:
    """Qwen2-architecture (Qwen1.5) model dimensions, turned into a ``transformers.Qwen2Config``."""
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    tie_word_embeddings: bool = False

    def config_kwargs(self) -> dict:
        return dict(hidden_size=self.hidden, num_hidden_layers=self.layers, num_attention_heads=self.heads,
                    num_key_value_heads=self.heads, intermediate_size=self.intermediate, vocab_size=self.vocab,
                    tie_word_embeddings=self.tie_word_embeddings)


@dataclass(frozen=True)
class StepShape:
    """The full-training-step case: teacher and student models and a batch of prompt + answer tokens."""
    family: str
    teacher: ModelShape
    student: ModelShape
    batch: int
    prompt_len: int
    answer_len: int
    gradient_checkpointing: bool

    @property
    def id(self) -> str:
        return f"{self.family}-B{self.batch}-T{self.prompt_len}+{self.answer_len}"


PAPER = dict(h_s=1024, h_t=4096, v=151_936)
LIGER = dict(h_s=2048, h_t=4096, v=128_256)

DISTILL_SHAPES = {
    "gpu": (
        [DistillShape("paper", 2048, **PAPER, divergences=ALL_DIVERGENCES)]
        + [DistillShape("liger", n, **LIGER, divergences=LIGER_DIVERGENCES) for n in (1024, 2048, 4096, 8192)]
        + [DistillShape("sweepN", n, **PAPER) for n in (1024, 4096, 8192, 16384)]
        + [DistillShape("sweepV", 2048, 1024, 4096, v) for v in (32_000, 256_000)]
    ),
    # Two cores, a few minutes: every divergence on one shape, reverse KL on the N x V grid; torch.compile (about
    # a minute of C++ compilation per case on two cores) on the headline shape only.
    "cpu": [
        DistillShape("cpu", n, 64, 128, v, divergences=ALL_DIVERGENCES if (n, v) == (512, 8000) else ("rkl",),
                     compile_divergences=("rkl",) if (n, v) == (512, 8000) else ())
        for n in (256, 512) for v in (4000, 8000)
    ],
    "smoke": [DistillShape("smoke", 64, 16, 32, 512, divergences=("rkl", "jsd"))],
}

LINEAR_SHAPES = {
    "gpu": (
        [LinearShape("paper", 2048, 1024, 151_936)]
        + [LinearShape("sweepN", n, 1024, 151_936) for n in (1024, 4096, 8192, 16384)]
        + [LinearShape("sweepV", 2048, 1024, v) for v in (32_000, 256_000)]
    ),
    "cpu": [LinearShape("cpu", n, 64, v, compile=(n, v) == (512, 8000)) for n in (256, 512) for v in (4000, 8000)],
    "smoke": [LinearShape("smoke", 64, 16, 512)],
}

SELECT_SHAPES = {
    "gpu": [SelectShape("paper", 16, 128, 1024, 151_936)],
    "cpu": [SelectShape("cpu", 4, 128, 64, 8000)],
    "smoke": [SelectShape("smoke", 2, 32, 16, 512)],
}

# Qwen1.5-7B and Qwen1.5-0.5B dimensions (the Qwen2 architecture in transformers), random weights.
QWEN15_7B = ModelShape(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=151_936)
QWEN15_05B = ModelShape(hidden=1024, layers=24, heads=16, intermediate=2816, vocab=151_936, tie_word_embeddings=True)

STEP_SHAPES = {
    "gpu": [StepShape("step-qwen7b-qwen0.5b", QWEN15_7B, QWEN15_05B, batch=16, prompt_len=1024, answer_len=128,
                      gradient_checkpointing=True)],
    "cpu": [StepShape("step-cpu", ModelShape(128, 2, 4, 256, 8000), ModelShape(64, 2, 4, 128, 8000, True), batch=2,
                      prompt_len=96, answer_len=32, gradient_checkpointing=False)],
    "smoke": [StepShape("step-smoke", ModelShape(32, 1, 2, 64, 512), ModelShape(16, 1, 2, 32, 512, True), batch=2,
                        prompt_len=24, answer_len=8, gradient_checkpointing=False)],
}
