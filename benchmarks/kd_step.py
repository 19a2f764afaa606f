"""One training step of each method the full-step benchmark compares, on Qwen2-architecture (Qwen1.5) models with
random weights: SFT, a teacher forward alone, RKD from Hugging Face logits (eager), RKD and KID through kidkernels.

PROVISIONAL: the trainer issue (``kid/``) will provide the production training step; when it lands, the benchmark
should call that step and this module should be deleted.  Until then this is the smallest faithful version, and
its choices follow anchors.md:

- A batch is ``prompt_len`` prompt tokens then ``answer_len`` answer (SQL) tokens, the last one EOS; no padding.
  The loss rows are the answer positions: the hidden state at position ``t - 1`` predicts token ``t``, so the rows
  are positions ``prompt_len - 1 .. T - 2`` (``B x answer_len`` rows: 2,048 at batch 16 x 128, the paper's N).
- Hidden states come from ``model.model(...)`` (no logits); the lm_head work happens in the loss, on those rows.
- SFT: cross-entropy through kidkernels with ``kd_weight=0, mle_weight=1`` (the "teacher" operands are the
  student's own detached hidden states and weight: the library has no CE-only entry, and that extra matmul is
  ``2 N H_s V``, about 1 ms at the paper's shape).
- RKD (HF, eager): the models' full ``[B, T, V]`` logits as ``forward()`` returns them (what TRL/torchtune-style
  code does), sliced to the answer rows, reverse KL + MLE with :mod:`kidkernels.reference` in float32.
- RKD (kidkernels): ``fused_linear_distill_loss(..., divergence="rkl", mle_weight=1)`` on the answer rows.
- KID: choose ``alpha = 0.2`` of the answer positions except EOS ("random": :func:`kidkernels.select_positions`;
  "hard": the student's entropies on the gold sequence via :func:`kidkernels.fused_linear_select`, which costs one
  more no-grad student pass), replace them with a mask token, one no-grad student pass over the masked sequence,
  :func:`kidkernels.fused_linear_argmax` at positions ``t - 1`` of the answer span (computed for every answer row
  and kept where chosen: no host synchronisation to compact the chosen rows), write the predictions into the gold
  sequence (y-hat), then the teacher (no grad) and the student (grad) read (x, y-hat) and the loss is reverse KL +
  MLE against the *gold* tokens, 1:1.
- The mask token is the last vocabulary id and EOS the one before it (random-weight models have no tokenizer).
- A step is forward + backward of the student (all parameters trainable, gradients dropped between steps); no
  optimizer update, which costs the same for every method.  ``gradient_checkpointing`` recomputes the student's
  layers in backward (the GPU case: the 0.5B student's activations over 18k tokens would otherwise take ~25 GB).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

import kidkernels
from kidkernels.reference import reference_distill_loss_from_logits

from .shapes import ModelShape, StepShape

VARIANTS = ("sft", "teacher_forward", "rkd_hf_eager", "rkd_kidkernels", "kid_random", "kid_hard")
KID_ALPHA = 0.2


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(shape: ModelShape, *, device: torch.device, dtype: torch.dtype, seed: int):
    """A randomly initialised ``Qwen2ForCausalLM`` of ``shape``, created directly on ``device`` in ``dtype`` (a 7B
    model initialised in float32 on the host would take minutes), SDPA attention, no KV cache."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape.config_kwargs(), max_position_embeddings=4096, use_cache=False,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = Qwen2ForCausalLM(config)
    return model.to(device=device, dtype=dtype)


def body_parameter_count(model) -> int:
    """Parameters of the transformer layers and final norm (the embedding lookup does no matmul; the lm_head's
    work is counted separately, on the rows that need logits)."""
    return sum(p.numel() for name, p in model.model.named_parameters() if not name.startswith("embed_tokens"))


