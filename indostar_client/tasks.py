"""The old Celery task API, drop-in: the same names and arguments, ``.delay(...)`` and a result handle.

Backend code written for the old system keeps working::

    from indostar_client.tasks import send_email_task, cleanup_expired_carts

    result = send_email_task.delay(to_email="asha@example.in", subject="Hi", body="Hello")
    result.get(timeout=10)          # {'sent': 1, 'dead': 0, ...}, or the task's own error
    cleanup_expired_carts.delay(days_old=30).id

- Message tasks (``send_*_task``) are rows of the outbox (lib.outbox): ``.delay`` checks the
  arguments, then records one row (one INSERT and a NOTIFY, a millisecond or two, no Prefect
  API call), and a warm task worker (``indostar-jobs task-worker``) sends it in the next
  batch. The row is the task's record: ``.get()`` reads its result or error there, so it
  answers even when the Prefect API is down or lost a state.
- Job tasks (``process_due_subscriptions``, ``cleanup_*``, ...) start their deployment
  through the Prefect API, as indostar_client.client does.

Celery's semantics are kept or refused: each ``.delay()`` sends (a call without an
``idempotency_key`` is keyed by its own id, so a retried or recovered task still sends
once); ``apply_async`` honours ``countdown``, ``eta``, ``expires`` and ``task_id`` (job
tasks: ``countdown`` and ``eta``); any other option raises ``TypeError`` naming it and
records nothing. ``AsyncResult`` has ``.id``, ``.status`` (PENDING, STARTED, RETRY,
SUCCESS, FAILURE, REVOKED), ``.ready()``, ``.get(timeout=...)`` (the result, or the task's
error raised; ``TimeoutError`` when not finished in time; ``TaskRevokedError`` when revoked
or expired) and ``.revoke()``; ``AsyncResult(id)`` rebuilds a handle in any process. The
README's "Moving from Celery" section lists each old call and its arguments.
"""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from indostar_client import client
from indostar_client.client import Call
from lib.notify import kinds

# Celery's states for Prefect's state types (flow runs) and for outbox rows (message tasks).
CELERY_STATUS = {
    "SCHEDULED": "PENDING",
    "PENDING": "PENDING",
    "PAUSED": "PENDING",
    "RUNNING": "STARTED",
    "AWAITINGRETRY": "RETRY",
    "COMPLETED": "SUCCESS",
    "FAILED": "FAILURE",
    "CRASHED": "FAILURE",
    "CANCELLED": "REVOKED",
    "CANCELLING": "REVOKED",
}
TASK_STATUS = {
    "queued": "PENDING",
    "running": "STARTED",
    "retry": "RETRY",
    "done": "SUCCESS",
    "failed": "FAILURE",
    "revoked": "REVOKED",
}
TASK_OPTIONS = ("countdown", "eta", "expires", "task_id")
JOB_OPTIONS = ("countdown", "eta")


class TaskRunLostError(LookupError):
    """The task or run does not exist (never recorded, or deleted after TASK_STORAGE_TTL_SECONDS)."""


class TaskRevokedError(Exception):
    """The task was revoked or expired before it ran (Celery's ``TaskRevokedError``)."""


