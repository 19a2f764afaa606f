"""Answers generated during training, for the on-policy baselines (GKD, ImitKD, f-distill).

* :func:`generate_answers` samples from a model given left-padded prompts and returns ``[B, G]`` answer tokens with
  -100 after the first EOS (EOS itself is kept: it is a target, as in the gold data); :func:`kid.batching.
  prompt_plus_answer` turns prompts and answers into a batch the losses read.
* :func:`merged_lora_weights`: decode with each LoRA adapter folded into a copy of the weight it adapts (one matrix
  product per layer instead of three; the trained weights are never modified, so nothing drifts).
* :func:`draw_sources` / :func:`rollout_step`: for one optimizer step, which answers come from the gold data, the
  student or the teacher, and one ``generate`` call per source for all the step's prompts, grouped by length.

The same collectives on every process.  Under FSDP every student forward (``generate`` included) is a collective,
so every process must run the same student passes in the same order.  The source draws are made on the host from a
seed that does not depend on the process, for the rows of *every* process (:func:`draw_sources`): each process
knows what every other one will do, and the decision structure -- whether the student generates, in how many calls,
which micro-batches take a separate KD pass -- is computed from the draws of all processes, so it is the same
everywhere.  A process with no row of its own for a call that another process makes generates for one of its
prompts and discards the result (only when the student is sharded: otherwise ``generate`` is local).

Generation waits on the host for each new token by nature; it is the on-policy methods' cost (the paper's 8-14x),
not a hot path to keep sync-free, and the few host reads added here (answer lengths) happen after it.
"""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .batching import IGNORE_INDEX, prompt_plus_answer
from .models import eval_mode, gather_fsdp_root, is_fsdp_sharded

GOLD, STUDENT, TEACHER = "gold", "student", "teacher"
# Batch key of the teacher's answers generated before training (kid generate-teacher), padded with -100.
TEACHER_ANSWER_KEY = "teacher_answer_labels"


# ---- decoding ---------------------------------------------------------------------------------------------------

def _inner_model(model):
    """The model ``generate`` runs on: inside DDP / accelerate wrappers, the peft model itself (its LoRA layers)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model


@contextlib.contextmanager
def merged_lora_weights(model, enabled: bool = True):
    """Within the context, every LoRA layer of ``model`` computes ``x @ (W + delta).T + b`` with its active
    adapters' ``delta = scale * B @ A`` folded into a *copy* of its base weight ``W``: decoding then costs one
    product per layer instead of three.  ``W``, the adapters and their ``requires_grad`` are never modified (an
    in-place merge and unmerge would round ``W`` twice per step, and the drift would accumulate over training).

    Extra memory: one copy of the adapted weights, for the duration of the context.  A no-op when there is no
    plain LoRA layer (no peft, full fine-tuning), when a layer is of a kind whose merge is not ``W + B @ A``
    (DoRA, LoRA bias, quantized or non-Linear base layers), when a model part is sharded by FSDP, or with
    ``enabled=False``.  Use it under ``torch.no_grad()`` only.
    """
    layers = _plain_lora_layers(model) if enabled else []
    restore = []
    try:
        # The merge itself in float32 (an enclosing autocast would form B @ A in bfloat16).
        with torch.no_grad(), torch.autocast("cpu", enabled=False), _cuda_autocast_off():
            for layer, base, adapters in layers:
                weight = base.weight
                merged = weight.to(torch.float32, copy=True)
                for name in adapters:
                    merged += layer.get_delta_weight(name).to(torch.float32)
                merged = merged.to(weight.dtype)
                bias = base.bias

                def forward(x, *args, _w=merged, _b=bias, **kwargs):
                    return torch.nn.functional.linear(x, _w, _b)

                # An instance attribute shadows the class's forward; deleting it restores the LoRA layer.
                layer.forward = forward
                restore.append(layer)
        yield len(restore) > 0
    finally:
        for layer in restore:
            del layer.forward


def _cuda_autocast_off():
    return torch.autocast("cuda", enabled=False) if torch.cuda.is_available() else contextlib.nullcontext()


def _plain_lora_layers(model) -> list:
    """``(layer, base_linear, active_adapter_names)`` for each LoRA layer of ``model`` if all of them can be merged
    as ``W + B @ A`` (else an empty list: decode through the LoRA layers)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    inner = _inner_model(model)
    if is_fsdp_sharded(inner):
        return []
    found = []
    for module in inner.modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer()
        if getattr(module, "merged", False) or getattr(module, "disable_adapters", False):
            continue  # already merged by the user, or adapters off: the base layer alone is what runs
        adapters = [name for name in module.active_adapters if name in getattr(module, "lora_A", {})]
        if not adapters:
            continue
        plain = type(base) is torch.nn.Linear and not getattr(module, "fan_in_fan_out", False)
        for name in adapters:
            plain = plain and not getattr(module, "use_dora", {}).get(name, False)
            plain = plain and not getattr(module, "lora_bias", {}).get(name, False)
        if not plain:
            return []
        found.append((module, base, adapters))
    return found


