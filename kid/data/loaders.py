"""Loaders for text-to-SQL data sets, returning ``datasets.Dataset`` objects.

Every loader returns one row per example whose database exists, with the fields

``source, db_id, db_path, question, evidence, query, target, hardness, difficulty,
prompt, prompt_question``

* ``query`` is the gold SQL as given; ``target`` its normalised form (the training
  target, :func:`kid.sql_normalize.normalize_sql`);
* ``hardness`` is the Spider level (official, from the parsed ``sql`` field when the file
  has it, otherwise computed from the SQL); ``difficulty`` is BIRD's label ("" elsewhere);
* ``prompt`` is the CodeS-style prompt (:mod:`kid.prompts`) and ``prompt_question`` its
  final part (evidence and question), which truncation always keeps.

Examples whose database file is missing are skipped and reported in one warning
(:class:`MissingDatabaseWarning`) with their number and the missing ``db_id`` values.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from ..evaluation.hardness import hardness_from_spider_json, spider_hardness
from ..evaluation.scoring import database_path
from ..sql_normalize import normalize_sql
from .matching import match_contents
from .schema import load_tables_json, read_schema

FIELDS = (
    "source",
    "db_id",
    "db_path",
    "question",
    "evidence",
    "query",
    "target",
    "hardness",
    "difficulty",
    "prompt",
    "prompt_question",
)


class MissingDatabaseWarning(UserWarning):
    """Some examples were skipped because their database file does not exist."""


def read_json_examples(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a data file: a json list of objects (or json lines)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(data, dict):
        data = data.get("data") or data.get("examples") or list(data.values())
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise ValueError(f"{path}: expected a json list of example objects")
    return data


def _get(example: dict[str, Any], names: Iterable[str], path: Path, index: int) -> str:
    for name in names:
        if example.get(name) is not None:
            return str(example[name])
    raise KeyError(f"{path}: example {index} has none of the fields {list(names)}")


def build_examples(
    raw: list[dict[str, Any]],
    db_dir: str | os.PathLike,
    *,
    source: str,
    data_path: Path,
    tables_file: str | os.PathLike | None = None,
    question_fields: tuple[str, ...] = ("question",),
    query_fields: tuple[str, ...] = ("query",),
    use_evidence: bool = False,
    build_prompts: bool = True,
    limit: int | None = None,
    sample: int | None = None,
    sample_seed: int = 0,
):
    """Turn raw examples into the loader rows (see the module docstring) as a ``Dataset``.

    ``limit``: the first N examples with a database; ``sample``: a random sample of N of them (``sample_seed``: the
    same sample every time), in file order; only the chosen examples' prompts are built."""
    from datasets import Dataset

    from ..prompts import build_prompt, question_text

    db_dir = Path(db_dir)
    if not db_dir.is_dir():
        raise FileNotFoundError(f"database directory not found: {db_dir}")
    tables = load_tables_json(tables_file) if tables_file else {}
    rows: list[dict[str, Any]] = []
    missing: Counter[str] = Counter()
    chosen = None
    if sample is not None:
        import random

        with_db = [i for i, ex in enumerate(raw)
                   if database_path(db_dir, _get(ex, ("db_id",), data_path, i)).is_file()]
        chosen = set(with_db) if sample >= len(with_db) else set(random.Random(sample_seed).sample(with_db, sample))
    for i, ex in enumerate(raw):
        db_id = _get(ex, ("db_id",), data_path, i)
        db_path = database_path(db_dir, db_id)
        if not db_path.is_file():
            missing[db_id] += 1
            continue
        if (limit is not None and len(rows) >= limit) or (chosen is not None and i not in chosen):
            continue  # keep counting missing databases for the warning
        query = _get(ex, query_fields, data_path, i)
        question = " ".join(_get(ex, question_fields, data_path, i).split())
        evidence = " ".join(str(ex.get("evidence") or "").split())
        if isinstance(ex.get("sql"), dict):
            try:
                hardness = hardness_from_spider_json(ex["sql"])
            except (KeyError, IndexError, TypeError):
                hardness = spider_hardness(query)
        else:
            hardness = spider_hardness(query)
        row = {
            "source": source,
            "db_id": db_id,
            "db_path": str(db_path),
            "question": question,
            "evidence": evidence,
            "query": query,
            "target": normalize_sql(query),
            "hardness": hardness,
            "difficulty": str(ex.get("difficulty") or ""),
            "prompt": "",
            "prompt_question": question_text({"question": question, "evidence": evidence}, use_evidence=use_evidence),
        }
        if build_prompts:
            schema = read_schema(db_path, tables.get(db_id), db_id=db_id)
            # Values are looked for in what the model will read: the question, and the
            # evidence when it is part of the prompt (it often spells the value out).
            matched = match_contents(row["prompt_question"], db_path)
            row["prompt"] = build_prompt(row, schema, matched, use_evidence=use_evidence)
        rows.append(row)
    if missing:
        warnings.warn(
            f"skipped {sum(missing.values())} of {len(raw)} examples in {data_path.name}: database file missing for "
            + ", ".join(f"{db} ({n})" for db, n in sorted(missing.items())),
            MissingDatabaseWarning,
            stacklevel=3,
        )
    if not rows:
        return Dataset.from_dict({name: [] for name in FIELDS})
    return Dataset.from_list(rows)


