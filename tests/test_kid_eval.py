"""Execution-accuracy evaluation: official semantics, safety, worker pool (kid.evaluation)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from kid.evaluation import (
    bird_results_equal,
    evaluate_predictions,
    explain_ok,
    has_order_by,
    open_readonly,
    remove_distinct,
    run_query,
    spider_results_equal,
)
from kid.evaluation.hardness import hardness_from_spider_json, spider_hardness
from kid.evaluation.pool import WorkerFailure, run_tasks
from kid.evaluation.sqlite_safe import _make_authorizer
from tests.spider_data import DB_DIR, SPIDER_DIR, needs_spider


def _with_db(examples):
    return [x for x in examples if (DB_DIR / x["db_id"] / f"{x['db_id']}.sqlite").is_file()]


@pytest.fixture(scope="module")
def dev():
    return json.loads((SPIDER_DIR / "dev.json").read_text())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def db_copy(tmp_path):
    """concert_singer copied to tmp (tests that try to write never touch the shared file)."""
    src = DB_DIR / "concert_singer" / "concert_singer.sqlite"
    if not src.is_file():
        pytest.skip(f"Spider database not found at {src}")
    dst_dir = tmp_path / "db" / "concert_singer"
    dst_dir.mkdir(parents=True)
    dst = dst_dir / "concert_singer.sqlite"
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)  # writable at the OS level: only our connection settings protect it
    return dst


# ---------------------------------------------------------------- comparison semantics
def test_spider_equality_rules():
    gold = [(1, "a"), (2, "b"), (2, "b")]
    assert spider_results_equal(gold, [("a", 1), ("b", 2), ("b", 2)], order_matters=False)  # column permutation
    assert spider_results_equal(gold, [(2, "b"), (1, "a"), (2, "b")], order_matters=False)  # row order free
    assert not spider_results_equal(gold, [(2, "b"), (1, "a"), (2, "b")], order_matters=True)
    assert not spider_results_equal(gold, [(1, "a"), (2, "b")], order_matters=False)  # multiset, not set
    assert not spider_results_equal(gold, [(1, "a"), (1, "a"), (2, "b")], order_matters=False)
    assert not spider_results_equal(gold, [(1, "a", 0), (2, "b", 0), (2, "b", 0)], order_matters=False)
    assert spider_results_equal([], [], order_matters=True)
    assert not spider_results_equal([], [(1,)], order_matters=False)
    # Same column multisets, but no permutation works row-wise.
    assert not spider_results_equal([(1, 2), (2, 1)], [(1, 1), (2, 2)], order_matters=False)
    assert spider_results_equal([(1, 1), (2, 2)], [(1, 1), (2, 2)], order_matters=True)


def test_bird_equality_is_set_equality():
    gold = [(1, "a"), (2, "b")]
    assert bird_results_equal(gold, [(2, "b"), (1, "a"), (1, "a")])
    assert not bird_results_equal(gold, [("a", 1), ("b", 2)])  # column order counts
    assert not bird_results_equal(gold, [(1, "a")])


def test_distinct_and_order_by_detection():
    assert remove_distinct("SELECT DISTINCT a, count(DISTINCT b) FROM t WHERE c = 'distinct'") == (
        "SELECT  a, count( b) FROM t WHERE c = 'distinct'"
    )
    assert has_order_by("SELECT a FROM t ORDER  BY a")
    assert not has_order_by("SELECT a FROM t WHERE b = 'order by'")


@needs_spider
def test_hardness_matches_official_labels(dev):
    agree = sum(spider_hardness(x["query"]) == hardness_from_spider_json(x["sql"]) for x in dev)
    assert agree / len(dev) >= 0.98
    # The official level counts of Spider-dev.
    counts = {}
    for x in dev:
        level = hardness_from_spider_json(x["sql"])
        counts[level] = counts.get(level, 0) + 1
    assert counts == {"easy": 248, "medium": 446, "hard": 174, "extra": 166}


# ---------------------------------------------------------------- safety
WRITES = [
    "DROP TABLE singer",
    "DELETE FROM singer",
    "UPDATE singer SET Age = 0",
    "INSERT INTO singer (Singer_ID, Name) VALUES (99, 'x')",
    "REPLACE INTO singer (Singer_ID, Name) VALUES (1, 'x')",
    "CREATE TABLE evil (x)",
    "ALTER TABLE singer ADD COLUMN evil TEXT",
    "CREATE INDEX evil_idx ON singer (Name)",
    "PRAGMA writable_schema = ON",
    "PRAGMA user_version = 7",
    "PRAGMA journal_mode = DELETE",
    "VACUUM",
    "BEGIN IMMEDIATE",
]


@needs_spider
def test_writes_are_refused_and_file_is_unchanged(db_copy, tmp_path):
    before = _sha256(db_copy)
    attach_target = tmp_path / "attached.sqlite"
    vacuum_target = tmp_path / "vacuumed.sqlite"
    statements = WRITES + [
        f"ATTACH DATABASE '{attach_target}' AS evil",
        f"VACUUM INTO '{vacuum_target}'",
        "SELECT load_extension('libevil')",
    ]
    conn = open_readonly(db_copy)
    for sql in statements:
        result = run_query(conn, sql, timeout_s=5)
        assert not result.ok, sql
    # Multiple statements are refused too (the DROP never runs).
    assert not run_query(conn, "SELECT 1; DROP TABLE singer").ok
    assert run_query(conn, "SELECT count(*) FROM singer").rows == [(6,)]
    conn.close()
    assert _sha256(db_copy) == before
    assert not attach_target.exists() and not vacuum_target.exists()

    # The same statements as predictions through the evaluator: all score 0, file unchanged.
    report = evaluate_predictions(
        statements,
        ["SELECT count(*) FROM singer"] * len(statements),
        ["concert_singer"] * len(statements),
        db_copy.parent.parent,
        timeout_s=5,
        num_workers=1,
        progress=False,
    )
    assert [r.correct for r in report.examples] == [False] * len(statements)
    assert all(r.error for r in report.examples)
    assert _sha256(db_copy) == before
    assert not attach_target.exists() and not vacuum_target.exists()


@needs_spider
def test_authorizer_alone_blocks_writes(db_copy):
    """Even on a writable connection, the authorizer denies every write."""
    before = _sha256(db_copy)
    conn = sqlite3.connect(db_copy)
    conn.set_authorizer(_make_authorizer(frozenset()))
    for sql in WRITES[:8]:
        with pytest.raises(sqlite3.DatabaseError, match="not authorized|prohibited"):
            conn.execute(sql)
        conn.rollback()
    assert conn.execute("SELECT count(*) FROM singer").fetchall() == [(6,)]
    conn.close()
    assert _sha256(db_copy) == before


ENDLESS = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r"


@needs_spider
def test_endless_recursive_cte_stops_at_the_limit(db_copy):
    conn = open_readonly(db_copy)
    start = time.monotonic()
    result = run_query(conn, ENDLESS, timeout_s=1.0)
    assert time.monotonic() - start < 5
    assert result.timed_out and not result.ok
    # The connection is usable afterwards.
    assert run_query(conn, "SELECT count(*) FROM singer").rows == [(6,)]

    start = time.monotonic()
    report = evaluate_predictions(
        [ENDLESS, "SELECT count(*) FROM singer"],
        ["SELECT count(*) FROM singer"] * 2,
        ["concert_singer"] * 2,
        db_copy.parent.parent,
        timeout_s=1.0,
        num_workers=2,
        progress=False,
    )
    assert time.monotonic() - start < 20
    first, second = report.examples
    assert not first.correct and first.timed_out and "timeout" in first.error
    assert second.correct
    assert report.totals["timeouts"] == 1


@needs_spider
def test_row_cap(db_copy):
    conn = open_readonly(db_copy)
    assert not run_query(conn, "SELECT * FROM singer", max_rows=5).ok
    assert len(run_query(conn, "SELECT * FROM singer", max_rows=6).rows) == 6
    assert explain_ok(conn, "SELECT name FROM singer")
    assert not explain_ok(conn, "SELECT nope FROM singer")


def crash_on_negative(payload):
    """Task for the pool tests: dies hard on -1, hangs on -2, raises on -3."""
    if payload == -1:
        os._exit(3)
    if payload == -2:
        time.sleep(60)
    if payload == -3:
        raise RuntimeError("bad payload")
    return payload * 2


def test_pool_survives_crashing_and_stuck_workers():
    results = run_tasks(crash_on_negative, [1, -1, 2, -2, 3, -3, 4], num_workers=2, hard_limit_s=3)
    assert results[0] == 2 and results[2] == 4 and results[4] == 6 and results[6] == 8
    assert isinstance(results[1], WorkerFailure) and "crashed" in results[1].message
    assert isinstance(results[3], WorkerFailure) and "hard limit" in results[3].message
    assert isinstance(results[5], WorkerFailure) and "bad payload" in results[5].message


# ---------------------------------------------------------------- official semantics on Spider data
@needs_spider
def test_gold_against_gold_scores_100_percent_on_dev(dev):
    examples = _with_db(dev)
    assert len(examples) == 972
    queries = [x["query"] for x in examples]
    report = evaluate_predictions(
        queries,
        queries,
        [x["db_id"] for x in examples],
        DB_DIR,
        timeout_s=10,
        num_workers=2,
        progress=False,
        hardness=[hardness_from_spider_json(x["sql"]) for x in examples],
    )
    assert report.totals["correct"] == 972, [r for r in report.examples if not r.correct][:3]
    assert report.breakdowns["hardness"]["easy"]["count"] + report.breakdowns["hardness"]["extra"]["count"] > 0
    assert set(report.breakdowns["hardness"]) == {"easy", "medium", "hard", "extra"}


@needs_spider
def test_gold_against_gold_on_train():
    """Every training example with a database scores 1, except the few whose gold SQL is broken."""
    train = _with_db(json.loads((SPIDER_DIR / "train_spider.json").read_text()))
    assert len(train) == 6904
    queries = [x["query"] for x in train]
    report = evaluate_predictions(  # hardness given (unused here): saves parsing 6,904 queries
        queries,
        queries,
        [x["db_id"] for x in train],
        DB_DIR,
        timeout_s=10,
        num_workers=2,
        progress=False,
        hardness=["unlabelled"] * len(train),
    )
    wrong = [r for r in report.examples if not r.correct]
    assert all(r.error and r.error.startswith("gold query failed") for r in wrong), wrong[:3]
    assert len(wrong) <= 5  # the release has 3 gold queries that SQLite rejects


CASES = [
    # (db_id, gold, prediction, correct by default, correct with keep_distinct)
    # wrong column
    (
        "concert_singer",
        "SELECT name, country, age FROM singer ORDER BY age DESC",
        "SELECT name, country, song_name FROM singer ORDER BY age DESC",
        False,
        False,
    ),
    # wrong value
    (
        "concert_singer",
        "SELECT avg(age), min(age), max(age) FROM singer WHERE country = 'France'",
        "SELECT avg(age), min(age), max(age) FROM singer WHERE country = 'Netherlands'",
        False,
        False,
    ),
    # missing ORDER BY where it matters, and the wrong direction
    (
        "concert_singer",
        "SELECT name, country, age FROM singer ORDER BY age DESC",
        "SELECT name, country, age FROM singer",
        False,
        False,
    ),
    (
        "concert_singer",
        "SELECT name, country, age FROM singer ORDER BY age DESC",
        "SELECT name, country, age FROM singer ORDER BY age ASC",
        False,
        False,
    ),
    # extra row, and a duplicated row
    (
        "concert_singer",
        "SELECT name FROM singer WHERE age > 40",
        "SELECT name FROM singer WHERE age > 30",
        False,
        False,
    ),
    (
        "concert_singer",
        "SELECT name FROM singer",
        "SELECT name FROM singer UNION ALL SELECT name FROM singer WHERE age > 50",
        False,
        False,
    ),
    # wrong aggregate, wrong join target
    ("concert_singer", "SELECT count(*) FROM singer", "SELECT count(*) FROM stadium", False, False),
    (
        "pets_1",
        "SELECT count(*) FROM student WHERE age > 20",
        "SELECT count(*) FROM student WHERE age >= 20",
        False,
        False,
    ),
    # column permutation: correct
    (
        "concert_singer",
        "SELECT name, country, age FROM singer ORDER BY age DESC",
        "SELECT age, name, country FROM singer ORDER BY age DESC",
        True,
        True,
    ),
    # row order without a gold ORDER BY: free
    ("concert_singer", "SELECT name, age FROM singer", "SELECT age, name FROM singer ORDER BY name", True, True),
    # ORDER BY in the prediction only: fine
    (
        "concert_singer",
        "SELECT country FROM singer WHERE age > 20",
        "SELECT country FROM singer WHERE age > 20 ORDER BY age",
        True,
        True,
    ),
    # DISTINCT is stripped from both by default; kept on request
    (
        "concert_singer",
        "SELECT DISTINCT country FROM singer WHERE age > 20",
        "SELECT country FROM singer WHERE age > 20",
        True,
        False,
    ),
    ("concert_singer", "SELECT count(DISTINCT country) FROM singer", "SELECT count(country) FROM singer", True, False),
    # failing prediction
    ("concert_singer", "SELECT count(*) FROM singer", "SELECT count(*) FROM no_such_table", False, False),
    ("concert_singer", "SELECT count(*) FROM singer", "", False, False),
]


@needs_spider
def test_official_rules_on_spider_databases():
    db_ids = [c[0] for c in CASES]
    golds = [c[1] for c in CASES]
    preds = [c[2] for c in CASES]
    # Sanity: every gold runs and scores against itself, so a 0 below is the prediction's fault.
    assert evaluate_predictions(golds, golds, db_ids, DB_DIR, num_workers=0, progress=False).totals["correct"] == len(
        CASES
    )
    default = evaluate_predictions(preds, golds, db_ids, DB_DIR, num_workers=2, progress=False)
    keep = evaluate_predictions(preds, golds, db_ids, DB_DIR, keep_distinct=True, num_workers=0, progress=False)
    for case, r_default, r_keep in zip(CASES, default.examples, keep.examples):
        assert r_default.correct == case[3], case
        assert r_keep.correct == case[4], case
    assert default.examples[-2].error and default.examples[-1].error == "empty prediction"


@needs_spider
def test_bird_semantics_and_difficulty_breakdown():
    golds = [
        "SELECT name, age FROM singer WHERE age > 40",
        "SELECT name, age FROM singer WHERE age > 40",
        "SELECT count(*) FROM singer",
    ]
    preds = [
        "SELECT name, age FROM singer WHERE age > 40 UNION ALL SELECT name, age FROM singer WHERE age > 50",
        "SELECT age, name FROM singer WHERE age > 40",
        "SELECT count(*) FROM singer",
    ]
    report = evaluate_predictions(
        preds,
        golds,
        ["concert_singer"] * 3,
        DB_DIR,
        bird=True,
        difficulties=["simple", "moderate", "simple"],
        num_workers=0,
        progress=False,
    )
    assert [r.correct for r in report.examples] == [True, False, True]  # duplicates ignored, column order counts
    assert report.breakdowns["difficulty"]["simple"] == {"count": 2, "correct": 2, "accuracy": 1.0}
    assert report.breakdowns["difficulty"]["moderate"]["correct"] == 0


@needs_spider
def test_missing_database_scores_zero_without_crash(tmp_path):
    report = evaluate_predictions(["SELECT 1"], ["SELECT 1"], ["wta_1"], DB_DIR, num_workers=0, progress=False)
    assert not report.examples[0].correct and "database not found" in report.examples[0].error


@needs_spider
def test_test_suite_accuracy(db_copy, tmp_path):
    suite = tmp_path / "suite" / "concert_singer"
    suite.mkdir(parents=True)
    shutil.copyfile(db_copy, suite / "concert_singer.sqlite")
    variant = suite / "concert_singer_1.sqlite"
    shutil.copyfile(db_copy, variant)
    with sqlite3.connect(variant) as conn:  # a distilled-database stand-in: fewer singers
        conn.execute("DELETE FROM singer WHERE age < 30")
    gold = "SELECT count(*) FROM singer"
    report = evaluate_predictions(
        ["SELECT 6", "SELECT count(*) FROM singer", "SELECT 5"],
        [gold] * 3,
        ["concert_singer"] * 3,
        db_copy.parent.parent,
        test_suite_dir=tmp_path / "suite",
        num_workers=0,
        progress=False,
    )
    assert [r.correct for r in report.examples] == [True, True, False]
    assert [r.test_suite_correct for r in report.examples] == [False, True, False]
    assert report.totals["test_suite_correct"] == 1
