"""pandas summaries of what a run did, and their conversion to artifact rows.

Pure functions: rows in, DataFrame out. Table artifacts go through plain JSON, so
``to_artifact_rows`` turns dates and timestamps into ISO strings and NaN into None.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import pandas as pd


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (pd.Timestamp, dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    return value


def to_artifact_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows of plain JSON values, column names as strings."""
    return [
        {str(k): _plain(v) for k, v in row.items()}
        for row in frame.reset_index(drop=frame.index.name is None).to_dict(orient="records")
    ]