@dataclass
class StepSetup:
    """Teacher, student, and one batch of gold token ids ``[B, prompt_len + answer_len]``."""
    teacher: torch.nn.Module
    student: torch.nn.Module
    input_ids: torch.Tensor
    prompt_len: int
    answer_len: int
    mask_token_id: int
    eos_token_id: int
    shape: StepShape | None = None

    @classmethod
    def create(cls, shape: StepShape, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> StepSetup:
        teacher = build_model(shape.teacher, device=device, dtype=dtype, seed=seed).eval().requires_grad_(False)
        student = build_model(shape.student, device=device, dtype=dtype, seed=seed + 1).train()
        if shape.gradient_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        vocab = shape.student.vocab
        generator = torch.Generator(device=device).manual_seed(seed)
        input_ids = torch.randint(0, vocab - 2, (shape.batch, shape.prompt_len + shape.answer_len),
                                  generator=generator, device=device)
        input_ids[:, -1] = vocab - 2
        return cls(teacher, student, input_ids, shape.prompt_len, shape.answer_len, mask_token_id=vocab - 1,
                   eos_token_id=vocab - 2, shape=shape)

    @property
    def gold_answer(self) -> torch.Tensor:
        """``[B, answer_len]`` gold answer tokens: the targets of the loss rows."""
        return self.input_ids[:, self.prompt_len:]

    def answer_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """The positions whose outputs predict the answer tokens: ``prompt_len - 1 .. T - 2``."""
        return tensor[:, self.prompt_len - 1:-1]

    def answer_hidden(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, answer_len, H]`` last hidden states at the answer rows."""
        return self.answer_rows(model.model(input_ids=input_ids).last_hidden_state)

    def with_answer(self, answer: torch.Tensor) -> torch.Tensor:
        """The gold sequence with its answer span replaced by ``answer``."""
        ids = self.input_ids.clone()
        ids[:, self.prompt_len:] = answer
        return ids

    def reset(self) -> None:
        self.student.zero_grad(set_to_none=True)

    def release(self) -> None:
        self.teacher = self.student = self.input_ids = None


# ---- the steps -----------------------------------------------------------------------------------------------

def sft_step(s: StepSetup) -> None:
    hidden = s.answer_hidden(s.student, s.input_ids)
    weight = s.student.lm_head.weight
    kidkernels.fused_linear_distill_loss(hidden, weight, hidden.detach(), weight.detach(), s.gold_answer,
                                         kd_weight=0.0, mle_weight=1.0).backward()


def teacher_forward(s: StepSetup) -> None:
    with torch.no_grad():
        s.answer_hidden(s.teacher, s.input_ids)


def rkd_hf_eager_step(s: StepSetup) -> None:
    student_logits = s.answer_rows(s.student(input_ids=s.input_ids).logits)
    with torch.no_grad():
        teacher_logits = s.answer_rows(s.teacher(input_ids=s.input_ids).logits)
    reference_distill_loss_from_logits(student_logits, teacher_logits, s.gold_answer, divergence="rkl",
                                       mle_weight=1.0, dtype=torch.float32).backward()


def _distill_on(s: StepSetup, input_ids: torch.Tensor) -> None:
    """Reverse KL + MLE (gold targets) with both models reading ``input_ids``."""
    with torch.no_grad():
        teacher_hidden = s.answer_hidden(s.teacher, input_ids)
    student_hidden = s.answer_hidden(s.student, input_ids)
    kidkernels.fused_linear_distill_loss(student_hidden, s.student.lm_head.weight, teacher_hidden,
                                         s.teacher.lm_head.weight, s.gold_answer, divergence="rkl",
                                         mle_weight=1.0).backward()


def rkd_kidkernels_step(s: StepSetup) -> None:
    _distill_on(s, s.input_ids)


def kid_imperfect_answer(s: StepSetup, strategy: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """KID's imperfect data: the answer span with ``alpha`` of its positions (EOS excluded) replaced by the
    student's greedy predictions given the masked sequence.  Returns ``[B, answer_len]`` token ids."""
    weight = s.student.lm_head.weight
    gold = s.gold_answer
    valid = torch.ones_like(gold, dtype=torch.bool)
    valid[:, -1] = False  # EOS is never masked
    with torch.no_grad():
        if strategy in ("hard", "easy"):
            chosen = kidkernels.fused_linear_select(s.answer_hidden(s.student, s.input_ids), weight, valid,
                                                    KID_ALPHA, strategy)
        else:
            chosen = kidkernels.select_positions(valid, KID_ALPHA, strategy, generator=generator)
        masked = s.with_answer(torch.where(chosen, s.mask_token_id, gold))
        predicted = kidkernels.fused_linear_argmax(s.answer_hidden(s.student, masked), weight)
    return torch.where(chosen, predicted, gold)


def kid_step(s: StepSetup, strategy: str = "random") -> None:
    _distill_on(s, s.with_answer(kid_imperfect_answer(s, strategy)))


STEPS = {
    "sft": sft_step,
    "teacher_forward": teacher_forward,
    "rkd_hf_eager": rkd_hf_eager_step,
    "rkd_kidkernels": rkd_kidkernels_step,
    "kid_random": lambda s: kid_step(s, "random"),
    "kid_hard": lambda s: kid_step(s, "hard"),
}


def step_flops(variant: str, s: StepSetup) -> int:
    """Matmul FLOPs of the work each method needs (2 x parameters per token per forward, x3 for forward+backward;
    the lm_head on the answer rows only, as in the anchors.md cost model; attention scores and the recomputation
    of gradient checkpointing are not counted).  The eager variant does more (logits at every position): that is
    its overhead, not useful work."""
    tokens = s.input_ids.numel()
    rows = s.gold_answer.numel()
    vocab = s.student.lm_head.weight.shape[0]
    h_s, h_t = s.student.config.hidden_size, s.teacher.config.hidden_size
    student_body, teacher_body = body_parameter_count(s.student), body_parameter_count(s.teacher)
    student_train = 6 * student_body * tokens
    student_no_grad_pass = 2 * student_body * tokens
    teacher_pass = 2 * teacher_body * tokens
    distill_loss = 2 * rows * vocab * (h_t + 3 * h_s)
    student_head = 2 * rows * vocab * h_s
    flops = {
        "sft": student_train + 3 * student_head,
        "teacher_forward": teacher_pass,
        "rkd_hf_eager": student_train + teacher_pass + distill_loss,
        "rkd_kidkernels": student_train + teacher_pass + distill_loss,
        "kid_random": student_train + teacher_pass + distill_loss + student_no_grad_pass + student_head,
        "kid_hard": student_train + teacher_pass + distill_loss + 2 * (student_no_grad_pass + student_head),
    }
    return flops[variant]
