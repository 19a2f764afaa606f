"""Loaders for Spider, Spider-DK/Syn/Realistic and BIRD (kid.data), on the full Spider data or, in a fresh clone,
on the shipped slice (tests/spider_data.py)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from kid.data import (
    FIELDS,
    MissingDatabaseWarning,
    load_bird,
    load_dataset_by_name,
    load_spider,
    load_spider_dk,
    load_spider_realistic,
    load_spider_syn,
)
from kid.sql_normalize import normalize_sql
from tests.spider_data import MISSING_DB, SAMPLE_DB, SPIDER, needs_full_spider

DB_DIR = SPIDER.db_dir


@pytest.fixture(scope="module")
def train_raw():
    return json.loads(SPIDER.train_file.read_text())


def test_spider_skips_missing_databases_with_a_warning(tmp_path):
    raw = json.loads(SPIDER.dev_file.read_text())[:40]
    extra = [{"db_id": MISSING_DB, "question": "How many players?", "query": "SELECT count(*) FROM players"}] * 2
    data = raw[:5] + extra + raw[5:]
    missing = sum(1 for x in data if not (DB_DIR / x["db_id"] / f"{x['db_id']}.sqlite").is_file())
    assert missing >= 2
    with pytest.warns(MissingDatabaseWarning, match=rf"skipped {missing} of {len(data)} .*{MISSING_DB} \("):
        ds = load_spider(_write(tmp_path / "dev.json", data), DB_DIR, SPIDER.tables_file)
    assert len(ds) == len(data) - missing
    assert set(FIELDS) <= set(ds.column_names)
    first = next(x for x in data if (DB_DIR / x["db_id"]).is_dir())
    row = ds[0]
    assert row["db_id"] == first["db_id"] and row["query"] == first["query"]
    assert row["target"] == normalize_sql(first["query"])
    assert row["prompt"].startswith("database schema :\ntable ")
    assert row["prompt"].endswith("\n" + row["question"]) and row["prompt_question"] == row["question"]
    assert {ds[i]["hardness"] for i in range(len(ds))} <= {"easy", "medium", "hard", "extra"}


@needs_full_spider
def test_spider_dev_official_counts():
    with pytest.warns(MissingDatabaseWarning, match=r"skipped 62 of 1034 .*wta_1 \(62\)"):
        ds = load_spider(SPIDER.dev_file, DB_DIR, SPIDER.tables_file)
    assert len(ds) == 972
    row = ds[0]
    assert row["db_id"] == "concert_singer" and row["query"] == "SELECT count(*) FROM singer"
    assert row["target"] == "SELECT COUNT(*) FROM singer"
    assert row["prompt"].startswith("database schema :\ntable stadium , columns = [ ")
    assert {ds[i]["hardness"] for i in range(len(ds))} == {"easy", "medium", "hard", "extra"}


def test_spider_train_without_prompts():
    expect = (pytest.warns(MissingDatabaseWarning, match=r"skipped 96 of 7000 .*baseball_1 \(82\).*soccer_1 \(14\)")
              if SPIDER.full else contextlib.nullcontext())
    with expect:
        ds = load_spider(SPIDER.train_file, DB_DIR, build_prompts=False, limit=30)
    assert len(ds) == 30 and ds[0]["prompt"] == "" and ds[0]["target"]


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_spider_variants(tmp_path, train_raw):
    sample = [x for x in train_raw if x["db_id"] == SAMPLE_DB][:3] + [
        {"db_id": MISSING_DB, "question": "How many players?", "query": "SELECT count(*) FROM players"}
    ]
    # Spider-Syn: the synonym-substituted question is SpiderSynQuestion.
    syn = [
        {
            "db_id": x["db_id"],
            "query": x["query"],
            "SpiderQuestion": x["question"],
            "SpiderSynQuestion": "syn " + x["question"],
        }
        for x in sample
    ]
    with pytest.warns(MissingDatabaseWarning, match="skipped 1 of 4"):
        ds = load_spider_syn(_write(tmp_path / "syn.json", syn), DB_DIR, SPIDER.tables_file)
    assert len(ds) == 3 and all(q.startswith("syn ") for q in ds["question"])
    assert all(p.endswith("\nsyn " + q[4:]) for p, q in zip(ds["prompt"], ds["question"]))
    assert set(ds["source"]) == {"spider-syn"}

    # Spider-DK: its own tables.json (here: a copy with a renamed comment).
    tables = json.loads(SPIDER.tables_file.read_text())
    entry = next(t for t in tables if t["db_id"] == SAMPLE_DB)
    entry["column_names"] = [[t, "renamed " + n] if t >= 0 else [t, n] for t, n in entry["column_names"]]
    dk_tables = _write(tmp_path / "dk_tables.json", [entry])
    with pytest.warns(MissingDatabaseWarning):
        ds = load_spider_dk(_write(tmp_path / "dk.json", sample), DB_DIR, dk_tables)
    assert "comment : renamed race id" in ds[0]["prompt"] and set(ds["source"]) == {"spider-dk"}
    with pytest.raises(ValueError, match="tables.json"):
        load_spider_dk(tmp_path / "dk.json", DB_DIR, None)

    with pytest.warns(MissingDatabaseWarning):
        ds = load_spider_realistic(_write(tmp_path / "realistic.json", sample), DB_DIR)
    assert len(ds) == 3 and set(ds["source"]) == {"spider-realistic"}


def test_bird_with_and_without_evidence(tmp_path):
    bird = [
        {
            "question_id": 0,
            "db_id": SAMPLE_DB,
            "question": "How many tracks does the city have?",
            "evidence": "the city refers to Location = 'Daytona Beach, FL'",
            "SQL": "SELECT count(*) FROM track WHERE Location = 'Daytona Beach, FL'",
            "difficulty": "simple",
        },
        {
            "question_id": 1,
            "db_id": "missing_db",
            "question": "q",
            "evidence": "",
            "SQL": "SELECT 1",
            "difficulty": "moderate",
        },
    ]
    path = _write(tmp_path / "bird_dev.json", bird)
    with pytest.warns(MissingDatabaseWarning, match="missing_db"):
        ds = load_bird(path, DB_DIR)
    row = ds[0]
    assert row["query"] == bird[0]["SQL"] and row["difficulty"] == "simple" and row["evidence"] == bird[0]["evidence"]
    question = "the city refers to Location = 'Daytona Beach, FL'\nHow many tracks does the city have?"
    assert row["prompt"].endswith("\n" + question) and row["prompt_question"] == question
    assert "track.Location ( Daytona Beach, FL )" in row["prompt"]  # found through the evidence
    with pytest.warns(MissingDatabaseWarning):
        ds = load_dataset_by_name("bird-no-evidence", path, DB_DIR)
    assert "the city refers" not in ds[0]["prompt"]
    assert ds[0]["prompt"].endswith("\nHow many tracks does the city have?")
    assert "matched contents : None" in ds[0]["prompt"]
    assert ds[0]["source"] == "bird-no-evidence"


def test_bad_input_is_reported_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file"):
        load_spider(tmp_path / "nope.json", DB_DIR)
    with pytest.raises(FileNotFoundError, match="database directory"):
        load_spider(SPIDER.dev_file, tmp_path / "nope")
    with pytest.raises(KeyError, match="question"):
        load_spider(_write(tmp_path / "bad.json", [{"db_id": SAMPLE_DB, "query": "SELECT 1"}]), DB_DIR)
    with pytest.raises(ValueError, match="unknown data format"):
        load_dataset_by_name("sparc", SPIDER.dev_file, DB_DIR)


def test_loading_does_not_write_to_the_shared_data(tmp_path, train_raw):
    before = {p: p.stat().st_mtime_ns for p in DB_DIR.glob(f"{SAMPLE_DB}/*")}
    assert before
    load_spider(_write(tmp_path / "t.json", [x for x in train_raw if x["db_id"] == SAMPLE_DB][:5]), DB_DIR)
    after = {p: p.stat().st_mtime_ns for p in DB_DIR.glob(f"{SAMPLE_DB}/*")}
    assert before == after
