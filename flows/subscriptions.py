"""Subscription flows: the nightly run, one subscription on demand, tomorrow's reminders, Razorpay events.

Thin orchestration over lib.subscriptions, lib.payments and lib.razorpay: each task is
one call with the shared retry policy; the work itself is set-based SQL in lib/.
Confirmations and reminders go through the notification steps of flows.notifications.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pandas as pd
from prefect import State, flow, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.responses import SetStateStatus
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from prefect.states import Cancelled
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import NonNegativeInt, PositiveInt

from flows.common import flow_options, publish_markdown, publish_table, run_id, scheduled_date, task_options
from flows.notifications import send_in_batches, send_messages
from flows.prefect_compat import completed_with_summary, summary_of
from lib import night_report, payments, razorpay
from lib import subscription_lanes as sub_lanes
from lib import subscription_stats as sub_stats
from lib import subscriptions as subs
from lib.config import get_settings
from lib.db import session_scope
from lib.errors import InvalidInputError, JobError, PermanentError, RejectedError, positive_int
from lib.notify.requests import OrderConfirmationRequest, PaymentFailedRequest, RenewalReminderRequest
from lib.schedule import check_run_date

REMINDER_CHUNK = 1000


def _today() -> dt.date:
    return dt.datetime.now(dt.UTC).date()


@task(**task_options("process-lane"))
def process_lane(
    lane: int, lanes: int, run_date: dt.date, batch_size: int, run_id: str, deadline: float
) -> sub_lanes.LaneResult:
    """Claim and process batches (one transaction each) until nothing is due or the soft limit."""
    result = sub_lanes.run_lane(session_scope, run_date, batch_size, run_id, deadline, (lane, lanes))
    get_run_logger().info("lane %d: %d batches, %d isolated", lane, result.batches, result.isolated_batches)
    return result


@task(**task_options("dry-run-subscriptions"))
def dry_run_subscriptions(run_date: dt.date, batch_size: int) -> sub_lanes.LaneResult:
    """Compute what a run would do, read-only."""
    with session_scope() as session:
        return sub_lanes.read_only_dry_run(session, run_date, batch_size)


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


def _confirm(run: str, stats: dict[str, Any], deadline: float | None = None) -> JobError | None:
    """Send the run's confirmations; a dead or undelivered one is returned (after the rest went), not raised.

    Past ``deadline`` (the night's soft limit) they are recorded and left to resend-stuck-messages.
    """
    counter = [0]
    try:
        requests = _confirmation_requests(run, counter)
        stats["confirmations"] = send_in_batches(requests, "order-confirmations", deadline)
    except JobError as exc:
        stats["confirmations_failed"] = str(exc)
        return exc
    finally:
        stats["confirmations_requested"] = counter[0]
    return None


def _night_stats(
    lanes: list[sub_lanes.LaneResult], run_date: dt.date, dry_run: bool
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The lanes' summaries merged (pandas, bounded by products x outcomes) and the run's headline numbers."""
    groups = sub_stats.summarize([], pd.concat([lane.groups for lane in lanes], ignore_index=True))
    stats: dict[str, Any] = {
        "run_date": run_date.isoformat(),
        "dry_run": dry_run,
        **sub_stats.headline(groups),
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
    text = night_report.render(groups, stats, names, batch_ms, run_date, dry_run=dry)
    publish_markdown(key, text, f"Subscriptions due on or before {run_date}" + (" (dry run)" if dry else ""))


def _confirm_and_report(
    key: str,
    run: str,
    lanes: list[sub_lanes.LaneResult],
    run_date: dt.date,
    paid: dict[str, int],
    *,
    confirm: bool,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Confirm what the run created, publish its summary, then fail if a confirmation could not go.

    The run's created orders are read from its outcome rows, so a rescheduled run (same id)
    confirms what its crashed first attempt created, even when it creates nothing itself.
    """
    groups, stats = _night_stats(lanes, run_date, dry_run=False)
    stats["payments_attached"] = paid
    failure = _confirm(run, stats, deadline) if confirm else None
    publish_night_summary(key, groups, [ms for lane in lanes for ms in lane.batch_ms], stats, run_date)
    if failure is not None:
        raise failure
    return stats


@flow(**flow_options("process-due-subscriptions", task_runner=ThreadPoolTaskRunner(max_workers=16)))
def process_due_subscriptions(
    run_date: dt.date | None = None,
    batch_size: PositiveInt = subs.BATCH_SIZE,
    max_concurrency: PositiveInt = subs.LANES,
    dry_run: bool = False,
    send_confirmations: bool = True,
    allow_any_date: bool = False,
    worker_runs: NonNegativeInt = 0,
) -> dict[str, Any]:
    """Turn every due active subscription into one order, in concurrent set-based batches; then confirm them.

    run_date defaults to the scheduled date; one more than a day ahead of today or more than
    35 days behind is refused unless allow_any_date (dry_run reports any date). worker_runs > 0
    shares the lanes among that many process-subscription-lanes runs, picked up by any workers
    of the subscriptions queue; 0 runs them here, in threads.
    """
    s = get_settings()
    run_date = check_run_date(scheduled_date(run_date), _today(), allow_any_date=allow_any_date or dry_run)
    subs.validate_knobs(batch_size, max_concurrency)
    _check_worker_runs(worker_runs, max_concurrency)
    if dry_run:
        groups, stats = _night_stats([dry_run_subscriptions(run_date, batch_size)], run_date, dry_run=True)
        publish_night_summary("process-due-subscriptions", groups, [], stats, run_date)
        return stats
    run = run_id()
    deadline = time.time() + s.flow_soft_limit_seconds
    if worker_runs:
        lanes = [_lanes_on_workers(run_date, batch_size, max_concurrency, worker_runs, run, deadline)]
    else:
        futures = [
            process_lane.submit(i, max_concurrency, run_date, batch_size, run, deadline) for i in range(max_concurrency)
        ]
        lanes = [f.result() for f in futures]
    paid = attach_awaiting_payments(run_date)
    return _confirm_and_report(
        "process-due-subscriptions", run, lanes, run_date, paid, confirm=send_confirmations, deadline=deadline
    )


# --- scale-out: the night's lanes as flow runs on several workers ---------------------------------

LANES_DEPLOYMENT = "process-subscription-lanes/default"
LANE_RUN_POLL_SECONDS = 2.0
# A lane run still waiting for a worker after this long is cancelled and its lanes run in the nightly run.
LANE_RUN_START_SECONDS = 300.0


class LaneRunError(PermanentError):
    """A lane run of the night did not complete; what it left stays due for a rerun of the night."""


def _check_worker_runs(worker_runs: int, lanes: int) -> None:
    if not 0 <= worker_runs <= lanes:
        raise InvalidInputError(f"worker_runs must be between 0 and max_concurrency ({lanes}), got {worker_runs}")


@task(**task_options("summarize-run-outcomes"))
def summarize_run_outcomes(run_id: str) -> pd.DataFrame:
    """The outcomes this run recorded, by outcome, frequency and product, read from the database."""
    with session_scope() as session:
        return sub_stats.run_outcomes(session, run_id)


def _wait_or_take_back(run_ids: list[uuid.UUID]) -> tuple[list[Any], set[uuid.UUID]]:
    """Wait until every lane run is final; cancel those no worker took within LANE_RUN_START_SECONDS.

    Returns the runs and the ids cancelled here, whose lanes the caller does itself (e.g. a
    single subscriptions worker with --limit 1: it is busy with this very run).
    """
    give_up_at = time.monotonic() + LANE_RUN_START_SECONDS
    taken_back: set[uuid.UUID] = set()
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)))
            if len(runs) == len(run_ids) and all(r.state and r.state.is_final() for r in runs):
                return runs, taken_back
            for r in runs:
                if time.monotonic() > give_up_at and r.state and r.state.is_scheduled():
                    message = f"no worker took it within {LANE_RUN_START_SECONDS:.0f} s; the nightly run does its lanes"
                    if client.set_flow_run_state(r.id, Cancelled(message=message)).status == SetStateStatus.ACCEPT:
                        taken_back.add(r.id)
            time.sleep(LANE_RUN_POLL_SECONDS)


def _lanes_on_workers(
    run_date: dt.date, batch_size: int, lanes: int, worker_runs: int, run_id: str, deadline: float
) -> sub_lanes.LaneResult:
    """Start the lane runs, wait for them, then summarise the night from the database.

    Workers on other machines share no result storage, so the numbers come from the
    outcomes rows of this run id and the lane runs' final state messages, both central.
    """

    stop_at = dt.datetime.fromtimestamp(deadline, dt.UTC).isoformat()
    started: list[Any] = [
        run_deployment(
            LANES_DEPLOYMENT,
            parameters={
                "run_date": run_date.isoformat(),
                "lanes": list(range(k, lanes, worker_runs)),
                "lane_count": lanes,
                "run_id": run_id,
                "batch_size": batch_size,
                "stop_claiming_at": stop_at,
            },
            timeout=0,
            as_subflow=True,
            # A retried night starts fresh lane runs; claims by run id skip what the first try decided.
            idempotency_key=f"{run_id}:{flow_run.get_run_count()}:lanes:{k}",
        )
        for k in range(worker_runs)
    ]
    get_run_logger().info("started %d lane runs: %s", len(started), ", ".join(r.name for r in started))
    runs, taken_back = _wait_or_take_back([r.id for r in started])
    failed = [f"{r.name} ({r.state_name})" for r in runs if r.id not in taken_back and not r.state.is_completed()]
    if failed:
        raise LaneRunError(f"lane run(s) did not complete: {', '.join(failed)}; the rest stays due for a rerun")
    here = [lane for r in started if r.id in taken_back for lane in r.parameters["lanes"]]
    if here:
        get_run_logger().warning("no worker took some lane runs in time: lanes %s run in this process", here)
    futures = [process_lane.submit(i, lanes, run_date, batch_size, run_id, deadline) for i in here]
    parts = [summary_of(r) for r in runs if r.id not in taken_back]
    parts += [vars(f.result()) for f in futures]
    return sub_lanes.LaneResult(
        summarize_run_outcomes(run_id),
        [],
        sum(p.get("batches", 0) for p in parts),
        sum(p.get("isolated_batches", 0) for p in parts),
        stopped_early=any(p.get("stopped_early", False) for p in parts),
    )


@flow(**flow_options("process-subscription-lanes", task_runner=ThreadPoolTaskRunner(max_workers=16)))
def process_subscription_lanes(
    run_date: dt.date,
    lanes: list[int],
    lane_count: int,
    run_id: str,
    batch_size: PositiveInt = subs.BATCH_SIZE,
    stop_claiming_at: dt.datetime | None = None,
) -> State:
    """Run some lanes of one night for process-due-subscriptions, on whichever worker picks this up."""
    s = get_settings()
    subs.validate_knobs(batch_size, lane_count)
    if not lanes or len(set(lanes)) != len(lanes) or not all(0 <= i < lane_count for i in lanes):
        raise InvalidInputError(f"lanes must be distinct numbers in 0..{lane_count - 1}, got {lanes}")
    if not run_id.strip():
        raise InvalidInputError("run_id (the night's run) must not be empty")
    deadline = (
        stop_claiming_at or dt.datetime.now(dt.UTC) + dt.timedelta(seconds=s.flow_soft_limit_seconds)
    ).timestamp()
    futures = [process_lane.submit(i, lane_count, run_date, batch_size, run_id, deadline) for i in lanes]
    results = [f.result() for f in futures]
    groups, night = _night_stats(results, run_date, dry_run=False)
    publish_night_summary(
        "process-subscription-lanes", groups, [ms for r in results for ms in r.batch_ms], night, run_date
    )
    stats = {
        "lanes": lanes,
        "batches": sum(r.batches for r in results),
        "isolated_batches": sum(r.isolated_batches for r in results),
        "stopped_early": any(r.stopped_early for r in results),
        "process": f"{socket.gethostname()}:{os.getpid()}",
    }
    get_run_logger().info("lanes %s of run %s done in process %s", lanes, run_id, stats["process"])
    return completed_with_summary(stats)


@task(**task_options("process-one-subscription"))
def process_one(subscription_id: int, run_date: dt.date, run_id: str) -> sub_lanes.LaneResult:
    """Process one subscription by id through the same batch code."""
    with session_scope() as session:
        row = subs.load_subscription(session, subscription_id)
        if row.status != "active":
            raise InvalidInputError(f"subscription {subscription_id} is {row.status}, not active: nothing to do")
        result = subs.process_batch(session, subs.Due(run_date, run_id, only_ids=[subscription_id]), 1)
    return sub_lanes.LaneResult(sub_stats.summarize(result.outcomes), [], 1, int(result.isolated), stopped_early=False)


@flow(**flow_options("process-single-subscription"))
def process_single_subscription(
    subscription_id: int, run_date: dt.date | None = None, send_confirmation: bool = True, allow_any_date: bool = False
) -> dict[str, Any]:
    """Process one subscription now, with the nightly rules; unknown or inactive ids fail."""
    positive_int(subscription_id, "subscription_id")
    run_date = check_run_date(scheduled_date(run_date), _today(), allow_any_date=allow_any_date)
    run = run_id()
    lanes = [process_one(subscription_id, run_date, run)]
    paid = attach_awaiting_payments(run_date, [subscription_id])
    return _confirm_and_report("process-single-subscription", run, lanes, run_date, paid, confirm=send_confirmation)


@task(**task_options("list-reminders-due"))
def list_reminders_due(day: dt.date, after_id: int, limit: int) -> list[tuple[int, dt.date | None]]:
    """One page of active subscriptions delivering on ``day``."""
    with session_scope() as session:
        return [(sid, day) for sid in subs.reminders_due(session, day, after_id, limit)]


def _reminder_requests(day: dt.date, counter: list[int]) -> Iterator[RenewalReminderRequest]:
    after = 0
    while page := list_reminders_due(day, after, REMINDER_CHUNK):
        counter[0] += len(page)
        yield RenewalReminderRequest(tuple(page))
        after = page[-1][0]


@flow(**flow_options("remind-upcoming-deliveries"))
def remind_upcoming_deliveries(run_date: dt.date | None = None, allow_any_date: bool = False) -> dict[str, Any]:
    """Remind every active subscription delivering the day after the run date, once per delivery date."""
    day = check_run_date(scheduled_date(run_date), _today(), allow_any_date=allow_any_date) + dt.timedelta(days=1)
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
            payments.mark_event_failed(session, event.event_id, reason)
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
    out: dict[str, Any] = {
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
