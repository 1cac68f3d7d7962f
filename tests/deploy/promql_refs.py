"""What a PromQL expression refers to: its series selectors, read from promql-parser's AST.

promtool checks the expressions as Prometheus would (tests/deploy/test_deploy_observability.py);
this answers "which metrics, which label values". Grafana's interval variables
(`[$__rate_interval]`) are not PromQL: the caller replaces them before parsing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import promql_parser

# Pairs, not a dict: promql-parser's MatchOp members compare equal but are not hashable.
_OPERATORS = [
    (promql_parser.MatchOp.Equal, "="),
    (promql_parser.MatchOp.NotEqual, "!="),
    (promql_parser.MatchOp.Re, "=~"),
    (promql_parser.MatchOp.NotRe, "!~"),
]


@dataclass(frozen=True, slots=True)
class LabelMatcher:
    label: str  # the label's name
    operator: str  # "=", "!=", "=~" or "!~", as written in PromQL
    value: str  # the value or regex, unquoted


@dataclass(frozen=True, slots=True)
class Selector:
    series: str  # the metric name it selects
    matchers: tuple[LabelMatcher, ...]  # its label matchers, the name excluded


def selectors(expr: str) -> list[Selector]:
    """Return every series selector in `expr`, those inside ranges, subqueries and calls too.

    Raises:
        ValueError: `expr` is not valid PromQL, or a selector names no series (a `__name__`
            regex, or labels only).
    """
    found: list[Selector] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(_selector(node, expr))

    try:
        tree = promql_parser.parse(expr)
    except ValueError as exc:
        raise ValueError(f"{exc}: {expr}") from exc
    promql_parser.walk(tree, visit)
    return found


def _selector(node: promql_parser.VectorSelector, expr: str) -> Selector:
    if node.matchers.or_matchers:
        raise ValueError(f"`or` inside a selector is not followed: {expr}")
    matchers = tuple(LabelMatcher(m.name, _operator(m.op), m.value) for m in node.matchers.matchers)
    if node.name is not None:
        return Selector(node.name, matchers)
    # `{__name__="x"}` is `x`; the parser refuses a second name, so at most one matcher is it.
    name = next((m for m in matchers if m.label == "__name__"), None)
    if name is None or name.operator != "=":
        raise ValueError(f"a selector names no single series: {expr}")
    return Selector(name.value, tuple(m for m in matchers if m is not name))


def _operator(op: promql_parser.MatchOp) -> str:
    return next(text for member, text in _OPERATORS if op == member)


def series_names(expr: str) -> set[str]:
    """Return the series (metric) names that `expr` selects."""
    return {s.series for s in selectors(expr)}


def label_matchers(expr: str) -> list[LabelMatcher]:
    """Return every label matcher in `expr`, in the order written."""
    return [m for s in selectors(expr) for m in s.matchers]


def matched_values(operator: str, value: str) -> set[str] | None:
    """Return the literal label values a matcher names, or None if it is a real regex.

    `=` and `!=` name their value; `=~` and `!~` name the alternatives of a regex made of
    literals only, such as "OK|INTERNAL" (Prometheus anchors the regex at both ends). Values
    holding a dashboard variable (`$x`) are None.
    """
    if "$" in value:
        return None
    if operator in ("=", "!="):
        return {value}
    alternatives = value.split("|")
    if all(part and re.escape(part) == part for part in alternatives):
        return set(alternatives)
    return None
