"""Matched contents: database values mentioned in a question, found by fuzzy matching.

CodeS retrieves values with a BM25 index and then matches by longest common substring;
this is a pure-Python equivalent (no Java, no extra dependency):

1. :class:`ValueIndex` reads the distinct text values of every column once per database
   (at most ``max_values_per_column`` per column, values up to 64 characters, numbers
   skipped) and indexes each value under its words and their 4-character prefixes (so
   "singers" finds "singer").
2. :func:`match_contents` takes the values that share a word or prefix with the question,
   and scores each against the question's n-grams around the shared word with
   ``difflib.SequenceMatcher``; an exact phrase match scores 1. Values at or above
   ``threshold`` (0.85) are kept, best first, at most ``max_per_column`` per column and
   ``max_total`` overall.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from difflib import SequenceMatcher
from functools import lru_cache
from pathlib import Path

from ..evaluation.sqlite_safe import open_readonly, run_query
from .schema import quote_identifier

_WORD = re.compile(r"[0-9a-z]+(?:['.][0-9a-z]+)*")
_NUMBER = re.compile(r"^[\s\d.,:/+-]*$")
_PREFIX = 4
# Words too common to retrieve values by (they still count inside a matched phrase).
STOPWORDS = frozenset(
    """a an the of in on at to for from by with and or not no is are was were be been being do does did
    has have had what which who whom whose when where why how many much list show give find return tell
    me all each every any some that this these those than then there their its it as into per
    number count name names total average mean maximum minimum max min most least more less""".split()
)


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _keys(word: str) -> set[str]:
    return {word, word[:_PREFIX]} if len(word) > _PREFIX else {word}


class ValueIndex:
    """Distinct text values of one database, indexed by word and word prefix."""

    def __init__(self, db_path: str | os.PathLike, *, max_values_per_column: int = 5000, timeout_s: float = 10.0):
        self.values: list[tuple[str, str, str]] = []  # (table, column, value)
        self._words: list[list[str]] = []
        self._index: dict[str, list[int]] = defaultdict(list)
        conn = open_readonly(db_path, allowed_pragmas=frozenset({"table_info"}))
        try:
            tables = run_query(conn, "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
            for (table,) in tables.rows:
                info = run_query(conn, f"PRAGMA table_info({quote_identifier(table)})")
                for row in info.rows:
                    column = row[1]
                    col = quote_identifier(column)
                    result = run_query(
                        conn,
                        f"SELECT DISTINCT {col} FROM {quote_identifier(table)} WHERE typeof({col}) = 'text' "
                        f"LIMIT {int(max_values_per_column)}",
                        timeout_s=timeout_s,
                        max_rows=max_values_per_column,
                    )
                    for (value,) in result.rows:
                        self._add(table, column, value)
        finally:
            conn.close()

    def _add(self, table: str, column: str, value: str) -> None:
        value = " ".join(value.split())
        if not value or len(value) > 64 or _NUMBER.match(value):
            return
        words = _words(value)
        if not words:
            return
        vid = len(self.values)
        self.values.append((table, column, value))
        self._words.append(words)
        for key in {k for w in words for k in _keys(w)}:
            self._index[key].append(vid)

    def candidates(self, question_words: list[str]) -> dict[int, set[int]]:
        """Value ids sharing a key with the question, with the question positions that matched."""
        hits: dict[int, set[int]] = defaultdict(set)
        for pos, word in enumerate(question_words):
            if word in STOPWORDS or len(word) < 2:
                continue
            for key in _keys(word):
                for vid in self._index.get(key, ())[:5000]:
                    hits[vid].add(pos)
        return hits


@lru_cache(maxsize=64)
def _value_index_cached(path: str, _mtime: int, max_values_per_column: int) -> ValueIndex:
    return ValueIndex(path, max_values_per_column=max_values_per_column)


def value_index(db_path: str | os.PathLike, *, max_values_per_column: int = 5000) -> ValueIndex:
    """The (cached) :class:`ValueIndex` of a database file."""
    path = Path(db_path).resolve()
    return _value_index_cached(str(path), path.stat().st_mtime_ns, max_values_per_column)


def match_contents(
    question: str,
    db_path: str | os.PathLike,
    *,
    threshold: float = 0.85,
    max_per_column: int = 2,
    max_total: int = 10,
    max_values_per_column: int = 5000,
) -> dict[str, list[str]]:
    """Values of the database that the question mentions: ``{"table.column": [values]}``.

    Keys keep the database's spelling; the order is best match first.
    """
    index = value_index(db_path, max_values_per_column=max_values_per_column)
    q_words = _words(question)
    if not q_words:
        return {}
    q_text = " " + " ".join(q_words) + " "
    scored: list[tuple[float, int]] = []
    for vid, positions in index.candidates(q_words).items():
        v_words = index._words[vid]
        v_text = " ".join(v_words)
        if f" {v_text} " in q_text:
            scored.append((1.0, vid))
            continue
        k = len(v_words)
        best = 0.0
        matcher = SequenceMatcher(autojunk=False)
        matcher.set_seq2(v_text)
        seen: set[tuple[int, int]] = set()
        for pos in positions:
            for n in range(max(1, k - 1), k + 2):
                for start in range(max(0, pos - n + 1), min(pos, len(q_words) - n) + 1):
                    if (start, n) in seen:
                        continue
                    seen.add((start, n))
                    matcher.set_seq1(" ".join(q_words[start : start + n]))
                    if matcher.real_quick_ratio() < threshold or matcher.quick_ratio() < threshold:
                        continue
                    best = max(best, matcher.ratio())
        if best >= threshold:
            scored.append((best, vid))
    scored.sort(key=lambda item: (-item[0], len(index.values[item[1]][2]), item[1]))
    out: dict[str, list[str]] = {}
    total = 0
    for _score, vid in scored:
        table, column, value = index.values[vid]
        key = f"{table}.{column}"
        bucket = out.setdefault(key, [])
        if len(bucket) >= max_per_column or value in bucket:
            continue
        bucket.append(value)
        total += 1
        if total >= max_total:
            break
    return {k: v for k, v in out.items() if v}
