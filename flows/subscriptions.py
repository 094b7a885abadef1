"""Subscription flows: the nightly run, one subscription on demand, tomorrow's reminders, Razorpay events.

Thin orchestration over lib.subscriptions, lib.payments and lib.razorpay: each task is
one call with the shared retry policy; the work itself is set-based SQL in lib/.
Confirmations and reminders go through the notification steps of flows.notifications.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import flow_options, publish_markdown, publish_table, run_id, scheduled_date, task_options
from flows.notifications import send_in_batches, send_messages
from lib import night_report, payments, razorpay
from lib import subscriptions as subs
from lib.config import get_settings
from lib.db import session_scope
from lib.errors import InvalidInputError, JobError, PermanentError, RejectedError
from lib.notify.messages import OrderConfirmationRequest, PaymentFailedRequest, RenewalReminderRequest
from lib.schedule import check_run_date

REMINDER_CHUNK = 1000


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


@task(**task_options("process-lane"))
def process_lane(
    lane: int, lanes: int, run_date: dt.date, batch_size: int, run_id: str, deadline: float
) -> subs.LaneResult:
    """Claim and process batches (one transaction each) until nothing is due or the soft limit."""
    result = subs.run_lane(session_scope, run_date, batch_size, run_id, deadline, (lane, lanes))
    get_run_logger().info("lane %d: %d batches, %d isolated", lane, result.batches, result.isolated_batches)
    return result


@task(**task_options("dry-run-subscriptions"))
def dry_run_subscriptions(run_date: dt.date, batch_size: int) -> subs.LaneResult:
    """Compute what a run would do, read-only."""
    with session_scope() as session:
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        return subs.dry_run(session, run_date, batch_size)


@task(**task_options("list-created-orders"))
def list_created_orders(run_id: str, after_id: int, limit: int) -> list[int]:
    """One page of the orders this run created."""
    with session_scope() as session:
        return subs.created_order_ids(session, run_id, after_id, limit)


@task(**task_options("attach-awaiting-payments"))
def attach_awaiting_payments(run_date: dt.date, only: list[int] | None = None) -> dict[str, int]:
    """Mark paid the orders of cycles charged in advance, now that their orders exist (one transaction)."""
    with session_scope() as session:
        return payments.attach_awaiting_payments(session, run_date, only)


def _confirmation_requests(run: str, counter: list[int]) -> Iterator[OrderConfirmationRequest]:
    """The run's created orders, a batch of confirmations at a time (read page by page, never all at once)."""
    after, size = 0, get_settings().notification_batch_size
    while page := list_created_orders(run, after, size):
        counter[0] += len(page)
        yield OrderConfirmationRequest(tuple(page))
        after = page[-1]


def _confirm(run: str, stats: dict[str, Any]) -> JobError | None:
    """Send the run's confirmations; a dead or undelivered one is returned (after the rest went), not raised."""
    counter = [0]
    try:
        stats["confirmations"] = send_in_batches(_confirmation_requests(run, counter), "order-confirmations")
    except JobError as exc:
        stats["confirmations_failed"] = str(exc)
        return exc
    finally:
        stats["confirmations_requested"] = counter[0]
    return None


def _night_stats(lanes: list[subs.LaneResult], run_date: dt.date, dry_run: bool) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The lanes' summaries merged (pandas, bounded by products x outcomes) and the run's headline numbers."""
    groups = subs.summarize([], pd.concat([lane.groups for lane in lanes], ignore_index=True))
    stats: dict[str, Any] = {
        "run_date": run_date.isoformat(),
        "dry_run": dry_run,
        **subs.headline(groups),
        "batches": sum(lane.batches for lane in lanes),
        "isolated_batches": sum(lane.isolated_batches for lane in lanes),
        "stopped_early": any(lane.stopped_early for lane in lanes),
    }
    if stats["stopped_early"]:
        get_run_logger().warning("soft time limit reached: the rest stays due for the next run")
    return groups, stats


@task(**task_options("publish-night-summary"))
def publish_night_summary(
    key: str, groups: pd.DataFrame, batch_ms: list[float], stats: dict[str, Any], run_date: dt.date
) -> None:
    """Publish the run's markdown summary: headline, outcomes, frequencies, top products by name, ₹ amounts."""
    with session_scope() as session:
        names = night_report.product_names(session, night_report.top_product_ids(groups))
    dry = bool(stats["dry_run"])
    text = night_report.render(groups, stats, names, batch_ms, run_date, dry)
    publish_markdown(key, text, f"Subscriptions due on or before {run_date}" + (" (dry run)" if dry else ""))


