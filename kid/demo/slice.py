"""The demo's slice of Spider, shipped with the package (``kid/demo_data/spider_slice``).

Six small Spider training databases with their easy and medium questions, split in-domain
into ``train.json`` and ``heldout.json`` (no question or gold query in both); how it was made
and the CC BY-SA 4.0 attribution: ``kid/demo_data/README.md`` (:func:`demo_data_dir`).
The slice is rebuilt by ``tools/make_demo_slice.py``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import NamedTuple

SLICE_NAME = "spider_slice"


class DemoSlicePaths(NamedTuple):
    """Files of the slice, in the standard Spider layout."""

    train_file: Path
    heldout_file: Path
    tables_file: Path
    db_dir: Path  # <db_dir>/<db_id>/<db_id>.sqlite, e.g. for kid.evaluation.evaluate_predictions


def demo_data_dir() -> Path:
    """``kid/demo_data`` of the installed package (a real directory: SQLite needs files)."""
    location = resources.files("kid").joinpath("demo_data")
    path = Path(str(location))
    if not isinstance(location, Path) and not path.is_dir():
        raise FileNotFoundError(f"kid/demo_data is not a directory on disk ({location!r}); install kid unzipped")
    if not (path / SLICE_NAME).is_dir():
        raise FileNotFoundError(f"demo data not found at {path / SLICE_NAME} (run tools/make_demo_slice.py)")
    return path


def demo_slice_paths() -> DemoSlicePaths:
    """Where the slice's files are."""
    root = demo_data_dir() / SLICE_NAME
    return DemoSlicePaths(root / "train.json", root / "heldout.json", root / "tables.json", root / "database")


def demo_db_ids() -> list[str]:
    """The slice's databases, sorted."""
    return sorted(p.name for p in demo_slice_paths().db_dir.iterdir() if p.is_dir())


def load_demo_splits(*, use_matched_contents: bool = True, build_prompts: bool = True):
    """The slice as ``(train, heldout)`` ``datasets.Dataset``s from :func:`kid.data.load_spider`.

    Rows have the loader's fields (``source`` "spider", ``db_id``, ``db_path`` (absolute, in
    the package), ``question``, ``evidence`` "", ``query`` (gold, for scoring), ``target``
    (normalised SQL, for training), ``hardness``, ``difficulty`` "", ``prompt``,
    ``prompt_question``). ``use_matched_contents=False`` builds the prompts with
    ``matched contents : None`` (a few tokens shorter, no value hints).
    """
    paths = demo_slice_paths()
    splits = []
    for data_file in (paths.train_file, paths.heldout_file):
        ds = _load(data_file, paths, build_prompts)
        if build_prompts and not use_matched_contents:
            ds = _without_matched_contents(ds, paths.tables_file)
        splits.append(ds)
    return splits[0], splits[1]


def _load(data_file: Path, paths: DemoSlicePaths, build_prompts: bool):
    from ..data import load_spider

    return load_spider(data_file, paths.db_dir, paths.tables_file, build_prompts=build_prompts)


def _without_matched_contents(ds, tables_file: Path):
    from datasets import Dataset

    from ..data import load_tables_json, read_schema
    from ..prompts import build_prompt

    tables = load_tables_json(tables_file)
    rows = ds.to_list()
    for row in rows:
        schema = read_schema(row["db_path"], tables.get(row["db_id"]), db_id=row["db_id"])
        row["prompt"] = build_prompt(row, schema, {}, use_evidence=False)
    return Dataset.from_list(rows) if rows else ds
