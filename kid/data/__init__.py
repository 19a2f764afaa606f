"""Text-to-SQL data: loaders (``datasets.Dataset``), schemas read from SQLite, value matching.

* loaders: :func:`load_spider`, :func:`load_spider_dk`, :func:`load_spider_syn`,
  :func:`load_spider_realistic`, :func:`load_bird`, :func:`load_dataset_by_name`
* schema: :func:`read_schema` -> :class:`DatabaseSchema`, :func:`load_tables_json`
* matching: :func:`match_contents`
"""

from .loaders import (
    FIELDS,
    LOADERS,
    MissingDatabaseWarning,
    load_bird,
    load_dataset_by_name,
    load_spider,
    load_spider_dk,
    load_spider_realistic,
    load_spider_syn,
    read_json_examples,
)
from .matching import match_contents, value_index
from .schema import Column, DatabaseSchema, Table, load_tables_json, read_schema

__all__ = [
    "FIELDS",
    "LOADERS",
    "Column",
    "DatabaseSchema",
    "MissingDatabaseWarning",
    "Table",
    "load_bird",
    "load_dataset_by_name",
    "load_spider",
    "load_spider_dk",
    "load_spider_realistic",
    "load_spider_syn",
    "load_tables_json",
    "match_contents",
    "read_json_examples",
    "read_schema",
    "value_index",
]
