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
from tests.spider_data import MISSING_DB, SAMPLE_DB, SECOND_DB, SPIDER, needs_full_spider, sample_db_path

DB_DIR = SPIDER.db_dir


def _with_db(examples):
    return [x for x in examples if (DB_DIR / x["db_id"] / f"{x['db_id']}.sqlite").is_file()]


@pytest.fixture(scope="module")
def dev():
    return json.loads(SPIDER.dev_file.read_text())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def db_copy(tmp_path):
    """race_track (tables track, 9 rows, and race) copied to tmp (tests that try to write never touch the shared
    file)."""
    src = sample_db_path()
    dst_dir = tmp_path / "db" / SAMPLE_DB
    dst_dir.mkdir(parents=True)
    dst = dst_dir / f"{SAMPLE_DB}.sqlite"
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


@needs_full_spider
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
    "DROP TABLE track",
    "DELETE FROM track",
    "UPDATE track SET Seating = 0",
    "INSERT INTO track (Track_ID, Name) VALUES (99, 'x')",
    "REPLACE INTO track (Track_ID, Name) VALUES (1, 'x')",
    "CREATE TABLE evil (x)",
    "ALTER TABLE track ADD COLUMN evil TEXT",
    "CREATE INDEX evil_idx ON track (Name)",
    "PRAGMA writable_schema = ON",
    "PRAGMA user_version = 7",
    "PRAGMA journal_mode = DELETE",
    "VACUUM",
    "BEGIN IMMEDIATE",
]


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
    assert not run_query(conn, "SELECT 1; DROP TABLE track").ok
    assert run_query(conn, "SELECT count(*) FROM track").rows == [(9,)]
    conn.close()
    assert _sha256(db_copy) == before
    assert not attach_target.exists() and not vacuum_target.exists()

    # The same statements as predictions through the evaluator: all score 0, file unchanged.
    report = evaluate_predictions(
        statements,
        ["SELECT count(*) FROM track"] * len(statements),
        [SAMPLE_DB] * len(statements),
        db_copy.parent.parent,
        timeout_s=5,
        num_workers=1,
        progress=False,
    )
    assert [r.correct for r in report.examples] == [False] * len(statements)
    assert all(r.error for r in report.examples)
    assert _sha256(db_copy) == before
    assert not attach_target.exists() and not vacuum_target.exists()


def test_authorizer_alone_blocks_writes(db_copy):
    """Even on a writable connection, the authorizer denies every write."""
    before = _sha256(db_copy)
    conn = sqlite3.connect(db_copy)
    conn.set_authorizer(_make_authorizer(frozenset()))
    for sql in WRITES[:8]:
        with pytest.raises(sqlite3.DatabaseError, match="not authorized|prohibited"):
            conn.execute(sql)
        conn.rollback()
    assert conn.execute("SELECT count(*) FROM track").fetchall() == [(9,)]
    conn.close()
    assert _sha256(db_copy) == before


ENDLESS = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r"


