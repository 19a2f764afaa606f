"""Execution accuracy (EX) and test-suite accuracy (TS) of predicted SQL.

:func:`evaluate_predictions` runs every (gold, prediction) pair in worker processes
(:mod:`kid.evaluation.pool`) on read-only, time-limited connections
(:mod:`kid.evaluation.sqlite_safe`) and compares results with the official Spider or BIRD
semantics (:mod:`kid.evaluation.compare`). It returns an :class:`EvalReport` with
per-example results in input order, totals, and breakdowns (Spider hardness, BIRD
difficulty).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..files import atomic_open, atomic_write_text
from .compare import bird_results_equal, has_order_by, remove_distinct, repair_spacing, spider_results_equal
from .pool import WorkerFailure, run_tasks
from .sqlite_safe import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT_S, open_readonly, run_query

BIRD_SEPARATOR = "\t----- bird -----\t"
DATABASE_NOT_FOUND = "database not found"


def database_path(db_dir: str | os.PathLike, db_id: str) -> Path:
    """Where a database lives in the standard layout: ``DIR/<db_id>/<db_id>.sqlite``."""
    return Path(db_dir) / db_id / f"{db_id}.sqlite"


def test_suite_paths(test_suite_dir: str | os.PathLike, db_id: str) -> list[Path]:
    """All ``.sqlite`` files of one database in a test-suite directory (``DIR/<db_id>/*.sqlite``)."""
    folder = Path(test_suite_dir) / db_id
    return sorted(p for p in folder.glob("*.sqlite") if p.is_file()) if folder.is_dir() else []


# ---------------------------------------------------------------- worker side
_CONNECTIONS: "OrderedDict[str, Any]" = OrderedDict()
_MAX_OPEN_CONNECTIONS = 16


def _connection(path: str):
    """Per-process cache of read-only connections (many examples share a database)."""
    conn = _CONNECTIONS.get(path)
    if conn is not None:
        _CONNECTIONS.move_to_end(path)
        return conn
    conn = open_readonly(path)
    _CONNECTIONS[path] = conn
    if len(_CONNECTIONS) > _MAX_OPEN_CONNECTIONS:
        _, old = _CONNECTIONS.popitem(last=False)
        old.close()
    return conn


def _match_on(path: str, gold: str, pred: str, task: dict) -> tuple[bool, str | None, bool]:
    """Run gold and prediction on one database: (correct, error text, prediction timed out)."""
    conn = _connection(path)
    gold_result = run_query(conn, gold, timeout_s=task["timeout_s"], max_rows=task["max_rows"])
    if not gold_result.ok:
        return False, f"gold query failed: {gold_result.error}", False
    pred_result = run_query(conn, pred, timeout_s=task["timeout_s"], max_rows=task["max_rows"])
    if not pred_result.ok:
        return False, pred_result.error, pred_result.timed_out
    if task["bird"]:
        return bird_results_equal(gold_result.rows, pred_result.rows), None, False
    return spider_results_equal(gold_result.rows, pred_result.rows, task["order_matters"]), None, False


def score_example(task: dict) -> dict:
    """Score one example (runs in a worker). ``task`` is built by :func:`evaluate_predictions`."""
    gold, pred = task["gold"], task["pred"]
    out: dict[str, Any] = {"correct": False, "error": None, "timed_out": False}
    if task.get("want_hardness"):
        from .hardness import spider_hardness

        out["hardness"] = spider_hardness(gold)
    if not task["bird"]:
        gold, pred = repair_spacing(gold), repair_spacing(pred)
        task = dict(task, order_matters=has_order_by(gold))
        if not task["keep_distinct"]:
            gold, pred = remove_distinct(gold), remove_distinct(pred)
    if not pred.strip():
        out["error"] = "empty prediction"
        if task["test_suite_paths"]:
            out["test_suite_correct"] = False
        return out
    if task["db_path"] is None:
        out["error"] = DATABASE_NOT_FOUND
    else:
        out["correct"], out["error"], out["timed_out"] = _match_on(task["db_path"], gold, pred, task)
    if task["test_suite_paths"]:
        ts_ok = out["correct"]
        for path in task["test_suite_paths"]:
            if not ts_ok:
                break
            ts_ok, error, _ = _match_on(path, gold, pred, task)
            if error and not out["error"]:
                out["error"] = f"test-suite database {Path(path).name}: {error}"
        out["test_suite_correct"] = bool(ts_ok)
    return out


# ---------------------------------------------------------------- parent side
@dataclass
class ExampleResult:
    """Score of one example."""

    index: int
    db_id: str
    correct: bool
    error: str | None = None
    timed_out: bool = False
    hardness: str | None = None
    difficulty: str | None = None
    test_suite_correct: bool | None = None
    gold: str = ""
    pred: str = ""


def _summary(results: Sequence[ExampleResult], with_ts: bool) -> dict[str, Any]:
    n = len(results)
    correct = sum(r.correct for r in results)
    out: dict[str, Any] = {"count": n, "correct": correct, "accuracy": correct / n if n else 0.0}
    if with_ts:
        ts = sum(bool(r.test_suite_correct) for r in results)
        out.update(test_suite_correct=ts, test_suite_accuracy=ts / n if n else 0.0)
    return out


@dataclass
class EvalReport:
    """Per-example results (input order), totals and breakdowns of one evaluation."""

    metric: str
    examples: list[ExampleResult]
    settings: dict[str, Any] = field(default_factory=dict)
    # examples left out before scoring because their database is missing (kid eval's loader skips them), per db_id
    skipped_without_database: dict[str, int] = field(default_factory=dict)

    @property
    def missing_databases(self) -> dict[str, int]:
        """Scored examples whose database file was not found (they score 0), per db_id."""
        counts: dict[str, int] = {}
        for r in self.examples:
            if r.error == DATABASE_NOT_FOUND:
                counts[r.db_id] = counts.get(r.db_id, 0) + 1
        return dict(sorted(counts.items()))

    @property
    def with_test_suite(self) -> bool:
        return any(r.test_suite_correct is not None for r in self.examples)

    @property
    def accuracy(self) -> float:
        return self.totals["accuracy"]

    @property
    def totals(self) -> dict[str, Any]:
        out = _summary(self.examples, self.with_test_suite)
        out["errors"] = sum(r.error is not None for r in self.examples)
        out["timeouts"] = sum(r.timed_out for r in self.examples)
        out["missing_database"] = sum(self.missing_databases.values())
        out["skipped_without_database"] = sum(self.skipped_without_database.values())
        return out

    @property
    def breakdowns(self) -> dict[str, dict[str, dict[str, Any]]]:
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for key, order in (
            ("hardness", ("easy", "medium", "hard", "extra")),
            ("difficulty", ("simple", "moderate", "challenging")),
        ):
            groups: dict[str, list[ExampleResult]] = {}
            for r in self.examples:
                level = getattr(r, key)
                if level:
                    groups.setdefault(level, []).append(r)
            if groups:
                names = [g for g in order if g in groups] + sorted(g for g in groups if g not in order)
                out[key] = {g: _summary(groups[g], self.with_test_suite) for g in names}
        return out

    def to_dict(self) -> dict[str, Any]:
        examples = []
        for r in self.examples:
            d = asdict(r)
            for key in ("hardness", "difficulty", "test_suite_correct"):
                if d[key] is None:
                    del d[key]
            examples.append(d)
        return {
            "metric": self.metric,
            "settings": self.settings,
            "totals": self.totals,
            "breakdowns": self.breakdowns,
            "missing_databases": self.missing_databases,
            "skipped_without_database": dict(self.skipped_without_database),
            "examples": examples,
        }

    def write_json(self, path: str | os.PathLike) -> None:
        """The report as JSON, replacing ``path`` atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")

    def summary_text(self) -> str:
        """Human-readable totals and breakdowns."""
        t = self.totals
        lines = [f"{self.metric} execution accuracy: {t['accuracy']:.4f} ({t['correct']}/{t['count']})"]
        if self.with_test_suite:
            lines.append(
                f"test-suite accuracy: {t['test_suite_accuracy']:.4f} ({t['test_suite_correct']}/{t['count']})"
            )
        lines.append(f"errors: {t['errors']} (timeouts: {t['timeouts']})")
        if self.missing_databases:
            lines.append(f"warning: {t['missing_database']} of {t['count']} examples have no database in "
                         f"{self.settings.get('db_dir')} and score 0: {_counts(self.missing_databases)}")
        if self.skipped_without_database:
            total = t["count"] + t["skipped_without_database"]
            lines.append(f"warning: {t['skipped_without_database']} of {total} examples were left out, their "
                         f"database missing: {_counts(self.skipped_without_database)}")
        for key, groups in self.breakdowns.items():
            for name, s in groups.items():
                extra = f"  TS {s['test_suite_accuracy']:.4f}" if self.with_test_suite else ""
                lines.append(f"  {key} {name:<12} {s['accuracy']:.4f} ({s['correct']}/{s['count']}){extra}")
        return "\n".join(lines)


def _counts(by_db: dict[str, int], shown: int = 6) -> str:
    items = sorted(by_db.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{db} ({n})" for db, n in items[:shown])
    return text + (f", and {len(items) - shown} more" if len(items) > shown else "")


def missing_database_counts(db_ids: Sequence[str], db_dir: str | os.PathLike) -> dict[str, int]:
    """How many of ``db_ids`` have no ``db_dir/<db_id>/<db_id>.sqlite``, per db_id."""
    counts: dict[str, int] = {}
    known: dict[str, bool] = {}
    for db_id in db_ids:
        if db_id not in known:
            known[db_id] = database_path(db_dir, db_id).is_file()
        if not known[db_id]:
            counts[db_id] = counts.get(db_id, 0) + 1
    return dict(sorted(counts.items()))


def evaluate_predictions(
    predictions: Sequence[str],
    gold_sql: Sequence[str],
    db_ids: Sequence[str],
    db_dir: str | os.PathLike,
    *,
    bird: bool = False,
    keep_distinct: bool = False,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_rows: int = DEFAULT_MAX_ROWS,
    test_suite_dir: str | os.PathLike | None = None,
    hardness: Sequence[str | None] | None = None,
    difficulties: Sequence[str | None] | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> EvalReport:
    """Execution accuracy of ``predictions`` against ``gold_sql`` (same order and length).

    ``bird`` selects BIRD semantics (row-set equality) instead of Spider's (row multisets
    under a column permutation, order only with a gold ORDER BY, DISTINCT removed unless
    ``keep_distinct``). Databases are at ``db_dir/<db_id>/<db_id>.sqlite``; an example
    whose database is missing scores 0 with an error. ``test_suite_dir`` (the
    distilled test-suite databases, ``DIR/<db_id>/*.sqlite``) adds test-suite accuracy:
    correct on the main database and on every test-suite database. Spider hardness is
    computed from the gold SQL unless ``hardness`` gives it; ``difficulties`` are BIRD's
    labels. ``timeout_s`` limits each query; ``max_rows`` caps the rows fetched.  The report counts the
    examples without a database (:attr:`EvalReport.missing_databases`) and its summary warns about them.
    """
    n = len(predictions)
    if len(gold_sql) != n or len(db_ids) != n:
        raise ValueError(
            f"predictions ({n}), gold queries ({len(gold_sql)}) and db_ids ({len(db_ids)}) must have the same length"
        )
    for name, seq in (("hardness", hardness), ("difficulties", difficulties)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} predictions")
    if not Path(db_dir).is_dir():
        raise FileNotFoundError(f"database directory not found: {db_dir}")
    if test_suite_dir is not None and not Path(test_suite_dir).is_dir():
        raise FileNotFoundError(f"test-suite directory not found: {test_suite_dir}")

    tasks = []
    for i in range(n):
        path = database_path(db_dir, db_ids[i])
        tasks.append(
            {
                "gold": gold_sql[i],
                "pred": predictions[i] or "",
                "db_path": str(path) if path.is_file() else None,
                "test_suite_paths": [str(p) for p in test_suite_paths(test_suite_dir, db_ids[i])]
                if test_suite_dir
                else [],
                "bird": bird,
                "keep_distinct": keep_distinct,
                "timeout_s": timeout_s,
                "max_rows": max_rows,
                "want_hardness": not bird and (hardness is None or hardness[i] is None),
            }
        )

    def hard_limit(task: dict) -> float:
        # Backstop for the per-query limit: every query of the task at its limit, plus slack.
        return 2 * (1 + len(task["test_suite_paths"])) * timeout_s + 30.0

    bar = None
    if progress and n:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="scoring", unit="ex")
    try:
        outputs = run_tasks(
            score_example,
            tasks,
            num_workers=num_workers,
            hard_limit_s=hard_limit,
            on_done=(lambda _i, _r: bar.update(1)) if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()

    results = []
    for i, out in enumerate(outputs):
        if isinstance(out, WorkerFailure):
            out = {"correct": False, "error": out.message, "timed_out": "hard limit" in out.message}
            if tasks[i]["test_suite_paths"]:
                out["test_suite_correct"] = False
        results.append(
            ExampleResult(
                index=i,
                db_id=db_ids[i],
                correct=bool(out["correct"]),
                error=out.get("error"),
                timed_out=bool(out.get("timed_out")),
                hardness=None
                if bird
                else (hardness[i] if hardness is not None and hardness[i] else out.get("hardness")),
                difficulty=difficulties[i] if difficulties is not None else None,
                test_suite_correct=out.get("test_suite_correct"),
                gold=gold_sql[i],
                pred=predictions[i] or "",
            )
        )
    settings = {
        "timeout_s": timeout_s,
        "max_rows": max_rows,
        "keep_distinct": keep_distinct,
        "db_dir": str(db_dir),
        "test_suite_dir": str(test_suite_dir) if test_suite_dir else None,
    }
    return EvalReport(metric="bird" if bird else "spider", examples=results, settings=settings)


# ---------------------------------------------------------------- files
# One prediction (or gold query) per line.  A query that a plain line cannot hold exactly (empty, with a newline,
# tab or carriage return, leading or trailing whitespace, or starting with a double quote) is written as a JSON
# string literal; every other query is written as is, so ordinary files stay what the official evaluators read.
def _needs_quoting(sql: str) -> bool:
    return (not sql or sql != sql.strip() or sql.startswith('"')
            or any(c in sql for c in "\n\r\t\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"))


def format_query_line(sql: str) -> str:
    """``sql`` as one line of a prediction or gold file (see above)."""
    sql = sql or ""
    return json.dumps(sql, ensure_ascii=False) if _needs_quoting(sql) else sql


def _parse_query(line: str, where: str) -> tuple[str, str]:
    """(query, rest of the line after it) from one line: a JSON string literal, or the text up to the first TAB."""
    if line.startswith('"'):
        try:
            value, end = json.JSONDecoder().raw_decode(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: a line starting with '\"' must be a JSON string ({exc.msg})") from None
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a JSON string")
        rest = line[end:]
        if rest and not rest.startswith("\t"):
            raise ValueError(f"{where}: unexpected text after the quoted query: {rest[:40]!r}")
        return value, rest[1:]
    sql, _, rest = line.partition("\t")
    return sql.strip(), rest


def _lines(text: str) -> list[str]:
    """The lines of a file: split on "\\n" only (a query may not contain one unquoted), one final newline ends the
    last line rather than starting an empty one."""
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def read_gold_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read a gold file: one ``SQL<TAB>db_id`` per line (the SQL JSON-quoted where needed; blank lines
    ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gold file not found: {path}")
    out = []
    for lineno, line in enumerate(_lines(path.read_text(encoding="utf-8")), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if line.startswith('"'):
            sql, db_id = _parse_query(line, where)
        else:
            sql, sep, db_id = line.rpartition("\t")
            if not sep:
                sql = ""
        if not db_id.strip() or not sql.strip():
            raise ValueError(f"{where}: expected 'SQL<TAB>db_id', got {line[:80]!r}")
        out.append((sql.strip(), db_id.strip()))
    return out


def write_gold_file(path: str | os.PathLike, gold: Sequence[tuple[str, str]]) -> None:
    """Write ``(sql, db_id)`` pairs as a gold file (atomically); :func:`read_gold_file` reads them back exactly."""
    with atomic_open(path, "w") as f:
        for sql, db_id in gold:
            if not db_id or any(c in db_id for c in "\t\n\r"):
                raise ValueError(f"db_id {db_id!r} cannot be written to a gold file")
            f.write(format_query_line(sql) + "\t" + db_id + "\n")


def read_prediction_file(path: str | os.PathLike, expected: int | None = None) -> list[str]:
    """Read predictions: one query per line (JSON-quoted where needed, see above; text after a TAB is ignored), or
    BIRD's json.

    BIRD's format is a json object ``{"0": "SQL\\t----- bird -----\\tdb_id", ...}``.  An empty line is an empty
    prediction (it scores 0); nothing is dropped.  With ``expected``, a count mismatch raises ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid json ({exc.msg} at line {exc.lineno})") from None
        if isinstance(data, dict):
            try:
                items = [data[k] for k in sorted(data, key=lambda k: int(k))]
            except ValueError:
                raise ValueError(f"{path}: the keys of a BIRD prediction object must be example numbers") from None
        elif isinstance(data, list):
            items = data
        else:
            raise ValueError(f"{path}: expected a json object or list of predictions")
        preds = [str(p).split(BIRD_SEPARATOR)[0].strip() for p in items]
    else:
        lines = _lines(text)
        preds = [_parse_query(line, f"{path}:{i}")[0] for i, line in enumerate(lines, 1)]
    if expected is not None and len(preds) != expected:
        hint = ""
        blank_tail = 0
        for p in reversed(preds):
            if p:
                break
            blank_tail += 1
        if blank_tail and len(preds) - blank_tail <= expected < len(preds):
            hint = f" (its last {blank_tail} line(s) are blank: an empty prediction is an empty line or \"\")"
        raise ValueError(f"{path} has {len(preds)} predictions but the gold file has {expected} examples{hint}")
    return preds


def write_prediction_file(path: str | os.PathLike, predictions: Sequence[str]) -> None:
    """Write predictions, one per line (atomically): :func:`read_prediction_file` gives back exactly the same
    strings, empty ones included (see above for the quoting)."""
    with atomic_open(path, "w") as f:
        for sql in predictions:
            f.write(format_query_line(sql or "") + "\n")
