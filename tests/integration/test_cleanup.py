"""Batched deletes on the real PostgreSQL: what goes, what stays, in which order, under locks."""

from __future__ import annotations

import datetime as dt
import threading
import time
from contextlib import contextmanager

import pytest
from sqlalchemy import text

from lib import cleanup
from lib.cleanup import Limits
from lib.db import session_scope
from lib.errors import InvalidInputError
from tests.builders import count_rows, make_audit_log, make_cart, make_user_session


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _purge_all_carts(days: int = 30, batch_size: int = 100, limits: Limits | None = None, dry_run: bool = False):
    now = _now()
    cutoff = cleanup.cutoff_for(now, days)
    stats = cleanup.PassStats()
    for phase in cleanup.CART_PHASES:
        limits_left = (limits or Limits()).after(stats.batches)
        if stats.stopped_early:
            break
        stats = stats.merge(
            cleanup.purge_carts(session_scope, phase, cutoff, now, batch_size, limits_left, dry_run=dry_run)
        )
    return stats


def _fresh_scalar(pg, sql: str):
    """One value read in a transaction of its own (pg_stat_activity is read once per transaction)."""
    with pg.connect() as conn:
        return conn.execute(text(sql)).scalar_one()


def _cart_ids(pg) -> set[int]:
    with pg.connect() as conn:
        return set(conn.execute(text("SELECT id FROM carts")).scalars())


def test_cart_29_days_old_stays_and_31_days_old_goes_with_its_items(pg):
    """A cart updated 29 days ago stays; one updated 31 days ago is deleted and its items with it."""
    fresh = make_cart(pg, age_days=29, items=2)
    stale = make_cart(pg, age_days=31, items=3)
    stats = _purge_all_carts()
    assert _cart_ids(pg) == {fresh}
    assert count_rows(pg, "cart_items") == 2
    assert stats.removed == {"empty_carts": 0, "carts_with_items": 1, "cart_items": 3}
    assert stale not in _cart_ids(pg)


def test_empty_carts_go_before_carts_with_items_when_stopped_early(pg):
    """With a budget of two batches, every stale empty cart goes first and carts with items wait."""
    empty = {make_cart(pg, age_days=40) for _ in range(4)}
    full = {make_cart(pg, age_days=40, items=1) for _ in range(4)}
    # Interleave ids so ordering by id alone would mix the two kinds.
    empty |= {make_cart(pg, age_days=50) for _ in range(2)}
    stats = _purge_all_carts(batch_size=3, limits=Limits(max_batches=2))
    assert stats.stopped_early
    assert _cart_ids(pg) == full
    assert stats.removed["empty_carts"] == len(empty)


def test_batches_cover_every_stale_row_and_the_age_histogram_counts_them(pg):
    """Many small batches remove every stale cart once, and the ages add up to what was removed."""
    for age in (31, 35, 46, 61, 100, 200, 400):
        make_cart(pg, age_days=age, items=age % 2)
    make_cart(pg, age_days=1)
    stats = _purge_all_carts(batch_size=2)
    assert count_rows(pg, "carts") == 1
    assert stats.batches >= 4
    assert sum(stats.ages.values()) == 7
    hist = cleanup.age_histogram(stats.ages).set_index("age_days")["removed"].to_dict()
    assert hist == {"0-29": 0, "30-44": 2, "45-59": 1, "60-89": 1, "90-179": 1, "180-364": 1, "365+": 1}


def test_dry_run_counts_and_deletes_nothing(pg):
    """A dry run reports what a real run would remove and leaves every row in place."""
    make_cart(pg, age_days=40)
    make_cart(pg, age_days=40, items=2)
    dry = _purge_all_carts(dry_run=True)
    assert count_rows(pg, "carts") == 2 and count_rows(pg, "cart_items") == 2
    real = _purge_all_carts()
    assert dry.removed == real.removed == {"empty_carts": 1, "carts_with_items": 1, "cart_items": 2}


@pytest.mark.parametrize(("days", "batch_size"), [(0, 10), (-5, 10), (30, 0), (30, -1)])
def test_non_positive_days_or_batch_size_is_rejected_and_nothing_deleted(pg, days, batch_size):
    """days <= 0 or batch_size <= 0 raise InvalidInputError naming the parameter before any delete."""
    make_cart(pg, age_days=400)
    make_audit_log(pg, age_days=400)
    with pytest.raises(InvalidInputError, match=r"days|batch_size"):
        cutoff = cleanup.cutoff_for(_now(), days)
        cleanup.purge_carts(session_scope, "empty_carts", cutoff, _now(), batch_size, Limits())
    with pytest.raises(InvalidInputError, match=r"days|batch_size"):
        cutoff = cleanup.cutoff_for(_now(), days)
        cleanup.purge_aged(session_scope, "audit_logs", cutoff, batch_size, Limits())
    assert count_rows(pg, "carts") == 1 and count_rows(pg, "audit_logs") == 1


def test_old_audit_logs_and_inactive_sessions_go_recent_ones_stay(pg):
    """Audit logs older than the cutoff and sessions idle past it are removed; newer rows stay."""
    keep_log, _ = make_audit_log(pg, age_days=89), make_audit_log(pg, age_days=91)
    keep_session, _ = make_user_session(pg, inactive_days=29), make_user_session(pg, inactive_days=31)
    logs = cleanup.purge_aged(session_scope, "audit_logs", cleanup.cutoff_for(_now(), 90), 1, Limits())
    sessions = cleanup.purge_aged(session_scope, "user_sessions", cleanup.cutoff_for(_now(), 30), 1, Limits())
    assert logs.removed == {"audit_logs": 1} and sessions.removed == {"user_sessions": 1}
    with pg.connect() as conn:
        assert list(conn.execute(text("SELECT id FROM audit_logs")).scalars()) == [keep_log]
        assert list(conn.execute(text("SELECT id FROM user_sessions")).scalars()) == [keep_session]


