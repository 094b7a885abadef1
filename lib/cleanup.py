"""Batched deletes of what the shop no longer needs: stale carts, old audit logs, idle sessions.

Every batch is one statement of the form
``DELETE ... WHERE id = ANY(ARRAY(SELECT id ... ORDER BY id LIMIT :batch FOR UPDATE SKIP LOCKED))``
(carts by ctid, see ``_CART_SQL``) run in its own short transaction, so no statement holds
locks for long and two runs at once share the work instead of waiting on each other.
Batches walk the primary key (keyset: ``id > :after``), so each one costs the same however
many went before.

Functions that touch the database take a session first and never commit; ``run_batches``
takes a *scope* (a context manager factory such as ``lib.db.session_scope``) and opens
one transaction per batch through it, so the caller still decides what a transaction is.
The summaries at the bottom are pure pandas, for the run's table artifacts.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import text
from sqlalchemy.orm import Session

from lib.errors import InvalidInputError, positive_int

if TYPE_CHECKING:  # pandas is loaded by the summaries only: lib.token_cleanup imports this module for its counters
    import pandas as pd

CART_PHASES = ("empty_carts", "carts_with_items")

# Age buckets (in days, lower bound inclusive) for the histogram of removed carts.
AGE_BINS = (0, 30, 45, 60, 90, 180, 365)

# Tables with a plain "older than" rule: table -> timestamp column. A fixed list, so
# table and column names in the SQL never come from input.
AGED_TABLES = {"audit_logs": "created_at", "user_sessions": "last_active_at"}

Scope = Callable[[], AbstractContextManager[Session]]


@dataclass(frozen=True)
class Batch:
    """What one batch claimed: how many rows, the last id (keyset cursor), removals by kind."""

    claimed: int
    last_id: int
    removed: dict[str, int]
    ages: dict[int, int] = field(default_factory=dict)


@dataclass
class PassStats:
    """Totals of one or more batched passes; also used by the token cleanup."""

    removed: dict[str, int] = field(default_factory=dict)
    batches: int = 0
    longest_batch_ms: float = 0.0
    stopped_early: bool = False
    ages: dict[int, int] = field(default_factory=dict)

    def add(self, removed: Mapping[str, int], elapsed_ms: float, ages: Mapping[int, int] | None = None) -> None:
        """Count one batch in."""
        for k, v in removed.items():
            self.removed[k] = self.removed.get(k, 0) + int(v)
        self.batches += 1
        self.longest_batch_ms = max(self.longest_batch_ms, elapsed_ms)
        for age, n in (ages or {}).items():
            self.ages[age] = self.ages.get(age, 0) + n

    def merge(self, other: PassStats) -> PassStats:
        """A new PassStats with both passes counted."""
        out = PassStats(
            removed=dict(self.removed),
            batches=self.batches + other.batches,
            longest_batch_ms=max(self.longest_batch_ms, other.longest_batch_ms),
            stopped_early=self.stopped_early or other.stopped_early,
            ages=dict(self.ages),
        )
        for kind, n in other.removed.items():
            out.removed[kind] = out.removed.get(kind, 0) + n
        for age, n in other.ages.items():
            out.ages[age] = out.ages.get(age, 0) + n
        return out


@dataclass(frozen=True)
class Limits:
    """When a pass stops claiming new batches: a wall-clock deadline (epoch s) and/or a batch budget."""

    stop_at: float | None = None
    max_batches: int | None = None

    def reached(self, batches_done: int) -> bool:
        if self.max_batches is not None and batches_done >= self.max_batches:
            return True
        return self.stop_at is not None and time.time() >= self.stop_at

    def after(self, used: int) -> Limits:
        """The limits left for a following pass once ``used`` batches are spent."""
        left = None if self.max_batches is None else max(self.max_batches - used, 0)
        return Limits(self.stop_at, left)


def check_positive(name: str, value: int) -> int:
    """Reject a day count or batch size <= 0 before anything is deleted."""
    return positive_int(value, name, "; nothing was deleted")


def cutoff_for(reference: dt.datetime, days: int, name: str = "days") -> dt.datetime:
    """The instant before which rows are stale: ``reference - days``; reference must be timezone-aware."""
    check_positive(name, days)
    if reference.tzinfo is None:
        raise InvalidInputError("the reference time must be timezone-aware (UTC)")
    return reference - dt.timedelta(days=days)


def run_batches(scope: Scope, step: Callable[[Session, int], Batch], batch_size: int, limits: Limits) -> PassStats:
    """Run ``step(session, after_id)`` one transaction each until a short batch or a limit; never loads all rows."""
    check_positive("batch_size", batch_size)
    stats = PassStats()
    after = 0
    while True:
        if limits.reached(stats.batches):
            stats.stopped_early = True
            return stats
        started = time.perf_counter()
        with scope() as session:
            batch = step(session, after)
        stats.add(batch.removed, (time.perf_counter() - started) * 1000, batch.ages)
        # Under SKIP LOCKED a short batch still means the key range is exhausted: LIMIT
        # counts only the rows we could lock, the locked ones are left for the next run.
        if batch.claimed < batch_size:
            return stats
        after = batch.last_id


# One statement per batch. The claim locks the batch (SKIP LOCKED) and hands the DELETE
# the rows' ctids, so each row is read straight from its heap page: deleting by
# ``id = ANY(array)`` cost one primary-key descent per row, about 8 % of the whole pass at
# 1M carts. The lock keeps every claimed ctid valid until commit. The DELETE returns
# nothing: RETURNING makes PostgreSQL fetch every deleted row once more (about 6 % of the
# pass), so the ages are taken from the claim and the number deleted from this
# transaction's own delete counter (below). (Arrays, not a join: joining the DELETE to a
# CTE made PostgreSQL hash the whole table.)
_CART_SQL = """
WITH claimed AS MATERIALIZED (
    SELECT c.id, c.ctid AS tid, {age} FROM carts c
    WHERE c.updated_at < :cutoff AND c.id > :after {item_filter}
    ORDER BY c.id
    LIMIT :batch
    {lock}
), counters AS MATERIALIZED (
    SELECT pg_stat_get_xact_tuples_deleted('carts'::regclass) AS carts,
           pg_stat_get_xact_tuples_deleted('cart_items'::regclass) AS items
){delete}
SELECT k.claimed, k.last_id, {items} AS items,
       ARRAY(SELECT ARRAY[age_days, count(*)] FROM claimed GROUP BY age_days) AS ages,
       (SELECT carts FROM counters) AS carts_before, (SELECT items FROM counters) AS items_before
