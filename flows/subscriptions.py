"""Subscription flows: the nightly run, one subscription on demand, reminders, Razorpay events.

Thin orchestration over lib.subscriptions and lib.razorpay: each task is one call
with the shared retry policy; the work itself is set-based SQL in lib/.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
import uuid
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Completed, State
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import publish_table, retry_options, scheduled_date
from lib import razorpay
from lib import subscriptions as subs
from lib.config import get_settings
from lib.db import session_scope
from lib.errors import InvalidInputError, PermanentError

CONFIRMATION_CHUNK = 5000
REMINDER_CHUNK = 1000


def _run_id() -> str:
    return flow_run.get_id() or f"adhoc-{uuid.uuid4()}"


@task(name="process-lane", cache_policy=NO_CACHE, **retry_options())
def process_lane(
    lane: int, lanes: int, run_date: dt.date, batch_size: int, run_id: str, deadline: float
) -> subs.LaneResult:
    """Claim and process batches (one transaction each) until nothing is due or the soft limit."""
    result = subs.run_lane(session_scope, run_date, batch_size, run_id, deadline, (lane, lanes))
    get_run_logger().info("lane %d: %d batches, %d isolated", lane, result.batches, result.isolated_batches)
    return result


@task(name="dry-run-subscriptions", cache_policy=NO_CACHE, **retry_options())
def dry_run_subscriptions(run_date: dt.date, batch_size: int) -> subs.LaneResult:
    """Compute what a run would do, read-only."""
    with session_scope() as session:
        session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        return subs.dry_run(session, run_date, batch_size)


@task(name="list-created-orders", cache_policy=NO_CACHE, **retry_options())
def list_created_orders(run_id: str, after_id: int, limit: int) -> list[int]:
    """One page of the orders this run created."""
    with session_scope() as session:
        return subs.created_order_ids(session, run_id, after_id, limit)


def _confirm(run_id: str) -> int:
    from flows.notifications import send_order_confirmations

    after, total = 0, 0
    while page := list_created_orders(run_id, after, CONFIRMATION_CHUNK):
        send_order_confirmations(order_ids=page)
        after, total = page[-1], total + len(page)
    return total


def _report(key: str, lanes: list[subs.LaneResult], run_date: dt.date, dry_run: bool) -> dict[str, Any]:
    groups = subs.summarize([], pd.concat([lane.groups for lane in lanes], ignore_index=True))
    batch_ms = [ms for lane in lanes for ms in lane.batch_ms]
    stats: dict[str, Any] = {
        "run_date": run_date.isoformat(),
        "dry_run": dry_run,
        **subs.headline(groups),
        "batches": sum(lane.batches for lane in lanes),
        "isolated_batches": sum(lane.isolated_batches for lane in lanes),
        "stopped_early": any(lane.stopped_early for lane in lanes),
    }
    publish_table(
        key,
        subs.night_tables(groups, batch_ms),
        f"Subscriptions due on or before {run_date}" + (" (dry run: nothing written)" if dry_run else ""),
    )
    return stats


@flow(
    name="process-due-subscriptions",
    task_runner=ThreadPoolTaskRunner(max_workers=16),
    timeout_seconds=get_settings().flow_timeout_seconds,
)
def process_due_subscriptions(
    run_date: dt.date | None = None,
    batch_size: int | None = None,
    max_concurrency: int | None = None,
    dry_run: bool = False,
    send_confirmations: bool = True,
    worker_runs: int = 0,
) -> dict[str, Any]:
    """Turn every due active subscription into one order, in concurrent set-based batches.

    worker_runs > 0 shares the lanes among that many process-subscription-lanes runs,
    picked up by any workers of the subscriptions queue; 0 runs them here, in threads.
    """
    s = get_settings()
    run_date = scheduled_date(run_date)
    batch_size = s.subscription_batch_size if batch_size is None else batch_size
    max_concurrency = s.subscription_max_concurrency if max_concurrency is None else max_concurrency
    subs.validate_knobs(batch_size, max_concurrency)
    _check_worker_runs(worker_runs, max_concurrency)
    if dry_run:
        return _report("process-due-subscriptions", [dry_run_subscriptions(run_date, batch_size)], run_date, True)
    run_id = _run_id()
    deadline = time.time() + s.flow_soft_limit_seconds
    if worker_runs:
        lanes = [_lanes_on_workers(run_date, batch_size, max_concurrency, worker_runs, run_id, deadline)]
    else:
        futures = [
            process_lane.submit(i, max_concurrency, run_date, batch_size, run_id, deadline)
            for i in range(max_concurrency)
        ]
        lanes = [f.result() for f in futures]
    stats = _report("process-due-subscriptions", lanes, run_date, False)
    if stats["stopped_early"]:
        get_run_logger().warning("soft time limit reached: the rest stays due for the next run")
    if send_confirmations and stats["created"]:
        stats["confirmations_requested"] = _confirm(run_id)
    return stats


# --- scale-out: the night's lanes as flow runs on several workers ---------------------------------

LANES_DEPLOYMENT = "process-subscription-lanes/default"
LANE_RUN_POLL_SECONDS = 2.0
# A lane run still waiting for a worker after this long is cancelled and its lanes run in the nightly run.
LANE_RUN_START_SECONDS = 300.0
# Aggregated in SQL so the summary stays products x outcomes x frequencies whatever the night's size.
# Units and revenue count only orders this run made (reason IS NULL), as the in-process summary does.
_RUN_OUTCOMES_SQL = """
SELECT o.outcome, s.frequency, s.product_id, count(*) AS subscriptions,
       CAST(coalesce(sum(i.units), 0) AS bigint) AS units,
       CAST(coalesce(sum(i.revenue_paise), 0) AS bigint) AS revenue_paise
