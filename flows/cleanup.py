"""Nightly housekeeping flows: stale carts, expired tokens, old audit logs, abandoned sessions.

Thin orchestration over lib.cleanup and lib.token_cleanup. Each task loops over batches (one
short transaction, or one Redis script call, per batch) rather than one task run per
row. The cutoff comes from the run's scheduled time, so a late run removes the same
rows the on-time run would have. After the soft limit a flow stops claiming batches
and leaves the rest for the next night.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING

from prefect import flow, get_run_logger, task
from pydantic import PositiveFloat, PositiveInt

from flows.common import flow_options, owner_retention, publish_table, scheduled_start, task_options
from lib import cleanup, outbox, retention, token_cleanup, tokens
from lib.cleanup import Limits, PassStats
from lib.config import get_settings
from lib.db import session_scope
from lib.notify import delivery_log as dlog

if TYPE_CHECKING:
    import pandas as pd

BATCH_SIZE = retention.DEFAULT_BATCH_SIZE


def _limits(soft_limit_seconds: float | None, max_batches: int | None) -> Limits:
    """Stop claiming batches at the soft limit (FLOW_SOFT_LIMIT_SECONDS unless given) or after max_batches."""
    seconds = soft_limit_seconds if soft_limit_seconds is not None else get_settings().flow_soft_limit_seconds
    return Limits(stop_at=time.time() + seconds, max_batches=max_batches)


def _report(
    name: str,
    stats: PassStats,
    cutoff: dt.datetime | None,
    dry_run: bool,
    kinds: tuple[str, ...],
    frame: pd.DataFrame | None = None,
) -> dict:
    """Log, publish the summary artifact and build the flow's return value."""
    publish_table(
        f"{name}-summary",
        frame if frame is not None else cleanup.summary_frame(stats, kinds),
        f"{name}: {'would remove' if dry_run else 'removed'} by kind"
        + (f", cutoff {cutoff.isoformat()}" if cutoff else "")
        + (" (stopped early at the soft limit)" if stats.stopped_early else ""),
    )
    if stats.stopped_early:
        get_run_logger().warning("%s stopped early; the rest is left for the next run", name)
    return {
        "removed": dict(stats.removed),
        "batches": stats.batches,
        "longest_batch_ms": round(stats.longest_batch_ms, 1),
        "stopped_early": stats.stopped_early,
        "dry_run": dry_run,
        "cutoff": cutoff.isoformat() if cutoff else None,
    }


@task(**task_options("delete-stale-carts"))
def delete_stale_carts(
    phase: str, cutoff: dt.datetime, now: dt.datetime, batch_size: int, limits: Limits, dry_run: bool
) -> PassStats:
    """Delete one phase of stale carts (empty ones, or ones with items) in short batches."""
    return cleanup.purge_carts(session_scope, phase, cutoff, now, batch_size, limits, dry_run=dry_run)


@task(**task_options("delete-aged-rows"))
def delete_aged_rows(table: str, cutoff: dt.datetime, batch_size: int, limits: Limits, dry_run: bool) -> PassStats:
    """Delete rows of one table older than the cutoff in short batches."""
    return cleanup.purge_aged(session_scope, table, cutoff, batch_size, limits, dry_run=dry_run)


@task(**task_options("check-token-store"))
def check_token_store() -> None:
    """Fail at once, naming the address, when Redis does not answer."""
    tokens.ping()


@task(**task_options("purge-token-index"))
def purge_token_index(kind: str, limits: Limits, dry_run: bool) -> PassStats:
    """Drop expired entries of one kind's expiry index; remove only tokens whose own expiry passed."""
    return token_cleanup.purge_expired_index(kind, dry_run=dry_run, limits=limits)


@task(**task_options("purge-user-index"))
def purge_user_index(limits: Limits, dry_run: bool) -> PassStats:
    """Drop per-user index entries whose token is gone."""
    return token_cleanup.purge_dangling_user_entries(dry_run=dry_run, limits=limits)


@task(**task_options("purge-ttl-lost-tokens"))
def purge_ttl_lost_tokens(limits: Limits, dry_run: bool) -> PassStats:
    """SCAN for token keys that lost their TTL; delete those past their own expiry."""
    return token_cleanup.purge_ttl_lost_keys(dry_run=dry_run, limits=limits)


@flow(**flow_options("cleanup-expired-carts"))
def cleanup_expired_carts(
    days_old: PositiveInt | None = None,
    batch_size: PositiveInt | None = None,
    dry_run: bool = False,
    max_batches: PositiveInt | None = None,
    soft_limit_seconds: PositiveFloat | None = None,
) -> dict:
    """Delete carts not updated for days_old days (the owner's setting, 30 unless changed), empty carts first,
    in short batches."""
    kept = owner_retention("cleanup-expired-carts", days_old=days_old, batch_size=batch_size)
    days, size, limits = kept["days_old"], kept["batch_size"], _limits(soft_limit_seconds, max_batches)
    now = scheduled_start()
    cutoff = cleanup.cutoff_for(now, days, "days_old")
    stats = delete_stale_carts("empty_carts", cutoff, now, size, limits, dry_run)
    if not stats.stopped_early:
        rest = delete_stale_carts("carts_with_items", cutoff, now, size, limits.after(stats.batches), dry_run)
        stats = stats.merge(rest)
    publish_table(
        "cleanup-expired-carts-age-histogram",
        cleanup.age_histogram(stats.ages),
        f"age in days (at {now.isoformat()}) of the carts {'that would be ' if dry_run else ''}removed",
    )
    out = _report("cleanup-expired-carts", stats, cutoff, dry_run, (*cleanup.CART_PHASES, "cart_items"))
    return out | {"age_histogram": {int(k): v for k, v in sorted(stats.ages.items())}}


