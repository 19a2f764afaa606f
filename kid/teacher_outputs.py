"""The teacher's answers generated once before training, as f-distill's reference runs it (``kid generate-teacher``).

A directory holds ``meta.json`` (the settings: teacher, decoding, budgets, counts, ``complete``) and
``outputs.jsonl``, one line per distinct training prompt: ``{"prompt": <sha1 of its token ids>, "answer": [ids]}``
(the answer ends with EOS unless it ran into ``max_new_tokens``).  Lines are appended and flushed batch by batch:
an interrupted run keeps what it wrote and the same command continues from there; a finished directory is reused
as is by every training run that names it (``MethodConfig.teacher_outputs``).

:class:`kid.trainer.DistillTrainer` looks each training example's prompt up (:func:`attach_teacher_outputs`) and
its collator adds the answers as ``teacher_answer_labels`` (``[B, G]``, -100 padded, see
:class:`TeacherAnswerCollator`); :func:`kid.rollout.rollout_step` reads them for the rows drawn as the teacher's.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .batching import IGNORE_INDEX
from .files import atomic_open
from .rollout import TEACHER_ANSWER_KEY, generate_grouped

META_NAME = "meta.json"
OUTPUTS_NAME = "outputs.jsonl"
ANSWER_COLUMN = "teacher_answer"


def prompt_key(prompt_ids: Sequence[int]) -> str:
    """The lookup key of a prompt: the sha1 of its token ids."""
    return hashlib.sha1(",".join(str(int(t)) for t in prompt_ids).encode()).hexdigest()


def prompt_of(example: Mapping[str, Any]) -> list[int]:
    """The prompt token ids of a tokenized training example (``input_ids`` before the first target label)."""
    ids, labels = list(example["input_ids"]), list(example["labels"])
    start = next((i for i, y in enumerate(labels) if y != IGNORE_INDEX), len(labels))
    return ids[:start]


def _read_meta(directory: Path) -> dict | None:
    path = directory / META_NAME
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_meta(directory: Path, meta: dict) -> None:
    with atomic_open(directory / META_NAME) as f:
        json.dump(meta, f, indent=2, sort_keys=True)


def _ends_with_a_complete_line(path: Path) -> bool:
    """``path`` is missing, empty, or ends with a newline (no line cut by an interruption)."""
    if not path.is_file() or path.stat().st_size == 0:
        return True
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _read_outputs(directory: Path) -> dict[str, list[int]]:
    outputs: dict[str, list[int]] = {}
    path = directory / OUTPUTS_NAME
    if not path.is_file():
        return outputs
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                outputs[str(record["prompt"])] = [int(t) for t in record["answer"]]
            except (ValueError, KeyError, TypeError):
                # A line cut by an interruption is the last one: drop it (it is generated again).
                if not line.endswith("\n"):
                    break
                raise ValueError(f"{path}:{number}: not a teacher-output record") from None
    return outputs


def output_settings(*, eos_token_id: int, max_new_tokens: int = 128, do_sample: bool = False,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 1,
                    settings: Mapping[str, Any] | None = None) -> dict:
    """The settings ``meta.json`` records (and a directory must match to be continued)."""
    meta = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample), "num_beams": int(num_beams),
            "temperature": float(temperature) if do_sample else None, "top_k": int(top_k) if do_sample else None,
            "top_p": float(top_p) if do_sample else None, "eos_token_id": int(eos_token_id)}
    meta.update(dict(settings or {}))
    return meta


def check_output_dir(out_dir, meta: Mapping[str, Any], *, overwrite: bool = False) -> None:
    """Raise ValueError (before any slow work) if ``out_dir`` cannot take outputs made with ``meta``: it holds
    outputs made with other settings, or other files, and ``overwrite`` is not set."""
    directory = Path(out_dir)
    if overwrite or not directory.exists():
        return
    existing = _read_meta(directory)
    if existing is None:
        if any(directory.iterdir()):
            raise ValueError(f"{directory} exists and is not a teacher-output directory; choose another or pass "
                             "--overwrite")
        return
    differing = sorted(k for k in meta if not _same_setting(k, existing.get(k), meta[k]))
    if differing:
        raise ValueError(f"{directory} holds teacher outputs made with other settings ({', '.join(differing)}); "
                         "pass --overwrite to generate them again, or choose another directory")


# Settings that name a directory: the same directory named another way (relative, absolute) is the same setting.
_PATH_SETTINGS = ("teacher", "teacher_adapter", "tokenizer")


def _same_setting(key: str, recorded, given) -> bool:
    if recorded == given:
        return True
    if key not in _PATH_SETTINGS or not isinstance(recorded, str) or not isinstance(given, str):
        return False
    a, b = Path(recorded).expanduser(), Path(given).expanduser()
    return a.exists() and b.exists() and a.resolve() == b.resolve()


@torch.no_grad()
def generate_teacher_outputs(teacher, dataset, out_dir, *, eos_token_id: int, pad_token_id: int,
                             max_new_tokens: int = 128, batch_size: int = 8, do_sample: bool = False,
                             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 1,
                             settings: Mapping[str, Any] | None = None, overwrite: bool = False,
                             progress: bool = True) -> dict:
    """Write (or finish) the teacher's answers to every distinct prompt of ``dataset`` under ``out_dir``.

    teacher: a causal LM on its device, frozen (None is accepted when every prompt already has its answer).
    dataset: tokenized examples (``input_ids`` / ``labels``, as :func:`kid.training.tokenize_dataset` makes them
    for training: the prompts must be tokenized as the training run tokenizes them).  Decoding: greedy by default
    (``num_beams`` > 1: beam search; ``do_sample``: sampling at
    ``temperature`` with top-k / top-p), in length-grouped batches of ``batch_size`` prompts.  settings: what else
    to record and check in ``meta.json`` (teacher path, tokenizer, budgets).

    An existing directory is continued if its settings are the same and refused otherwise (``overwrite=True``
    starts it again).  Returns the final ``meta.json`` content.
    """
    directory = Path(out_dir)
    meta = output_settings(eos_token_id=eos_token_id, max_new_tokens=max_new_tokens, do_sample=do_sample,
                           temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams, settings=settings)
    check_output_dir(directory, meta, overwrite=overwrite)
    directory.mkdir(parents=True, exist_ok=True)
    done = {} if overwrite else _read_outputs(directory)
    prompts: dict[str, list[int]] = {}
    for example in dataset:  # distinct prompts, in data order
        ids = prompt_of(example)
        if not ids:
            raise ValueError("a training example has no prompt token")
        prompts.setdefault(prompt_key(ids), ids)
    todo = [key for key in prompts if key not in done]
    meta.update(prompts=len(prompts), complete=False)
    if not todo and not overwrite and _read_meta(directory) == dict(meta, complete=True):
        return dict(meta, complete=True)  # finished with these settings: nothing is written
    _write_meta(directory, meta)
    outputs = directory / OUTPUTS_NAME
    if overwrite or not _ends_with_a_complete_line(outputs):
        # Starting over, or a line cut by an interruption (it must not stay in the file): the kept records are
        # written anew, atomically, so a crash here leaves the previous file.  Otherwise answers are only appended.
        with atomic_open(outputs) as f:
            for key, answer in done.items():
                f.write(json.dumps({"prompt": key, "answer": answer}) + "\n")
    order = sorted(todo, key=lambda k: len(prompts[k]))
    if order and teacher is None:
        raise ValueError(f"{len(order)} prompts still need the teacher's answers, and no teacher was given")
    device = next(teacher.parameters()).device if order else None
    bar = None
    if progress and order:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), initial=len(prompts) - len(order), desc="teacher outputs", unit="prompt")
    step = max(1, int(batch_size))
    try:
        with open(directory / OUTPUTS_NAME, "a", encoding="utf-8") as f:
            for start in range(0, len(order), step):
                keys = order[start:start + step]
                rows = [torch.tensor(prompts[k], dtype=torch.long, device=device) for k in keys]
                answers = generate_grouped(teacher, rows, batch_size=0, pad_token_id=pad_token_id,
                                           max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                           do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                           num_beams=num_beams)
                for key, answer in zip(keys, answers):
                    tokens = answer.tolist() or [int(eos_token_id)]
                    f.write(json.dumps({"prompt": key, "answer": tokens}) + "\n")
                f.flush()
                os.fsync(f.fileno())
                if bar is not None:
                    bar.update(len(keys))
    finally:
        if bar is not None:
            bar.close()
    meta.update(complete=True)
    _write_meta(directory, meta)
    return meta


def missing_prompts(out_dir, dataset) -> int:
    """How many distinct prompts of ``dataset`` have no answer in ``out_dir`` yet."""
    done = _read_outputs(Path(out_dir))
    return len({key for key in (prompt_key(prompt_of(example)) for example in dataset) if key not in done})


def finished_meta(path) -> dict:
    """``meta.json`` of a finished teacher-output directory; FileNotFoundError / ValueError (one line) otherwise."""
    directory = Path(path)
    meta = _read_meta(directory)
    if meta is None:
        raise FileNotFoundError(f"{directory}: no teacher outputs ({META_NAME} missing); write them with "
                                "`kid generate-teacher`")
    if not meta.get("complete"):
        raise ValueError(f"{directory}: the teacher outputs are incomplete (an interrupted `kid generate-teacher`); "
                         "run the same command again to finish them")
    return meta


def load_teacher_outputs(path) -> tuple[dict, dict[str, list[int]]]:
    """``(meta, {prompt key: answer ids})`` of a finished directory written by :func:`generate_teacher_outputs`."""
    meta = finished_meta(path)
    return meta, _read_outputs(Path(path))


def attach_teacher_outputs(dataset, outputs: Mapping[str, Sequence[int]], *, max_new_tokens: int | None = None):
    """``dataset`` (a ``datasets.Dataset`` of tokenized examples) with a ``teacher_answer`` column: each example's
    cached teacher answer (cut to ``max_new_tokens``).  Every prompt must have one; else a ValueError that counts
    the missing ones (tokenized differently, or another data set)."""
    if not hasattr(dataset, "map") or not hasattr(dataset, "column_names"):
        raise TypeError("teacher_outputs needs the training data as a datasets.Dataset")
    missing = sum(prompt_key(prompt_of(example)) not in outputs for example in dataset)
    if missing:
        raise ValueError(f"{missing} of {len(dataset)} training prompts have no cached teacher output: generate them "
                         "for this data and tokenization (same tokenizer and max_input_tokens) with "
                         "`kid generate-teacher`")

    def add(example):
        answer = list(outputs[prompt_key(prompt_of(example))])
        return {ANSWER_COLUMN: answer[:max_new_tokens] if max_new_tokens else answer}

    if ANSWER_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(ANSWER_COLUMN)
    return dataset.map(add, desc="attaching teacher outputs")


class TeacherAnswerCollator:
    """Wraps a collator (:class:`kid.batching.DistillCollator`): takes each feature's ``teacher_answer`` out, lets
    the wrapped collator build the batch, and adds ``teacher_answer_labels`` ``[B, G]`` (int64, -100 padded)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        answers, rest = [], []
        for feature in features:
            feature = dict(feature)
            if ANSWER_COLUMN not in feature:
                raise ValueError(f"a training example has no {ANSWER_COLUMN!r}: attach the teacher outputs first "
                                 "(kid.teacher_outputs.attach_teacher_outputs) and keep the column "
                                 "(TrainingArguments(remove_unused_columns=False))")
            answers.append(list(feature.pop(ANSWER_COLUMN)))
            rest.append(feature)
        batch = self.collator(rest)
        width = max(1, max(len(a) for a in answers))
        padded = torch.full((len(answers), width), IGNORE_INDEX, dtype=torch.long)
        for b, answer in enumerate(answers):
            if answer:
                padded[b, :len(answer)] = torch.tensor(answer, dtype=torch.long)
        batch[TEACHER_ANSWER_KEY] = padded
        return batch