FROM (SELECT count(*) AS claimed, max(id) AS last_id FROM claimed) k
"""
# date_part, not extract: extract returns numeric since PostgreSQL 14, several times dearer
# per row; both give the whole days of the interval.
_AGE = "date_part('day', CAST(:now AS timestamptz) - c.updated_at)::int AS age_days"
# The condition on counters makes the DELETE read them before it removes its first row.
_CART_DELETE = """, gone AS (
    DELETE FROM carts c
    WHERE c.ctid = ANY(ARRAY(SELECT tid FROM claimed)) AND (SELECT carts FROM counters) IS NOT NULL
)"""
# The extra "i.cart_id > :after" lets the anti-join start at the cursor instead of the
# first item, so later batches do not re-read every earlier cart's items.
_ONLY_EMPTY = "AND NOT EXISTS (SELECT 1 FROM cart_items i WHERE i.cart_id = c.id AND i.cart_id > :after)"
_WITH_ITEMS = "AND EXISTS (SELECT 1 FROM cart_items i WHERE i.cart_id = c.id AND i.cart_id > :after)"
_COUNT_ITEMS = "(SELECT count(*) FROM cart_items WHERE cart_id = ANY(ARRAY(SELECT id FROM claimed)))"
# What went is read from this transaction's delete counters, before the statement and after
# it: items go by the ON DELETE CASCADE trigger, which runs after the statement, so they
# cannot be counted inside it, and counting them beforehand cost one index descent per cart
# (about 6 % of the pass). A difference, because PostgreSQL 15 keeps not-yet-reported counts
# of earlier transactions in them. With track_counts off the counters stand still: the
# statement then counts the items itself (that subquery runs only in this case) and the
# carts are found through _KEPT.
_ITEMS_IF_UNTRACKED = f"CASE WHEN current_setting('track_counts')::bool THEN NULL ELSE {_COUNT_ITEMS} END"
_COUNTERS = text(
    "SELECT pg_stat_get_xact_tuples_deleted('carts'::regclass) AS carts,"
    " pg_stat_get_xact_tuples_deleted('cart_items'::regclass) AS items"
)
# Claimed carts the DELETE could not see: a cart someone updated between this statement's
# snapshot and our lock is claimed at its new version, invisible to that snapshot, so it
# stays for the next run, like a cart someone holds. It is still ours (locked: xmax is our
# transaction), so this finds it when the counters say fewer carts went than were claimed.
_KEPT = f"""
SELECT {_AGE}, count(*) AS n FROM carts c
WHERE c.id > :after AND c.id <= :last AND c.updated_at < :cutoff {{item_filter}}
  AND c.xmax = pg_current_xact_id()::xid
