"""One training step of each method the full-step benchmark compares, on Qwen2-architecture (Qwen1.5) models with
random weights, through the trainer's own objectives (:func:`kid.methods.compute_objective` with ``backward=``:
the terms one graph at a time, as :class:`kid.trainer.DistillTrainer` runs each micro-batch): SFT, a teacher
forward alone, RKD from Hugging Face logits (eager, the comparison), RKD and KID (random and hard selection).

- A batch is ``prompt_len`` prompt tokens then ``answer_len`` answer (SQL) tokens, the last one EOS; no padding.  The
  loss rows are the answer positions (``B x answer_len``: 2,048 at batch 16 x 128, the paper's N), read by
  :func:`kid.models.answer_hidden_states` without logits.
- RKD (HF, eager): the models' full ``[B, T, V]`` logits as ``forward()`` returns them (what TRL/torchtune-style
  code does), sliced to the answer rows, reverse KL + MLE with :mod:`kidkernels.reference` in float32.
- The mask token is the last vocabulary id and EOS the one before it (random-weight models have no tokenizer).
- A step is forward + backward of the student (all parameters trainable, gradients dropped between steps); no
  optimizer update, which costs the same for every method.  ``gradient_checkpointing`` recomputes the student's
  layers in backward (the GPU case: the 0.5B student's activations over 18k tokens would otherwise take ~25 GB).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kid.config import MethodConfig
from kid.methods import DistillContext, compute_objective
from kid.models import answer_hidden_states, lm_head_of
from kidkernels.reference import reference_distill_loss_from_logits

from .fake_memory import default_dtype
from .shapes import ModelShape, StepShape

VARIANTS = ("sft", "teacher_forward", "rkd_hf_eager", "rkd_kidkernels", "kid_random", "kid_hard")
KID_ALPHA = 0.2


def build_model(shape: ModelShape, *, device: torch.device, dtype: torch.dtype, seed: int):
    """A randomly initialised ``Qwen2ForCausalLM`` of ``shape``, created directly on ``device`` in ``dtype`` (a 7B
    model initialised in float32 on the host would take minutes), SDPA attention, no KV cache."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape.config_kwargs(), max_position_embeddings=4096, use_cache=False,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
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

    def reset(self) -> None:
        self.student.zero_grad(set_to_none=True)

    def release(self) -> None:
        self.teacher = self.student = self.input_ids = None


# ---- the steps -----------------------------------------------------------------------------------------------

def trainer_batch(s: StepSetup, input_ids: torch.Tensor | None = None) -> dict:
    """The batch layout of :mod:`kid.batching` for the (unpadded) benchmark sequences."""
    ids = s.input_ids if input_ids is None else input_ids
    batch, width = ids.shape
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "answer_index": torch.arange(s.prompt_len, width, device=ids.device).expand(batch, -1),
            "answer_labels": s.gold_answer}


def objective_context(s: StepSetup, method: str, **options) -> DistillContext:
    config = MethodConfig(method=method, **options)
    return DistillContext(config=config, student=s.student, student_head=lm_head_of(s.student),
                          teacher=s.teacher if config.needs_teacher else None,
                          teacher_head=lm_head_of(s.teacher) if config.needs_teacher else None,
                          eos_token_id=s.eos_token_id, pad_token_id=s.eos_token_id, mask_token_id=s.mask_token_id,
                          generator=torch.Generator(device=s.input_ids.device).manual_seed(0))


def trainer_step(s: StepSetup, method: str, **options) -> None:
    batch = trainer_batch(s)
    normalizer = batch["answer_labels"].numel()
    # Each term back-propagated before the next is built, as DistillTrainer.training_step runs them.
    compute_objective(objective_context(s, method, **options), batch, normalizer, backward=torch.Tensor.backward)


def teacher_forward(s: StepSetup) -> None:
    with torch.no_grad():
        answer_hidden_states(s.teacher, trainer_batch(s))


def rkd_hf_eager_step(s: StepSetup) -> None:
    student_logits = s.answer_rows(s.student(input_ids=s.input_ids).logits)
    with torch.no_grad():
        teacher_logits = s.answer_rows(s.teacher(input_ids=s.input_ids).logits)
    reference_distill_loss_from_logits(student_logits, teacher_logits, s.gold_answer, divergence="rkl",
                                       mle_weight=1.0, dtype=torch.float32).backward()


STEPS = {
    "sft": lambda s: trainer_step(s, "sft"),
    "teacher_forward": teacher_forward,
    "rkd_hf_eager": rkd_hf_eager_step,
    "rkd_kidkernels": lambda s: trainer_step(s, "rkd"),
    "kid_random": lambda s: trainer_step(s, "kid", alpha=KID_ALPHA, strategy="random"),
    "kid_hard": lambda s: trainer_step(s, "kid", alpha=KID_ALPHA, strategy="hard"),
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
