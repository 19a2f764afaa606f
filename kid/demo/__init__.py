"""The embedded demo's data and tokenizer: runs offline, in minutes, on a CPU.

* :mod:`kid.demo.slice` - the small slice of Spider shipped in ``kid/demo_data`` (six small
  training databases, easy and medium questions, an in-domain train / held-out split;
  CC BY-SA 4.0, see ``kid/demo_data/README.md``): :func:`load_demo_splits`,
  :func:`demo_data_dir`, :func:`demo_slice_paths`, :func:`demo_db_ids`.
* :mod:`kid.demo.tokenizer` - :func:`train_demo_tokenizer`, a byte-level BPE tokenizer
  trained in well under a second on the demo's texts, with ``<|endoftext|>`` (EOS),
  ``<|pad|>`` and ``<|mask|>`` (KID's mask token).

Nothing heavy is imported until a function is called.
"""

from .slice import DemoSlicePaths, demo_data_dir, demo_db_ids, demo_slice_paths, load_demo_splits
from .tokenizer import DEFAULT_VOCAB_SIZE, EOS_TOKEN, MASK_TOKEN, PAD_TOKEN, train_demo_tokenizer

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "DemoSlicePaths",
    "EOS_TOKEN",
    "MASK_TOKEN",
    "PAD_TOKEN",
    "demo_data_dir",
    "demo_db_ids",
    "demo_slice_paths",
    "load_demo_splits",
    "train_demo_tokenizer",
]