def sampling_config(*, max_new_tokens: int, eos_token_id: int, pad_token_id: int, do_sample: bool = True,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 1):
    """A ``GenerationConfig`` with every sampling knob explicit: transformers fills unset ones from the checkpoint's
    generation_config.json (a chat model's repetition penalty would make the samples stop following the model's
    distribution)."""
    from transformers import GenerationConfig

    return GenerationConfig(do_sample=do_sample, temperature=temperature if do_sample else None,
                            top_k=top_k if do_sample else None, top_p=top_p if do_sample else None, min_p=None,
                            typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=num_beams,
                            max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                            use_cache=True)


@torch.no_grad()
def generate_answers(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                     eos_token_id: int, pad_token_id: int, temperature: float = 1.0, do_sample: bool = True,
                     top_k: int = 0, top_p: float = 1.0, num_beams: int = 1, merge_lora: bool = False
                     ) -> torch.Tensor:
    """``[B, G]`` int64 generated answer tokens (``G <= max_new_tokens``), -100 after each row's first EOS.

    model: a causal LM, possibly wrapped (DDP, peft); generation runs on the unwrapped model in eval mode (no
    dropout) with a KV cache, sampling at ``temperature`` with optional top-k / top-p truncation (or greedy /
    beam search with ``do_sample=False``).  merge_lora: decode with the LoRA adapters merged
    (:func:`merged_lora_weights`).  A row with no EOS within ``max_new_tokens`` keeps all its tokens (truncated,
    like a gold answer longer than the output budget).
    """
    lm = _inner_model(model)
    config = sampling_config(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                             do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                             num_beams=num_beams)
    # Under FSDP every decoding step all-gathers parameters, so a process whose rows all ended must keep stepping
    # until every process has ended (transformers detects only the FSDP it applied itself, not accelerate's).
    synced = is_fsdp_sharded(lm) and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
    if synced:
        gather_fsdp_root(lm)
    with eval_mode(lm), merged_lora_weights(lm, enabled=merge_lora):
        out = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config,
                          synced_gpus=synced)
    new = out[:, prompt_ids.shape[1]:]
    if new.shape[1] == 0:
        return torch.full((prompt_ids.shape[0], 1), eos_token_id, dtype=torch.long, device=prompt_ids.device)
    is_eos = new == eos_token_id
    # Slots strictly after the first EOS: at least one EOS before them.
    after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
    return torch.where(after_eos, torch.full_like(new, IGNORE_INDEX), new)


def generate_grouped(model, prompts: Sequence[torch.Tensor], *, batch_size: int = 0, num_calls: int | None = None,
                     pad_token_id: int, **options) -> list[torch.Tensor]:
    """Generate an answer for each prompt (1-D tensors of real tokens, no padding) in length-grouped calls.

    Prompts are sorted by length (ties in input order) and cut into calls of at most ``batch_size`` rows (0: one
    call), each left-padded to its own longest prompt.  ``num_calls``: make exactly this many calls (at least the
    number needed), repeating the last prompt in calls that would otherwise be empty and discarding their answers:
    every process of a sharded student must call ``generate`` equally often.  ``options``: see
    :func:`generate_answers`.  Returns one 1-D answer per prompt, in input order, cut after its first EOS (or at
    ``max_new_tokens``): every element is a target token (one host read of the lengths per call).
    """
    n = len(prompts)
    needed = 0 if n == 0 else (1 if batch_size <= 0 else math.ceil(n / batch_size))
    calls = needed if num_calls is None else num_calls
    if calls < needed:
        raise ValueError(f"{n} prompts need {needed} generate calls of at most {batch_size}, not {calls}")
    if calls > 0 and n == 0:
        raise ValueError("no prompt to generate for")
    order = sorted(range(n), key=lambda i: (prompts[i].numel(), i))
    per_call = math.ceil(n / calls) if calls else 0
    answers: list[torch.Tensor | None] = [None] * n
    for c in range(calls):
        rows = order[c * per_call:(c + 1) * per_call]
        dummy = not rows
        if dummy:
            rows = order[-1:]
        width = max(prompts[i].numel() for i in rows)
        first = prompts[rows[0]]
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=first.device)
        mask = torch.zeros((len(rows), width), dtype=torch.long, device=first.device)
        for j, i in enumerate(rows):
            length = prompts[i].numel()
            ids[j, width - length:] = prompts[i]
            mask[j, width - length:] = 1
        generated = generate_answers(model, ids, mask, pad_token_id=pad_token_id, **options)
        if not dummy:
            lengths = (generated != IGNORE_INDEX).sum(dim=1).tolist()
            for j, i in enumerate(rows):
                answers[i] = generated[j, :lengths[j]]
    return answers  # type: ignore[return-value]