class AsyncResult:
    """A handle on a background task or a flow run, by id, in any process (Celery's AsyncResult)."""

    def __init__(self, id: str | uuid.UUID, kind: str = "task") -> None:
        self.id = str(id)
        self.kind = kind  # task | flow

    def __repr__(self) -> str:
        return f"<AsyncResult {self.kind} {self.id}>"

    # ---- message tasks: the outbox row -------------------------------------------------------------

    def _row(self) -> Any:
        from lib import db, outbox

        row = outbox.read(db.get_engine(), uuid.UUID(self.id))
        if row is None:
            raise TaskRunLostError(f"task {self.id} does not exist")
        return row

    # ---- flow runs: the Prefect API ---------------------------------------------------------------

    def _state(self) -> Any:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as api:
            try:
                run = api.read_flow_run(uuid.UUID(self.id))
            except ObjectNotFound:
                raise TaskRunLostError(f"flow run {self.id} does not exist") from None
        if run.state is None:
            # A run the server has recorded before its first state event arrived: not started yet.
            from prefect.states import Pending

            return Pending()
        return run.state

    @property
    def status(self) -> str:
        if self.kind == "task":
            return TASK_STATUS[self._row().status]
        state = self._state()
        name = "AWAITINGRETRY" if state.name == "AwaitingRetry" else state.type.value
        return CELERY_STATUS.get(name, "PENDING")

    @property
    def state(self) -> str:
        return self.status

    def ready(self) -> bool:
        return bool(self._row().ready if self.kind == "task" else self._state().is_final())

    def successful(self) -> bool:
        return self.status == "SUCCESS"

    def failed(self) -> bool:
        return self.status == "FAILURE"

    def revoke(self, terminate: bool = False, **options: Any) -> bool:
        """Cancel the task (or flow run) if it has not started; True if this call did. A running one goes on."""
        if terminate or options:
            refused = ["terminate"] if terminate else []
            raise TypeError(
                f"revoke() does not support {', '.join(refused + sorted(options))}: a started task runs to its end"
            )
        if self.kind == "task":
            from lib import db, outbox

            return outbox.revoke(db.get_engine(), uuid.UUID(self.id))
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        if self._state().type.value not in ("SCHEDULED", "PENDING"):
            return False
        with get_client(sync_client=True) as api:
            result: Any = api.set_flow_run_state(uuid.UUID(self.id), Cancelled(message="revoked by the caller"))
        return str(result.status.value) == "ACCEPT"

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.05) -> Any:
        """Wait for the task or run to finish; its result, or its error raised (unless propagate=False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.kind == "task":
                row = self._row()
                if row.ready:
                    return _task_outcome(row, propagate)
                where = row.status
            else:
                state = self._state()
                if state.is_final():
                    return self._flow_outcome(state, propagate)
                where = state.name
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{self.kind} {self.id} not finished after {timeout:g} s (state {where})")
            time.sleep(interval)

    def _flow_outcome(self, state: Any, propagate: bool) -> Any:
        from flows.hooks import flow_result_key
        from lib.tokens import get_redis

        raw = get_redis().get(flow_result_key(self.id))
        kept = json.loads(raw) if raw else {"result": None}
        if state.is_completed() or not propagate:
            return kept.get("result")
        from lib.errors import PermanentError

        raise PermanentError(f"flow run {self.id} ended {state.name}: {state.message}")


def _task_outcome(row: Any, propagate: bool) -> Any:
    """A finished row's result, or its error raised as the class it had in the worker (lib.errors)."""
    from lib.errors import rebuild

    if row.status == "done":
        return row.result
    if not propagate:
        return row.error
    if row.status == "revoked":
        raise TaskRevokedError(row.error or "revoked")
    raise rebuild(row.error_type, row.error or "failed")


# ---- message tasks: rows of the outbox ----------------------------------------------------------


