"""CodeS-style prompts and the tokenization used for training and generation.

Prompt layout (one string)::

    database schema :
    table singer , columns = [ singer.singer_id ( int | primary key | values : 1 , 2 ) , singer.name ( text | values : Joe Sharp , Timbaland ) ]
    table concert , columns = [ ... ]
    foreign keys :
    concert.stadium_id = stadium.stadium_id
    matched contents :
    singer.country ( France )
    <evidence, if any>
    <question>

* column annotations: the declared type, ``primary key``, ``comment : ...`` (the
  ``tables.json`` name where it differs from the column name), ``values : v1 , v2`` (two
  sample values of at most 25 characters);
* ``foreign keys : None`` / ``matched contents : None`` when there are none;
* names that are not plain identifiers (spaces, leading digits, SQL keywords) are
  back-quoted, as in SQLite: ``table `Home Town```.

The target is the normalised SQL (:func:`kid.sql_normalize.normalize_sql`) followed by EOS;
:func:`tokenize_example` masks the prompt out of the loss.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from .data.schema import DatabaseSchema

IGNORE_INDEX = -100

_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# SQLite keywords that cannot be used as bare identifiers without confusion.
SQL_KEYWORDS = frozenset(
    """abort action add after all alter analyze and as asc attach autoincrement before begin between by cascade
    case cast check collate column commit conflict constraint create cross current current_date current_time
    current_timestamp database default deferrable deferred delete desc detach distinct drop each else end escape
    except exclusive exists explain fail for foreign from full glob group having if ignore immediate in index
    indexed initially inner insert instead intersect into is isnull join key left like limit match natural no not
    notnull null of offset on or order outer plan pragma primary query raise recursive references regexp reindex
    release rename replace restrict right rollback row rows savepoint select set table temp temporary then to
    transaction trigger union unique update using vacuum values view virtual when where with without""".split()
)


def prompt_name(name: str) -> str:
    """A table or column name as written in the prompt: back-quoted when it needs quoting."""
    if _PLAIN_NAME.match(name) and name.lower() not in SQL_KEYWORDS:
        return name
    return "`" + name.replace("`", "``") + "`"


def format_schema(schema: DatabaseSchema) -> str:
    """The ``database schema :`` and ``foreign keys :`` sections."""
    lines = ["database schema :"]
    for table in schema.tables:
        t_name = prompt_name(table.name)
        header = t_name + (f" ( comment : {table.comment} )" if table.comment else "")
        columns = []
        for col in table.columns:
            notes = [col.type or "any"]
            if col.primary_key:
                notes.append("primary key")
            if col.comment:
                notes.append(f"comment : {col.comment}")
            if col.values:
                notes.append("values : " + " , ".join(col.values))
            columns.append(f"{t_name}.{prompt_name(col.name)} ( {' | '.join(notes)} )")
        lines.append(f"table {header} , columns = [ {' , '.join(columns)} ]")
    if schema.foreign_keys:
        lines.append("foreign keys :")
        lines += [
            f"{prompt_name(a)}.{prompt_name(b)} = {prompt_name(c)}.{prompt_name(d)}"
            for a, b, c, d in schema.foreign_keys
        ]
    else:
        lines.append("foreign keys : None")
    return "\n".join(lines)


def format_matched_contents(matched: Mapping[str, list[str]] | None) -> str:
    """The ``matched contents :`` section from ``{"table.column": [values]}``."""
    if not matched:
        return "matched contents : None"
    lines = ["matched contents :"]
    for key, values in matched.items():
        table, _, column = key.partition(".")
        lines.append(f"{prompt_name(table)}.{prompt_name(column)} ( {' , '.join(values)} )")
    return "\n".join(lines)


def question_text(example: Mapping[str, Any], *, use_evidence: bool = True) -> str:
    """The final part of the prompt: BIRD's evidence (if used and present) and the question."""
    question = " ".join(str(example.get("question", "")).split())
    evidence = " ".join(str(example.get("evidence") or "").split()) if use_evidence else ""
    return f"{evidence}\n{question}" if evidence else question


def build_prompt(
    example: Mapping[str, Any],
    schema: DatabaseSchema,
    matched_contents: Mapping[str, list[str]] | None = None,
    *,
    use_evidence: bool = True,
) -> str:
    """The CodeS-style prompt of one example (``question``, optional ``evidence``).

    ``matched_contents`` defaults to the example's ``matched_contents`` field if any.
    """
    if matched_contents is None:
        matched_contents = example.get("matched_contents") or None
    return "\n".join(
        [
            format_schema(schema),
            format_matched_contents(matched_contents),
            question_text(example, use_evidence=use_evidence),
        ]
    )


def _split_prompt(prompt: str, question: str | None) -> tuple[str, str]:
    if question and prompt.endswith(question):
        return prompt[: len(prompt) - len(question)], question
    head, sep, tail = prompt.rpartition("\n")
    return head + sep, tail


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """Special tokens the tokenizer puts before and after a text (e.g. ``([bos], [])``)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return full[:start], full[start + len(plain) :]
    return [], []


def tokenize_prompt(
    tokenizer,
    prompt: str,
    *,
    max_input_tokens: int = 1024,
    question: str | None = None,
) -> list[int]:
    """Token ids of a prompt, at most ``max_input_tokens``, always keeping the question.

    When the prompt is too long, the schema part is cut from its end (the first tables
    stay), and the question (``question``, by default the prompt's last line) is kept
    whole; a question longer than the whole budget keeps its end. Special tokens the
    tokenizer adds (e.g. BOS) are kept.
    """
    ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if len(ids) <= max_input_tokens:
        return ids
    prefix, suffix = special_tokens_around(tokenizer)
    context, tail = _split_prompt(prompt, question)
    context_ids = list(tokenizer(context, add_special_tokens=False)["input_ids"])
    tail_ids = list(tokenizer(tail, add_special_tokens=False)["input_ids"])
    budget = max(max_input_tokens - len(prefix) - len(suffix), 0)
    if len(tail_ids) >= budget:
        body = tail_ids[len(tail_ids) - budget :] if budget else []
    else:
        body = context_ids[: budget - len(tail_ids)] + tail_ids
    return prefix + body + suffix


def tokenize_example(
    tokenizer,
    prompt: str,
    target_sql: str,
    max_input_tokens: int = 1024,
    max_output_tokens: int = 128,
    *,
    question: str | None = None,
) -> dict[str, list[int]]:
    """Training features of one example: ``input_ids``, ``labels``, ``attention_mask``.

    ``input_ids`` = prompt tokens (:func:`tokenize_prompt`, at most ``max_input_tokens``)
    + target tokens (``target_sql`` + EOS, at most ``max_output_tokens``; a target that is
    too long is cut and loses its EOS). ``labels`` are ``-100`` on the prompt, so the loss
    covers only the SQL and EOS.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token")
    prompt_ids = tokenize_prompt(tokenizer, prompt, max_input_tokens=max_input_tokens, question=question)
    target_ids = list(tokenizer(target_sql, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    target_ids = target_ids[:max_output_tokens]
    input_ids = prompt_ids + target_ids
    return {
        "input_ids": input_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
        "attention_mask": [1] * len(input_ids),
    }