FROM subscription_outcomes o
JOIN subscriptions s ON s.id = o.subscription_id
LEFT JOIN LATERAL (
    SELECT sum(quantity) AS units, sum(quantity * unit_price_paise) AS revenue_paise
    FROM order_items WHERE order_id = o.order_id
) i ON o.outcome = 'created' AND o.reason IS NULL
WHERE o.run_id = :run_id
GROUP BY o.outcome, s.frequency, s.product_id
"""


class LaneRunError(PermanentError):
    """A lane run of the night did not complete; what it left stays due for a rerun of the night."""


def _check_worker_runs(worker_runs: int, lanes: int) -> None:
    if not 0 <= worker_runs <= lanes:
        raise InvalidInputError(f"worker_runs must be between 0 and max_concurrency ({lanes}), got {worker_runs}")


@task(name="summarize-run-outcomes", cache_policy=NO_CACHE, **retry_options())
def summarize_run_outcomes(run_id: str) -> pd.DataFrame:
    """The outcomes this run recorded, by outcome, frequency and product, read from the database."""
    from sqlalchemy import text

    with session_scope() as session:
        rows = session.execute(text(_RUN_OUTCOMES_SQL), {"run_id": run_id}).all()
    return subs.summarize([], pd.DataFrame([tuple(r) for r in rows], columns=subs.SUMMARY_COLUMNS))


def _wait_or_take_back(run_ids: list[uuid.UUID]) -> tuple[list[Any], set[uuid.UUID]]:
    """Wait until every lane run is final; cancel those no worker took within LANE_RUN_START_SECONDS.

    Returns the runs and the ids cancelled here, whose lanes the caller does itself (e.g. a
    single subscriptions worker with --limit 1: it is busy with this very run).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.states import Cancelled

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
) -> subs.LaneResult:
    """Start the lane runs, wait for them, then summarise the night from the database.

    Workers on other machines share no result storage, so the numbers come from the
    outcomes rows of this run id and the lane runs' final state messages, both central.
    """
    from prefect.deployments import run_deployment

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
    parts = [json.loads(r.state.message or "{}") for r in runs if r.id not in taken_back]
    parts += [vars(f.result()) for f in futures]
    return subs.LaneResult(
        summarize_run_outcomes(run_id),
        [],
        sum(p.get("batches", 0) for p in parts),
        sum(p.get("isolated_batches", 0) for p in parts),
        any(p.get("stopped_early", False) for p in parts),
    )


@flow(
    name="process-subscription-lanes",
    task_runner=ThreadPoolTaskRunner(max_workers=16),
    timeout_seconds=get_settings().flow_timeout_seconds,
)
def process_subscription_lanes(
    run_date: dt.date,
    lanes: list[int],
    lane_count: int,
    run_id: str,
    batch_size: int | None = None,
    stop_claiming_at: dt.datetime | None = None,
) -> State:
    """Run some lanes of one night for process-due-subscriptions, on whichever worker picks this up."""
    s = get_settings()
    batch_size = s.subscription_batch_size if batch_size is None else batch_size
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
    groups = subs.summarize([], pd.concat([r.groups for r in results], ignore_index=True))
    batch_ms = [ms for r in results for ms in r.batch_ms]
    publish_table("process-subscription-lanes", subs.night_tables(groups, batch_ms), f"Lanes {lanes} of {run_id}")
    stats = {
        "lanes": lanes,
        "batches": sum(r.batches for r in results),
        "isolated_batches": sum(r.isolated_batches for r in results),
        "stopped_early": any(r.stopped_early for r in results),
        "process": f"{socket.gethostname()}:{os.getpid()}",
    }
    get_run_logger().info("lanes %s of run %s done in process %s", lanes, run_id, stats["process"])
    # The parent reads these numbers from the API (the state message): it shares no result storage with us.
    return Completed(message=json.dumps(stats), data=stats)


