"""Spider hardness levels (easy / medium / hard / extra).

The official Spider evaluator classifies a gold query from three counts over its parsed
form (``evaluation.py``, ``Evaluator.eval_hardness``):

* component 1: WHERE, GROUP BY, ORDER BY, LIMIT present (one each), joins (tables in FROM
  minus one), ORs and LIKEs among the conditions of FROM/WHERE/HAVING;
* component 2: nested queries in those conditions, plus one for INTERSECT/UNION/EXCEPT;
* others: one each for more than one aggregate, more than one SELECT column, more than
  one WHERE condition, more than one GROUP BY column.

Two implementations of the same rule:

* :func:`hardness_from_spider_json` reads the parsed ``sql`` dict shipped in Spider's
  json files and reproduces the official counts exactly, quirks included (the official
  "aggregate" count of WHERE/HAVING conditions actually counts negated conditions and,
  in HAVING, the AND/OR connectors).
* :func:`spider_hardness` computes the counts from the SQL text with sqlglot (we do not
  port the official parser). It follows the same rules and quirks on sqlglot's tree; it
  agrees with the official labels on the large majority of Spider-dev (a test measures
  the agreement). Queries sqlglot cannot parse are labelled ``"extra"``.
"""

from __future__ import annotations

from typing import Any

import sqlglot
from sqlglot import exp

HARDNESS_LEVELS = ("easy", "medium", "hard", "extra")


def classify_hardness(comp1: int, comp2: int, others: int) -> str:
    """The official decision rule from the three counts."""
    if comp1 <= 1 and others == 0 and comp2 == 0:
        return "easy"
    if (others <= 2 and comp1 <= 1 and comp2 == 0) or (comp1 <= 2 and others < 2 and comp2 == 0):
        return "medium"
    if (
        (others > 2 and comp1 <= 2 and comp2 == 0)
        or (2 < comp1 <= 3 and others <= 2 and comp2 == 0)
        or (comp1 <= 1 and others == 0 and comp2 <= 1)
    ):
        return "hard"
    return "extra"


# ---------------------------------------------------------------- official parsed form
_LIKE_OP = 9  # index of "like" in the official WHERE_OPS


def _official_counts(sql: dict[str, Any]) -> tuple[int, int, int]:
    conds = sql["from"]["conds"][::2] + sql["where"][::2] + sql["having"][::2]
    connectors = sql["from"]["conds"][1::2] + sql["where"][1::2] + sql["having"][1::2]

    comp1 = sum(1 for key in ("where", "groupBy", "orderBy") if len(sql[key]) > 0)
    comp1 += sql["limit"] is not None
    if sql["from"]["table_units"]:
        comp1 += len(sql["from"]["table_units"]) - 1
    comp1 += sum(1 for c in connectors if c == "or")
    comp1 += sum(1 for c in conds if c[1] == _LIKE_OP)

    comp2 = sum(isinstance(c[3], dict) for c in conds) + sum(isinstance(c[4], dict) for c in conds)
    comp2 += sum(sql[k] is not None for k in ("intersect", "union", "except"))

    def n_agg(units) -> int:
        # official has_agg: first element differs from the "none" aggregate (0); on
        # condition units that element is the NOT flag, on "and"/"or" it is a letter.
        return sum(1 for u in units if u[0] != 0)

    agg = n_agg(sql["select"][1]) + n_agg(sql["where"][::2]) + n_agg(sql["groupBy"])
    if sql["orderBy"]:
        units = sql["orderBy"][1]
        agg += n_agg([u[1] for u in units if u[1]] + [u[2] for u in units if u[2]])
    agg += n_agg(sql["having"])
    others = int(agg > 1) + int(len(sql["select"][1]) > 1) + int(len(sql["where"]) > 1) + int(len(sql["groupBy"]) > 1)
    return comp1, comp2, others


def hardness_from_spider_json(sql: dict[str, Any]) -> str:
    """Official hardness from the parsed ``sql`` field of a Spider json example."""
    return classify_hardness(*_official_counts(sql))