GROUP BY 1
"""
# A batch's commit does not wait for its WAL flush (one per batch, ~2 ms each on a quiet
# disk, about 5 % of the pass at 1M carts). A crash can only lose the last fraction of a
# second of committed batches: PostgreSQL recovers to a consistent earlier point, those
# carts (items with them) come back, and the next run deletes them again.
_NO_FLUSH_WAIT = text("SET LOCAL synchronous_commit = off")


def cart_batch(
    session: Session,
    phase: str,
    cutoff: dt.datetime,
    now: dt.datetime,
    after_id: int,
    batch_size: int,
    *,
    dry_run: bool = False,
) -> Batch:
    """Delete (or on a dry run, count) one batch of carts not updated since ``cutoff``; items go by cascade."""
    if phase not in CART_PHASES:
        raise InvalidInputError(f"unknown cart phase {phase!r}; expected one of {CART_PHASES}")
    with_items = phase == "carts_with_items"
    # A dry run deletes no empty carts in phase one, so phase two must skip them itself.
    item_filter = _ONLY_EMPTY if not with_items else (_WITH_ITEMS if dry_run else "")
    sql = _CART_SQL.format(
        age=_AGE,
        item_filter=item_filter,
        # A dry run takes no row locks: it must not slow shoppers down for a count.
        lock="" if dry_run else "FOR UPDATE SKIP LOCKED",
        delete="" if dry_run else _CART_DELETE,
        items="NULL" if not with_items else (_COUNT_ITEMS if dry_run else _ITEMS_IF_UNTRACKED),
    )
    params = {"cutoff": cutoff, "now": now, "after": after_id, "batch": batch_size}
    row = session.execute(text(sql), params).one()
    last_id = int(row.last_id or after_id)
    ages = {int(age): int(n) for age, n in row.ages}
    items = row.items
    if not dry_run:
        counters = session.execute(_COUNTERS).one()
        if counters.carts - row.carts_before != row.claimed:
            for age, n in session.execute(text(_KEPT.format(item_filter=item_filter)), params | {"last": last_id}):
                ages[age] -= n
            ages = {age: n for age, n in ages.items() if n}
        if items is None:
            items = counters.items - row.items_before
    removed = {phase: sum(ages.values())}
    if with_items:
        removed["cart_items"] = int(items)
    return Batch(claimed=int(row.claimed), last_id=last_id, removed=removed, ages=ages)


_AGED_SQL = """
WITH ids AS MATERIALIZED (
    SELECT ARRAY(
        SELECT id FROM {table}
        WHERE {column} < :cutoff AND id > :after
        ORDER BY id
        LIMIT :batch
        {lock}
    ) AS a
), {gone}
SELECT count(*) AS n, max(id) AS last_id FROM gone
"""


def aged_batch(
    session: Session, table: str, cutoff: dt.datetime, after_id: int, batch_size: int, *, dry_run: bool = False
) -> Batch:
    """Delete (or count) one batch of ``table`` rows whose timestamp is before ``cutoff``."""
    if table not in AGED_TABLES:
        raise InvalidInputError(f"no age rule for table {table!r}; expected one of {sorted(AGED_TABLES)}")
    sql = _AGED_SQL.format(
        table=table,
        column=AGED_TABLES[table],
        lock="" if dry_run else "FOR UPDATE SKIP LOCKED",
        gone="gone AS (SELECT unnest(a) AS id FROM ids)"
        if dry_run
        else f"gone AS (DELETE FROM {table} WHERE id = ANY((SELECT a FROM ids)::bigint[]) RETURNING id)",
    )
    row = session.execute(text(sql), {"cutoff": cutoff, "after": after_id, "batch": batch_size}).one()
    return Batch(claimed=int(row.n), last_id=int(row.last_id or after_id), removed={table: int(row.n)})


def purge_carts(
    scope: Scope,
    phase: str,
    cutoff: dt.datetime,
    now: dt.datetime,
    batch_size: int,
    limits: Limits,
    *,
    dry_run: bool = False,
) -> PassStats:
    """One phase of the stale-cart cleanup, batch after batch, each in its own transaction."""

    def step(session: Session, after: int) -> Batch:
        if not dry_run:
            session.execute(_NO_FLUSH_WAIT)
        return cart_batch(session, phase, cutoff, now, after, batch_size, dry_run=dry_run)

    return run_batches(scope, step, batch_size, limits)


def purge_aged(
    scope: Scope, table: str, cutoff: dt.datetime, batch_size: int, limits: Limits, *, dry_run: bool = False
) -> PassStats:
    """Delete every row of ``table`` older than ``cutoff``, batch after batch."""
    return run_batches(
        scope, lambda s, after: aged_batch(s, table, cutoff, after, batch_size, dry_run=dry_run), batch_size, limits
    )


def purge_with(scope: Scope, step: Callable[[Session], int], kind: str, batch_size: int, limits: Limits) -> PassStats:
    """Repeat ``step(session)`` (one bounded statement returning rows touched) until it touches fewer than a batch."""
    stats = PassStats(removed={kind: 0})
    while not limits.reached(stats.batches):
        started = time.perf_counter()
        with scope() as session:
            n = step(session)
        stats.add({kind: n}, (time.perf_counter() - started) * 1000)
        if n < batch_size:
            return stats
    stats.stopped_early = True
    return stats


# ---- summaries (pure pandas) -------------------------------------------------------


def summary_frame(stats: PassStats, kinds: Iterable[str] = ()) -> pd.DataFrame:
    """One row per kind removed (kinds listed first even when zero), with the run's batch figures."""
    import pandas as pd

    removed = {k: 0 for k in kinds} | dict(stats.removed)
    frame = pd.DataFrame({"kind": list(removed), "removed": [int(v) for v in removed.values()]})
    frame["batches"] = stats.batches
    frame["longest_batch_ms"] = round(stats.longest_batch_ms, 1)
    frame["stopped_early"] = stats.stopped_early
    return frame


