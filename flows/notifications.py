"""Notification flows: one per message kind of the registry (lib.notify.kinds), each one hop from its
deployment to the lib request that builds its messages, plus dead-letter replay and the stuck-message sweep.

Every flow has the same three steps: record the request's messages in the delivery log
(one transaction), deliver them (one task per channel: one SMTP session, one pooled HTTP
client, each message committed as it goes), report (an artifact, and the run fails if a
message is dead or still undelivered). ``send_in_batches`` is the bulk form the nightly
run and the daily reminders use. Provider settings and rate limits are flows.providers.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prefect import Flow, flow, get_run_logger, task
from prefect.futures import PrefectFuture, wait
from prefect.runtime import task_run
from pydantic import NonNegativeInt

from flows.common import (
    IdempotencyKey,
    PositiveId,
    final_attempt,
    flow_options,
    publish_markdown,
    run_key,
    task_options,
)
from flows.prefect_compat import with_signature
from flows.providers import SMS_LIMIT, SMTP_LIMIT, provider_rate, provider_session, sms_config, smtp_config
from lib import db
from lib import markdown as md
from lib.config import get_settings
from lib.errors import InvalidInputError, JobError, PermanentError, TransientError
from lib.notify import delivery, kinds
from lib.notify import delivery_log as dlog
from lib.notify.address import scrub
from lib.notify.requests import MessageBatch, MessageRequest, positive_id

RECORD_AHEAD = 2

# --- tasks: one side effect each -------------------------------------------------------------


@task(**task_options("record-messages"))
def record_messages(request: MessageRequest) -> MessageBatch:
    """Write the request's messages to the delivery log (one transaction); existing keys are left as they are."""
    with db.session_scope() as s:
        batch = request.build(s)
        dlog.record(s, batch.messages)
    return batch


def _raise_if_retryable(report: dlog.DeliveryReport, channel: str, *, final: bool) -> dlog.DeliveryReport:
    get_run_logger().info("%s: %s", channel, report.as_dict())
    if report.transient_error and not final:
        raise TransientError(report.transient_error)
    return report


def deliver_email_keys(keys: list[str], *, final: bool) -> dlog.DeliveryReport:
    """One delivery pass over these email keys: one SMTP session, each outcome committed as it happens."""
    # Wait for a provider slot before claiming rows, so waiting never holds messages in `sending`.
    with provider_session(SMTP_LIMIT), dlog.delivery_session(db.get_engine()) as (conn, token):
        return delivery.deliver(conn, token, keys, "email", lambda: delivery.email_sender(smtp_config()), final=final)


def deliver_sms_keys(keys: list[str], *, final: bool) -> dlog.DeliveryReport:
    """One delivery pass over these SMS keys: one pooled HTTP client, each outcome committed as it happens."""
    config, rate = sms_config(), provider_rate(SMS_LIMIT)
    with dlog.delivery_session(db.get_engine()) as (conn, token):
        return delivery.deliver(
            conn, token, keys, "sms", lambda: delivery.sms_sender(config), final=final, before_send=rate
        )


@task(**task_options("deliver-emails"))
def deliver_emails(keys: list[str]) -> dlog.DeliveryReport:
    """Send the unsent emails among these keys over one SMTP session, committing each outcome as it happens."""
    final = final_attempt(task_run.get_run_count())
    return _raise_if_retryable(deliver_email_keys(keys, final=final), "email", final=final)


@task(**task_options("deliver-sms"))
def deliver_sms(keys: list[str]) -> dlog.DeliveryReport:
    """Send the unsent SMS among these keys through one pooled HTTP client, committing each outcome."""
    final = final_attempt(task_run.get_run_count())
    return _raise_if_retryable(deliver_sms_keys(keys, final=final), "sms", final=final)


@task(**task_options("report-messages"))
def report_messages(keys: list[str], flow_name: str, extra: dict[str, int]) -> dict[str, Any]:
    """Count this run's messages by status and publish them, with dead-letter reasons, as a markdown artifact."""
    with db.session_scope() as s:
        rows = dlog.summary_rows(s, keys)
    counts: dict[str, Any] = dlog.counts_by_status(rows) | extra
    reasons = dead_reasons(rows)
    headline = ", ".join(f"{counts[k]} {k}" for k in ("sent", "dead", "failed", "pending", "sending") if counts[k])
    parts = [
        md.section(
            "By kind, channel and status", md.table(dlog.summary_table(rows), ["kind", "channel", "status", "messages"])
        )
    ]
    if shown := {k: v for k, v in extra.items() if v}:
        parts.append(md.section("Other counts", md.table([shown], list(shown))))
    if reasons:
        parts.append(md.section("Dead letters", "\n".join(f"- {r}" for r in reasons[:20])))
    publish_markdown(
        f"notifications-{flow_name}",
        md.document(f"{flow_name}: {headline or 'nothing to send'}", *parts),
        f"Messages of this `{flow_name}` run",
    )
    return counts | {
        "rows": [{"status": r["status"], "last_error": r["last_error"]} for r in rows if r["status"] == "dead"]
    }


# --- the steps every notification flow takes ---------------------------------------------------


def submit_deliveries(batch: MessageBatch) -> list[PrefectFuture[dlog.DeliveryReport]]:
    """Start the email and SMS deliveries of a recorded batch; the two channels run at the same time."""
    futures = []
    if emails := batch.keys("email"):
        futures.append(deliver_emails.submit(emails))
    if texts := batch.keys("sms"):
        futures.append(deliver_sms.submit(texts))
    return futures


def await_deliveries(futures: Sequence[PrefectFuture[dlog.DeliveryReport]]) -> dict[str, int]:
    """Wait for delivery tasks; a task that failed outright is counted (its rows stay claimable)."""
    wait(list(futures))
    totals = {"recovered": 0, "failed_tasks": 0}
    for f in futures:
        if f.state.is_completed():
            totals["recovered"] += f.result().recovered
        else:
            totals["failed_tasks"] += 1
            get_run_logger().error("delivery task failed: %s", scrub(str(f.state.message)))
    return totals


def dead_reasons(rows: list[dict[str, Any]]) -> list[str]:
    """The distinct reasons of the dead rows, scrubbed and cut short."""
    return sorted({scrub(r["last_error"] or "")[:200] for r in rows if r["status"] == "dead"})


def undelivered_error(name: str, counts: dict[str, Any], rows: list[dict[str, Any]]) -> JobError | None:
    """PermanentError when a message is dead, TransientError when one is not delivered yet, else None."""
    if counts["dead"]:
        return PermanentError(f"{name}: {counts['dead']} message(s) dead: {'; '.join(dead_reasons(rows)[:5])}")
    waiting = counts["pending"] + counts["failed"] + counts["sending"]
    if waiting and not counts.get("deferred"):
        return TransientError(f"{name}: {waiting} message(s) not delivered yet; rerun to finish")
    return None


def raise_if_undelivered(flow_name: str, counts: dict[str, Any]) -> dict[str, Any]:
    """Fail the run when a message is dead (permanent) or not delivered yet (rerun to finish)."""
    rows = counts.pop("rows", [])
    if error := undelivered_error(flow_name, counts, rows):
        raise error
    return counts


def send_messages(request: MessageRequest, flow_name: str) -> dict[str, Any]:
    """Record, deliver and report the messages of one request; fail if any is dead or undelivered."""
    batch = record_messages(request)
    totals = await_deliveries(submit_deliveries(batch))
    extra = {"missing": len(batch.missing), "opted_out": batch.opted_out, "no_address": batch.no_address}
    counts = report_messages(batch.keys(), flow_name, extra | totals)
    return raise_if_undelivered(flow_name, counts)