# ---------------------------------------------------------------- from SQL text
def _walk_same_query(node: exp.Expression):
    """Yield ``node`` and descendants, not entering nested queries."""
    stack = [node]
    while stack:
        cur = stack.pop()
        yield cur
        for child in cur.iter_expressions():
            if isinstance(child, (exp.Subquery, exp.Query)):
                continue
            stack.append(child)


def _split_conditions(node: exp.Expression | None) -> tuple[list[exp.Expression], list[str]]:
    """Flatten an AND/OR tree (through parentheses) into leaf conditions and connectors."""
    if node is None:
        return [], []
    if isinstance(node, (exp.Where, exp.Having)):
        node = node.this
    if isinstance(node, exp.Paren) and not isinstance(node.this, exp.Query):
        return _split_conditions(node.this)
    if isinstance(node, (exp.And, exp.Or)):
        left, lc = _split_conditions(node.this)
        right, rc = _split_conditions(node.expression)
        return left + right, lc + ["and" if isinstance(node, exp.And) else "or"] + rc
    return [node], []


def _is_negated(cond: exp.Expression) -> bool:
    return isinstance(cond, exp.Not) or bool(cond.args.get("negate"))


def _has_agg(node: exp.Expression) -> bool:
    return any(isinstance(n, exp.AggFunc) for n in _walk_same_query(node))


def _nested_queries(cond: exp.Expression) -> int:
    """Nested queries directly inside one condition (not inside another nested query)."""
    count = 0
    stack = [cond]
    while stack:
        cur = stack.pop()
        for child in cur.iter_expressions():
            if isinstance(child, (exp.Subquery, exp.Query)):
                count += 1
            else:
                stack.append(child)
    return count


def _text_counts(tree: exp.Expression) -> tuple[int, int, int]:
    comp2 = 0
    while isinstance(tree, (exp.Subquery, exp.Paren)) and isinstance(tree.this, (exp.Query, exp.Subquery)):
        tree = tree.this
    # "A UNION B ..." : the official parser reads A as the query and the rest as nested.
    if isinstance(tree, exp.SetOperation):
        comp2 += 1
        while isinstance(tree, exp.SetOperation):
            tree = tree.this
        while isinstance(tree, exp.Subquery):
            tree = tree.this
    if not isinstance(tree, exp.Select):
        return 99, 99, 99

    where, where_conn = _split_conditions(tree.args.get("where"))
    having, having_conn = _split_conditions(tree.args.get("having"))
    join_conds: list[exp.Expression] = []
    join_conn: list[str] = []
    for join in tree.args.get("joins") or []:
        c, cc = _split_conditions(join.args.get("on"))
        if join_conds and c:
            join_conn.append("and")
        join_conds += c
        join_conn += cc
    conds = join_conds + where + having
    group = list((tree.args.get("group") or exp.Group()).expressions)
    order = list((tree.args.get("order") or exp.Order()).expressions)

    comp1 = sum(bool(tree.args.get(k)) for k in ("where", "group", "order", "limit"))
    comp1 += len(tree.args.get("joins") or [])
    comp1 += sum(c == "or" for c in join_conn + where_conn + having_conn)
    comp1 += sum(isinstance(c.unnest() if isinstance(c, exp.Not) else c, exp.Like) for c in conds)

    comp2 += sum(_nested_queries(c) for c in conds)

    agg = sum(_has_agg(e) for e in tree.expressions)
    agg += sum(_is_negated(c) for c in where)  # official quirk: NOT flags count here
    agg += sum(_has_agg(g) for g in group)
    agg += sum(_has_agg(o) for o in order)
    agg += len(having_conn) + sum(_is_negated(c) for c in having)  # quirk: connectors count
    others = int(agg > 1) + int(len(tree.expressions) > 1) + int(len(where) > 1) + int(len(group) > 1)
    return comp1, comp2, others


def spider_hardness(sql: str) -> str:
    """Spider hardness of a SQL query, computed with sqlglot (see the module docstring)."""
    from .compare import repair_spacing

    try:
        tree = sqlglot.parse_one(repair_spacing(sql), read="sqlite")
    except Exception:
        return "extra"
    if tree is None:
        return "extra"
    return classify_hardness(*_text_counts(tree))
