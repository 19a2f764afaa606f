"""Normalisation of SQL training targets (the CodeS-style target), built on sqlglot.

:func:`normalize_sql` rewrites a query so that equivalent queries look alike to the
student model:

* keywords and function names upper case, single spaces, no trailing semicolon
  (sqlglot's SQLite generator);
* ``T1``-style table aliases removed: ``SELECT T1.name FROM singer AS T1`` becomes
  ``SELECT singer.name FROM singer``. An alias is kept when removing it could change the
  meaning: the same table twice in one FROM (self-joins), an alias that a nested query
  refers to (correlated subqueries), or a table name already used as a qualifier in the
  query's scope. Aliases of derived tables and CTEs are kept;
* ``x IS NOT NULL``, ``x NOT IN (...)`` and ``!=`` are written the usual way (sqlglot
  would print ``NOT x IS NULL`` and ``<>``), and a join without a condition stays
  without one (sqlglot adds ``ON TRUE``).

Unlike CodeS we do not lower-case identifiers or turn double-quoted strings into single
quotes: in SQLite ``"x"`` is an identifier when a column ``x`` exists, so either change
could alter the result.

The rewrite never changes the result: a test executes the original and the normalised
query of every Spider dev and training example that has its database and compares. SQL
that sqlglot cannot parse is returned with whitespace collapsed.
"""

from __future__ import annotations

import re

import sqlglot
from sqlglot import exp
from sqlglot.dialects.sqlite import SQLite
from sqlglot.optimizer.scope import Scope, traverse_scope


class _TargetSQLite(SQLite):
    """SQLite dialect whose generator writes negations and ``!=`` the conventional way."""

    class Generator(SQLite.Generator):
        def not_sql(self, expression: exp.Not) -> str:
            inner = expression.this
            if isinstance(inner, exp.Is):
                return f"{self.sql(inner, 'this')} IS NOT {self.sql(inner, 'expression')}"
            if isinstance(inner, exp.In):
                left = self.sql(inner, "this")
                full = self.in_sql(inner)
                if full.startswith(left + " IN "):
                    return f"{left} NOT IN {full[len(left) + 4 :]}"
            return super().not_sql(expression)

        def join_sql(self, expression: exp.Join, join_op: str | None = None) -> str:
            # sqlglot's SQLite parser adds "ON TRUE" to a JOIN without a condition; write
            # it back as the plain JOIN (same meaning in SQLite).
            on = expression.args.get("on")
            plain = not (expression.side or expression.kind or expression.method or expression.args.get("using"))
            if plain and join_op is None and isinstance(on, exp.Boolean) and on.this is True:
                return f"{self.seg('JOIN')} {self.sql(expression, 'this')}"
            return super().join_sql(expression, join_op)

        def neq_sql(self, expression: exp.NEQ) -> str:
            return self.binary(expression, "!=")


def _repair_spacing(sql: str) -> str:
    # Spider's tokenized queries sometimes split comparison operators ("> =").
    return re.sub(r"([<>!])\s+=", r"\1=", sql)


def _lower(name: str | None) -> str:
    return (name or "").lower()


def _scope_columns(scope: Scope) -> list[exp.Column]:
    """Columns written in this scope's own SELECT (not inside nested queries)."""
    out = []
    stack: list[exp.Expression] = [scope.expression]
    while stack:
        node = stack.pop()
        for child in node.iter_expressions():
            if isinstance(child, (exp.Subquery, exp.Query)) or (
                isinstance(child, exp.CTE) or isinstance(child, exp.With)
            ):
                continue
            if isinstance(child, exp.Column):
                out.append(child)
            stack.append(child)
    return out


def remove_table_aliases(tree: exp.Expression) -> exp.Expression:
    """Remove table aliases from a parsed query where that is safe (see module docstring).

    Decisions are made on the unmodified tree first (sqlglot caches scope information),
    then applied.
    """
    edits: list[tuple[exp.Table, list[exp.Column]]] = []
    for scope in traverse_scope(tree):
        select = scope.expression
        if not isinstance(select, exp.Select):
            continue
        # Tables written directly in this SELECT's FROM / JOINs.
        tables: list[exp.Table] = []
        from_ = select.args.get("from") or select.args.get("from_")
        for part in [from_, *(select.args.get("joins") or [])]:
            if part is not None and isinstance(part.this, exp.Table):
                tables.append(part.this)
        if not tables:
            continue
        names_here = [_lower(t.name) for t in tables]
        aliases_here = [_lower(t.alias) for t in tables if t.alias]
        own_columns = _scope_columns(scope)
        own_qualifiers = {_lower(c.table) for c in own_columns if c.table}
        inner_external = {
            _lower(c.table) for s in scope.traverse() if s is not scope for c in s.external_columns if c.table
        }
        cte_names = {_lower(s.expression.parent.alias) for s in scope.cte_scopes if s.expression.parent is not None}
        for table in tables:
            alias = _lower(table.alias)
            name = _lower(table.name)
            if not alias or table.args.get("db") or name in cte_names:
                continue
            if alias != name and (
                names_here.count(name) > 1  # self-join: the alias is what tells them apart
                or name in aliases_here  # another table is aliased to this name
                or alias in inner_external  # a nested query refers to the alias
                or name in inner_external  # a nested query refers to an outer table of that name
                or name in own_qualifiers  # the bare name already qualifies something here
            ):
                continue
            edits.append((table, [c for c in own_columns if _lower(c.table) == alias]))
    for table, columns in edits:
        for column in columns:
            column.set("table", table.this.copy())
        table.set("alias", None)
    return tree


def normalize_sql(sql: str, *, remove_aliases: bool = True) -> str:
    """Normalised form of a SQLite query (see the module docstring)."""
    text = _repair_spacing(sql.strip()).rstrip(";").strip()
    try:
        trees = sqlglot.parse(text, read="sqlite")
    except Exception:
        return " ".join(text.split())
    if len(trees) != 1 or trees[0] is None:
        return " ".join(text.split())
    tree = trees[0]
    if remove_aliases:
        try:
            tree = remove_table_aliases(tree.copy())
        except Exception:  # an unusual shape the scope analysis cannot handle: keep aliases
            tree = trees[0]
    try:
        return tree.sql(dialect=_TargetSQLite)
    except Exception:
        return " ".join(text.split())
