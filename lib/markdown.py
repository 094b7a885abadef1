"""Small markdown builders for run artifacts an operator reads at a glance (plain Python, no pandas).

A headline line, then one small table per dimension; numbers right-aligned, money as ₹
with Indian digit grouping. The notification path uses these without loading pandas.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from typing import Any


def cell(value: Any) -> str:
    """One table cell: dates ISO, floats trimmed, None/NaN as a dash, pipes escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], empty: str = "_none_") -> str:
    """A GitHub-flavoured markdown table of ``columns``; numeric columns right-aligned."""
    if not rows:
        return empty
    numeric = [
        all(isinstance(r.get(c), int | float) and not isinstance(r.get(c), bool) for r in rows if r.get(c) is not None)
        for c in columns
    ]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def section(title: str, body: str) -> str:
    return f"### {title}\n\n{body}"


def document(headline: str, *sections: str) -> str:
    """A headline paragraph followed by the sections, blank lines between."""
    return "\n\n".join([f"**{headline}**", *sections]) + "\n"