def test_a_cart_locked_by_a_shopper_is_skipped_not_waited_on(pg):
    """A stale cart whose row another transaction holds is skipped at once and left for the next run."""
    locked = make_cart(pg, age_days=40)
    other = make_cart(pg, age_days=40)
    with pg.connect() as shopper:
        shopper.execute(text("SET lock_timeout = '5s'"))
        shopper.execute(text("SELECT id FROM carts WHERE id = :i FOR UPDATE"), {"i": locked})
        with session_scope() as s:
            s.execute(text("SET LOCAL lock_timeout = '1s'"))  # would fail the test if we waited
            batch = cleanup.cart_batch(s, "empty_carts", cleanup.cutoff_for(_now(), 30), _now(), 0, 10)
        shopper.rollback()
    assert batch.removed == {"empty_carts": 1}
    assert _cart_ids(pg) == {locked}
    assert other not in _cart_ids(pg)


def test_cart_items_are_counted_exactly_over_many_quick_batches(pg):
    """Back-to-back one-cart batches report each cart's own items, however PostgreSQL accumulates its counters."""
    for items in (1, 2, 3, 1, 2):
        make_cart(pg, age_days=40, items=items)
    stats = _purge_all_carts(batch_size=1)
    assert stats.removed == {"empty_carts": 0, "carts_with_items": 5, "cart_items": 9}
    assert count_rows(pg, "cart_items") == 0


def test_cart_items_deleted_earlier_in_the_same_transaction_are_not_counted(pg):
    """A batch counts only the items its own carts took with them, not other deletes in its transaction."""
    fresh = make_cart(pg, age_days=1, items=2)
    make_cart(pg, age_days=40, items=3)
    with session_scope() as s:
        s.execute(text("DELETE FROM cart_items WHERE cart_id = :c"), {"c": fresh})
        batch = cleanup.cart_batch(s, "carts_with_items", cleanup.cutoff_for(_now(), 30), _now(), 0, 10)
    assert batch.removed == {"carts_with_items": 1, "cart_items": 3}


def test_carts_and_items_are_counted_when_track_counts_is_off(pg):
    """With PostgreSQL's row counters off (track_counts) a batch still reports exactly the carts and items removed."""
    make_cart(pg, age_days=40, items=3)
    make_cart(pg, age_days=40, items=1)
    with session_scope() as s:
        s.execute(text("SET LOCAL track_counts = off"))
        batch = cleanup.cart_batch(s, "carts_with_items", cleanup.cutoff_for(_now(), 30), _now(), 0, 10)
    assert batch.removed == {"carts_with_items": 2, "cart_items": 4}
    assert count_rows(pg, "carts") == 0


def test_cart_batches_commit_without_waiting_for_the_wal_flush_and_dry_runs_leave_that_alone(pg):
    """Each deleting cart batch runs with synchronous_commit off; a dry run leaves the setting alone."""
    make_cart(pg, age_days=40)
    seen: list[str] = []

    @contextmanager
    def recording_scope():
        with session_scope() as s:
            yield s
            seen.append(s.execute(text("SELECT current_setting('synchronous_commit')")).scalar_one())

    cutoff = cleanup.cutoff_for(_now(), 30)
    cleanup.purge_carts(recording_scope, "empty_carts", cutoff, _now(), 10, Limits(), dry_run=True)
    cleanup.purge_carts(recording_scope, "empty_carts", cutoff, _now(), 10, Limits())
    with pg.connect() as conn:
        default = conn.execute(text("SELECT current_setting('synchronous_commit')")).scalar_one()
    assert seen == [default, "off"]
    assert count_rows(pg, "carts") == 0


def test_a_cart_updated_while_its_batch_runs_stays_and_is_not_counted(pg, monkeypatch):
    """A stale cart updated by someone between the batch's snapshot and its lock stays for the next run, uncounted."""
    first, touched, last = (make_cart(pg, age_days=40) for _ in range(3))
    # Pause the batch's scan at `touched` (before it locks that row) until the test lets it go.
    hook = f"(c.id <> {touched} OR pg_advisory_xact_lock_shared(4242)::text = '') AND "
    monkeypatch.setattr(
        cleanup, "_CART_SQL", cleanup._CART_SQL.replace("WHERE c.updated_at", f"WHERE {hook}c.updated_at")
    )
    result: list[cleanup.Batch] = []
    with pg.connect() as gate:
        gate.execute(text("SELECT pg_advisory_lock(4242)"))

        def run_batch() -> None:
            with session_scope() as s:
                result.append(cleanup.cart_batch(s, "empty_carts", cleanup.cutoff_for(_now(), 30), _now(), 0, 10))

        worker = threading.Thread(target=run_batch)
        worker.start()
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory' AND datname = current_database()"
        deadline = time.monotonic() + 10
        while not _fresh_scalar(pg, waiting):
            assert time.monotonic() < deadline, "the batch never reached the paused cart"
            time.sleep(0.02)
        with pg.begin() as shopper:  # a change that leaves updated_at alone, so the cart is still stale
            shopper.execute(text("UPDATE carts SET created_at = created_at WHERE id = :i"), {"i": touched})
        gate.execute(text("SELECT pg_advisory_unlock(4242)"))
        gate.commit()
        worker.join(timeout=30)
    (batch,) = result
    assert batch.claimed == 3 and batch.last_id == last
    assert batch.removed == {"empty_carts": 2} and sum(batch.ages.values()) == 2
    assert _cart_ids(pg) == {touched}
    assert first not in _cart_ids(pg)
