"""Glue shared by the flows: one way to declare task and flow options, artifacts, the run date.

``task_options`` and ``flow_options`` are the only places retries, caching, result
persistence and timeouts are decided: every task and flow is declared with them. The
retry policy is read from the settings when a flow module is imported, so set RETRY_* and
FLOW_TIMEOUT_SECONDS before starting a worker. Kept small: anything that is not about
Prefect lives in lib/. pandas is imported only when a DataFrame is published, so the
notification path does not load it.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Annotated, Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from pydantic import Field

from flows.hooks import flow_run_ended, flow_run_started, task_run_ended_badly
from flows.prefect_compat import in_flow_run
from lib import retention, retry, sentry
from lib.config import get_settings
from lib.errors import InvalidInputError, is_transient

if TYPE_CHECKING:
    import pandas as pd

# Every process that runs a flow (serve, a pool worker's flow-run process, a task worker) reports to Sentry.
sentry.init()

# Flow parameter types: the UI form shows and validates them, Prefect rejects bad values before the run.
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=160)]
PositiveId = Annotated[int, Field(gt=0, lt=2**63)]


def _retry_condition(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we only classify the exception
        return is_transient(exc)
    return False


def retry_options() -> dict[str, Any]:
    """Prefect task options of the shared retry policy: transient errors only, capped delays, jitter."""
    p = retry.policy()
    return {
        "retries": p.attempts,
        "retry_delay_seconds": p.delays or 0,
        "retry_jitter_factor": p.jitter_factor if p.delays else None,
        "retry_condition_fn": _retry_condition,
    }


def task_options(name: str, *, retries: bool = True, persist_result: bool = False) -> dict[str, Any]:
    """Options of every task: a name, never a cached result (side effects run every time), the retry policy."""
    options: dict[str, Any] = {
        "name": name,
        "cache_policy": NO_CACHE,
        "persist_result": persist_result,
        "on_failure": [task_run_ended_badly],
    }
    return options | (retry_options() if retries else {"retries": 0})


def flow_options(name: str, *, timeout_seconds: float | None = None, **extra: Any) -> dict[str, Any]:
    """Options of every flow: a kebab-case name, the hard timeout (FLOW_TIMEOUT_SECONDS unless given), and
    the hooks that keep a backend-started run's result for its handle, post the task webhook, and tell
    Sentry of a run that ended badly and of a cron run's start and end (flows.hooks)."""
    hooks = [flow_run_ended]
    return {
        "name": name,
        "timeout_seconds": timeout_seconds or get_settings().flow_timeout_seconds,
        "on_running": [flow_run_started],
        "on_completion": hooks,
        "on_failure": hooks,
        "on_crashed": hooks,
        **extra,
    }


def run_key(idempotency_key: str | None) -> str | None:
    """The caller's key, else this flow run's own (``run-<id>``): two runs send twice, one run retried sends once."""
    if idempotency_key:
        return idempotency_key
    run_id = flow_run.get_id()
    return f"run-{run_id}" if run_id else None


def final_attempt(run_count: int) -> bool:
    """Whether a task on its ``run_count``-th run (1 = first) has no retry left."""
    return retry.is_final(run_count)


def scheduled_start() -> dt.datetime:
    """The run's scheduled start in UTC (now for an ad-hoc run or outside a flow)."""
    start = flow_run.get_scheduled_start_time() if in_flow_run() else None
    return (start or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)


def scheduled_date(default: dt.date | None = None) -> dt.date:
    """``default`` if given, else the date of the run's scheduled start in UTC."""
    return default if default is not None else scheduled_start().date()


def run_id() -> str:
    """This flow run's id (a fresh one outside a flow run, e.g. in a unit test)."""
    import uuid

    return flow_run.get_id() or f"adhoc-{uuid.uuid4()}"


def publish_table(key: str, frame: pd.DataFrame | list[dict[str, Any]], description: str) -> None:
    """Publish rows (a DataFrame or plain dicts) as a table artifact under a stable kebab-case key."""
    if not in_flow_run():
        return
    if not isinstance(frame, list):
        from lib.stats import to_artifact_rows  # pandas: only runs that publish frames load it

        frame = to_artifact_rows(frame)
    create_table_artifact(key=key, table=frame, description=description)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """Publish a markdown artifact under a stable kebab-case key (no-op outside a flow run)."""
    if in_flow_run():
        create_markdown_artifact(key=key, markdown=markdown, description=description)


def stored_retention(flow_name: str) -> dict[str, Any]:
    """The owner's retention values for a cleanup job (Prefect Variable ``retention_<flow>``), {} if never set."""
    from prefect.variables import Variable

    spec = retention.job(flow_name)
    stored = Variable.get(spec.variable, default=None)
    if stored is not None and not isinstance(stored, dict):
        raise InvalidInputError(f'{spec.source} must be a JSON object like {{"{spec.days.name}": 30}}, got {stored!r}')
    return stored or {}


def owner_retention(flow_name: str, **given: int | None) -> dict[str, int]:
    """A cleanup run's retention: a value passed to the run, else the owner's (set in the UI's Variables or
    with `indostar-jobs schedule retention`), else the default. An owner's value under its floor fails the
    run with one line naming the variable."""
    return retention.resolve(flow_name, given, stored_retention(flow_name), retention.job(flow_name).source)
