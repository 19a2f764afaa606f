"""SQL normalisation (every Spider example must keep its result), CodeS prompts, tokenization."""

from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict

import pytest

from kid.data.schema import read_schema
from kid.evaluation.compare import has_order_by
from kid.evaluation.pool import WorkerFailure, run_tasks
from kid.evaluation.sqlite_safe import open_readonly, run_query
from kid.prompts import IGNORE_INDEX, build_prompt, prompt_name, tokenize_example, tokenize_prompt
from kid.sql_normalize import normalize_sql
from tests.spider_data import SAMPLE_DB, SPIDER, sample_db_path


# ---------------------------------------------------------------- normalisation
def test_normalize_sql_examples():
    assert normalize_sql("select count(*) from singer where age > = 3;") == "SELECT COUNT(*) FROM singer WHERE age >= 3"
    assert normalize_sql(
        "SELECT T1.name FROM singer AS T1 JOIN concert AS t2 ON T1.id = T2.sid WHERE T1.x IS NOT NULL AND t2.y NOT IN (SELECT y FROM b) AND z != 'a'"
    ) == (
        "SELECT singer.name FROM singer JOIN concert ON singer.id = concert.sid "
        "WHERE singer.x IS NOT NULL AND concert.y NOT IN (SELECT y FROM b) AND z != 'a'"
    )
    # Self-joins and correlated references keep the aliases they need.
    assert (
        normalize_sql("SELECT T1.a FROM t AS T1 JOIN t AS T2 ON T1.p = T2.q")
        == "SELECT T1.a FROM t AS T1 JOIN t AS T2 ON T1.p = T2.q"
    )
    assert normalize_sql("SELECT T1.a FROM t AS T1 WHERE T1.b > (SELECT avg(T2.b) FROM t AS T2 WHERE T2.c = T1.c)") == (
        "SELECT T1.a FROM t AS T1 WHERE T1.b > (SELECT AVG(t.b) FROM t WHERE t.c = T1.c)"
    )
    assert normalize_sql("SELECT a FROM t WHERE b > (SELECT avg(b) FROM t AS T2 WHERE T2.c = t.c)") == (
        "SELECT a FROM t WHERE b > (SELECT AVG(b) FROM t AS T2 WHERE T2.c = t.c)"
    )
    assert normalize_sql("SELECT a FROM x JOIN y") == "SELECT a FROM x JOIN y"
    assert normalize_sql("not sql at all (") == "not sql at all ("


def check_normalized_results(payload):
    """Worker task: run every query and its normalised form on one database; return mismatches."""
    db_path, queries = payload
    conn = open_readonly(db_path)
    bad = []
    for query in queries:
        normalized = normalize_sql(query)
        original, new = run_query(conn, query, timeout_s=20), run_query(conn, normalized, timeout_s=20)
        if not original.ok:  # broken gold SQL in the release: the normalised form must not "fix" it silently
            continue
        if not new.ok:
            bad.append((query, normalized, new.error))
        elif has_order_by(query):
            if original.rows != new.rows:
                bad.append((query, normalized, "rows differ"))
        elif Counter(original.rows) != Counter(new.rows):
            bad.append((query, normalized, "row multisets differ"))
    conn.close()
    return bad


def test_normalized_sql_executes_to_the_same_result_on_all_dev_and_train():
    # Spider's dev and train sets (972 + 6904 examples with a database), or the shipped slice's 246 + 64.
    by_db: dict[str, list[str]] = defaultdict(list)
    total = 0
    db_dir = SPIDER.db_dir
    for path in (SPIDER.dev_file, SPIDER.train_file):
        for x in json.loads(path.read_text()):
            if (db_dir / x["db_id"] / f"{x['db_id']}.sqlite").is_file():
                by_db[x["db_id"]].append(x["query"])
                total += 1
    assert total == (972 + 6904 if SPIDER.full else 246 + 64)
    payloads = [(str(db_dir / db / f"{db}.sqlite"), queries) for db, queries in sorted(by_db.items())]
    results = run_tasks(check_normalized_results, payloads, num_workers=2, hard_limit_s=300)
    failures = [r for r in results if isinstance(r, WorkerFailure)]
    assert not failures, failures[:3]
    mismatches = [m for r in results for m in r]
    assert not mismatches, mismatches[:5]


# ---------------------------------------------------------------- prompts
@pytest.fixture
def odd_db(tmp_path):
    """A database with names that need quoting, long values and a declared foreign key."""
    path = tmp_path / "odd" / "odd.sqlite"
    path.parent.mkdir()
    with sqlite3.connect(path) as conn:
        conn.execute('CREATE TABLE "Home Town" (id INTEGER PRIMARY KEY, "order" TEXT, city_nm TEXT)')
        conn.execute(
            'CREATE TABLE person (pid INTEGER PRIMARY KEY, town_id INTEGER REFERENCES "Home Town"(id), note TEXT)'
        )
        conn.executemany(
            'INSERT INTO "Home Town" VALUES (?, ?, ?)', [(1, "first", "Springfield"), (2, "second", "Shelbyville")]
        )
        conn.executemany("INSERT INTO person VALUES (?, ?, ?)", [(1, 1, "x" * 40), (2, 2, "short")])
    return path