def age_histogram(ages: Mapping[int, int], bins: Iterable[int] = AGE_BINS) -> pd.DataFrame:
    """Counts of removed rows per age bucket in days (``30-44``, ..., ``365+``), every bucket listed."""
    import pandas as pd

    edges = sorted(set(bins))
    labels = [f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(edges)] + [f"{edges[-1]}+"]
    series = pd.Series(dict(ages), dtype="int64")
    if series.empty:
        counts = pd.Series(0, index=labels, dtype="int64")
    else:
        buckets = pd.cut(series.index.to_numpy(), bins=[*edges, float("inf")], right=False, labels=labels)
        counts = series.groupby(buckets, observed=False).sum().reindex(labels, fill_value=0)  # type: ignore[call-overload]
    return pd.DataFrame({"age_days": labels, "removed": counts.to_numpy().astype(int)})


TOKEN_COLUMNS = {
    "": "keys_removed",
    "_index": "index_entries_removed",
    "_user_index": "user_entries_removed",
    "_kept": "live_kept",
    "_ttl_restored": "ttl_restored",
}


def token_summary(stats: PassStats, kinds: Iterable[str]) -> pd.DataFrame:
    """One row per token kind: keys removed, index and per-user entries dropped, live keys kept, TTLs restored."""
    import pandas as pd

    rows = [
        {"kind": kind} | {col: int(stats.removed.get(f"{kind}{suffix}", 0)) for suffix, col in TOKEN_COLUMNS.items()}
        for kind in kinds
    ]
    frame = pd.DataFrame(rows, columns=["kind", *TOKEN_COLUMNS.values()])
    frame["batches"] = stats.batches
    frame["longest_batch_ms"] = round(stats.longest_batch_ms, 1)
    frame["stopped_early"] = stats.stopped_early
    return frame
