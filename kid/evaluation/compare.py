"""Result comparison with the official semantics of the Spider and BIRD evaluators.

Spider (test-suite evaluator, Zhong et al. 2020): two results are equal when their row
*multisets* are equal under some permutation of the columns; row order counts only when
the gold query has ``ORDER BY``. Before execution ``DISTINCT`` is removed from both
queries by default (:func:`remove_distinct`), and a few tokenization artefacts of the
Spider files (``> =``) are repaired (:func:`repair_spacing`).

BIRD (Li et al. 2023): the *sets* of result rows are equal (column order counts,
duplicates and row order do not).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

Row = tuple

# One SQL token: a quoted literal or identifier (kept verbatim), a word, or any other
# single character. Used to edit SQL without touching text inside quotes.
_TOKEN = re.compile(
    r"""'(?:[^']|'')*'?|"(?:[^"]|"")*"?|`[^`]*`?|\[[^\]]*\]?|[A-Za-z_][A-Za-z0-9_$]*|\s+|.""",
    re.DOTALL,
)


def sql_tokens(sql: str) -> list[str]:
    """Split SQL into tokens whose concatenation is the input (quotes kept intact)."""
    return _TOKEN.findall(sql)


def remove_distinct(sql: str) -> str:
    """Drop every ``DISTINCT`` keyword outside quotes, as the official evaluator does.

    This includes ``COUNT(DISTINCT x)``, which becomes ``COUNT( x)``: the official rule,
    kept for comparable numbers.
    """
    return "".join(tok for tok in sql_tokens(sql) if tok.lower() != "distinct")


def repair_spacing(sql: str) -> str:
    """Join comparison operators split by Spider's tokenizer (``> =`` -> ``>=``)."""
    return re.sub(r"([<>!])\s+=", r"\1=", sql)


def has_order_by(sql: str) -> bool:
    """Whether the (gold) query has ORDER BY outside quotes: then row order counts."""
    words = [t.lower() for t in sql_tokens(sql) if not t.isspace()]
    return any(a == "order" and b == "by" for a, b in zip(words, words[1:]))


def _multiset_equal(a: Sequence[Row], b: Sequence[Row]) -> bool:
    return len(a) == len(b) and Counter(a) == Counter(b)


def spider_results_equal(gold: Sequence[Row], pred: Sequence[Row], order_matters: bool) -> bool:
    """Official Spider execution match between two results.

    True when some permutation of ``pred``'s columns makes its rows equal to ``gold``'s
    as multisets (as lists when ``order_matters``). Two empty results are equal.
    """
    if len(gold) == 0 and len(pred) == 0:
        return True
    if len(gold) != len(pred):
        return False
    n_cols = len(gold[0])
    if any(len(r) != n_cols for r in gold) or any(len(r) != n_cols for r in pred):
        return False
    gold = [tuple(r) for r in gold]
    pred = [tuple(r) for r in pred]
    # A valid permutation maps each gold column to a pred column with the same value
    # multiset; use that to prune the search (exact, unlike sampling).
    gold_cols = [Counter(r[i] for r in gold) for i in range(n_cols)]
    pred_cols = [Counter(r[j] for r in pred) for j in range(n_cols)]
    candidates = [[j for j in range(n_cols) if pred_cols[j] == gold_cols[i]] for i in range(n_cols)]
    if any(not c for c in candidates):
        return False
    gold_counter = None if order_matters else Counter(gold)

    def matches(perm: list[int]) -> bool:
        permuted = [tuple(r[j] for j in perm) for r in pred]
        if order_matters:
            return permuted == gold
        return Counter(permuted) == gold_counter

    # Depth-first over injective assignments, most constrained column first.
    order = sorted(range(n_cols), key=lambda i: len(candidates[i]))
    perm = [-1] * n_cols
    used: set[int] = set()

    def search(k: int) -> bool:
        if k == n_cols:
            return matches(perm)
        i = order[k]
        for j in candidates[i]:
            if j not in used:
                used.add(j)
                perm[i] = j
                if search(k + 1):
                    return True
                used.discard(j)
        return False

    return search(0)


def bird_results_equal(gold: Sequence[Row], pred: Sequence[Row]) -> bool:
    """Official BIRD execution match: the sets of rows are equal."""
    return set(map(tuple, gold)) == set(map(tuple, pred))
