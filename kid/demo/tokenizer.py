"""A small byte-level BPE tokenizer trained in well under a second on the demo's texts.

* Pre-tokenization (a regex, then GPT-2's byte-to-unicode mapping): identifiers with their
  leading space (`` singer_id``, `` T1``: underscores and digits stay inside the word, so a
  column name that occurs often becomes one token), single digits (numbers are spelled digit
  by digit, as in Qwen2), runs of punctuation, whitespace. Merges never cross these pieces.
* Byte level: every string is encoded without an unknown token and decodes back exactly, so
  generated SQL decodes to executable text.
* Special tokens, in this order (ids 0, 1, 2): ``<|endoftext|>`` (EOS), ``<|pad|>`` (padding,
  left side for generation) and ``<|mask|>`` (``tokenizer.mask_token``, the token KID puts in
  the masked positions). No BOS is added, as in Qwen2.
* Deterministic: the same texts give the same vocabulary and merges, in any process (the
  tests check it across processes).
"""

from __future__ import annotations

from typing import Iterable

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, MASK_TOKEN)
DEFAULT_VOCAB_SIZE = 1024

# Identifiers (letters, digits, underscores; not starting with a digit), single digits,
# punctuation runs, each with at most one leading space; then whitespace as in GPT-2.
PRETOKENIZE_PATTERN = r" ?[\p{L}_][\p{L}\p{N}_]*| ?\p{N}| ?[^\s\p{L}\p{N}_]+|\s+(?!\S)|\s+"


def _backend(vocab_size: int, texts: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def train_demo_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train the demo tokenizer on ``texts`` (e.g. the training prompts and SQL targets).

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``eos_token`` ``<|endoftext|>``,
    ``pad_token`` ``<|pad|>``, ``mask_token`` ``<|mask|>`` and left padding. ``vocab_size``
    is an upper bound (at least 256 bytes + 3 special tokens): training stops early when no
    pair occurs twice. Use ``len(tokenizer)`` for the model's embedding size.
    """
    from transformers import PreTrainedTokenizerFast

    texts = [str(t) for t in texts]
    if not texts:
        raise ValueError("train_demo_tokenizer needs at least one text")
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (the 256 bytes and the special tokens)")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_backend(vocab_size, texts),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        mask_token=MASK_TOKEN,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
    return tokenizer
