"""Background tasks: every notification as a Prefect task a warm task worker runs on ``.delay()``.

Where a customer waits (OTP, password reset, order confirmation) a deployment run is too
slow: a process start and Prefect's imports per message. A background task goes to a
task worker that is already running (``indostar-jobs task-worker``) and sends in about a
tenth of a second. Each task runs the same lib request and delivery code as the flows
(flows.notifications): the delivery log keeps one message per idempotency key, dead
letters, masking, transient-only retries.

Storage: a task's parameters and its result live in Redis (``TaskStorage``: REDIS_URL,
keys under REDIS_KEY_PREFIX, expiring after TASK_STORAGE_TTL_SECONDS), so task workers on
several machines and the backend share them. Prefect removed its own rescheduling of task
runs whose worker died (PrefectHQ/prefect#14772): ``sweep_stuck_task_runs`` puts such runs
back to Scheduled with their stored parameters, and every task worker runs it.
Webhooks: with TASK_WEBHOOK_URL set, a finished background task (or a backend-triggered
flow run, tagged ``backend``) is POSTed there, signed (lib.webhooks).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from prefect import Task, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    TaskRunFilter,
    TaskRunFilterFlowRunId,
    TaskRunFilterName,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.runtime import task_run
from prefect.states import Scheduled
from prefect_redis import RedisDatabase

from flows.common import final_attempt, task_options
from flows.hooks import task_run_finished
from flows.notifications import deliver_email_keys, deliver_sms_keys, record_messages, undelivered_error
from lib import db, tokens
from lib.config import get_settings
from lib.errors import TransientError
from lib.notify import delivery_log as dlog
from lib.notify import messages as req
from lib.notify.templates import environment

log = logging.getLogger(__name__)


class TaskStorage(RedisDatabase):
    """The Redis store of background-task parameters and results: keys under our prefix, with a TTL.

    Never saved as a block: the task worker and the backend build it from the same settings.
    """

    _block_type_slug = "indostar-task-storage"
    key_prefix: str = ""

    def _key(self, path: str) -> str:
        return f"{self.key_prefix}{path}"

    # Prefect calls these with _sync=True (its async-dispatch switch): pass it on.
    def read_path(self, path: str, **dispatch: Any) -> bytes:  # type: ignore[override]
        return super().read_path(self._key(path), **dispatch)  # type: ignore[no-any-return]

    def write_path(self, path: str, content: bytes, **dispatch: Any) -> bool:  # type: ignore[override]
        return super().write_path(self._key(path), content, **dispatch)  # type: ignore[no-any-return]

    async def aread_path(self, path: str) -> bytes:
        return await super().aread_path(self._key(path))

    async def awrite_path(self, path: str, content: bytes) -> bool:
        return await super().awrite_path(self._key(path), content)


@lru_cache(maxsize=1)
def task_storage() -> TaskStorage:
    """The store both sides use, saved as a block once per process (Prefect requires a saved block as a
    task's result storage); built from REDIS_URL, REDIS_KEY_PREFIX and TASK_STORAGE_TTL_SECONDS."""
    s = get_settings()
    store = TaskStorage(
        connection_url=s.redis_url, key_ttl=s.task_storage_ttl_seconds, key_prefix=f"{s.redis_key_prefix}prefect/"
    )
    store.save("indostar-task-storage", overwrite=True)
    return store


def configured(tsk: Task[Any, Any]) -> Task[Any, Any]:
    """The task as the worker serves it and the backend submits it: its parameters and result in Redis.

    Same function, so the same task key: runs the backend creates reach the workers serving it.
    """
    return tsk.with_options(result_storage=task_storage())


# ---- the tasks --------------------------------------------------------------------------------------


def background_options(name: str) -> dict[str, Any]:
    """Task options of a background task: its result kept (key results/<run id>), a timeout, the webhook hooks.

    The storage itself is attached when the task is served or submitted (``configured``).
    """
    s = get_settings()
    return task_options(name, persist_result=True) | {
        "result_storage_key": "results/{task_run.id}",
        "timeout_seconds": s.background_task_timeout_seconds,
        "on_completion": [task_run_finished],
        "on_failure": [task_run_finished],
    }


def send_now(request: req.MessageRequest) -> dict[str, Any]:
    """Record and deliver one request's messages inside the running task; fail if any is dead or undelivered."""
    batch = record_messages.fn(request)  # the flows' recording step, inside this task run
    final = final_attempt(task_run.get_run_count())
    reports = []
    if emails := batch.keys("email"):
        reports.append(deliver_email_keys(emails, final))
    if texts := batch.keys("sms"):
        reports.append(deliver_sms_keys(texts, final))
    transient = next((r.transient_error for r in reports if r.transient_error), None)
    if transient and not final:
        raise TransientError(transient)  # the task retries; sent messages stay sent
    with db.session_scope() as s:
        rows = dlog.summary_rows(s, batch.keys())
    counts: dict[str, Any] = dlog.counts_by_status(rows) | {"recovered": sum(r.recovered for r in reports)}
    if error := undelivered_error(type(request).__name__, counts, rows):
        raise error
    return counts


@task(**background_options("send-email-task"))
def send_email_task(
    to: str, subject: str, body: str, html: str | None = None, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Send one email (plain text, optional HTML), once per idempotency key."""
    return send_now(req.EmailRequest(to, subject, body, html, idempotency_key))


@task(**background_options("send-sms-task"))
def send_sms_task(phone: str, text: str, idempotency_key: str | None = None) -> dict[str, Any]:
    """Send one free-text SMS, once per idempotency key."""
    return send_now(req.SmsRequest(phone, text, idempotency_key))


@task(**background_options("send-templated-email-task"))
def send_templated_email_task(
    template: str, context: dict[str, Any], to: str, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Render a template and email it once."""
    return send_now(req.TemplatedRequest("email", template, context, to, idempotency_key))


@task(**background_options("send-templated-sms-task"))
def send_templated_sms_task(
    template: str, context: dict[str, Any], phone: str, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Render a template's DLT-registered SMS text and send it once."""
    return send_now(req.TemplatedRequest("sms", template, context, phone, idempotency_key))


@task(**background_options("send-order-confirmation-task"))
def send_order_confirmation_task(order_id: int, idempotency_key: str | None = None) -> dict[str, Any]:
    """Email and SMS the confirmation of one order."""
    return send_now(req.OrderConfirmationRequest((order_id,), idempotency_key, require_all=True))


@task(**background_options("send-order-shipped-task"))
def send_order_shipped_task(
    order_id: int, tracking_number: str, carrier: str, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Email and SMS that an order has shipped."""
    return send_now(req.OrderShippedRequest(order_id, tracking_number, carrier, idempotency_key))


@task(**background_options("send-payment-failed-task"))
def send_payment_failed_task(
    order_id: int | None = None,
    subscription_id: int | None = None,
    reason: str = "the payment was declined",
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Tell a customer a payment failed, for an order or a subscription's cycle."""
    return send_now(req.PaymentFailedRequest(order_id, subscription_id, reason, idempotency_key))


@task(**background_options("send-subscription-renewal-reminder-task"))
def send_subscription_renewal_reminder_task(
    subscription_id: int, delivery_date: dt.date | None = None, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Remind a customer of a coming delivery (default: the subscription's next one), opt-ins honoured."""
    items = ((subscription_id, delivery_date),)
    return send_now(req.RenewalReminderRequest(items, idempotency_key, require_all=True))  # type: ignore[arg-type]


@task(**background_options("send-otp-task"))
def send_otp_task(customer_id: int, purpose: str = "login", idempotency_key: str | None = None) -> dict[str, Any]:
    """Issue a one-time code and send it by SMS; the code exists only inside this task run."""
    return send_now(req.OtpRequest(customer_id, purpose, idempotency_key))


@task(**background_options("send-password-reset-task"))
def send_password_reset_task(customer_id: int, idempotency_key: str | None = None) -> dict[str, Any]:
    """Issue a password-reset token and email its link; the token exists only inside this task run."""
    return send_now(req.LinkRequest("password_reset", customer_id, idempotency_key))


@task(**background_options("send-email-verification-task"))
def send_email_verification_task(customer_id: int, idempotency_key: str | None = None) -> dict[str, Any]:
    """Issue an email-verification token and email its link; the token exists only inside this task run."""
    return send_now(req.LinkRequest("email_verification", customer_id, idempotency_key))


BACKGROUND_TASKS = (
    send_email_task,
    send_sms_task,
    send_templated_email_task,
    send_templated_sms_task,
    send_order_confirmation_task,
    send_order_shipped_task,
    send_payment_failed_task,
    send_subscription_renewal_reminder_task,
    send_otp_task,
    send_password_reset_task,
    send_email_verification_task,
)


# ---- the sweeper ----------------------------------------------------------------------------------


async def sweep_stuck_task_runs(older_than: dt.timedelta, names: tuple[str, ...] | None = None) -> list[str]:
    """Put background task runs stuck in Scheduled, Pending or Running (their worker died, or the
    server restarted and forgot its queue) back to Scheduled with their stored parameters, so a
    live worker runs them again under the same id; the delivery log keeps each message to one send.
    Returns the ids rescheduled."""
    cutoff = dt.datetime.now(dt.UTC) - older_than
    waiting = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING]
    done: list[str] = []
    async with get_client() as client:
        runs = await client.read_task_runs(
            task_run_filter=TaskRunFilter(
                name=TaskRunFilterName(any_=list(names or (t.name for t in BACKGROUND_TASKS))),
                flow_run_id=TaskRunFilterFlowRunId(is_null_=True),
                state=TaskRunFilterState(type=TaskRunFilterStateType(any_=waiting)),
            ),
            limit=200,
        )
        for run in runs:
            if run.state is None or run.state.timestamp >= cutoff:
                continue
            states = sorted(await client.read_task_run_states(run.id), key=lambda st: st.timestamp)
            params = next(
                (
                    st.state_details.task_parameters_id
                    for st in states
                    if st.type == StateType.SCHEDULED and st.state_details.task_parameters_id
                ),
                None,
            )
            again = Scheduled()
            again.state_details.deferred = True
            again.state_details.task_parameters_id = params
            await client.set_task_run_state(run.id, state=again, force=True)
            done.append(str(run.id))
    if done:
        log.warning("rescheduled %d background task run(s) left stuck: %s", len(done), ", ".join(done[:10]))
    return done


def task_by_name() -> dict[str, Callable[..., Any]]:
    return {t.name: t for t in BACKGROUND_TASKS}


# ---- the task worker ------------------------------------------------------------------------------


def warm_up() -> None:
    """Open what the first message needs (database pool, Redis, the templates), so it does not pay for it."""
    db.ping()
    tokens.ping()
    environment().get_template("order_confirmation.txt")


async def _sweep_forever(every: float) -> None:
    import asyncio
    import random

    after = dt.timedelta(seconds=get_settings().task_sweep_after_seconds)
    while True:
        # Jitter: several workers sweeping the same runs at the same instant would each reschedule them.
        await asyncio.sleep(every * random.uniform(0.5, 1.5))
        try:
            await sweep_stuck_task_runs(after)
        except Exception:
            log.warning("sweeping stuck background task runs failed", exc_info=True)


async def _serve(limit: int | None, sweep_every: float, drain_seconds: float) -> None:
    import asyncio
    import signal

    from prefect.task_worker import TaskWorker  # the task worker's server stack: only this command needs it

    worker = TaskWorker(*(configured(t) for t in BACKGROUND_TASKS), limit=limit)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with worker:
        # Prefect's own start() dies on SIGTERM with its runs left Running; subscribing here lets us stop
        # taking runs on SIGTERM and finish the ones in hand (a private method: Prefect is pinned < 3.10).
        subscription = asyncio.create_task(worker._subscribe_to_task_scheduling())
        sweeper = asyncio.create_task(_sweep_forever(sweep_every))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({subscription, stopped}, return_when=asyncio.FIRST_COMPLETED)
        subscription.cancel()
        sweeper.cancel()
        deadline = loop.time() + drain_seconds
        while any(worker.in_flight_task_runs.values()) and loop.time() < deadline:
            await asyncio.sleep(0.1)
        if subscription.done() and not subscription.cancelled() and subscription.exception():
            raise subscription.exception()  # type: ignore[misc]


def serve_background_tasks(limit: int | None = 10, sweep_every: float = 30.0, drain_seconds: float = 60.0) -> None:
    """Run every background task from this process until SIGTERM/SIGINT (then finish the runs in hand)."""
    import asyncio

    warm_up()
    task_storage()  # saved once, before the first run needs it
    asyncio.run(_serve(limit, sweep_every, drain_seconds))
