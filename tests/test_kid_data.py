"""Loaders for Spider, Spider-DK/Syn/Realistic and BIRD (kid.data)."""

from __future__ import annotations

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
from tests.spider_data import DB_DIR, SPIDER_DIR, needs_spider

pytestmark = needs_spider


@pytest.fixture(scope="module")
def dev_raw():
    return json.loads((SPIDER_DIR / "dev.json").read_text())


def test_spider_dev_skips_missing_databases_with_a_warning():
    with pytest.warns(MissingDatabaseWarning, match=r"skipped 62 of 1034 .*wta_1 \(62\)"):
        ds = load_spider(SPIDER_DIR / "dev.json", DB_DIR, SPIDER_DIR / "tables.json")
    assert len(ds) == 972
    assert set(FIELDS) <= set(ds.column_names)
    row = ds[0]
    assert row["db_id"] == "concert_singer" and row["query"] == "SELECT count(*) FROM singer"
    assert row["target"] == "SELECT COUNT(*) FROM singer"
    assert row["prompt"].startswith("database schema :\ntable stadium , columns = [ ")
    assert row["prompt"].endswith("\n" + row["question"]) and row["prompt_question"] == row["question"]
    assert {ds[i]["hardness"] for i in range(len(ds))} == {"easy", "medium", "hard", "extra"}


def test_spider_train_without_prompts():
    with pytest.warns(MissingDatabaseWarning, match=r"skipped 96 of 7000 .*baseball_1 \(82\).*soccer_1 \(14\)"):
        ds = load_spider(SPIDER_DIR / "train_spider.json", DB_DIR, build_prompts=False, limit=300)
    assert len(ds) == 300 and ds[0]["prompt"] == "" and ds[0]["target"]


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_spider_variants(tmp_path, dev_raw):
    sample = [x for x in dev_raw if x["db_id"] in ("concert_singer", "wta_1")][:3] + [
        x for x in dev_raw if x["db_id"] == "wta_1"
    ][:1]
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
        ds = load_spider_syn(_write(tmp_path / "syn.json", syn), DB_DIR, SPIDER_DIR / "tables.json")
    assert len(ds) == 3 and all(q.startswith("syn ") for q in ds["question"])
    assert all(p.endswith("\nsyn " + q[4:]) for p, q in zip(ds["prompt"], ds["question"]))
    assert set(ds["source"]) == {"spider-syn"}

    # Spider-DK: its own tables.json (here: a copy with a renamed comment).
    tables = json.loads((SPIDER_DIR / "tables.json").read_text())
    entry = next(t for t in tables if t["db_id"] == "concert_singer")
    entry["column_names"] = [[t, "renamed " + n] if t >= 0 else [t, n] for t, n in entry["column_names"]]
    dk_tables = _write(tmp_path / "dk_tables.json", [entry])
    with pytest.warns(MissingDatabaseWarning):
        ds = load_spider_dk(_write(tmp_path / "dk.json", sample), DB_DIR, dk_tables)
    assert "comment : renamed singer id" in ds[0]["prompt"] and set(ds["source"]) == {"spider-dk"}
    with pytest.raises(ValueError, match="tables.json"):
        load_spider_dk(tmp_path / "dk.json", DB_DIR, None)

    with pytest.warns(MissingDatabaseWarning):
        ds = load_spider_realistic(_write(tmp_path / "realistic.json", sample), DB_DIR)
    assert len(ds) == 3 and set(ds["source"]) == {"spider-realistic"}


def test_bird_with_and_without_evidence(tmp_path):
    bird = [
        {
            "question_id": 0,
            "db_id": "concert_singer",
            "question": "How many French singers are there?",
            "evidence": "French refers to Country = 'France'",
            "SQL": "SELECT count(*) FROM singer WHERE Country = 'France'",
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
    assert row["prompt"].endswith("\nFrench refers to Country = 'France'\nHow many French singers are there?")
    assert row["prompt_question"] == "French refers to Country = 'France'\nHow many French singers are there?"
    assert "singer.Country ( France )" in row["prompt"]  # found through the evidence
    with pytest.warns(MissingDatabaseWarning):
        ds = load_dataset_by_name("bird-no-evidence", path, DB_DIR)
    assert "French refers" not in ds[0]["prompt"] and ds[0]["prompt"].endswith("\nHow many French singers are there?")
    assert "matched contents : None" in ds[0]["prompt"]
    assert ds[0]["source"] == "bird-no-evidence"


def test_bad_input_is_reported_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file"):
        load_spider(tmp_path / "nope.json", DB_DIR)
    with pytest.raises(FileNotFoundError, match="database directory"):
        load_spider(SPIDER_DIR / "dev.json", tmp_path / "nope")
    with pytest.raises(KeyError, match="question"):
        load_spider(_write(tmp_path / "bad.json", [{"db_id": "concert_singer", "query": "SELECT 1"}]), DB_DIR)
    with pytest.raises(ValueError, match="unknown data format"):
        load_dataset_by_name("sparc", SPIDER_DIR / "dev.json", DB_DIR)


def test_loading_does_not_write_to_the_shared_data():
    before = {p: p.stat().st_mtime_ns for p in DB_DIR.glob("concert_singer/*")}
    with pytest.warns(MissingDatabaseWarning):
        load_spider(SPIDER_DIR / "dev.json", DB_DIR, limit=5)
    after = {p: p.stat().st_mtime_ns for p in DB_DIR.glob("concert_singer/*")}
    assert before == after
