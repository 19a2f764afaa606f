"""Tiny models, tokenizer and data for the tests of the ``kid`` trainer (no download: everything is built here).

* :func:`tiny_model`: a randomly initialised ``Qwen2ForCausalLM`` (vocabulary :data:`VOCAB`, hidden 32, SDPA,
  untied lm_head) seeded for reproducibility;
* :func:`tiny_tokenizer`: a whitespace ``WordLevel`` tokenizer over ``<pad> <eos> <mask> t3 .. t63`` with pad, EOS
  and mask special tokens (:data:`PAD`, :data:`EOS`, :data:`MASK`);
* :func:`bpe_tokenizer`: a byte-level BPE trained on given texts, for models saved with ``save_pretrained``;
* :func:`tiny_examples` / :func:`tiny_dataset`: tokenized ``prompt + answer + EOS`` examples whose answer is a
  deterministic function of the prompt (:func:`answer_for`), so that training losses can fall.
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

VOCAB = 64
PAD, EOS, MASK = 0, 1, 2
FIRST_WORD = 3  # ids FIRST_WORD..VOCAB-1 are ordinary words "t3".."t63"
IGNORE_INDEX = -100


def tiny_config(*, hidden: int = 32, layers: int = 1, vocab: int = VOCAB, max_positions: int = 512,
                init_std: float = 0.02):
    """``init_std``: the weights' initialisation spread (larger: peakier, more context-dependent predictions)."""
    from transformers import Qwen2Config

    config = Qwen2Config(initializer_range=init_std, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions, use_cache=False, tie_word_embeddings=False,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    config._attn_implementation = "sdpa"
    return config


def tiny_model(seed: int = 0, *, hidden: int = 32, layers: int = 1, **kwargs):
    """A float32 ``Qwen2ForCausalLM`` (in train mode) with weights drawn from ``seed``; ``kwargs``: see
    :func:`tiny_config`."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_config(hidden=hidden, layers=layers, **kwargs)).float()


def tiny_teacher(seed: int = 1):
    """A (randomly initialised) teacher: wider and deeper than the default student, same vocabulary."""
    return tiny_model(seed, hidden=48, layers=2)


def tiny_tokenizer():
    """The whitespace tokenizer over ``<pad> <eos> <mask> t3 .. t63`` (unknown words become ``<mask>``), for
    in-memory use.  Not for ``save_pretrained`` next to a Qwen2 model: ``AutoTokenizer`` would then rebuild it as a
    byte-level BPE ``Qwen2Tokenizer`` from the vocabulary alone (see :func:`bpe_tokenizer`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<mask>": MASK}
    vocab.update({f"t{i}": i for i in range(FIRST_WORD, VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<mask>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   mask_token="<mask>")


def bpe_tokenizer(texts, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on ``texts`` (any text encodes, unseen words as bytes), with the
    specials ``<pad>`` (0), ``<eos>`` (1), ``<mask>`` (2).  Saved next to a tiny Qwen2 model it loads back through
    ``AutoTokenizer`` as an equivalent ``Qwen2Tokenizer``, as ``kid train`` loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<mask>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   mask_token="<mask>")


def answer_for(prompt: list[int], length: int) -> list[int]:
    """The answer (without EOS) to ``prompt``: a fixed map of its tokens, cycled to ``length`` tokens."""
    words = VOCAB - FIRST_WORD
    return [(prompt[i % len(prompt)] * 7 + 3) % words + FIRST_WORD for i in range(length)]


def tiny_examples(n: int = 16, *, seed: int = 0, prompt_len=(4, 9), answer_len=(2, 6), eos: bool = True
                  ) -> list[dict[str, list[int]]]:
    """``n`` features ``{"input_ids", "labels", "attention_mask"}`` (lists of ints) of varied lengths; prompt and
    answer lengths are drawn from ``range(*prompt_len)`` / ``range(*answer_len)``; ``eos=False`` drops the EOS (a
    truncated target)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        p = int(torch.randint(*prompt_len, (1,), generator=g))
        a = int(torch.randint(*answer_len, (1,), generator=g))
        prompt = torch.randint(FIRST_WORD, VOCAB, (p,), generator=g).tolist()
        answer = answer_for(prompt, a) + ([EOS] if eos else [])
        rows.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer,
                     "attention_mask": [1] * (len(prompt) + len(answer))})
    return rows


def tiny_dataset(n: int = 16, **kwargs):
    from datasets import Dataset

    return Dataset.from_list(tiny_examples(n, **kwargs))


def train_config(output_dir, **overrides):
    """A :class:`kid.training.TrainConfig` for a few fast CPU steps (no LoRA, no progress bars, no warmup)."""
    from kid.training import TrainConfig

    values = dict(output_dir=str(output_dir), batch_size=4, micro_batch_size=2, max_steps=6, learning_rate=3e-3,
                  warmup_ratio=0.0, lr_scheduler="constant", logging_steps=1, save_steps=1000, progress=False,
                  lora=False, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def step_logs(report) -> list[dict]:
    """The per-step log lines (those with a ``loss``) of a run report."""
    return [h for h in report["log_history"] if "loss" in h]


def rel_err(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom > 0 else (a - b).norm().item()


def all_finite(values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def end_worker() -> None:
    """The end of a torchrun worker that succeeded: tear the process group down (``kid.training.close_distributed``),
    flush, and leave without the interpreter's teardown.  On CPU/gloo that teardown can still abort a finished
    worker ("terminate called without an active exception": gloo threads held by objects that outlive the group,
    such as FSDP's device mesh, are destroyed by static destructors; seen under load in the FSDP test).  What the
    worker had to say is already written to its result files and streams, so skipping the teardown loses
    nothing."""
    from kid.training import close_distributed

    close_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_two_processes(worker_source: str, work_dir: Path, *args: str, timeout: float = 300
                         ) -> subprocess.CompletedProcess:
    """Write ``worker_source`` to ``work_dir/worker.py`` and run it with torchrun on two local processes (CPU: the
    worker picks gloo; kidkernels' torch backend, one thread each), with ``work_dir`` and then ``args`` as its
    arguments.  Fails the test with the output's tail unless both processes exit with 0."""
    worker = Path(work_dir) / "worker.py"
    worker.write_text(worker_source)
    env = dict(os.environ, KIDKERNELS_BACKEND="torch", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    env.pop("TRITON_INTERPRET", None)
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), str(worker), str(work_dir), *args]
    proc = subprocess.run(cmd, cwd=work_dir, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc
