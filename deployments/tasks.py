"""The old Celery task API, drop-in: the same names and arguments, ``.delay(...)`` and a result handle.

Backend code written for the old system keeps working::

    from deployments.tasks import send_email_task, cleanup_expired_carts

    result = send_email_task.delay(to_email="asha@example.in", subject="Hi", body="Hello")
    result.get(timeout=10)          # {'sent': 1, 'dead': 0, ...}, or the task's own error
    cleanup_expired_carts.delay(days_old=30).id

- Message tasks (``send_*_task``) run as Prefect background tasks on a warm task worker
  (``indostar-jobs task-worker``), in about a tenth of a second. ``.delay`` stores the
  parameters in Redis (the task storage) and creates the task run with one API call on a
  client kept open for the process: Prefect's own ``Task.delay`` also loads a block,
  fetches a CSRF token, opens a client and serialises the caller's whole settings on every
  call, which costs more than the send itself.
- Job tasks (``process_due_subscriptions``, ``cleanup_*``, ...) start their deployment
  through the Prefect API, as deployments.client does.

Every ``.delay`` returns an ``AsyncResult`` with ``.id``, ``.status`` (Celery's names:
PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED), ``.ready()`` and ``.get(timeout=...)``,
which returns the result or raises the error (``TimeoutError`` when not finished in time).
``AsyncResult(id)`` rebuilds a handle from an id in any process. The README's "Moving from
Celery" section lists each old call and its arguments.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from deployments import client
from deployments.client import Call

# Celery's states for Prefect's state types.
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


class TaskRunLostError(LookupError):
    """The run no longer exists (e.g. a worker deleted it because its parameters had expired)."""


class AsyncResult:
    """A handle on a background task run or a flow run, by id, in any process (Celery's AsyncResult)."""

    def __init__(self, id: str | uuid.UUID, kind: str = "task") -> None:
        self.id = str(id)
        self.kind = kind  # task | flow

    def __repr__(self) -> str:
        return f"<AsyncResult {self.kind} {self.id}>"

    def _state(self) -> Any:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        with get_client(sync_client=True) as api:
            try:
                run = (
                    api.read_task_run(uuid.UUID(self.id))
                    if self.kind == "task"
                    else api.read_flow_run(uuid.UUID(self.id))
                )
            except ObjectNotFound:
                raise TaskRunLostError(f"{self.kind} run {self.id} does not exist") from None
        if run.state is None:
            # A run the server has recorded before its first state event arrived: not started yet.
            from prefect.states import Pending

            return Pending()
        return run.state

    @property
    def status(self) -> str:
        state = self._state()
        name = "AWAITINGRETRY" if state.name == "AwaitingRetry" else state.type.value
        return CELERY_STATUS.get(name, "PENDING")

    @property
    def state(self) -> str:
        return self.status

    def ready(self) -> bool:
        return bool(self._state().is_final())

    def successful(self) -> bool:
        return self.status == "SUCCESS"

    def failed(self) -> bool:
        return self.status == "FAILURE"

    def get(self, timeout: float | None = None, propagate: bool = True, interval: float = 0.05) -> Any:
        """Wait for the run to finish; its result, or its error raised (unless propagate=False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            state = self._state()
            if state.is_final():
                return self._outcome(state, propagate)
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{self.kind} run {self.id} not finished after {timeout:g} s (state {state.name})")
            time.sleep(interval)

    def _outcome(self, state: Any, propagate: bool) -> Any:
        if self.kind == "task":
            return _task_outcome(self.id, state, propagate)
        from flows.hooks import flow_result_key
        from lib.tokens import get_redis

        raw = get_redis().get(flow_result_key(self.id))
        kept = json.loads(raw) if raw else {"result": None}
        if state.is_completed() or not propagate:
            return kept.get("result")
        from lib.errors import PermanentError

        raise PermanentError(f"flow run {self.id} ended {state.name}: {state.message}")


def _task_outcome(run_id: str, state: Any, propagate: bool) -> Any:
    """The result (or the exception) the worker kept in the task storage for this run.

    Read with our own store rather than Prefect's block lookup, which rebuilds the storage as
    the plain RedisDatabase it derives from and so would miss the key prefix.
    """
    from prefect.results import ResultRecord

    from flows.background import task_storage
    from lib.errors import PermanentError

    key = getattr(state.data, "storage_key", None) or f"results/{run_id}"
    raw = task_storage().read_path(key)
    for _ in range(20):  # the final state can reach the API a moment before the result is readable
        if raw or not state.is_completed():
            break
        time.sleep(0.05)
        raw = task_storage().read_path(key)
    value = ResultRecord.deserialize(raw).result if raw else None
    if state.is_completed():
        return value
    if not propagate:
        return value if value is not None else state.message
    if isinstance(value, BaseException):
        raise value
    raise PermanentError(f"task run {run_id} ended {state.name}: {state.message}")


# ---- message tasks: Prefect background tasks ------------------------------------------------------


class _Submitter:
    """Creates background task runs: parameters to the task storage, one POST on a client kept per thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def _client(self) -> Any:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL

        url = PREFECT_API_URL.value()
        api, for_url = getattr(self._local, "client", (None, None))
        if api is None or for_url != url:
            api = get_client(sync_client=True)
            api.__enter__()  # keep its connection pool for the life of the thread
            self._local.client = (api, url)
        return api

    def submit(self, task: Any, parameters: dict[str, Any]) -> AsyncResult:
        from prefect.results import ResultRecord, ResultRecordMetadata, get_default_result_serializer
        from prefect.states import Scheduled

        from flows.background import task_storage

        # The record a task worker reads (prefect.task_worker.read_parameters); an empty context
        # means the worker runs with its own settings, not a copy of the backend's (secrets included).
        parameters_id = uuid.uuid4()
        record = ResultRecord(
            result={"parameters": parameters, "context": {}},
            metadata=ResultRecordMetadata(serializer=get_default_result_serializer(), storage_key=str(parameters_id)),
        )
        task_storage().write_path(f"parameters/{parameters_id}", content=record.serialize())
        state = Scheduled()
        state.state_details.deferred = True
        state.state_details.task_parameters_id = parameters_id
        run = self._client().create_task_run(
            task=task,
            flow_run_id=None,
            dynamic_key=f"{task.task_key}-{uuid.uuid4().hex}",
            name=task.name,
            state=state,
            task_inputs={k: [] for k in parameters},
        )
        return AsyncResult(run.id, "task")


_submitter = _Submitter()


@dataclass(frozen=True)
class MessageTask:
    """An old message task: ``.delay`` runs the background task ``task_name`` with translated arguments."""

    name: str
    task_name: str
    translate: Callable[..., dict[str, Any]]

    def _task(self) -> Any:
        from flows.background import configured, task_by_name

        return configured(task_by_name()[self.task_name])

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return _submitter.submit(self._task(), self.translate(*args, **kwargs))

    def apply_async(self, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None, **_: Any) -> AsyncResult:
        """Celery's long form; options such as countdown or queue are ignored (the worker runs it at once)."""
        return self.delay(*args, **dict(kwargs or {}))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run in this process, as calling a Celery task does (no worker involved)."""
        from flows.background import task_by_name

        return task_by_name()[self.task_name].fn(**self.translate(*args, **kwargs))


@dataclass(frozen=True)
class JobTask:
    """An old job task: ``.delay`` starts the deployment (a worker or ``serve`` runs it)."""

    name: str
    describe: Callable[..., Call]

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult:
        return AsyncResult(client.start(self.describe(*args, **kwargs)).id, "flow")

    def apply_async(self, args: tuple[Any, ...] = (), kwargs: Mapping[str, Any] | None = None, **_: Any) -> AsyncResult:
        return self.delay(*args, **dict(kwargs or {}))


def _pick(kwargs: dict[str, Any], *names: str, default: Any = ...) -> Any:
    """The first of ``names`` given (old name first, then ours); TypeError naming them if none is."""
    for name in names:
        if name in kwargs:
            return kwargs.pop(name)
    if default is ...:
        raise TypeError(f"missing argument {' / '.join(names)}")
    return default


def _check_names(kwargs: Mapping[str, Any], allowed: set[str], task: str) -> None:
    if unknown := set(kwargs) - allowed:
        raise TypeError(f"{task}() got unexpected argument(s): {', '.join(sorted(unknown))}")


def _email(
    to_email: str | None = None, subject: str | None = None, body: str | None = None, **kw: Any
) -> dict[str, Any]:
    _check_names(kw, {"to", "text", "message", "html_body", "html", "idempotency_key"}, "send_email_task")
    out = {
        "to": to_email if to_email is not None else _pick(kw, "to"),
        "subject": subject if subject is not None else _pick(kw, "subject"),
        "body": body if body is not None else _pick(kw, "text", "message"),
        "html": _pick(kw, "html_body", "html", default=None),
        "idempotency_key": _pick(kw, "idempotency_key", default=None),
    }
    return out


def _sms(phone: str | None = None, message: str | None = None, **kw: Any) -> dict[str, Any]:
    _check_names(kw, {"to_phone", "phone_number", "text", "body", "idempotency_key"}, "send_sms_task")
    out = {
        "phone": phone if phone is not None else _pick(kw, "to_phone", "phone_number"),
        "text": message if message is not None else _pick(kw, "text", "body"),
        "idempotency_key": _pick(kw, "idempotency_key", default=None),
    }
    return out


def _templated(channel: str) -> Callable[..., dict[str, Any]]:
    address = ("to_email", "to") if channel == "email" else ("phone", "to_phone")
    target = "to" if channel == "email" else "phone"

    def translate(*args: Any, **kw: Any) -> dict[str, Any]:
        given = dict(zip((address[0], "template_name", "context"), args, strict=False)) | kw
        allowed = {*address, "template_name", "template", "context", "idempotency_key"}
        _check_names(given, allowed, f"send_templated_{channel}_task")
        out = {
            target: _pick(given, *address),
            "template": _pick(given, "template_name", "template"),
            "context": _pick(given, "context", default={}),
            "idempotency_key": _pick(given, "idempotency_key", default=None),
        }
        return out

    return translate


def _same(*names: str, task: str) -> Callable[..., dict[str, Any]]:
    """Arguments that kept their names: positional or keyword, unknown ones refused."""

    def translate(*args: Any, **kw: Any) -> dict[str, Any]:
        given = dict(zip(names, args, strict=False)) | kw
        _check_names(given, set(names), task)
        return given

    return translate


def _kept(name: str, *arguments: str) -> MessageTask:
    """An old message task whose arguments kept their names; its background task is the name in dashes."""
    return MessageTask(name, name.replace("_", "-"), _same(*arguments, task=name))


send_email_task = MessageTask("send_email_task", "send-email-task", _email)
send_sms_task = MessageTask("send_sms_task", "send-sms-task", _sms)
send_templated_email_task = MessageTask("send_templated_email_task", "send-templated-email-task", _templated("email"))
send_templated_sms_task = MessageTask("send_templated_sms_task", "send-templated-sms-task", _templated("sms"))
send_order_confirmation_task = _kept("send_order_confirmation_task", "order_id", "idempotency_key")
send_order_shipped_task = _kept("send_order_shipped_task", "order_id", "tracking_number", "carrier", "idempotency_key")
send_payment_failed_task = _kept("send_payment_failed_task", "order_id", "subscription_id", "reason", "idempotency_key")
send_subscription_renewal_reminder_task = _kept(
    "send_subscription_renewal_reminder_task", "subscription_id", "delivery_date", "idempotency_key"
)
send_otp_task = _kept("send_otp_task", "customer_id", "purpose", "idempotency_key")
send_password_reset_task = _kept("send_password_reset_task", "customer_id", "idempotency_key")
send_email_verification_task = _kept("send_email_verification_task", "customer_id", "idempotency_key")


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
