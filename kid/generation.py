"""SQL generation from a Hugging Face causal LM, for evaluation.

:func:`generate_sql` encodes CodeS-style prompts (truncated by
:func:`kid.prompts.tokenize_prompt`, which keeps the question), runs batched greedy
decoding or beam search that stops at EOS, and returns one single-line SQL string per
prompt. With ``check_executable`` it asks for every beam and keeps the first (best
scored) one that passes ``EXPLAIN QUERY PLAN`` on the example's database (read-only),
falling back to the best beam.
"""

from __future__ import annotations

import os
from typing import Sequence

from .evaluation.sqlite_safe import explain_ok, open_readonly
from .prompts import tokenize_prompt


def clean_generated_sql(text: str) -> str:
    """One-line SQL from decoded model output (whitespace collapsed, trailing ';' dropped)."""
    return " ".join(text.split()).rstrip(";").strip()


def generate_sql(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    questions: Sequence[str | None] | None = None,
    db_paths: Sequence[str | os.PathLike] | None = None,
    batch_size: int = 8,
    num_beams: int = 1,
    max_new_tokens: int = 128,
    max_input_tokens: int = 1024,
    check_executable: bool = False,
    progress: bool = True,
    finished: dict[int, str] | None = None,
) -> list[str]:
    """Generate one SQL query per prompt, in input order (see the module docstring).

    ``questions`` are the final parts of the prompts that truncation must keep (default:
    each prompt's last line); ``db_paths`` are needed with ``check_executable``.
    ``finished``: filled batch by batch (prompt index -> SQL; prompts are batched by length,
    not in input order), so that a caller keeps what was generated when interrupted.
    """
    import torch
    from transformers import GenerationConfig

    if check_executable and num_beams < 2:
        raise ValueError("check_executable needs beam search (num_beams >= 2)")
    if check_executable and (db_paths is None or len(db_paths) != len(prompts)):
        raise ValueError("check_executable needs one database path per prompt")
    if questions is not None and len(questions) != len(prompts):
        raise ValueError("questions must have one entry per prompt")
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id

    encoded = [
        tokenize_prompt(tokenizer, p, max_input_tokens=max_input_tokens, question=questions[i] if questions else None)
        for i, p in enumerate(prompts)
    ]
    # Batch prompts of similar length together: less padding.
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    n_return = num_beams if check_executable else 1
    config = GenerationConfig(
        do_sample=False,
        num_beams=num_beams,
        num_return_sequences=n_return,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        early_stopping=True if num_beams > 1 else False,
    )
    device = next(model.parameters()).device
    outputs: list[str] = [""] * len(prompts)
    bar = None
    if progress and prompts:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), desc="generating", unit="ex")
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in batch)
            # Left padding: every prompt ends where generation starts.
            input_ids = torch.tensor([[pad_id] * (width - len(encoded[i])) + encoded[i] for i in batch], device=device)
            attention = torch.tensor(
                [[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in batch], device=device
            )
            with torch.no_grad():
                generated = model.generate(input_ids=input_ids, attention_mask=attention, generation_config=config)
            new_tokens = generated[:, width:]
            texts = [clean_generated_sql(t) for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            for k, i in enumerate(batch):
                candidates = texts[k * n_return : (k + 1) * n_return]
                outputs[i] = _first_executable(candidates, db_paths[i]) if check_executable else candidates[0]
                if finished is not None:
                    finished[i] = outputs[i]
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    return outputs


def _first_executable(candidates: Sequence[str], db_path) -> str:
    """The first candidate that compiles on the database, else the first candidate."""
    try:
        conn = open_readonly(db_path)
    except FileNotFoundError:
        return candidates[0]
    try:
        for sql in candidates:
            if explain_ok(conn, sql):
                return sql
    finally:
        conn.close()
    return candidates[0]
