"""The loops the subscription flow tasks wrap: a lane of batches until nothing is due, and the dry run.

A lane walks the due rows in (next_delivery_date, id) order with a keyset cursor, so
each claim starts where the last one ended instead of re-reading the rows this run has
already decided (out-of-stock rows stay due); one last claim from the start picks up
rows that another transaction held while the lane passed them.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import pandas as pd
from sqlalchemy import text
from sqlalchemy.orm import Session

from lib.subscription_stats import Tally
from lib.subscriptions import BATCH_SETTINGS, DUE_COLUMNS, EXISTING_ORDER, Due, DueSub, allocate, process_batch


@dataclass
class LaneResult:
    groups: pd.DataFrame
    batch_ms: list[float]
    batches: int
    isolated_batches: int
    stopped_early: bool


def run_lane(
    session_factory: Callable[[], AbstractContextManager[Session]],
    run_date: dt.date,
    batch_size: int,
    run_id: str,
    deadline: float | None = None,
    lane: tuple[int, int] | None = None,
) -> LaneResult:
    """Process batch after batch, each its own transaction, until nothing is due or the deadline.

    ``deadline`` is a ``time.time()`` value: past it, no new batch is claimed. ``lane``
    is (index, count) when several lanes of one run share the night. Each claim goes on
    from the last row claimed; when that walk runs dry, one claim from the start picks
    up rows that were locked by another transaction as the walk passed them (e.g. a
    worker that then died): the lane ends when a claim from the start finds less than
    a batch.
    """
    tally = Tally()
    batch_ms: list[float] = []
    isolated = 0
    after: tuple[dt.date, int] | None = None
    while True:
        if deadline is not None and time.time() >= deadline:
            return LaneResult(tally.frame(), batch_ms, len(batch_ms), isolated, stopped_early=True)
        started = time.perf_counter()
        with session_factory() as session:
            result = process_batch(session, Due(run_date, run_id, lane=lane, after=after), batch_size)
        if result.claimed:
            batch_ms.append((time.perf_counter() - started) * 1000)
            tally.add(result.outcomes)
            isolated += result.isolated
        if result.claimed == batch_size:
            after = result.last
        elif after is not None:
            after = None
        else:
            return LaneResult(tally.frame(), batch_ms, len(batch_ms), isolated, stopped_early=False)


def dry_run(session: Session, run_date: dt.date, batch_size: int) -> LaneResult:
    """What a run would do, computed read-only with the same allocation; nothing is written.

    Walks due rows by keyset (date, id) so memory stays bounded, carrying the stock
    of the products seen so far.
    """
    stock: dict[int, int] = {}
    tally = Tally()
    cursor: tuple[dt.date, int] = (dt.date.min, 0)
    batches = 0
    session.execute(BATCH_SETTINGS)  # the same index walk as a claim, whatever the statistics say
    while True:
        rows = session.execute(
            text(
                f"SELECT {DUE_COLUMNS}, {EXISTING_ORDER}, p.price_paise, p.stock FROM subscriptions s "
                "LEFT JOIN products p ON p.id = s.product_id "
                "WHERE s.status = 'active' AND s.next_delivery_date <= :run_date "
                "AND (s.next_delivery_date, s.id) > (:d, :i) ORDER BY s.next_delivery_date, s.id LIMIT :n"
            ),
            {"run_date": run_date, "d": cursor[0], "i": cursor[1], "n": batch_size},
        ).all()
        if not rows:
            return LaneResult(tally.frame(), [], batches, 0, stopped_early=False)
        batches += 1
        subs = [DueSub.from_row(r) for r in rows]
        price = {r.product_id: r.price_paise for r in rows}
        for r in rows:
            if r.stock is not None:
                stock.setdefault(r.product_id, r.stock)
        served, short, stock_left = allocate([s for s in subs if s.existing_order_id is None], stock)
        stock.update(stock_left)
        tally.add(s.decided("created", unit_price=price[s.product_id] or 0) for s in served)
        tally.add(s.decided("out_of_stock") for s in short)
        cursor = (subs[-1].next_delivery_date, subs[-1].id)


def read_only_dry_run(session: Session, run_date: dt.date, batch_size: int) -> LaneResult:
    """``dry_run`` in one REPEATABLE READ snapshot, so the whole report sees one state of the tables."""
    session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
    return dry_run(session, run_date, batch_size)