def test_endless_recursive_cte_stops_at_the_limit(db_copy):
    conn = open_readonly(db_copy)
    start = time.monotonic()
    result = run_query(conn, ENDLESS, timeout_s=1.0)
    assert time.monotonic() - start < 5
    assert result.timed_out and not result.ok
    # The connection is usable afterwards.
    assert run_query(conn, "SELECT count(*) FROM track").rows == [(9,)]

    start = time.monotonic()
    report = evaluate_predictions(
        [ENDLESS, "SELECT count(*) FROM track"],
        ["SELECT count(*) FROM track"] * 2,
        [SAMPLE_DB] * 2,
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


def test_row_cap(db_copy):
    conn = open_readonly(db_copy)
    assert not run_query(conn, "SELECT * FROM track", max_rows=8).ok
    assert len(run_query(conn, "SELECT * FROM track", max_rows=9).rows) == 9
    assert explain_ok(conn, "SELECT name FROM track")
    assert not explain_ok(conn, "SELECT nope FROM track")


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
@needs_full_spider
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


@needs_full_spider
def test_gold_against_gold_on_train():
    """Every training example with a database scores 1, except the few whose gold SQL is broken."""
    train = _with_db(json.loads(SPIDER.train_file.read_text()))
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


# race_track: track (Track_ID, Name, Location, Seating, Year_Opened; 9 rows, two with Seating 65000) and race
# (Race_ID, Name, Class, Date, Track_ID; 7 rows, Class "DP/GT" or "GT"); manufactory_1: products (Price).
TRACK = SAMPLE_DB
CASES = [
    # (db_id, gold, prediction, correct by default, correct with keep_distinct)
    # wrong column
    (TRACK, "SELECT name, location, seating FROM track ORDER BY name DESC",
     "SELECT name, location, year_opened FROM track ORDER BY name DESC", False, False),
    # wrong value
    (TRACK, "SELECT avg(seating), min(seating), max(seating) FROM track WHERE year_opened > 1990",
     "SELECT avg(seating), min(seating), max(seating) FROM track WHERE year_opened < 1990", False, False),
    # missing ORDER BY where it matters, and the wrong direction
    (TRACK, "SELECT name, location, seating FROM track ORDER BY name DESC",
     "SELECT name, location, seating FROM track", False, False),
    (TRACK, "SELECT name, location, seating FROM track ORDER BY name DESC",
     "SELECT name, location, seating FROM track ORDER BY name ASC", False, False),
    # extra row, and a duplicated row
    (TRACK, "SELECT name FROM track WHERE seating > 90000", "SELECT name FROM track WHERE seating > 70000", False,
     False),
    (TRACK, "SELECT name FROM track",
     "SELECT name FROM track UNION ALL SELECT name FROM track WHERE seating > 100000", False, False),
    # wrong aggregate target, off-by-one comparison
    (TRACK, "SELECT count(*) FROM track", "SELECT count(*) FROM race", False, False),
    (SECOND_DB, "SELECT count(*) FROM products WHERE price > 150", "SELECT count(*) FROM products WHERE price >= 150",
     False, False),
    # column permutation: correct
    (TRACK, "SELECT name, location, seating FROM track ORDER BY name DESC",
     "SELECT seating, name, location FROM track ORDER BY name DESC", True, True),
    # row order without a gold ORDER BY: free
    (TRACK, "SELECT name, seating FROM track", "SELECT seating, name FROM track ORDER BY name", True, True),
    # ORDER BY in the prediction only: fine
    (TRACK, "SELECT location FROM track WHERE seating > 70000",
     "SELECT location FROM track WHERE seating > 70000 ORDER BY seating", True, True),
    # DISTINCT is stripped from both by default; kept on request
    (TRACK, "SELECT DISTINCT class FROM race WHERE race_id > 1", "SELECT class FROM race WHERE race_id > 1", True,
     False),
    (TRACK, "SELECT count(DISTINCT class) FROM race", "SELECT count(class) FROM race", True, False),
    # failing prediction
    (TRACK, "SELECT count(*) FROM track", "SELECT count(*) FROM no_such_table", False, False),
    (TRACK, "SELECT count(*) FROM track", "", False, False),
]


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


def test_bird_semantics_and_difficulty_breakdown():
    golds = [
        "SELECT name, seating FROM track WHERE seating > 70000",
        "SELECT name, seating FROM track WHERE seating > 70000",
        "SELECT count(*) FROM track",
    ]
    preds = [
        "SELECT name, seating FROM track WHERE seating > 70000 UNION ALL "
        "SELECT name, seating FROM track WHERE seating > 100000",
        "SELECT seating, name FROM track WHERE seating > 70000",
        "SELECT count(*) FROM track",
    ]
    report = evaluate_predictions(
        preds,
        golds,
        [SAMPLE_DB] * 3,
        DB_DIR,
        bird=True,
        difficulties=["simple", "moderate", "simple"],
        num_workers=0,
        progress=False,
    )
    assert [r.correct for r in report.examples] == [True, False, True]  # duplicates ignored, column order counts
    assert report.breakdowns["difficulty"]["simple"] == {"count": 2, "correct": 2, "accuracy": 1.0}
    assert report.breakdowns["difficulty"]["moderate"]["correct"] == 0


def test_missing_database_scores_zero_without_crash(tmp_path):
    report = evaluate_predictions(["SELECT 1"], ["SELECT 1"], [MISSING_DB], DB_DIR, num_workers=0, progress=False)
    assert not report.examples[0].correct and "database not found" in report.examples[0].error


def test_test_suite_accuracy(db_copy, tmp_path):
    suite = tmp_path / "suite" / SAMPLE_DB
    suite.mkdir(parents=True)
    shutil.copyfile(db_copy, suite / f"{SAMPLE_DB}.sqlite")
    variant = suite / f"{SAMPLE_DB}_1.sqlite"
    shutil.copyfile(db_copy, variant)
    with sqlite3.connect(variant) as conn:  # a distilled-database stand-in: fewer tracks
        conn.execute("DELETE FROM track WHERE seating < 70000")
    gold = "SELECT count(*) FROM track"
    report = evaluate_predictions(
        ["SELECT 9", "SELECT count(*) FROM track", "SELECT 5"],
        [gold] * 3,
        [SAMPLE_DB] * 3,
        db_copy.parent.parent,
        test_suite_dir=tmp_path / "suite",
        num_workers=0,
        progress=False,
    )
    assert [r.correct for r in report.examples] == [True, True, False]
    assert [r.test_suite_correct for r in report.examples] == [False, True, False]
    assert report.totals["test_suite_correct"] == 1
