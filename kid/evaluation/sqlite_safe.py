"""Read-only, time-limited execution of untrusted SQL on SQLite databases.

Model-written SQL is untrusted input. Every query runs on a connection that

* is opened with ``mode=ro`` (the SQLite library refuses to write the file),
* has an authorizer that allows only reads (``SELECT``, column reads, functions,
  recursive CTEs) and denies everything else: writes, ``ATTACH`` (which is also how
  ``VACUUM INTO`` starts), ``PRAGMA``, schema changes, transactions,
* cannot load extensions,
* has small length limits, so a single value cannot eat the machine's memory,
* has a progress handler that aborts the running statement once its deadline has
  passed, so a pathological query (an endless recursive CTE, a huge cross join) really
  stops, and
* fetches at most ``max_rows`` rows.

The worker pool in :mod:`kid.evaluation.pool` adds a second line of defence: a worker
process that crashes or overruns its hard limit is killed and replaced.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_ROWS = 200_000

# SQLite VM instructions between two deadline checks: small enough that the check runs
# many times a second, large enough that its cost is negligible.
_PROGRESS_INTERVAL = 20_000

# Actions a pure read needs. Anything else (INSERT, UPDATE, DELETE, CREATE, DROP, ATTACH,
# DETACH, PRAGMA, TRANSACTION, ALTER, ANALYZE, REINDEX, SAVEPOINT, ...) is denied.
_READ_ACTIONS = frozenset(
    {
        sqlite3.SQLITE_SELECT,
        sqlite3.SQLITE_READ,
        sqlite3.SQLITE_FUNCTION,
        getattr(sqlite3, "SQLITE_RECURSIVE", 33),
    }
)
# Functions that must never run on untrusted input even if the build provides them.
_DENIED_FUNCTIONS = frozenset({"load_extension", "fts3_tokenizer", "readfile", "writefile", "edit"})
# Pragmas that only read schema information; allowed on trusted (schema-reading)
# connections only, never for model-written SQL.
SCHEMA_PRAGMAS = frozenset({"table_info", "table_xinfo", "foreign_key_list", "index_list", "index_info"})

_MAX_VALUE_BYTES = 10_000_000


class QueryTimeout(Exception):
    """A query ran past its time limit and was stopped."""


class QueryError(Exception):
    """A query failed: bad SQL, a denied action, a timeout, or too many rows."""


def decode_text(raw: bytes) -> str:
    """Decode SQLite TEXT as UTF-8, dropping invalid bytes (as the official evaluator does)."""
    return raw.decode("utf-8", errors="ignore")


def _make_authorizer(allowed_pragmas: frozenset[str]):
    def authorizer(action, arg1, arg2, db_name, trigger):
        if action in _READ_ACTIONS:
            if action == sqlite3.SQLITE_FUNCTION and arg2 and arg2.lower() in _DENIED_FUNCTIONS:
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and arg1 and arg1.lower() in allowed_pragmas:
            return sqlite3.SQLITE_OK
        return sqlite3.SQLITE_DENY

    return authorizer


class _Deadline:
    """Progress-handler state: aborts the statement once ``time.monotonic()`` passes ``at``."""

    __slots__ = ("at", "fired")

    def __init__(self) -> None:
        self.at = float("inf")
        self.fired = False

    def __call__(self) -> int:
        if time.monotonic() > self.at:
            self.fired = True
            return 1  # non-zero aborts the running statement with SQLITE_INTERRUPT
        return 0


def open_readonly(db_path: str | os.PathLike, *, allowed_pragmas: frozenset[str] = frozenset()) -> "ReadOnlyConnection":
    """Open ``db_path`` read-only with the read-only authorizer and a deadline handler.

    ``allowed_pragmas`` is for trusted code that reads schema information
    (see :data:`SCHEMA_PRAGMAS`); leave it empty for untrusted SQL.
    Raises ``FileNotFoundError`` if the file does not exist (SQLite would otherwise
    report a vague "unable to open database file").
    """
    path = Path(db_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"database file not found: {path}")
    # Percent-encode characters that are special in a URI path.
    uri_path = str(path).replace("%", "%25").replace("?", "%3f").replace("#", "%23")
    conn = sqlite3.connect(f"file:{uri_path}?mode=ro", uri=True, check_same_thread=False, factory=ReadOnlyConnection)
    conn.text_factory = decode_text
    if hasattr(conn, "enable_load_extension"):
        conn.enable_load_extension(False)
    if hasattr(conn, "setlimit"):  # Python >= 3.11
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, _MAX_VALUE_BYTES)
        conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 1_000_000)
        conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    conn.set_authorizer(_make_authorizer(frozenset(p.lower() for p in allowed_pragmas)))
    conn.deadline = _Deadline()
    conn.set_progress_handler(conn.deadline, _PROGRESS_INTERVAL)
    return conn


class ReadOnlyConnection(sqlite3.Connection):
    """A ``sqlite3.Connection`` that carries its deadline handler (see :func:`open_readonly`)."""

    deadline: "_Deadline"


@dataclass
class QueryResult:
    """Outcome of one query: its rows, or the error text."""

    rows: list[tuple] = field(default_factory=list)
    error: str | None = None
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def run_query(
    conn: sqlite3.Connection,
    sql: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> QueryResult:
    """Run one statement of untrusted SQL on a connection from :func:`open_readonly`.

    Never raises for a bad query: failures come back in ``QueryResult.error``.
    More than ``max_rows`` result rows is an error (the rows could not be compared
    faithfully).
    """
    deadline = getattr(conn, "deadline", None)
    if not isinstance(deadline, _Deadline):
        raise TypeError("run_query needs a connection opened with kid.evaluation.sqlite_safe.open_readonly")
    start = time.monotonic()
    deadline.at = start + timeout_s
    deadline.fired = False
    cursor = None
    try:
        cursor = conn.execute(sql)
        rows: list[tuple] = []
        while True:
            chunk = cursor.fetchmany(min(10_000, max_rows + 1 - len(rows)))
            if not chunk:
                break
            rows.extend(chunk)
            if len(rows) > max_rows:
                return QueryResult(error=f"result has more than {max_rows} rows", seconds=time.monotonic() - start)
        return QueryResult(rows=rows, seconds=time.monotonic() - start)
    except Exception as exc:  # any failure of untrusted SQL is a scored failure, not a crash
        elapsed = time.monotonic() - start
        if deadline.fired:
            return QueryResult(error=f"timeout after {timeout_s:g} s", timed_out=True, seconds=elapsed)
        return QueryResult(error=f"{type(exc).__name__}: {exc}", seconds=elapsed)
    finally:
        deadline.at = float("inf")
        if cursor is not None:
            try:
                cursor.close()
            except Exception:
                pass
        if conn.in_transaction:  # a read can leave an implicit transaction open; end it
            try:
                conn.rollback()
            except Exception:
                pass


def explain_ok(conn: sqlite3.Connection, sql: str, *, timeout_s: float = 5.0) -> bool:
    """Whether ``EXPLAIN QUERY PLAN <sql>`` succeeds, i.e. the SQL compiles on this database."""
    sql = sql.strip().rstrip(";").strip()
    if not sql:
        return False
    return run_query(conn, "EXPLAIN QUERY PLAN " + sql, timeout_s=timeout_s, max_rows=10_000).ok