def test_prompt_layout_quoting_comments_and_values(odd_db):
    tables_entry = {
        "db_id": "odd",
        "table_names_original": ["Home Town", "person"],
        "table_names": ["home town", "person"],
        "column_names_original": [
            [-1, "*"],
            [0, "id"],
            [0, "order"],
            [0, "city_nm"],
            [1, "pid"],
            [1, "town_id"],
            [1, "note"],
        ],
        "column_names": [[-1, "*"], [0, "id"], [0, "order"], [0, "city name"], [1, "pid"], [1, "town id"], [1, "note"]],
        "foreign_keys": [],
        "primary_keys": [1, 4],
    }
    schema = read_schema(odd_db, tables_entry)
    prompt = build_prompt({"question": "Who lives in  Springfield?"}, schema, {"Home Town.city_nm": ["Springfield"]})
    lines = prompt.split("\n")
    assert lines[0] == "database schema :"
    assert lines[1].startswith(
        "table `Home Town` , columns = [ `Home Town`.id ( integer | primary key | values : 1 , 2 ) , "
    )
    assert "`Home Town`.`order` ( text | values : first , second )" in lines[1]
    assert "`Home Town`.city_nm ( text | comment : city name | values : Springfield , Shelbyville )" in lines[1]
    assert "person.note ( text | values : " + "x" * 25 + " , short )" in lines[2]  # values cut to 25 characters
    assert "town id" not in prompt  # same as the column name once "_" is a space: no comment
    assert lines[3:5] == ["foreign keys :", "person.town_id = `Home Town`.id"]
    assert lines[5:7] == ["matched contents :", "`Home Town`.city_nm ( Springfield )"]
    assert lines[-1] == "Who lives in Springfield?"
    assert prompt_name("singer") == "singer" and prompt_name("order") == "`order`" and prompt_name("2nd") == "`2nd`"

    bare = build_prompt({"question": "q", "evidence": "hint"}, read_schema(odd_db), None)
    assert "matched contents : None" in bare and bare.endswith("hint\nq")
    assert bare.endswith("\nq") and "hint" not in build_prompt(
        {"question": "q", "evidence": "hint"}, schema, use_evidence=False
    )


def test_spider_prompt_has_schema_foreign_keys_and_matched_values():
    from kid.data import load_tables_json, match_contents

    db = sample_db_path()  # race_track: race (.., Track_ID) -> track (Track_ID, Name, Location, ...)
    schema = read_schema(db, load_tables_json(SPIDER.tables_file)[SAMPLE_DB])
    question = "Which tracks are in Daytona Beach?"
    matched = match_contents(question, db)
    assert matched == {"track.Location": ["Daytona Beach, FL"]}
    prompt = build_prompt({"question": question}, schema, matched)
    assert "track.Track_ID ( int | primary key | values : 1 , 2 )" in prompt
    assert "race.Track_ID = track.Track_ID" in prompt
    assert prompt.endswith("matched contents :\ntrack.Location ( Daytona Beach, FL )\n" + question)
    # Fuzzy: a misspelt value is still found.
    assert "Daytona Beach, FL" in match_contents("tracks in Daytonna Beach", db).get("track.Location", [])


# ---------------------------------------------------------------- tokenization
def _char_tokenizer():
    """A tiny character-level tokenizer with BOS/EOS (built here: no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ,.:;()[]|=*<>!?'\"`_-\n"))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_tokenize_example_masks_prompt_and_appends_eos():
    tok = _char_tokenizer()
    features = tokenize_example(tok, "schema\nhow many?", "SELECT 1")
    n_prompt = len("schema\nhow many?") + 1  # characters + BOS
    assert features["input_ids"][0] == tok.bos_token_id
    assert features["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert features["labels"][n_prompt:] == features["input_ids"][n_prompt:]
    assert tok.decode(features["labels"][n_prompt:-1]).replace(" ", "") == "SELECT1"
    assert features["input_ids"][-1] == tok.eos_token_id
    assert features["attention_mask"] == [1] * len(features["input_ids"])


def test_truncation_keeps_question_and_target():
    tok = _char_tokenizer()
    schema = "table t , columns = [ " + " , ".join(f"t.c{i} ( int )" for i in range(200)) + " ]"
    prompt = schema + "\nhow many rows are there?"
    features = tokenize_example(tok, prompt, "SELECT COUNT(*) FROM t", max_input_tokens=100, max_output_tokens=10)
    labels = features["labels"]
    n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
    assert n_prompt == 100
    prompt_text = tok.decode(features["input_ids"][1:n_prompt]).replace(" ", "")
    assert prompt_text.endswith("howmanyrowsarethere?") and prompt_text.startswith("tablet,columns")
    assert len(labels) - n_prompt == 10  # target cut to 10 tokens (its EOS is lost)
    # An explicit question (two lines, e.g. BIRD evidence + question) is kept whole.
    ids = tokenize_prompt(tok, schema + "\nhint line\nquestion?", max_input_tokens=60, question="hint line\nquestion?")
    assert len(ids) == 60 and tok.decode(ids).replace(" ", "").endswith("hintline\nquestion?".replace(" ", ""))
    # A question longer than the budget keeps its end.
    ids = tokenize_prompt(tok, "s\n" + "q" * 50 + "?", max_input_tokens=20)
    assert len(ids) == 20 and ids[0] == tok.bos_token_id and tok.decode(ids[-1:]) == "?"
