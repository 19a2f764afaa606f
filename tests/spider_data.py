"""Where the tests find the shared Spider data: ``KID_SPIDER_DIR``, else ``../shared/data/spider`` beside the repo.

The data is read-only for the tests: anything that could write copies a database to ``tmp_path`` first.
"""
import os
from pathlib import Path

import pytest

SPIDER_DIR = Path(
    os.environ.get("KID_SPIDER_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spider")
)
DB_DIR = SPIDER_DIR / "database"
needs_spider = pytest.mark.skipif(
    not (SPIDER_DIR / "dev.json").is_file(), reason=f"Spider data not found at {SPIDER_DIR} (set KID_SPIDER_DIR)"
)