# ---- one optimizer step's rollout -------------------------------------------------------------------------------

def prompt_tokens(batch: dict, row: int) -> torch.Tensor:
    """The real prompt tokens of ``batch``'s row ``row`` (1-D, padding dropped), as :func:`generate_grouped` takes
    them.  Its length is read on the host (a boolean-mask gather); generation syncs at every token anyway."""
    mask = batch["prompt_attention_mask"][row].bool()
    return batch["prompt_input_ids"][row][mask]


def draw_sources(config, seed: int, rows_per_process: Sequence[Sequence[int]], *, progress: float = 0.0
                 ) -> list[list[list[str]]]:
    """``sources[p][m][r]``: where the KD answer of row ``r`` of micro-batch ``m`` of process ``p`` comes from
    ("gold", "student" or "teacher"), for every process, drawn on the host from ``seed`` alone.

    rows_per_process: ``[p][m]`` the number of rows of each micro-batch of the step on each process.  ``seed``
    must be the same on every process.  GKD draws once per micro-batch (all processes' micro-batch ``m`` together
    form one global batch, generated or gold); ImitKD and f-distill draw per row, in the order of the process's rows
    over the whole step, so that the draw a row gets does not depend on how the step is cut into micro-batches.
    """
    rng = random.Random(seed)
    method = config.method
    if method == "gkd":
        micro = max((len(m) for m in rows_per_process), default=0)
        per_micro = [STUDENT if rng.random() < config.gkd_lambda else GOLD for _ in range(micro)]
        return [[[per_micro[m]] * rows for m, rows in enumerate(process)] for process in rows_per_process]
    if method == "imitkd":
        gold_p = (1.0 - progress) if config.imitkd_gold_probability == "linear" else config.imitkd_gold_probability

        def draw():
            return GOLD if rng.random() < gold_p else STUDENT
    elif method == "fdistill":
        def draw():
            return TEACHER if rng.random() < config.fdistill_teacher_probability else STUDENT
    else:
        raise ValueError(f"method {method!r} does not generate")
    out = []
    for process in rows_per_process:
        flat = [draw() for _ in range(sum(process))]
        split, start = [], 0
        for rows in process:
            split.append(flat[start:start + rows])
            start += rows
        out.append(split)
    return out


@dataclass
class KDPlan:
    """The KD data of one micro-batch.

    kd_batch: the batch (see :mod:`kid.batching`) whose answers come from the drawn sources; None when the
        micro-batch's KD term reads the gold batch on every process (one fused pass with the MLE term).
    sources: this process's per-row sources.
    generated_rows, generated_tokens: this process's rows whose answers were generated during training (student,
        or teacher when online), and their answer tokens (EOS included).
    """
    kd_batch: dict | None
    sources: list[str]
    generated_rows: int = 0
    generated_tokens: int = 0


@dataclass
class StepRollout:
    """The result of :func:`rollout_step`: one :class:`KDPlan` per micro-batch, and the seconds spent generating."""
    plans: list[KDPlan]
    generation_s: float = 0.0
    generate_calls: dict[str, int] = field(default_factory=dict)

    @property
    def any_generated(self) -> bool:
        """Whether some micro-batch of the step (on any process) reads generated answers."""
        return any(plan.kd_batch is not None for plan in self.plans)