def _chunks(items: Sequence[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


def send_in_batches(
    requests: Iterable[MessageRequest], flow_name: str, deadline: float | None = None
) -> dict[str, Any]:
    """The bulk form: record batches concurrently, deliver each as soon as it is recorded, stop at the soft limit.

    ``deadline`` (a ``time.time()`` value) defaults to FLOW_SOFT_LIMIT_SECONDS from now; the
    nightly run passes its own, so its confirmations share the night's limit. A batch reached
    after it is still recorded (pending) but not sent: `resend-stuck-messages` sends it within
    the quarter hour, once. The run fails if a message is dead.
    """
    deadline = deadline if deadline is not None else time.time() + get_settings().flow_soft_limit_seconds
    total, deliveries = MessageBatch(), []
    recording: deque[PrefectFuture[MessageBatch]] = deque()
    deferring = []

    def deliver_next() -> None:
        batch = recording.popleft().result()
        deliveries.extend(submit_deliveries(batch))
        total.extend(batch)

    for request in requests:
        if time.time() >= deadline:
            deferring.append(record_messages.submit(request))
            continue
        recording.append(record_messages.submit(request))
        # A couple of batches recorded ahead, no more: deliveries start at once instead of queueing
        # behind the recording of the whole night in the task runner.
        if len(recording) > RECORD_AHEAD:
            deliver_next()
    while recording:
        deliver_next()
    totals = await_deliveries(deliveries)
    for future in deferring:
        total.extend(future.result())
    if deferring:
        get_run_logger().warning(
            "soft limit reached: %d batch(es) recorded and left pending for resend-stuck-messages", len(deferring)
        )
    if total.missing:
        get_run_logger().warning("%d id(s) name no row and were skipped: %s", len(total.missing), total.missing[:20])
    extra = {
        "missing": len(total.missing),
        "opted_out": total.opted_out,
        "no_address": total.no_address,
        "deferred_batches": len(deferring),
    } | totals
    counts = report_messages(total.keys(), flow_name, extra)
    return raise_if_undelivered(flow_name, counts | {"deferred": len(deferring)})


# --- flows: one per message kind (lib.notify.kinds) -------------------------------------------------


@functools.cache
def kind_flow(kind: kinds.Kind) -> Flow[..., dict[str, Any]]:
    """The flow of a message kind: its parameters checked as declared, then record, deliver, report.

    Without a caller's key, a kind keyed by the run (plain, templated, token messages) takes the
    run's id, so a retried run sends once; the others are keyed by what they are about."""
    signature = kind.signature(id_type=PositiveId, key_type=IdempotencyKey)

    def send(*args: Any, **kwargs: Any) -> dict[str, Any]:
        params, key = kinds.bind(kind, args, kwargs)
        return send_messages(kind.request(params, run_key(key) if kind.keyless == "run" else key), kind.name)

    send.__name__ = send.__qualname__ = kind.function
    send.__doc__ = kind.doc
    send.__module__ = __name__
    return flow(**flow_options(kind.name))(with_signature(send, signature))


# A kind registered after import (a test's) is a flow here too, as ``flows/notifications.py:<name>``.
__getattr__ = kinds.expose(globals(), "function", kind_flow)


# --- dead letters and stuck messages -----------------------------------------------------------------


@task(**task_options("requeue-dead-letters"))
def requeue_dead_letters(
    ids: list[int] | None, since: dt.datetime | None, until: dt.datetime | None
) -> list[tuple[str, str]]:
    """Put the chosen dead messages back to pending; returns (key, channel) of each."""
    with db.session_scope() as s:
        found = dlog.find_dead(s, ids, since, until)
        dlog.requeue(s, [k for k, _ in found])
    return found


@task(**task_options("find-stuck-messages"))
def find_stuck_messages(older_than_minutes: int) -> list[tuple[str, str]]:
    """Messages nobody is finishing: `sending` under a stopped worker, or pending/failed for ``older_than_minutes``."""
    with db.session_scope() as s:
        return dlog.stuck(s, older_than_minutes)


def _deliver_found(found: list[tuple[str, str]], flow_name: str, extra: dict[str, int]) -> dict[str, Any]:
    size = get_settings().notification_batch_size
    futures = []
    for channel, task_fn in (("email", deliver_emails), ("sms", deliver_sms)):
        futures += [task_fn.submit(chunk) for chunk in _chunks([k for k, c in found if c == channel], size)]
    totals = await_deliveries(futures)
    counts = report_messages([k for k, _ in found], flow_name, extra | totals)
    return raise_if_undelivered(flow_name, counts)


@flow(**flow_options("replay-dead-letters"))
def replay_dead_letters(
    ids: list[PositiveId] | None = None, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> dict[str, Any]:
    """Resend dead messages (by ids, or last updated in [since, until)) once each, re-reading current addresses."""
    if ids is None and since is None and until is None:
        raise InvalidInputError("give ids or a time window (since and/or until) to replay")
    found = requeue_dead_letters([positive_id(i, "notification id") for i in ids or []] or None, since, until)
    return _deliver_found(found, "replay-dead-letters", {"replayed": len(found)})


@flow(**flow_options("resend-stuck-messages"))
def resend_stuck_messages(older_than_minutes: NonNegativeInt = 15) -> dict[str, Any]:
    """Finish messages a stopped worker or a failed run left behind (at most one resend each)."""
    found = find_stuck_messages(older_than_minutes)
    return _deliver_found(found, "resend-stuck-messages", {"found": len(found)})