def _finish(
    key: str, run: str, lanes: list[subs.LaneResult], run_date: dt.date, paid: dict[str, int], confirm: bool
) -> dict[str, Any]:
    """Confirm what the run created, publish its summary, then fail if a confirmation could not go."""
    groups, stats = _night_stats(lanes, run_date, dry_run=False)
    stats["payments_attached"] = paid
    failure = _confirm(run, stats) if confirm and stats["created"] else None
    publish_night_summary(key, groups, [ms for lane in lanes for ms in lane.batch_ms], stats, run_date)
    if failure is not None:
        raise failure
    return stats


@flow(**flow_options("process-due-subscriptions", task_runner=ThreadPoolTaskRunner(max_workers=16)))
def process_due_subscriptions(
    run_date: dt.date | None = None,
    batch_size: int | None = None,
    max_concurrency: int | None = None,
    dry_run: bool = False,
    send_confirmations: bool = True,
    allow_any_date: bool = False,
) -> dict[str, Any]:
    """Turn every due active subscription into one order, in concurrent set-based batches; then confirm them.

    run_date defaults to the scheduled date; one more than a day ahead of today or more than
    35 days behind is refused unless allow_any_date (dry_run reports any date).
    """
    s = get_settings()
    run_date = check_run_date(scheduled_date(run_date), _today(), allow_any_date or dry_run)
    batch_size = s.subscription_batch_size if batch_size is None else batch_size
    max_concurrency = s.subscription_max_concurrency if max_concurrency is None else max_concurrency
    subs.validate_knobs(batch_size, max_concurrency)
    if dry_run:
        groups, stats = _night_stats([dry_run_subscriptions(run_date, batch_size)], run_date, dry_run=True)
        publish_night_summary("process-due-subscriptions", groups, [], stats, run_date)
        return stats
    run = run_id()
    deadline = time.time() + s.flow_soft_limit_seconds
    futures = [
        process_lane.submit(i, max_concurrency, run_date, batch_size, run, deadline) for i in range(max_concurrency)
    ]
    lanes = [f.result() for f in futures]
    paid = attach_awaiting_payments(run_date)
    return _finish("process-due-subscriptions", run, lanes, run_date, paid, send_confirmations)


@task(**task_options("process-one-subscription"))
def process_one(subscription_id: int, run_date: dt.date, run_id: str) -> subs.LaneResult:
    """Process one subscription by id through the same batch code."""
    with session_scope() as session:
        row = subs.load_subscription(session, subscription_id)
        if row.status != "active":
            raise InvalidInputError(f"subscription {subscription_id} is {row.status}, not active: nothing to do")
        result = subs.process_batch(session, run_date, 1, run_id, only_ids=[subscription_id])
    return subs.LaneResult(subs.summarize(result.outcomes), [], 1, int(result.isolated), False)


@flow(**flow_options("process-single-subscription"))
def process_single_subscription(
    subscription_id: int, run_date: dt.date | None = None, send_confirmation: bool = True, allow_any_date: bool = False
) -> dict[str, Any]:
    """Process one subscription now, with the nightly rules; unknown or inactive ids fail."""
    if subscription_id <= 0:
        raise InvalidInputError(f"subscription_id must be a positive id, got {subscription_id}")
    run_date = check_run_date(scheduled_date(run_date), _today(), allow_any_date)
    run = run_id()
    lanes = [process_one(subscription_id, run_date, run)]
    paid = attach_awaiting_payments(run_date, [subscription_id])
    return _finish("process-single-subscription", run, lanes, run_date, paid, send_confirmation)


@task(**task_options("list-reminders-due"))
def list_reminders_due(day: dt.date, after_id: int, limit: int) -> list[tuple[int, str]]:
    """One page of active subscriptions delivering on ``day``."""
    from sqlalchemy import text

    with session_scope() as session:
        rows = session.execute(
            text(
                "SELECT id FROM subscriptions WHERE status = 'active' AND next_delivery_date = :d "
                "AND id > :a ORDER BY id LIMIT :n"
            ),
            {"d": day, "a": after_id, "n": limit},
        ).scalars()
        return [(sid, day.isoformat()) for sid in rows]


