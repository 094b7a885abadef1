"""State hooks for runs the backend started: keep a flow run's result for its handle, post the task webhook.

A background task's result is kept in its outbox row (lib.outbox); the task worker posts its
webhook with ``background_task_finished``. A flow
run started by the backend (indostar_client.client, indostar_client.tasks: tagged ``backend``) keeps
a JSON copy of its return value in Redis under ``<prefix>prefect/flow-results/<run id>`` for
TASK_STORAGE_TTL_SECONDS, which is what ``indostar_client.tasks`` handles return from ``get()``.
With TASK_WEBHOOK_URL set, each such run's end is POSTed there, signed (lib.webhooks), from
a thread so that a slow receiver never holds a worker.
"""

from __future__ import annotations

import atexit
import datetime as dt
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lib import sentry, webhooks
from lib.config import get_settings
from lib.tokens import get_redis

log = logging.getLogger(__name__)
BACKEND_TAG = "backend"

_posting = ThreadPoolExecutor(max_workers=2, thread_name_prefix="task-webhook")
atexit.register(_posting.shutdown, wait=True)


def flow_result_key(run_id: Any) -> str:
    return f"{get_settings().redis_key_prefix}prefect/flow-results/{run_id}"


def _result_of(state: Any) -> Any:
    if state.is_completed():
        return webhooks.summary(state.result(raise_on_failure=False))
    return {"error": str(state.message or state.name)[:300]}


def _webhook(kind: str, name: str, run_id: Any, state: str, finished: dt.datetime | None, result: Any) -> None:
    s = get_settings()
    if not s.task_webhook_url:
        return
    secret = s.task_webhook_secret.get_secret_value() if s.task_webhook_secret else ""
    when = (finished or dt.datetime.now(dt.UTC)).isoformat()
    body = webhooks.body(str(run_id), kind, name, state, when, result)
    _posting.submit(webhooks.post, s.task_webhook_url, body, secret)


# The webhook's `state` keeps Prefect's words for both kinds, so one receiver reads tasks and flows alike.
TASK_STATE = {"done": "COMPLETED", "failed": "FAILED", "revoked": "CANCELLED"}


def background_task_finished(name: str, task_id: Any, status: str, result: Any, error: str | None) -> None:
    """A background task ended for good (done or failed): post its webhook."""
    outcome = webhooks.summary(result) if status == "done" else {"error": (error or status)[:300]}
    _webhook("task", name, task_id, TASK_STATE.get(status, status.upper()), None, outcome)


def flow_run_finished(flw: Any, run: Any, state: Any) -> None:
    """Flow hook (completed, failed, crashed): for a backend-started run, keep its result and post the webhook."""
    if BACKEND_TAG not in (run.tags or []):
        return
    result = _result_of(state)
    try:
        doc = {"state": state.type.value, "message": state.message, "result": result}
        get_redis().set(
            flow_result_key(run.id), json.dumps(doc, default=str), ex=get_settings().task_storage_ttl_seconds
        )
    except Exception:
        log.warning("could not keep the result of flow run %s for its handle", run.id, exc_info=True)
    _webhook("flow", flw.name, run.id, state.type.value, state.timestamp, result)


def flow_run_ended(flw: Any, run: Any, state: Any) -> None:
    """Every flow's end (completed, failed, crashed): the backend's copy and webhook, Sentry's event and check-in."""
    try:
        flow_run_finished(flw, run, state)
    finally:
        if not state.is_completed():
            flow_run_ended_badly(flw, run, state)
        flow_run_checked_out(run, state)
        sentry.flush()


# ---- error tracking (lib/sentry.py) ------------------------------------------------------------------

_check_ins: dict[Any, tuple[str, str | None]] = {}  # flow run id: (monitor slug, check-in id)


def _ui(kind: str, run_id: Any) -> str:
    return f"{get_settings().public_ui_url.rstrip('/')}/runs/{kind}/{run_id}"


