"""State hooks for runs the backend started: keep a flow run's result for its handle, post the task webhook.

A background task's result is kept in its outbox row (lib.outbox); the task worker posts its
webhook with ``background_task_finished``. A flow
run started by the backend (deployments.client, deployments.tasks: tagged ``backend``) keeps
a JSON copy of its return value in Redis under ``<prefix>prefect/flow-results/<run id>`` for
TASK_STORAGE_TTL_SECONDS, which is what ``deployments.tasks`` handles return from ``get()``.
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

from lib import webhooks
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
