"""A Spider-format toy data set on one small database, and a tiny student and teacher saved with
``save_pretrained`` (their tokenizer knows the data's words): what ``kid train`` loads from disk, built in a
second.  :func:`toy_spider` is the pytest fixture (module scope); :func:`train_argv` the command line of a short run.
"""
from __future__ import annotations

import json
import sqlite3

import pytest

from tests.kid_tiny import bpe_tokenizer, tiny_model

QUESTIONS = [
    ("How many singers are there?", "SELECT count(*) FROM singer"),
    ("List the names of all singers.", "SELECT name FROM singer"),
    ("What is the average age of singers?", "SELECT avg(age) FROM singer"),
    ("Show the names of singers older than 30.", "SELECT name FROM singer WHERE age > 30"),
    ("Which country has the most singers?",
     "SELECT country FROM singer GROUP BY country ORDER BY count(*) DESC LIMIT 1"),
    ("What are the distinct countries of singers?", "SELECT DISTINCT country FROM singer"),
]


@pytest.fixture(scope="module")
def toy_spider(tmp_path_factory):
    """A Spider-format data file on one toy database, and a tiny student and teacher whose tokenizer knows the
    data's words, saved with save_pretrained."""
    from transformers import AutoTokenizer

    from kid.data import load_spider

    root = tmp_path_factory.mktemp("toy_spider")
    db = root / "database" / "toy" / "toy.sqlite"
    db.parent.mkdir(parents=True)
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE singer (singer_id INTEGER PRIMARY KEY, name TEXT, country TEXT, age INTEGER)")
        con.executemany("INSERT INTO singer VALUES (?, ?, ?, ?)",
                        [(1, "Joe", "France", 52), (2, "Ann", "Netherlands", 29), (3, "Tim", "France", 41)])
    data = root / "train.json"
    data.write_text(json.dumps([{"db_id": "toy", "question": q, "query": s} for q, s in QUESTIONS]))
    rows = load_spider(data, root / "database")
    tokenizer = bpe_tokenizer([r["prompt"] + " " + r["target"] for r in rows])
    save_tiny_models(root, tokenizer)
    # kid train loads the tokenizer with AutoTokenizer: it must read the data as the tokenizer we built does
    loaded = AutoTokenizer.from_pretrained(root / "student")
    prompt = rows[0]["prompt"]
    assert len(loaded(prompt)["input_ids"]) > 20 and loaded.decode(loaded(prompt)["input_ids"]) == prompt
    assert (loaded.eos_token_id, loaded.pad_token_id, loaded.mask_token) == (1, 0, "<mask>")
    return {"data": data, "db_dir": root / "database", "student": root / "student", "teacher": root / "teacher"}


def save_tiny_models(root, tokenizer):
    """A tiny student and a larger teacher with ``tokenizer``'s vocabulary, saved with their tokenizer."""
    for name, seed, size in (("student", 0, {}), ("teacher", 1, {"hidden": 48, "layers": 2})):
        tiny_model(seed, vocab=len(tokenizer), **size).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)


def train_argv(toy, out, method, *extra):
    return ["train", "--student", str(toy["student"]), "--teacher", str(toy["teacher"]), "--data-file",
            str(toy["data"]), "--db-dir", str(toy["db_dir"]), "--output-dir", str(out), "--method", method,
            "--max-steps", "2", "--batch-size", "2", "--micro-batch-size", "1", "--lora-r", "4", "--lora-alpha", "8",
            "--learning-rate", "1e-3", "--logging-steps", "1", "--no-progress", "--max-input-tokens", "256",
            "--max-output-tokens", "32", *extra]


