"""Where the tests find Spider data.

* The full Spider data: ``KID_SPIDER_DIR``, else ``../shared/data/spider`` beside the repository (``dev.json``,
  ``train_spider.json``, ``tables.json``, ``database/``).
* Without it (a fresh clone), the slice of Spider shipped in ``kid/demo_data`` (six Spider databases and their easy
  and medium questions): :data:`SPIDER` then points at the slice, so every test that needs *some* Spider data runs.
  Only the tests that need the full sets (the official hardness counts, whole-dev and whole-train checks) are
  marked :data:`needs_full_spider` and skip, saying what to set.

:data:`SAMPLE_DB` is a database in both (race_track, one of the slice's: the same file as Spider's), for tests that
query a known schema; :data:`MISSING_DB` is a db_id whose database is in neither (Spider's release lacks wta_1).
The data is read-only for the tests: anything that could write copies a database to ``tmp_path`` first.
"""
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FULL_SPIDER_DIR = Path(os.environ.get("KID_SPIDER_DIR", REPO.parent / "shared" / "data" / "spider"))
SLICE_DIR = REPO / "kid" / "demo_data" / "spider_slice"
HAVE_FULL_SPIDER = (FULL_SPIDER_DIR / "dev.json").is_file() and (FULL_SPIDER_DIR / "database").is_dir()


@dataclass(frozen=True)
class SpiderFiles:
    """Spider-format files: an evaluation split, a training split, tables.json and the databases."""

    dev_file: Path
    train_file: Path
    tables_file: Path
    db_dir: Path
    full: bool

    @property
    def name(self) -> str:
        return "Spider" if self.full else "the shipped Spider slice"


if HAVE_FULL_SPIDER:
    SPIDER = SpiderFiles(FULL_SPIDER_DIR / "dev.json", FULL_SPIDER_DIR / "train_spider.json",
                         FULL_SPIDER_DIR / "tables.json", FULL_SPIDER_DIR / "database", full=True)
else:
    SPIDER = SpiderFiles(SLICE_DIR / "heldout.json", SLICE_DIR / "train.json", SLICE_DIR / "tables.json",
                         SLICE_DIR / "database", full=False)

SAMPLE_DB = "race_track"
SECOND_DB = "manufactory_1"
MISSING_DB = "wta_1"

needs_full_spider = pytest.mark.skipif(
    not HAVE_FULL_SPIDER,
    reason=f"needs the full Spider data (not found at {FULL_SPIDER_DIR}): set KID_SPIDER_DIR to a directory with "
           "Spider's dev.json, train_spider.json, tables.json and database/",
)

# The names of the first version of this module (the full data only), for tests written against them.
SPIDER_DIR = FULL_SPIDER_DIR
DB_DIR = FULL_SPIDER_DIR / "database"
needs_spider = needs_full_spider


def sample_db_path() -> Path:
    return SPIDER.db_dir / SAMPLE_DB / f"{SAMPLE_DB}.sqlite"
