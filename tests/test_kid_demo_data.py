"""The embedded demo's Spider slice (kid/demo_data) and its tokenizer (kid.demo)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kid.data import FIELDS
from kid.demo import (
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    demo_data_dir,
    demo_db_ids,
    demo_slice_paths,
    load_demo_splits,
    train_demo_tokenizer,
)
from kid.evaluation import open_readonly, run_query
from kid.prompts import IGNORE_INDEX, special_tokens_around, tokenize_example
from tests.spider_data import SPIDER_DIR, needs_full_spider

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def splits():
    return load_demo_splits()


@pytest.fixture(scope="module")
def tokenizer(splits):
    train, _ = splits
    return train_demo_tokenizer(_texts(train))


def _texts(train):
    return [text for row in train for text in (row["prompt"], row["target"])]


def test_slice_loads_in_domain(splits):
    train, heldout = splits
    assert 200 <= len(train) <= 400 and 50 <= len(heldout) <= 100
    for ds in splits:
        assert set(FIELDS) <= set(ds.column_names)
        assert set(ds["hardness"]) <= {"easy", "medium"}  # the filter, as the README says
        assert all(Path(p).is_file() for p in set(ds["db_path"]))
        assert all(p.endswith("\n" + q) for p, q in zip(ds["prompt"], ds["question"]))
    ids = demo_db_ids()
    assert 3 <= len(ids) <= 6 and set(train["db_id"]) == set(heldout["db_id"]) == set(ids)
    paths = demo_slice_paths()
    assert paths.db_dir.parent == demo_data_dir() / "spider_slice"
    assert sorted(t["db_id"] for t in json.loads(paths.tables_file.read_text())) == ids


def test_train_and_heldout_are_disjoint(splits):
    train, heldout = splits

    def questions(ds):
        return {" ".join(q.lower().split()) for q in ds["question"]}

    assert not questions(train) & questions(heldout)
    assert not set(train["target"]) & set(heldout["target"])  # no held-out gold query in training
    raw = [json.loads(p.read_text()) for p in (demo_slice_paths().train_file, demo_slice_paths().heldout_file)]
    indices = [{r["spider_train_index"] for r in split} for split in raw]
    assert not indices[0] & indices[1] and sum(map(len, indices)) == len(train) + len(heldout)


def test_every_gold_query_and_target_executes(splits):
    for ds in splits:
        conns = {}
        try:
            for row in ds:
                conn = conns.get(row["db_path"]) or conns.setdefault(row["db_path"], open_readonly(row["db_path"]))
                gold, target = run_query(conn, row["query"]), run_query(conn, row["target"])
                assert gold.ok, (row["query"], gold.error)
                assert target.ok and sorted(map(repr, target.rows)) == sorted(map(repr, gold.rows)), row["target"]
        finally:
            for conn in conns.values():
                conn.close()


def test_attribution_readme():
    text = (demo_data_dir() / "README.md").read_text()
    assert "CC BY-SA 4.0" in text and "https://creativecommons.org/licenses/by-sa/4.0/" in text
    assert "Spider" in text and "Yu" in text and "2018" in text
    assert "python tools/make_demo_slice.py" in text
    for db in demo_db_ids():
        digest = hashlib.sha256((demo_slice_paths().db_dir / db / f"{db}.sqlite").read_bytes()).hexdigest()
        assert f"{digest}  database/{db}/{db}.sqlite" in text


@needs_full_spider
def test_shipped_slice_is_what_the_script_makes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_demo_slice", REPO / "tools" / "make_demo_slice.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--spider-dir", str(SPIDER_DIR), "--out", str(tmp_path)]) == 0
    shipped = demo_data_dir()
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert made == sorted(p.relative_to(shipped) for p in shipped.rglob("*") if p.is_file())
    for rel in made:
        assert (tmp_path / rel).read_bytes() == (shipped / rel).read_bytes(), rel
    for db in demo_db_ids():  # unmodified copies
        rel = Path("database") / db / f"{db}.sqlite"
        assert (SPIDER_DIR / rel).read_bytes() == (shipped / "spider_slice" / rel).read_bytes()


def test_tokenizer_special_tokens(tokenizer):
    ids = {tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.mask_token_id}
    assert len(ids) == 3 and None not in ids
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.mask_token) == (EOS_TOKEN, PAD_TOKEN, MASK_TOKEN)
    assert ids <= set(tokenizer.all_special_ids)
    assert tokenizer.padding_side == "left"
    assert special_tokens_around(tokenizer) == ([], [])  # no BOS/EOS added around a text
    assert len(tokenizer) == 1024
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(MASK_TOKEN)) == [MASK_TOKEN]  # one token


def test_tokenizer_round_trips_every_example(splits, tokenizer):
    for ds in splits:
        for row in ds:
            for text in (row["query"], row["target"], row["prompt"]):
                ids = tokenizer(text)["input_ids"]
                assert tokenizer.decode(ids, skip_special_tokens=True) == text
        # short sequences: what the demo's step time depends on
        prompt_lengths = sorted(len(tokenizer(p)["input_ids"]) for p in ds["prompt"])
        assert prompt_lengths[len(prompt_lengths) // 2] <= 250 and prompt_lengths[-1] <= 400
        assert max(len(tokenizer(t)["input_ids"]) for t in ds["target"]) <= 64
    odd = "SELECT \"Name\" FROM t WHERE x = 'Zoë 東京' AND y >= -3.5\n\tORDER BY z ;"
    assert tokenizer.decode(tokenizer(odd)["input_ids"]) == odd  # byte level: anything encodes
    # special tokens are dropped when decoding generated ids
    ids = [tokenizer.pad_token_id] + tokenizer("SELECT 1")["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "SELECT 1"


def test_tokenize_example_with_demo_tokenizer(splits, tokenizer):
    row = splits[0][0]
    features = tokenize_example(tokenizer, row["prompt"], row["target"], question=row["prompt_question"])
    n_target = len(tokenizer(row["target"])["input_ids"]) + 1
    assert features["input_ids"][-1] == tokenizer.eos_token_id
    assert features["labels"][:-n_target] == [IGNORE_INDEX] * (len(features["input_ids"]) - n_target)
    assert features["labels"][-n_target:] == features["input_ids"][-n_target:]
    assert tokenizer.decode(features["labels"][-n_target:], skip_special_tokens=True) == row["target"]
    short = tokenize_example(
        tokenizer, row["prompt"], row["target"], max_input_tokens=40, question=row["prompt_question"]
    )
    prompt_ids = short["input_ids"][: len(short["input_ids"]) - n_target]
    assert len(prompt_ids) == 40 and tokenizer.decode(prompt_ids).endswith(row["question"])


def test_tokenizer_training_is_deterministic(splits, tokenizer):
    texts = _texts(splits[0])
    again = train_demo_tokenizer(texts)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    # ... also in a fresh process (Rust hash seeds differ per process)
    code = (
        "import json, sys\nfrom kid.demo.tokenizer import DEFAULT_VOCAB_SIZE, _backend\n"
        "print(_backend(DEFAULT_VOCAB_SIZE, json.load(sys.stdin)).to_str())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], input=json.dumps(texts), capture_output=True, text=True, cwd=REPO, check=True
    ).stdout
    assert json.loads(out)["model"] == json.loads(tokenizer.backend_tokenizer.to_str())["model"]  # vocab, merges
    smaller = train_demo_tokenizer(texts[:50], vocab_size=400)
    assert len(smaller) == 400 and smaller.backend_tokenizer.to_str() != again.backend_tokenizer.to_str()
    with pytest.raises(ValueError, match="vocab_size"):
        train_demo_tokenizer(texts, vocab_size=100)