@flow(**flow_options("cleanup-expired-tokens"))
def cleanup_expired_tokens(dry_run: bool = False, soft_limit_seconds: PositiveFloat | None = None) -> dict:
    """Remove expired token index entries, dangling per-user entries and TTL-less expired tokens from Redis."""
    limits = _limits(soft_limit_seconds, None)
    check_token_store()
    stats = PassStats()
    for kind in tokens.KINDS:
        stats = stats.merge(purge_token_index(kind, limits, dry_run))
    stats = stats.merge(purge_user_index(limits, dry_run))
    stats = stats.merge(purge_ttl_lost_tokens(limits, dry_run))
    frame = cleanup.token_summary(stats, tokens.KINDS)
    out = _report("cleanup-expired-tokens", stats, None, dry_run, tokens.KINDS, frame)
    return out | {"by_kind": frame.set_index("kind")[list(cleanup.TOKEN_COLUMNS.values())].to_dict(orient="index")}


@flow(**flow_options("cleanup-old-audit-logs"))
def cleanup_old_audit_logs(
    days: PositiveInt | None = None,
    batch_size: PositiveInt | None = None,
    dry_run: bool = False,
    max_batches: PositiveInt | None = None,
    soft_limit_seconds: PositiveFloat | None = None,
) -> dict:
    """Delete audit logs older than days (the owner's setting, 90 unless changed) in short batches."""
    kept = owner_retention("cleanup-old-audit-logs", days=days, batch_size=batch_size)
    size, limits = kept["batch_size"], _limits(soft_limit_seconds, max_batches)
    cutoff = cleanup.cutoff_for(scheduled_start(), kept["days"], "days")
    stats = delete_aged_rows("audit_logs", cutoff, size, limits, dry_run)
    return _report("cleanup-old-audit-logs", stats, cutoff, dry_run, ("audit_logs",))


@flow(**flow_options("cleanup-abandoned-sessions"))
def cleanup_abandoned_sessions(
    inactive_days: PositiveInt | None = None,
    batch_size: PositiveInt | None = None,
    dry_run: bool = False,
    max_batches: PositiveInt | None = None,
    soft_limit_seconds: PositiveFloat | None = None,
) -> dict:
    """Delete user sessions inactive for inactive_days (the owner's setting, 30 unless changed) in short batches."""
    kept = owner_retention("cleanup-abandoned-sessions", inactive_days=inactive_days, batch_size=batch_size)
    days, size, limits = kept["inactive_days"], kept["batch_size"], _limits(soft_limit_seconds, max_batches)
    cutoff = cleanup.cutoff_for(scheduled_start(), days, "inactive_days")
    stats = delete_aged_rows("user_sessions", cutoff, size, limits, dry_run)
    return _report("cleanup-abandoned-sessions", stats, cutoff, dry_run, ("user_sessions",))


@task(**task_options("clear-message-payloads"))
def clear_message_payloads(before: dt.datetime, batch_size: int, limits: Limits) -> PassStats:
    """Empty the stored text of finished plain and templated messages last touched before the cutoff."""
    return cleanup.purge_with(
        session_scope, lambda s: dlog.clear_payloads(s, before, batch_size), "payloads_cleared", batch_size, limits
    )


@task(**task_options("delete-message-rows"))
def delete_message_rows(before: dt.datetime, batch_size: int, limits: Limits) -> PassStats:
    """Delete sent and dead delivery-log rows last touched before the cutoff."""
    return cleanup.purge_with(
        session_scope, lambda s: dlog.delete_finished(s, before, batch_size), "rows_deleted", batch_size, limits
    )


@task(**task_options("delete-background-tasks"))
def delete_background_tasks(before: dt.datetime, batch_size: int, limits: Limits) -> PassStats:
    """Delete background-task rows (lib.outbox) finished before the cutoff: done, failed or revoked."""
    return cleanup.purge_with(
        session_scope, lambda s: outbox.delete_finished(s, before, batch_size), "tasks_deleted", batch_size, limits
    )


@flow(**flow_options("cleanup-delivery-log"))
def cleanup_delivery_log(
    payload_days: PositiveInt | None = None, row_days: PositiveInt | None = None, batch_size: PositiveInt = BATCH_SIZE
) -> dict:
    """Clear finished message texts after NOTIFICATION_PAYLOAD_RETENTION_DAYS (7); delete rows after 180 days;
    delete finished background tasks (the rows behind ``.delay()`` handles) after TASK_STORAGE_TTL_SECONDS."""
    s = get_settings()
    payload_days = payload_days or s.notification_payload_retention_days
    row_days, size = row_days or s.notification_retention_days, batch_size
    limits, now = _limits(None, None), scheduled_start()
    # Rows past both limits are deleted first: no point clearing what goes anyway.
    stats = delete_message_rows(cleanup.cutoff_for(now, row_days, "row_days"), size, limits)
    stats = stats.merge(clear_message_payloads(cleanup.cutoff_for(now, payload_days, "payload_days"), size, limits))
    tasks_before = now - dt.timedelta(seconds=s.task_storage_ttl_seconds)
    stats = stats.merge(delete_background_tasks(tasks_before, size, limits))
    return _report("cleanup-delivery-log", stats, None, False, ("rows_deleted", "payloads_cleared", "tasks_deleted"))
