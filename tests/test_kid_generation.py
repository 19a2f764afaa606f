"""Generation with a tiny random model, and ``kid eval`` end to end (no downloads)."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kid.cli import main  # noqa: E402
from kid.evaluation.scoring import read_gold_file, read_prediction_file  # noqa: E402
from kid.generation import clean_generated_sql, generate_sql  # noqa: E402
from tests.spider_data import SAMPLE_DB, SECOND_DB, SPIDER, sample_db_path  # noqa: E402


def tiny_model_and_tokenizer(seed: int = 0):
    """A byte-level BPE tokenizer trained on a few strings and a 2-layer random Llama."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [
        "SELECT COUNT(*) FROM singer WHERE age > 20",
        "database schema : table singer , columns = [ singer.name ( text ) ]",
        "How many singers are there?",
        "SELECT name FROM singer ORDER BY age DESC",
    ] * 5
    tok.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config), tokenizer


def test_clean_generated_sql():
    assert clean_generated_sql("  SELECT a\n FROM t ;  ") == "SELECT a FROM t"


def test_greedy_generation_is_batched_and_stops_at_eos():
    model, tokenizer = tiny_model_and_tokenizer()
    prompts = ["database schema :\nHow many singers are there?", "x\nHow many?", "a longer prompt " * 30 + "\nWhat?"]
    single = [generate_sql(model, tokenizer, [p], max_new_tokens=12, progress=False)[0] for p in prompts]
    batched = generate_sql(model, tokenizer, prompts, batch_size=3, max_new_tokens=12, progress=False)
    assert batched == single  # left padding does not change greedy outputs
    assert all("\n" not in s for s in batched)

    # Make EOS the most likely next token everywhere: generation must stop at once.
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 10.0
    model.lm_head = head
    assert generate_sql(model, tokenizer, prompts, max_new_tokens=12, num_beams=2, progress=False) == ["", "", ""]


def test_beam_search_keeps_first_executable_beam(monkeypatch):
    import kid.generation as generation

    model, tokenizer = tiny_model_and_tokenizer()
    db = sample_db_path()
    # Replace decoding output with known beams: the first beam does not compile, the second does.
    beams = ["SELECT nope FROM track", "SELECT count(*) FROM track", "SELECT 1"]

    def fake_batch_decode(ids, skip_special_tokens=True):
        return [beams[j % len(beams)] for j in range(len(ids))]

    monkeypatch.setattr(tokenizer, "batch_decode", fake_batch_decode)
    out = generation.generate_sql(
        model,
        tokenizer,
        ["q1", "q2"],
        db_paths=[db, db],
        num_beams=3,
        check_executable=True,
        max_new_tokens=4,
        progress=False,
    )
    assert out == ["SELECT count(*) FROM track"] * 2
    plain = generation.generate_sql(model, tokenizer, ["q1"], num_beams=3, max_new_tokens=4, progress=False)
    assert len(plain) == 1
    with pytest.raises(ValueError, match="num_beams"):
        generation.generate_sql(model, tokenizer, ["q"], db_paths=[db], check_executable=True, progress=False)


def test_kid_eval_end_to_end(tmp_path, capsys):
    model, tokenizer = tiny_model_and_tokenizer()
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    db_dir = tmp_path / "db"
    for db_id in (SAMPLE_DB, SECOND_DB):  # copies: nothing here may touch the shared data
        (db_dir / db_id).mkdir(parents=True)
        shutil.copyfile(SPIDER.db_dir / db_id / f"{db_id}.sqlite", db_dir / db_id / f"{db_id}.sqlite")
    train = json.loads(SPIDER.train_file.read_text())
    sample = [x for x in train if x["db_id"] == SAMPLE_DB][:2] + [x for x in train if x["db_id"] == SECOND_DB][:2]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(sample))
    out_dir = tmp_path / "out"
    code = main(
        [
            "eval",
            "--model",
            str(model_dir),
            "--data-file",
            str(data),
            "--db-dir",
            str(db_dir),
            "--tables-file",
            str(SPIDER.tables_file),
            "--output-dir",
            str(out_dir),
            "--batch-size",
            "2",
            "--num-beams",
            "2",
            "--check-executable",
            "--max-new-tokens",
            "8",
            "--max-input-tokens",
            "256",
            "--timeout",
            "5",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0
    predictions = read_prediction_file(out_dir / "predictions.sql", expected=4)
    assert len(predictions) == 4
    report = json.loads((out_dir / "report.json").read_text())
    assert [e["db_id"] for e in report["examples"]] == [x["db_id"] for x in sample]
    assert [e["gold"] for e in report["examples"]] == [x["query"] for x in sample]
    assert report["totals"]["count"] == 4 and report["settings"]["num_beams"] == 2
    assert (out_dir / "gold.sql").read_text().count("\n") == 4
    assert read_gold_file(out_dir / "gold.sql") == [(x["query"], x["db_id"]) for x in sample]
    assert "execution accuracy" in capsys.readouterr().out
    # the same output directory again: refused (nothing overwritten) unless asked
    before = (out_dir / "report.json").read_text()
    assert main(["eval", "--model", str(model_dir), "--data-file", str(data), "--db-dir", str(db_dir),
                 "--output-dir", str(out_dir), "--no-progress"]) == 2
    assert "--overwrite-output-dir" in capsys.readouterr().err
    assert (out_dir / "report.json").read_text() == before
