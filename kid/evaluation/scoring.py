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

from .compare import bird_results_equal, has_order_by, remove_distinct, repair_spacing, spider_results_equal
from .pool import WorkerFailure, run_tasks
from .sqlite_safe import DEFAULT_MAX_ROWS, DEFAULT_TIMEOUT_S, open_readonly, run_query

BIRD_SEPARATOR = "\t----- bird -----\t"


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
        out["error"] = "database not found"
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
            "examples": examples,
        }

    def write_json(self, path: str | os.PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    def summary_text(self) -> str:
        """Human-readable totals and breakdowns."""
        t = self.totals
        lines = [f"{self.metric} execution accuracy: {t['accuracy']:.4f} ({t['correct']}/{t['count']})"]
        if self.with_test_suite:
            lines.append(
                f"test-suite accuracy: {t['test_suite_accuracy']:.4f} ({t['test_suite_correct']}/{t['count']})"
            )
        lines.append(f"errors: {t['errors']} (timeouts: {t['timeouts']})")
        for key, groups in self.breakdowns.items():
            for name, s in groups.items():
                extra = f"  TS {s['test_suite_accuracy']:.4f}" if self.with_test_suite else ""
                lines.append(f"  {key} {name:<12} {s['accuracy']:.4f} ({s['correct']}/{s['count']}){extra}")
        return "\n".join(lines)


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
    labels. ``timeout_s`` limits each query; ``max_rows`` caps the rows fetched.
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
def read_gold_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read a gold file: one ``SQL<TAB>db_id`` per line (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"gold file not found: {path}")
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        sql, sep, db_id = line.rstrip("\r").rpartition("\t")
        if not sep or not db_id.strip() or not sql.strip():
            raise ValueError(f"{path}:{lineno}: expected 'SQL<TAB>db_id', got {line[:80]!r}")
        out.append((sql.strip(), db_id.strip()))
    return out


def read_prediction_file(path: str | os.PathLike, expected: int | None = None) -> list[str]:
    """Read predictions: one query per line (text after a TAB is ignored), or BIRD's json.

    BIRD's format is a json object ``{"0": "SQL\\t----- bird -----\\tdb_id", ...}``.
    An empty line is an empty prediction (it scores 0). With ``expected``, a count
    mismatch raises ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prediction file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if isinstance(data, dict):
            items = [data[k] for k in sorted(data, key=lambda k: int(k))]
        elif isinstance(data, list):
            items = data
        else:
            raise ValueError(f"{path}: expected a json object or list of predictions")
        preds = [str(p).split(BIRD_SEPARATOR)[0].strip() for p in items]
    else:
        lines = [line.rstrip("\r") for line in text.split("\n")]
        while lines and not lines[-1].strip():
            lines.pop()
        preds = [line.split("\t")[0].strip() for line in lines]
        if expected is not None and len(preds) != expected:
            non_blank = [p for p in preds if p]
            if len(non_blank) == expected:  # files with blank separator lines
                preds = non_blank
    if expected is not None and len(preds) != expected:
        raise ValueError(f"{path} has {len(preds)} predictions but the gold file has {expected} examples")
    return preds


def write_prediction_file(path: str | os.PathLike, predictions: Sequence[str]) -> None:
    """Write predictions in the standard format: one query per line (newlines become spaces)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for sql in predictions:
            f.write(" ".join((sql or "").split()) + "\n")
