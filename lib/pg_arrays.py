"""PostgreSQL array literals (``{1,2,3}``) passed as one text parameter, for set-based statements."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable


def pg_array(values: Iterable[int | dt.date]) -> str:
    """A PostgreSQL array literal (``{1,2,3}``) of ints or dates, passed as one text parameter.

    psycopg2 sends a Python list as ARRAY[...] with one literal per element: for the
    thousand-row arrays of a batch that costs milliseconds per array to build and as much
    again for the server to parse, several times the work the statement then does.
    """
    return "{" + ",".join(map(str, values)) + "}"


def pg_text_array(values: Iterable[object]) -> str:
    """Like pg_array, for text or values that may be None (NULL): every element quoted."""
    parts = []
    for v in values:
        if v is None:
            parts.append("NULL")
            continue
        element = str(v)
        if '"' in element or "\\" in element:
            element = element.replace("\\", "\\\\").replace('"', '\\"')
        parts.append(f'"{element}"')
    return "{" + ",".join(parts) + "}"