def _refuse(task: str, options: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    if unknown := sorted(set(options) - set(allowed)):
        raise TypeError(
            f"{task}.apply_async() does not support {', '.join(unknown)} (supported: {', '.join(allowed)}); "
            "nothing was queued"
        )


def _aware(value: Any, what: str) -> Any:
    """A datetime as UTC-aware (a naive one is UTC, as Celery's enable_utc reads it); TypeError otherwise."""
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{what} must be a datetime, got {type(value).__name__}")
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _seconds(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise TypeError(f"{what} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _schedule(task: str, options: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """TypeError, nothing queued, for an option this kind of task cannot honour or for countdown with eta."""
    _refuse(task, options, allowed)
    if "countdown" in options and "eta" in options:
        raise TypeError(f"{task}.apply_async(): give countdown or eta, not both; nothing was queued")


@dataclass(frozen=True)
class MessageTask:
    """An old message task: ``.delay`` records a row of the outbox for the kind's background task."""

    kind: kinds.Kind

    @property
    def name(self) -> str:
        return self.kind.celery_name

    @property
    def task_name(self) -> str:
        return self.kind.task_name

    def _params(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments as the row stores them (JSON, dates as ISO text), checked by building the request."""
        params = kinds.plain(old_arguments(self.kind, args, kwargs))
        key = params.pop(kinds.KEY, None)
        self.kind.request(params, key)  # bad input raises here, before anything is recorded
        return params | {kinds.KEY: key}

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: tuple[Any, ...] | list[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult:
        """Celery's long form: ``countdown`` (seconds), ``eta`` (a datetime), ``expires`` (seconds or a
        datetime: not sent after it, REVOKED) and ``task_id``; any other option raises TypeError."""
        from lib import db, outbox

        _schedule(self.name, options, TASK_OPTIONS)
        expires = options.get("expires")
        seconds = isinstance(expires, int | float)
        task_id = options.get("task_id")
        task_id, _ = outbox.enqueue(
            db.get_engine(),
            self.task_name,
            self._params(tuple(args), dict(kwargs or {})),
            task_id=uuid.UUID(str(task_id)) if task_id is not None else None,
            countdown=_seconds(options.get("countdown", 0), "countdown"),
            eta=_aware(options["eta"], "eta") if "eta" in options else None,
            expires_in=_seconds(expires, "expires") if seconds else None,
            expires_at=_aware(expires, "expires") if expires is not None and not seconds else None,
        )
        return AsyncResult(task_id, "task")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run in this process, as calling a Celery task does (no worker, no row); raises the task's error."""
        from flows.background import run_here

        return run_here(self.task_name, self._params(args, kwargs))


@dataclass(frozen=True)
class JobTask:
    """An old job task: ``.delay`` starts the deployment (a worker or ``serve`` runs it)."""

    name: str
    describe: Callable[..., Call]

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: tuple[Any, ...] | list[Any] = (), kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult:
        """Celery's long form: ``countdown`` or ``eta`` schedule the flow run; any other option raises TypeError."""
        _schedule(self.name, options, JOB_OPTIONS)
        when = None
        if "countdown" in options:
            when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=_seconds(options["countdown"], "countdown"))
        elif "eta" in options:
            when = _aware(options["eta"], "eta")
        call = self.describe(*args, **dict(kwargs or {}))
        return AsyncResult(client.start(call, scheduled_time=when).id, "flow")


def _check_names(kwargs: Mapping[str, Any], allowed: set[str], task: str) -> None:
    if unknown := set(kwargs) - allowed:
        raise TypeError(f"{task}() got unexpected argument(s): {', '.join(sorted(unknown))}")


def old_arguments(kind: kinds.Kind, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The old task's call as the kind's parameters: its positional order and its names (old or ours).

    TypeError, as a Python call would raise, for an unknown, missing or twice-given argument."""
    task = kind.celery_name
    positional = kind.old_positional or (*(p.name for p in kind.params), kinds.KEY)
    if len(args) > len(positional):
        raise TypeError(f"{task}() takes {len(positional)} positional argument(s) but {len(args)} were given")
    given = dict(zip(positional, args, strict=False))
    for name, value in kwargs.items():
        if name in given:
            raise TypeError(f"{task}() got multiple values for argument {name!r}")
        given[name] = value
    params = (*kind.params, kinds.Param(kinds.KEY, str, None))
    if unknown := set(given) - {n for p in params for n in (p.name, *p.old_names)}:
        raise TypeError(f"{task}() got unexpected argument(s): {', '.join(sorted(unknown))}")
    out: dict[str, Any] = {}
    for param in params:
        names = [n for n in (*param.old_names, param.name) if n in given]
        if len(names) > 1:
            raise TypeError(f"{task}() got {' and '.join(names)}: give one")
        if names:
            out[param.name] = given.pop(names[0])
        elif param.old_default is not kinds.REQUIRED:
            out[param.name] = param.old_default
        elif param.default is not kinds.REQUIRED:
            out[param.name] = param.default
        else:
            raise TypeError(f"{task}() missing argument {' / '.join((*param.old_names, param.name))}")
    return out


def _same(*names: str, task: str) -> Callable[..., dict[str, Any]]:
    """Arguments that kept their names: positional or keyword, unknown ones refused."""

    def translate(*args: Any, **kw: Any) -> dict[str, Any]:
        given = dict(zip(names, args, strict=False)) | kw
        _check_names(given, set(names), task)
        return given

    return translate


# A message kind registered after import (a test's) has its old-style task here too.
__getattr__ = kinds.expose(globals(), "celery_name", MessageTask)


# ---- job tasks: deployment runs -------------------------------------------------------------------


def _job(flow: str, deployment: str, *names: str) -> Callable[..., Call]:
    translate = _same(*names, task=flow.replace("-", "_"))

    def describe(*args: Any, **kwargs: Any) -> Call:
        params = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in translate(*args, **kwargs).items()}
        return Call(flow, params, None, deployment)

    return describe


def _sessions(*args: Any, **kwargs: Any) -> Call:
    # The old task called it `days`; the flow's parameter is `inactive_days`.
    if "days" in kwargs:
        kwargs["inactive_days"] = kwargs.pop("days")
    return _job("cleanup-abandoned-sessions", "default", "inactive_days", "batch_size", "dry_run")(*args, **kwargs)


process_due_subscriptions = JobTask(
    "process_due_subscriptions", _job("process-due-subscriptions", "daily", "run_date", "batch_size", "dry_run")
)
process_single_subscription = JobTask(
    "process_single_subscription", _job("process-single-subscription", "default", "subscription_id", "run_date")
)
send_subscription_renewal_reminders = JobTask(
    "send_subscription_renewal_reminders", _job("remind-upcoming-deliveries", "daily", "run_date")
)
cleanup_expired_carts = JobTask(
    "cleanup_expired_carts", _job("cleanup-expired-carts", "daily", "days_old", "batch_size", "dry_run")
)
cleanup_expired_tokens = JobTask("cleanup_expired_tokens", _job("cleanup-expired-tokens", "daily", "dry_run"))
cleanup_old_audit_logs = JobTask(
    "cleanup_old_audit_logs", _job("cleanup-old-audit-logs", "default", "days", "batch_size", "dry_run")
)
cleanup_abandoned_sessions = JobTask("cleanup_abandoned_sessions", _sessions)

# Every old task name this module serves, by kind (the tests check each one against the old list).
MESSAGE_TASKS = tuple(t for t in list(globals().values()) if isinstance(t, MessageTask))
JOB_TASKS = tuple(t for t in list(globals().values()) if isinstance(t, JobTask))
