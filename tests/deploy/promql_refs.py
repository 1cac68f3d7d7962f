"""What a PromQL expression refers to: series names and label matchers.

Enough of PromQL's lexical structure for the expressions in deploy/ (alert rules, dashboard,
prometheus-adapter rule): strings, label matchers, ranges and grouping clauses are cut out, and
the identifiers left that are not function calls or keywords are series names. promtool checks
the syntax itself; this only answers "which metrics, which label values".
"""

from __future__ import annotations

import re

_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "atan2",
    "inf",
    "nan",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# An identifier not glued to a word, number, `.`, `:` or `$` before it; a `(` after it: a call.
_IDENT = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_ALTERNATION = re.compile(r"[A-Za-z0-9_]+(?:\|[A-Za-z0-9_]+)*")


def series_names(expr: str) -> set[str]:
    """Return the series (metric) names that `expr` selects.

    Raises:
        ValueError: `expr` selects series by a `__name__` matcher, which this cannot follow.
    """
    if "__name__" in expr:
        raise ValueError(f"__name__ matchers are not followed: {expr}")
    text = _STRING.sub('""', expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {
        m.group(1) for m in _IDENT.finditer(text) if not m.group(2) and m.group(1) not in _KEYWORDS
    }


def label_matchers(expr: str) -> list[tuple[str, str, str]]:
    """Return every label matcher in `expr` as (label, operator, value)."""
    found = []
    for block in _BRACES.findall(expr):
        found.extend(_MATCHER.findall(block))
    return found


def matched_values(operator: str, value: str) -> set[str] | None:
    """Return the literal label values a matcher names, or None if it is a real regex.

    `=` and `!=` name their value; `=~` and `!~` name the words of a plain alternation such as
    "OK|INTERNAL". Values holding a dashboard variable (`$x`) are None.
    """
    if "$" in value:
        return None
    if operator in ("=", "!="):
        return {value}
    if _ALTERNATION.fullmatch(value):
        return set(value.split("|"))
    return None