def _exception(state: Any) -> BaseException | None:
    try:
        result = state.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - a result that cannot be read is still a failure to report
        return exc
    return result if isinstance(result, BaseException) else None


def _deployment_name(run: Any) -> str | None:
    if not getattr(run, "deployment_id", None):
        return None
    from prefect.runtime import deployment

    try:
        name = deployment.name
    except Exception:  # noqa: BLE001 - a tag we could not read is left out, the event still goes
        return None
    return str(name) if name else None


def flow_run_ended_badly(flw: Any, run: Any, state: Any) -> None:
    """Flow hook (failed, crashed): one Sentry event for the run, after its retries."""
    if not sentry.enabled():
        return
    deployment = _deployment_name(run)
    tags = {
        "flow": flw.name,
        "deployment": f"{flw.name}/{deployment}" if deployment else None,
        "flow_run_id": run.id,
        "work_queue": run.work_queue_name,
        "attempt": run.run_count,
        "state": state.type.value,
    }
    message = f"flow run {flw.name} ({run.name}) {state.name}: {state.message or ''}".strip()
    sentry.capture_failure(message, tags, ["prefect-flow-run", str(run.id)], _ui("flow-run", run.id), _exception(state))


def task_run_ended_badly(tsk: Any, task_run: Any, state: Any) -> None:
    """Task hook (failed): one Sentry event for the task run, after its retries."""
    if not sentry.enabled():
        return
    from prefect.runtime import flow_run

    tags = {
        "flow": flow_run.flow_name,
        "task": tsk.name,
        "task_run_id": task_run.id,
        "flow_run_id": task_run.flow_run_id,
        "attempt": task_run.run_count,
        "state": state.type.value,
    }
    message = f"task run {tsk.name} ({task_run.name}) {state.name}: {state.message or ''}".strip()
    fingerprint = ["prefect-task-run", str(task_run.id)]
    sentry.capture_failure(message, tags, fingerprint, _ui("task-run", task_run.id), _exception(state))


def background_task_failed(name: str, task_id: Any, task_run_id: Any, tries: int, error: str | None) -> None:
    """A background task failed for good (its retries used up): one Sentry event."""
    if not sentry.enabled():
        return
    tags = {
        "task": name,
        "task_id": task_id,
        "task_run_id": task_run_id,
        "work_queue": "background-tasks",
        "attempt": tries,
        "state": "FAILED",
    }
    url = _ui("task-run", task_run_id) if task_run_id else None
    message = f"background task {name} failed: {error or ''}"
    sentry.capture_failure(message, tags, ["background-task", str(task_id)], url)


def _cron_of(deployment_id: Any) -> tuple[str, str | None]:
    """The deployment's name and its active cron (the owner's schedule), None when it runs on no cron."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        dep = client.read_deployment(deployment_id)
    for schedule in dep.schedules or []:
        cron = getattr(schedule.schedule, "cron", None)
        if schedule.active and cron and not dep.paused:
            return dep.name, cron
    return dep.name, None


def flow_run_started(flw: Any, run: Any, state: Any) -> None:
    """Flow hook (running): a cron deployment's run checks in to its Sentry monitor (in_progress)."""
    if not sentry.enabled() or not run.deployment_id:
        return
    try:
        deployment, cron = _cron_of(run.deployment_id)
        if cron is None:
            return
        slug = f"{flw.name}-{deployment}"
        timeout = int(get_settings().flow_timeout_seconds // 60) + 1
        _check_ins[run.id] = (slug, sentry.check_in(slug, "in_progress", cron=cron, max_runtime=timeout))
    except Exception:  # a monitor that cannot be told must not fail the night's run (logged with its cause)
        log.warning("could not check in flow run %s to Sentry", run.id, exc_info=True)


def flow_run_checked_out(run: Any, state: Any) -> None:
    """The run's end closes its check-in: ok when it completed, error otherwise."""
    slug, check_in_id = _check_ins.pop(run.id, (None, None))
    if slug:
        sentry.check_in(slug, "ok" if state.is_completed() else "error", check_in_id=check_in_id)
