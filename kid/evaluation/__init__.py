"""Execution-accuracy evaluation of predicted SQL, safe against untrusted queries.

Main entry points (imported lazily so that worker processes start fast):

* :func:`evaluate_predictions` -> :class:`EvalReport` (``kid.evaluation.scoring``)
* :func:`read_gold_file`, :func:`write_gold_file`, :func:`read_prediction_file`, :func:`write_prediction_file`
  (one query per line, JSON-quoted where a plain line cannot hold it), :func:`missing_database_counts`
* :func:`spider_results_equal`, :func:`bird_results_equal`, :func:`remove_distinct`
  (``kid.evaluation.compare``)
* :func:`spider_hardness`, :func:`hardness_from_spider_json` (``kid.evaluation.hardness``)
* :func:`open_readonly`, :func:`run_query`, :func:`explain_ok` (``kid.evaluation.sqlite_safe``)
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate_predictions": "scoring",
    "EvalReport": "scoring",
    "ExampleResult": "scoring",
    "read_gold_file": "scoring",
    "read_prediction_file": "scoring",
    "write_prediction_file": "scoring",
    "write_gold_file": "scoring",
    "format_query_line": "scoring",
    "missing_database_counts": "scoring",
    "database_path": "scoring",
    "spider_results_equal": "compare",
    "bird_results_equal": "compare",
    "remove_distinct": "compare",
    "has_order_by": "compare",
    "spider_hardness": "hardness",
    "hardness_from_spider_json": "hardness",
    "HARDNESS_LEVELS": "hardness",
    "open_readonly": "sqlite_safe",
    "run_query": "sqlite_safe",
    "explain_ok": "sqlite_safe",
    "QueryResult": "sqlite_safe",
    "DEFAULT_TIMEOUT_S": "sqlite_safe",
    "DEFAULT_MAX_ROWS": "sqlite_safe",
    "run_tasks": "pool",
    "WorkerFailure": "pool",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
