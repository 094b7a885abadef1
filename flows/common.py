"""Glue shared by the flows: the retry policy as Prefect task options, artifacts, run date.

Kept small: anything that is not about Prefect lives in lib/.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pandas as pd
from prefect import Task
from prefect.artifacts import create_table_artifact
from prefect.context import FlowRunContext
from prefect.runtime import flow_run

from lib import retry
from lib.stats import to_artifact_rows


def _retry_condition(task: Task, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we only classify the exception
        return retry.is_transient(exc)
    return False


def retry_options() -> dict[str, Any]:
    """Task options for the shared policy; read at import, so set RETRY_* before starting a worker."""
    p = retry.policy()
    return {
        "retries": p.attempts,
        "retry_delay_seconds": p.delays or 0,
        "retry_jitter_factor": p.jitter_factor if p.delays else None,
        "retry_condition_fn": _retry_condition,
    }


def scheduled_start() -> dt.datetime:
    """The run's scheduled start in UTC (now for an ad-hoc run or outside a flow)."""
    start = flow_run.get_scheduled_start_time() if FlowRunContext.get() else None
    return (start or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)


def scheduled_date(default: dt.date | None = None) -> dt.date:
    """``default`` if given, else the date of the run's scheduled start in UTC."""
    return default if default is not None else scheduled_start().date()


def publish_table(key: str, frame: pd.DataFrame, description: str) -> None:
    """Publish a summary DataFrame as a table artifact under a stable kebab-case key."""
    if FlowRunContext.get() is None:
        return
    create_table_artifact(key=key, table=to_artifact_rows(frame), description=description)