@task(name="process-one-subscription", cache_policy=NO_CACHE, **retry_options())
def process_one(subscription_id: int, run_date: dt.date, run_id: str) -> subs.LaneResult:
    """Process one subscription by id through the same batch code."""
    with session_scope() as session:
        row = subs.load_subscription(session, subscription_id)
        if row.status != "active":
            raise InvalidInputError(f"subscription {subscription_id} is {row.status}, not active: nothing to do")
        result = subs.process_batch(session, run_date, 1, run_id, only_ids=[subscription_id])
    return subs.LaneResult(subs.summarize(result.outcomes), [], 1, int(result.isolated), False)


@flow(name="process-single-subscription", timeout_seconds=get_settings().flow_timeout_seconds)
def process_single_subscription(
    subscription_id: int, run_date: dt.date | None = None, send_confirmation: bool = True
) -> dict[str, Any]:
    """Process one subscription now, with the nightly rules; unknown or inactive ids fail."""
    if subscription_id <= 0:
        raise InvalidInputError(f"subscription_id must be a positive id, got {subscription_id}")
    run_date = scheduled_date(run_date)
    run_id = _run_id()
    stats = _report("process-single-subscription", [process_one(subscription_id, run_date, run_id)], run_date, False)
    if stats["created"] == 0 and stats["out_of_stock"] == 0 and stats["failed"] == 0:
        get_run_logger().info("subscription %d is not due on %s", subscription_id, run_date)
    if send_confirmation and stats["created"]:
        stats["confirmations_requested"] = _confirm(run_id)
    return stats


@task(name="list-reminders-due", cache_policy=NO_CACHE, **retry_options())
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


@flow(name="send-subscription-renewal-reminders", timeout_seconds=get_settings().flow_timeout_seconds)
def send_subscription_renewal_reminders(run_date: dt.date | None = None) -> dict[str, Any]:
    """Remind every active subscription delivering tomorrow, once per delivery date."""
    from flows.notifications import send_renewal_reminders

    tomorrow = scheduled_date(run_date) + dt.timedelta(days=1)
    after, counts = 0, {"subscriptions": 0}
    while page := list_reminders_due(tomorrow, after, REMINDER_CHUNK):
        result = send_renewal_reminders(items=page) or {}
        for k, v in result.items():
            if isinstance(v, int):
                counts[k] = counts.get(k, 0) + v
        after, counts["subscriptions"] = page[-1][0], counts["subscriptions"] + len(page)
    counts["delivery_date"] = tomorrow.isoformat()
    return counts


@task(name="apply-razorpay-event", cache_policy=NO_CACHE, **retry_options())
def apply_razorpay_event(event: razorpay.RazorpayEvent, today: dt.date) -> dict[str, Any]:
    """Apply one verified event in one transaction; replays change nothing."""
    with session_scope() as session:
        if event.event == "subscription.charged":
            r = razorpay.handle_charged(session, event, today)
            return {
                "event": event.event,
                "status": r.status,
                "order_id": r.order_id,
                "subscription_id": r.subscription_id,
            }
        if event.event == "payment.failed":
            f = razorpay.handle_payment_failed(session, event)
            return {
                "event": event.event,
                "status": f.status,
                "order_id": f.order_id,
                "subscription_id": f.subscription_id,
                "reason": f.reason,
            }
        new = razorpay.record_ignored(session, event)
        return {"event": event.event, "status": "ignored" if new else "replay"}


@flow(name="handle-razorpay-event", timeout_seconds=get_settings().flow_timeout_seconds)
def handle_razorpay_event(body: str, signature: str, event_id: str | None = None) -> dict[str, Any]:
    """Verify a Razorpay webhook and apply it idempotently (the event id is the key)."""
    raw = body.encode()
    razorpay.verify_signature(raw, signature, get_settings().razorpay_webhook_secret.get_secret_value())
    event = razorpay.parse_event(raw, event_id)
    result = apply_razorpay_event(event, dt.datetime.now(dt.UTC).date())
    if result["event"] == "payment.failed" and result["status"] == "notify":
        from flows.notifications import send_payment_failed

        # The event is already recorded; a dead message must not fail the webhook's run.
        state = send_payment_failed(
            order_id=result["order_id"],
            subscription_id=result["subscription_id"],
            reason=result["reason"],
            idempotency_key=f"razorpay:{event.event_id}",
            return_state=True,
        )
        result["notification"] = state.type.value.lower()
    get_run_logger().info("razorpay %s %s: %s", event.event, event.event_id, result["status"])
    return result
