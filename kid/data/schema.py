"""Database schemas read from SQLite files, for CodeS-style prompts.

:func:`read_schema` returns a :class:`DatabaseSchema`: the tables in file order, each
column with its declared type, primary-key flag, comment (from ``tables.json``, where the
natural-language name differs from the column name) and sample values, plus the foreign
keys declared in the file and in ``tables.json``. Results are cached per database file,
so many examples on one database read it once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..evaluation.sqlite_safe import SCHEMA_PRAGMAS, open_readonly, run_query


@dataclass
class Column:
    """One column: name as in the database, declared type, and prompt annotations."""

    name: str
    type: str
    primary_key: bool = False
    comment: str = ""
    values: list[str] = field(default_factory=list)


@dataclass
class Table:
    """One table and its columns, in database order."""

    name: str
    columns: list[Column]
    comment: str = ""


@dataclass
class DatabaseSchema:
    """Tables and foreign keys of one database (``(table, column, ref_table, ref_column)``)."""

    db_id: str
    tables: list[Table]
    foreign_keys: list[tuple[str, str, str, str]]
    path: str = ""

    def table(self, name: str) -> Table | None:
        lowered = name.lower()
        return next((t for t in self.tables if t.name.lower() == lowered), None)


def quote_identifier(name: str) -> str:
    """SQL double-quoted identifier (for queries this module runs itself)."""
    return '"' + name.replace('"', '""') + '"'


def _natural(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


def load_tables_json(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Read a Spider/BIRD ``tables.json``: a mapping ``db_id -> entry``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tables file not found: {path}")
    entries = json.loads(path.read_text(encoding="utf-8"))
    return {e["db_id"]: e for e in entries}


def _comments_from_tables_json(entry: dict[str, Any] | None):
    """Column comments ``{(table_lower, column_lower): comment}``, table comments, foreign keys."""
    if not entry:
        return {}, {}, []
    tables_orig = entry.get("table_names_original") or entry.get("table_names") or []
    tables_nat = entry.get("table_names") or tables_orig
    cols_orig = entry.get("column_names_original") or entry.get("column_names") or []
    cols_nat = entry.get("column_names") or cols_orig
    column_comments: dict[tuple[str, str], str] = {}
    for (t_idx, orig), (_, natural) in zip(cols_orig, cols_nat):
        if t_idx < 0 or t_idx >= len(tables_orig):
            continue
        if natural and _natural(natural) != _natural(orig):
            column_comments[(tables_orig[t_idx].lower(), orig.lower())] = natural.strip()
    table_comments = {
        orig.lower(): nat.strip()
        for orig, nat in zip(tables_orig, tables_nat)
        if nat and _natural(nat) != _natural(orig)
    }
    fks = []
    for a, b in entry.get("foreign_keys") or []:
        try:
            (ta, ca), (tb, cb) = cols_orig[a], cols_orig[b]
            fks.append((tables_orig[ta], ca, tables_orig[tb], cb))
        except (IndexError, TypeError):
            continue
    return column_comments, table_comments, fks


def _sample_values(conn, table: str, column: str, count: int, max_chars: int) -> list[str]:
    if count <= 0:
        return []
    col, tab = quote_identifier(column), quote_identifier(table)
    result = run_query(
        conn,
        f"SELECT DISTINCT {col} FROM {tab} WHERE {col} IS NOT NULL AND typeof({col}) != 'blob' "
        f"AND trim({col}) != '' LIMIT {int(count)}",
        timeout_s=10.0,
        max_rows=count,
    )
    return [" ".join(str(row[0]).split())[:max_chars] for row in result.rows] if result.ok else []


def read_schema(
    db_path: str | os.PathLike,
    tables_entry: dict[str, Any] | None = None,
    *,
    db_id: str | None = None,
    sample_values: int = 2,
    max_value_chars: int = 25,
) -> DatabaseSchema:
    """Read the schema of one SQLite database (cached; see the module docstring).

    ``tables_entry`` is this database's entry of ``tables.json`` (for comments and extra
    foreign keys). ``sample_values`` distinct non-empty values per column are kept,
    each cut to ``max_value_chars`` characters.
    """
    entry_key = json.dumps(tables_entry, sort_keys=True) if tables_entry else ""
    path = Path(db_path).resolve()
    stat = path.stat()
    return _read_schema_cached(
        str(path), stat.st_mtime_ns, stat.st_size, entry_key, db_id or path.stem, sample_values, max_value_chars
    )


@lru_cache(maxsize=256)
def _read_schema_cached(
    path: str, _mtime: int, _size: int, entry_key: str, db_id: str, sample_values: int, max_value_chars: int
) -> DatabaseSchema:
    entry = json.loads(entry_key) if entry_key else None
    column_comments, table_comments, json_fks = _comments_from_tables_json(entry)
    conn = open_readonly(path, allowed_pragmas=SCHEMA_PRAGMAS)
    try:
        names = run_query(
            conn, "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY rowid"
        )
        if not names.ok:
            raise RuntimeError(f"cannot read the tables of {path}: {names.error}")
        tables: list[Table] = []
        fks: list[tuple[str, str, str, str]] = []
        for (table_name,) in names.rows:
            info = run_query(conn, f"PRAGMA table_info({quote_identifier(table_name)})")
            columns = [
                Column(
                    name=name,
                    type=(col_type or "").strip().lower(),
                    primary_key=bool(pk),
                    comment=column_comments.get((table_name.lower(), name.lower()), ""),
                    values=_sample_values(conn, table_name, name, sample_values, max_value_chars),
                )
                for _cid, name, col_type, _notnull, _default, pk in info.rows
            ]
            tables.append(Table(table_name, columns, table_comments.get(table_name.lower(), "")))
            fk_rows = run_query(conn, f"PRAGMA foreign_key_list({quote_identifier(table_name)})")
            for row in fk_rows.rows:
                fks.append((table_name, row[3], row[2], row[4]))
    finally:
        conn.close()
    schema = DatabaseSchema(db_id=db_id, tables=tables, foreign_keys=[], path=path)
    schema.foreign_keys = _resolve_foreign_keys(schema, fks + json_fks)
    return schema


def _resolve_foreign_keys(schema: DatabaseSchema, raw: list[tuple[str, str | None, str, str | None]]):
    """Map foreign keys onto actual table/column spellings; drop ones that do not resolve."""
    out: list[tuple[str, str, str, str]] = []
    seen = set()
    for src_t, src_c, dst_t, dst_c in raw:
        src, dst = schema.table(src_t or ""), schema.table(dst_t or "")
        if src is None or dst is None or not src_c:
            continue
        if not dst_c:  # "REFERENCES t" without a column means t's primary key
            pks = [c.name for c in dst.columns if c.primary_key]
            if len(pks) != 1:
                continue
            dst_c = pks[0]
        sc = next((c.name for c in src.columns if c.name.lower() == src_c.lower()), None)
        dc = next((c.name for c in dst.columns if c.name.lower() == dst_c.lower()), None)
        if sc is None or dc is None:
            continue
        key = (src.name.lower(), sc.lower(), dst.name.lower(), dc.lower())
        if key not in seen:
            seen.add(key)
            out.append((src.name, sc, dst.name, dc))
    return out