def _reminder_requests(day: dt.date, counter: list[int]) -> Iterator[RenewalReminderRequest]:
    after = 0
    while page := list_reminders_due(day, after, REMINDER_CHUNK):
        counter[0] += len(page)
        yield RenewalReminderRequest(tuple(page))
        after = page[-1][0]


@flow(**flow_options("remind-upcoming-deliveries"))
def remind_upcoming_deliveries(run_date: dt.date | None = None, allow_any_date: bool = False) -> dict[str, Any]:
    """Remind every active subscription delivering the day after the run date, once per delivery date."""
    day = check_run_date(scheduled_date(run_date), _today(), allow_any_date) + dt.timedelta(days=1)
    counter = [0]
    counts = send_in_batches(_reminder_requests(day, counter), "remind-upcoming-deliveries")
    return counts | {"subscriptions": counter[0], "delivery_date": day.isoformat()}


@task(**task_options("record-razorpay-event"))
def record_razorpay_event(event: razorpay.RazorpayEvent) -> payments.Inbox:
    """Put the event in the inbox, committed before any work, so a payment is on record whatever follows."""
    with session_scope() as session:
        return payments.record_event(session, event)


@task(**task_options("apply-razorpay-event"))
def apply_razorpay_event(event: razorpay.RazorpayEvent, today: dt.date) -> payments.EventResult:
    """Apply one recorded event in its own transaction; the inbox row ends applied, rejected or failed."""
    try:
        with session_scope() as session:
            return payments.apply_event(session, event, today)
    except Exception as exc:
        # The inbox shows why (a redelivery applies it again); the error itself goes on to the retry policy.
        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        with contextlib.suppress(Exception), session_scope() as session:
            payments.mark_failed(session, event.event_id, reason)
        raise


def _event_artifact(result: payments.EventResult) -> None:
    row = {
        k: getattr(result, k)
        for k in (
            "event_id",
            "event",
            "status",
            "reason",
            "payment_id",
            "amount_paise",
            "expected_paise",
            "order_id",
            "subscription_id",
        )
    }
    publish_table("razorpay-event", [row], f"Razorpay {result.event} {result.event_id}: {result.status}")


@flow(**flow_options("handle-razorpay-event"))
def handle_razorpay_event(body: str, signature: str, event_id: str) -> dict[str, Any]:
    """Verify a Razorpay webhook, record it in the inbox, apply it once; a refused charge fails the run.

    Rules (lib.payments): a charge applies only when captured, in INR, for the cycle's exact
    total; it pays the oldest unpaid order, or makes the due cycle's order, or waits for a
    cycle not due yet; a charge that cannot be applied is kept as a held payment.
    """
    raw = body.encode()
    razorpay.verify_signature(raw, signature, get_settings().webhook_secret())
    event = razorpay.parse_event(raw, event_id)
    inbox = record_razorpay_event(event)
    if inbox.done:
        get_run_logger().info("razorpay %s %s: already %s", event.event, event.event_id, inbox.status)
        return {"event": event.event, "status": "replay", "reason": inbox.reason, "order_id": inbox.order_id}
    if inbox.status == "rejected":
        raise RejectedError(f"razorpay event {event.event_id} was rejected: {inbox.reason}")
    result = apply_razorpay_event(event, _today())
    _event_artifact(result)
    get_run_logger().info("razorpay %s %s: %s (%s)", event.event, event.event_id, result.status, result.reason)
    if not result.ok:
        raise (RejectedError if result.status == "rejected" else PermanentError)(
            f"razorpay {event.event} {event.event_id} {result.status}: {result.reason}"
        )
    out = {
        "event": event.event,
        "status": result.status,
        "reason": result.reason,
        "order_id": result.order_id,
        "subscription_id": result.subscription_id,
        "order_created": result.order_created,
    }
    if result.confirm_order and result.order_id is not None:
        # The nightly run's key: the customer gets one confirmation whichever path asks first.
        out["confirmation"] = send_messages(OrderConfirmationRequest((result.order_id,)), "order-confirmation")
    if result.status == "notify":
        request = PaymentFailedRequest(
            result.order_id, result.subscription_id, result.details["reason"], f"razorpay:{event.event_id}"
        )
        out["notification"] = send_messages(request, "payment-failed")
    return out