def load_spider(
    data_file: str | os.PathLike,
    db_dir: str | os.PathLike,
    tables_file: str | os.PathLike | None = None,
    *,
    build_prompts: bool = True,
    limit: int | None = None,
    sample: int | None = None,
    source: str = "spider",
    question_field: str = "question",
):
    """Spider-format data (``dev.json``, ``train_spider.json``, ``train_others.json``).

    ``db_dir`` holds ``<db_id>/<db_id>.sqlite``; ``tables_file`` (Spider's
    ``tables.json``) adds column comments and foreign keys to the prompt.
    """
    path = Path(data_file)
    return build_examples(
        read_json_examples(path),
        db_dir,
        source=source,
        data_path=path,
        tables_file=tables_file,
        question_fields=(question_field,),
        query_fields=("query", "SQL"),
        build_prompts=build_prompts,
        limit=limit,
        sample=sample,
    )


def load_spider_dk(data_file, db_dir, tables_file, **kwargs):
    """Spider-DK (Gan et al. 2021): Spider format with its own ``tables.json``."""
    if tables_file is None:
        raise ValueError("Spider-DK needs its own tables.json (tables_file)")
    return load_spider(data_file, db_dir, tables_file, source="spider-dk", **kwargs)


def load_spider_syn(data_file, db_dir, tables_file=None, **kwargs):
    """Spider-Syn (Gan et al. 2021): the question is in ``SpiderSynQuestion``."""
    return load_spider(
        data_file, db_dir, tables_file, source="spider-syn", question_field="SpiderSynQuestion", **kwargs
    )


def load_spider_realistic(data_file, db_dir, tables_file=None, **kwargs):
    """Spider-Realistic (Deng et al. 2021): Spider format, column mentions removed from questions."""
    return load_spider(data_file, db_dir, tables_file, source="spider-realistic", **kwargs)


def load_bird(
    data_file: str | os.PathLike,
    db_dir: str | os.PathLike,
    tables_file: str | os.PathLike | None = None,
    *,
    use_evidence: bool = True,
    build_prompts: bool = True,
    limit: int | None = None,
    sample: int | None = None,
):
    """BIRD (Li et al. 2023): ``question``, ``evidence``, ``SQL``, ``difficulty``.

    ``use_evidence`` puts the external-knowledge evidence before the question in the
    prompt (BIRD is reported with and without it). ``db_dir`` is e.g.
    ``dev_databases``; ``tables_file`` e.g. ``dev_tables.json``.
    """
    path = Path(data_file)
    return build_examples(
        read_json_examples(path),
        db_dir,
        source="bird" if use_evidence else "bird-no-evidence",
        data_path=path,
        tables_file=tables_file,
        query_fields=("SQL", "query"),
        use_evidence=use_evidence,
        build_prompts=build_prompts,
        limit=limit,
        sample=sample,
    )


LOADERS = {
    "spider": load_spider,
    "spider-dk": load_spider_dk,
    "spider-syn": load_spider_syn,
    "spider-realistic": load_spider_realistic,
    "bird": load_bird,
    "bird-no-evidence": lambda data_file, db_dir, tables_file=None, **kw: load_bird(
        data_file, db_dir, tables_file, use_evidence=False, **kw
    ),
}


def load_dataset_by_name(name: str, data_file, db_dir, tables_file=None, **kwargs):
    """Load a data set by format name: one of :data:`LOADERS`."""
    try:
        loader = LOADERS[name]
    except KeyError:
        raise ValueError(f"unknown data format {name!r}; expected one of {sorted(LOADERS)}") from None
    return loader(data_file, db_dir, tables_file, **kwargs)