def rollout_step(ctx, batches: Sequence[dict], *, seed: int, rows_per_process: Sequence[Sequence[int]] | None = None
                 ) -> StepRollout:
    """Draw the sources and generate the answers of one optimizer step (the micro-batches ``batches`` of this
    process, collated ``with_prompts=True``), with one length-grouped ``generate`` per model for all of them.

    ctx: a :class:`kid.methods.DistillContext` (student, teacher, config, token ids, ``process_index``; ``progress``
    for ImitKD).  seed: the host seed of the step, the same on every process.  rows_per_process: the micro-batch
    sizes of every process (default: every process has this one's).  Teacher answers are read from the batches'
    ``teacher_answer_labels`` when the config names ``teacher_outputs``, else sampled from the teacher.
    """
    cfg = ctx.config
    for batch in batches:
        if "prompt_input_ids" not in batch:
            raise ValueError(f"method {cfg.method!r} generates answers: collate with with_prompts=True")
    local_rows = [int(b["input_ids"].shape[0]) for b in batches]
    if rows_per_process is None:
        rows_per_process = [local_rows] * ctx.num_processes
    if list(rows_per_process[ctx.process_index]) != local_rows:
        raise ValueError(f"rows_per_process[{ctx.process_index}] is {list(rows_per_process[ctx.process_index])}, "
                         f"but this process's micro-batches have {local_rows} rows")
    every = draw_sources(cfg, seed, rows_per_process, progress=ctx.progress)
    mine = every[ctx.process_index]
    cached_teacher = cfg.teacher_outputs is not None
    # Which micro-batches read generated data, on any process: the same decision everywhere.
    separate = [any(s != GOLD for process in every if m < len(process) for s in process[m])
                for m in range(len(batches))]

    def prompt_rows(indices):
        return [prompt_tokens(batches[m], r) for m, r in indices]

    options = dict(max_new_tokens=cfg.max_new_tokens, eos_token_id=ctx.eos_token_id, pad_token_id=ctx.pad_token_id,
                   temperature=cfg.sampling_temperature, top_k=cfg.top_k, top_p=cfg.top_p)
    answers: dict[tuple[int, int], torch.Tensor] = {}
    calls: dict[str, int] = {}
    started = time.perf_counter()
    for source, model in ((STUDENT, ctx.student), (TEACHER, ctx.teacher)):
        rows = [(m, r) for m, sources in enumerate(mine) for r, s in enumerate(sources) if s == source]
        if source == TEACHER and cached_teacher:
            for m in sorted({m for m, _ in rows}):
                if TEACHER_ANSWER_KEY not in batches[m]:
                    raise ValueError(f"teacher_outputs is set but the batch has no {TEACHER_ANSWER_KEY!r}: train with "
                                     "kid.trainer.DistillTrainer, which attaches the teacher's answers to the data")
                cached = batches[m][TEACHER_ANSWER_KEY]
                lengths = (cached != IGNORE_INDEX).sum(dim=1).tolist()
                for mm, r in rows:
                    if mm == m:
                        answers[(m, r)] = cached[r, :lengths[r]]
            continue
        # A sharded student's generate is a collective: every process makes the same number of calls.
        collective = source == STUDENT and ctx.num_processes > 1 and is_fsdp_sharded(_inner_model(model))
        counts = [sum(s == source for sources in process for s in sources) for process in every]
        if collective:
            most = max(counts)
            num_calls = 0 if most == 0 else (1 if cfg.generation_batch_size <= 0
                                             else math.ceil(most / cfg.generation_batch_size))
        else:
            num_calls = None
        if not rows and not num_calls:
            continue
        prompts = prompt_rows(rows) if rows else prompt_rows([(0, 0)])
        generated = generate_grouped(model, prompts, batch_size=cfg.generation_batch_size, num_calls=num_calls,
                                     merge_lora=source == STUDENT and cfg.merge_lora_for_generation, **options)
        calls[source] = num_calls if num_calls is not None else (
            1 if cfg.generation_batch_size <= 0 else math.ceil(len(rows) / cfg.generation_batch_size))
        for key, answer in zip(rows, generated):
            answers[key] = answer
    generation_s = time.perf_counter() - started

    plans = []
    for m, batch in enumerate(batches):
        if not separate[m]:
            plans.append(KDPlan(None, mine[m]))
            continue
        gold = batch["answer_labels"]
        rows = {r: answers[(m, r)] for r, s in enumerate(mine[m]) if s != GOLD}
        width = max([gold.shape[1]] + [a.numel() for a in rows.values()])
        kd_answers = torch.full((gold.shape[0], width), IGNORE_INDEX, dtype=torch.long, device=gold.device)
        kd_answers[:, :gold.shape[1]] = gold
        for r, answer in rows.items():
            kd_answers[r] = IGNORE_INDEX
            kd_answers[r, :answer.numel()] = answer.to(gold.device)
        kd_batch = prompt_plus_answer(batch["prompt_input_ids"], batch["prompt_attention_mask"], kd_answers,
                                      ctx.pad_token_id)
        online = [r for r in rows if mine[m][r] == STUDENT or not cached_teacher]
        plans.append(KDPlan(kd_batch, mine[m], generated_rows=len(online),
                            generated_tokens=sum(rows[r].numel() for r in online)))
    return StepRollout(plans, generation_s, calls)
