"""Turning due subscriptions into orders, exactly once, in set-based batches.

A batch is one transaction: claim due rows with FOR UPDATE SKIP LOCKED, lock their
products in id order, allocate stock oldest due first, insert orders and items
(ON CONFLICT DO NOTHING on (subscription_id, delivery_date)), reduce stock, move
each subscription past the run date, and record one outcome per subscription. A
killed worker's transaction rolls back, so its rows are simply due again.

If the set-based statements hit a data error, the batch is redone row by row in
savepoints so that one bad row fails alone (outcome ``failed``) and the rest go.
Connection-level errors are raised as TransientError for the caller's retry.

The loops over batches are in lib.subscription_lanes, the night's statistics in
lib.subscription_stats.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Row, text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from lib.errors import NotFoundError, TransientError, positive_int
from lib.pg_arrays import pg_array, pg_text_array
from lib.schedule import next_after

log = logging.getLogger(__name__)

BATCH_SIZE = 1000  # subscriptions per transaction: the nightly run's default batch_size
LANES = 4  # batches claimed side by side: its default max_concurrency


@dataclass(frozen=True)
class DueSub:
    id: int
    customer_id: int
    product_id: int
    quantity: int
    frequency: str
    next_delivery_date: dt.date
    anchor_day: int
    existing_order_id: int | None = None  # this cycle already has an order (e.g. the webhook made it)

    @classmethod
    def from_row(cls, row: Row[Any]) -> DueSub:
        """The subscription of a row selected with DUE_COLUMNS and EXISTING_ORDER, read by column name."""
        return cls(
            id=row.id,
            customer_id=row.customer_id,
            product_id=row.product_id,
            quantity=row.quantity,
            frequency=row.frequency,
            next_delivery_date=row.next_delivery_date,
            anchor_day=row.anchor_day,
            existing_order_id=row.existing_order_id,
        )

    def decided(
        self, outcome: str, reason: str | None = None, order_id: int | None = None, unit_price: int | None = None
    ) -> Outcome:
        """This cycle's outcome; ``unit_price`` (paise) is given for an order created now: it counts units, revenue."""
        units = self.quantity if unit_price is not None else 0
        revenue = (unit_price or 0) * units
        return Outcome(
            subscription_id=self.id,
            product_id=self.product_id,
            frequency=self.frequency,
            delivery_date=self.next_delivery_date,
            outcome=outcome,
            reason=reason,
            order_id=order_id,
            units=units,
            revenue_paise=revenue,
        )


@dataclass(frozen=True)
class Outcome:
    subscription_id: int
    product_id: int
    frequency: str
    delivery_date: dt.date
    outcome: str
    reason: str | None = None
    order_id: int | None = None
    units: int = 0
    revenue_paise: int = 0


@dataclass
class BatchResult:
    claimed: int
    outcomes: list[Outcome] = field(default_factory=list)
    isolated: bool = False  # the batch fell back to row by row
    last: tuple[dt.date, int] | None = None  # (next_delivery_date, id) of the last row claimed


def allocate(subs: Sequence[DueSub], stock: dict[int, int]) -> tuple[list[DueSub], list[DueSub], dict[int, int]]:
    """Serve the oldest due first while stock lasts; returns (served, short, stock left)."""
    left = dict(stock)
    served: list[DueSub] = []
    short: list[DueSub] = []
    for sub in sorted(subs, key=lambda s: (s.next_delivery_date, s.id)):
        if left.get(sub.product_id, 0) >= sub.quantity:
            left[sub.product_id] -= sub.quantity
            served.append(sub)
        else:
            short.append(sub)
    return served, short, left


def validate_knobs(batch_size: int, max_concurrency: int = 1) -> None:
    """Refuse a batch size or lane count that is not a whole number > 0."""
    positive_int(batch_size, "batch_size")
    positive_int(max_concurrency, "max_concurrency")


DUE_COLUMNS = "s.id, s.customer_id, s.product_id, s.quantity, s.frequency, s.next_delivery_date, s.anchor_day"
# The order this cycle already has, if any: one lookup in uq_orders_subscription_id_delivery_date.
EXISTING_ORDER = (
    "(SELECT o.id FROM orders o WHERE o.subscription_id = s.id AND o.delivery_date = s.next_delivery_date) "
    "AS existing_order_id"
)


@dataclass(frozen=True)
class Due:
    """Which due subscriptions a claim may take: due by ``run_date``, not yet decided by ``run_id``.

    ``only_ids`` keeps to those ids. ``lane=(i, n)`` keeps to products with
    ``product_id % n == i``: lanes of one run then lock disjoint products and never queue
    behind each other, and every subscription of a product still goes through one lane in
    due order (oldest first). ``after`` is the (next_delivery_date, id) of the last row the
    caller claimed: the claim goes on from there instead of walking again over every row
    decided so far.
    """

    run_date: dt.date
    run_id: str
    only_ids: Sequence[int] | None = None
    lane: tuple[int, int] | None = None
    after: tuple[dt.date, int] | None = None


def claim_due(session: Session, due: Due, limit: int) -> list[DueSub]:
    """Lock up to ``limit`` of the ``due`` subscriptions, oldest first.

    Each row carries the id of the order its cycle already has, if any.
    """
    only_ids, lane, after = due.only_ids, due.lane, due.after
    where = "s.id = ANY(:only_ids) AND " if only_ids is not None else ""
    if lane is not None:
        where += "s.product_id % :lanes = :lane AND "
    if after is not None:
        where += "(s.next_delivery_date, s.id) > (:after_day, :after_id) AND "
    rows = session.execute(
        text(
            f"SELECT {DUE_COLUMNS}, {EXISTING_ORDER} FROM subscriptions s "
            f"WHERE {where}s.status = 'active' AND s.next_delivery_date <= :run_date "
            # The probe must stay a lookup of this row's outcomes in the unique index. A new
            # run id is in no statistics, so the planner takes it for a rare value and, given
            # `o.run_id = :run_id`, may probe ix_subscription_outcomes_run_order instead, reading
            # every outcome this run wrote, for every row (quadratic: measured 17 ms a probe
            # after 75k rows); `|| ''` keeps run_id out of that index's reach. OFFSET 0 keeps it
            # a per-row probe rather than an anti-join over the whole run's outcomes.
            "AND NOT EXISTS (SELECT 1 FROM subscription_outcomes o "
            "                WHERE o.subscription_id = s.id AND o.delivery_date = s.next_delivery_date "
            "                AND o.run_id || '' = :run_id OFFSET 0) "
            "ORDER BY s.next_delivery_date, s.id LIMIT :limit FOR UPDATE OF s SKIP LOCKED"
        ),
        {
            "run_date": due.run_date,
            "limit": limit,
            "run_id": due.run_id,
            "only_ids": list(only_ids or []),
            "lane": lane[0] if lane else 0,
            "lanes": lane[1] if lane else 1,
            "after_day": after[0] if after else None,
            "after_id": after[1] if after else None,
        },
    ).all()
    return [DueSub.from_row(r) for r in rows]


def _lock_products(session: Session, product_ids: Iterable[int]) -> dict[int, Row[Any]]:
    """Lock the batch's products, with their stock and price, in id order."""
    # Id order everywhere, so two batches never wait on each other in a cycle.
    rows = session.execute(
        text(
            "SELECT id, stock, price_paise FROM products WHERE id = ANY(CAST(:ids AS bigint[])) ORDER BY id FOR UPDATE"
        ),
        {"ids": pg_array(sorted(set(product_ids)))},
    ).all()
    return {r.id: r for r in rows}


def _insert_orders(session: Session, served: Sequence[DueSub], price: dict[int, int]) -> dict[int, int]:
    """One order per served subscription; returns {subscription id: order id} for the rows inserted.

    ON CONFLICT DO NOTHING on (subscription_id, delivery_date): a row missing from the
    result already had its order from another path, and must neither take stock nor move.
    """
    rows = session.execute(
        text(
            "INSERT INTO orders (customer_id, subscription_id, delivery_date, total_paise) "
            "SELECT * FROM unnest(CAST(:c AS bigint[]), CAST(:s AS bigint[]), CAST(:d AS date[]), "
            "                     CAST(:t AS bigint[])) "
            "ON CONFLICT (subscription_id, delivery_date) DO NOTHING RETURNING subscription_id, id"
        ),
        {
            "c": pg_array(s.customer_id for s in served),
            "s": pg_array(s.id for s in served),
            "d": pg_array(s.next_delivery_date for s in served),
            "t": pg_array(price[s.product_id] * s.quantity for s in served),
        },
    ).all()
    return {r[0]: r[1] for r in rows}


def _insert_items(session: Session, made: Sequence[DueSub], order_ids: dict[int, int], price: dict[int, int]) -> None:
    """The one line of each new order: the subscription's product, quantity and today's price."""
    session.execute(
        text(
            "INSERT INTO order_items (order_id, product_id, quantity, unit_price_paise) "
            "SELECT * FROM unnest(CAST(:o AS bigint[]), CAST(:p AS bigint[]), CAST(:q AS int[]), "
            "                     CAST(:u AS bigint[]))"
        ),
        {
            "o": pg_array(order_ids[s.id] for s in made),
            "p": pg_array(s.product_id for s in made),
            "q": pg_array(s.quantity for s in made),
            "u": pg_array(price[s.product_id] for s in made),
        },
    )


def _take_stock(session: Session, made: Sequence[DueSub]) -> None:
    """Reduce each product's stock by the quantities ordered (the CHECK keeps it >= 0)."""
    take: dict[int, int] = {}
    for s in made:
        take[s.product_id] = take.get(s.product_id, 0) + s.quantity
    session.execute(
        text(
            "UPDATE products p SET stock = p.stock - d.qty, updated_at = now() "
            "FROM unnest(CAST(:ids AS bigint[]), CAST(:qty AS int[])) AS d(id, qty) WHERE p.id = d.id"
        ),
        {"ids": pg_array(take), "qty": pg_array(take.values())},
    )


def _move_past_run_date(session: Session, moved: Sequence[DueSub], run_date: dt.date) -> None:
    """Set each ordered subscription's next delivery date to its first cycle after the run date."""
    if not moved:
        return
    nexts: dict[tuple[dt.date, str, int], dt.date] = {}  # a batch has few distinct (date, cadence, anchor)
    for s in moved:
        key = (s.next_delivery_date, s.frequency, s.anchor_day)
        if key not in nexts:
            nexts[key] = next_after(*key, run_date)
    session.execute(
        text(
            "UPDATE subscriptions s SET next_delivery_date = d.day, updated_at = now() "
            "FROM unnest(CAST(:ids AS bigint[]), CAST(:days AS date[])) AS d(id, day) WHERE s.id = d.id"
        ),
        {
            "ids": pg_array(s.id for s in moved),
            "days": pg_array(nexts[(s.next_delivery_date, s.frequency, s.anchor_day)] for s in moved),
        },
    )


def _decide(
    subs: Sequence[DueSub],
    served: Sequence[DueSub],
    short: Sequence[DueSub],
    order_ids: dict[int, int],
    products: dict[int, Row[Any]],
) -> tuple[list[Outcome], list[DueSub]]:
    """The batch's outcomes (created, order already existed, out of stock) and the rows that move on."""
    outcomes: list[Outcome] = []
    moved: list[DueSub] = []
    for s in served:
        if s.id in order_ids:
            outcomes.append(s.decided("created", None, order_ids[s.id], products[s.product_id].price_paise))
            moved.append(s)
    for s in subs:
        if s.existing_order_id is not None:
            outcomes.append(s.decided("created", "order already existed", s.existing_order_id))
            moved.append(s)
    for s in short:
        have = products[s.product_id].stock
        reason = f"needs {s.quantity}, {have} in stock before this batch"
        outcomes.append(s.decided("out_of_stock", reason))
    return outcomes, moved


def _apply(session: Session, subs: Sequence[DueSub], run_date: dt.date, run_id: str) -> list[Outcome]:
    """The set-based core for already-claimed rows: every write in a handful of statements."""
    products = _lock_products(session, (s.product_id for s in subs))
    todo = [s for s in subs if s.existing_order_id is None]
    served, short, _ = allocate(todo, {pid: p.stock for pid, p in products.items()})
    order_ids: dict[int, int] = {}
    if served:
        price = {pid: p.price_paise for pid, p in products.items()}
        order_ids = _insert_orders(session, served, price)
        made = [s for s in served if s.id in order_ids]
        _insert_items(session, made, order_ids, price)
        _take_stock(session, made)
    outcomes, moved = _decide(subs, served, short, order_ids, products)
    _move_past_run_date(session, moved, run_date)
    record_outcomes(session, outcomes, run_date, run_id)
    return outcomes


def record_outcomes(session: Session, outcomes: Sequence[Outcome], run_date: dt.date, run_id: str) -> None:
    """One row per (subscription, run, delivery date); a later decision in the same run replaces it."""
    if not outcomes:
        return
    session.execute(
        text(
            "INSERT INTO subscription_outcomes "
            "  (subscription_id, delivery_date, run_date, outcome, reason, order_id, run_id) "
            "SELECT d.sid, d.day, CAST(:run_date AS date), d.outcome, d.reason, d.order_id, :run_id "
            "FROM unnest(CAST(:sids AS bigint[]), CAST(:days AS date[]), CAST(:outcomes AS text[]), "
            "            CAST(:reasons AS text[]), CAST(:orders AS bigint[])) "
            "     AS d(sid, day, outcome, reason, order_id) "
            "ON CONFLICT (subscription_id, run_id, delivery_date) DO UPDATE SET "
            "  outcome = excluded.outcome, reason = excluded.reason, order_id = excluded.order_id, "
            "  created_at = now()"
        ),
        {
            "run_date": run_date,
            "run_id": run_id,
            "sids": pg_array(o.subscription_id for o in outcomes),
            "days": pg_array(o.delivery_date for o in outcomes),
            "outcomes": pg_text_array(o.outcome for o in outcomes),
            "reasons": pg_text_array(o.reason for o in outcomes),
            "orders": pg_text_array(o.order_id for o in outcomes),
        },
    )


def _short_error(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:500]


# Settings for the rest of the batch's transaction (is_local). A batch touches only the rows it
# names, so every statement in it should go through an index, its cost bounded by the batch
# and not by the table's size or the quality of its statistics. The planner does not know
# that: it takes the lane filter (product_id % n = i) for 50 times more selective than it is,
# and with no statistics (a first deployment) everything for rare, so it reckons that LIMIT
# will not be met and reads and sorts the whole remaining due range in every claim (measured
# 0.5-1.3 s a claim at 1M due, against 5-15 ms for the walk in index order). JIT compiling,
# set off by those estimates, cost ~100 ms a claim that runs in a few milliseconds.
BATCH_SETTINGS = text(
    "SELECT set_config('enable_seqscan', 'off', true), set_config('enable_bitmapscan', 'off', true), "
    "set_config('jit', 'off', true)"
)


def process_batch(session: Session, due: Due, batch_size: int) -> BatchResult:
    """Claim up to ``batch_size`` of the ``due`` subscriptions and process them in the caller's transaction."""
    run_date, run_id = due.run_date, due.run_id
    try:
        session.execute(BATCH_SETTINGS)
        subs = claim_due(session, due, batch_size)
        if not subs:
            return BatchResult(0)
        last = (subs[-1].next_delivery_date, subs[-1].id)
        try:
            with session.begin_nested():
                return BatchResult(len(subs), _apply(session, subs, run_date, run_id), last=last)
        except OperationalError:
            raise
        except DBAPIError as exc:
            log.warning("batch of %d failed (%s); isolating rows one by one", len(subs), _short_error(exc))
        return BatchResult(len(subs), _row_by_row(session, subs, run_date, run_id), isolated=True, last=last)
    except OperationalError as exc:
        raise TransientError(f"database error while processing a batch: {_short_error(exc)}") from exc


def _row_by_row(session: Session, subs: Sequence[DueSub], run_date: dt.date, run_id: str) -> list[Outcome]:
    """Each row in its own savepoint: a row the database refuses is recorded failed, the rest go on."""
    outcomes: list[Outcome] = []
    for sub in subs:
        try:
            with session.begin_nested():
                outcomes.extend(_apply(session, [sub], run_date, run_id))
        except OperationalError:
            raise
        except DBAPIError as exc:
            reason = _short_error(exc)
            log.error("subscription %d failed alone: %s", sub.id, reason)
            failed = sub.decided("failed", reason)
            with session.begin_nested():
                record_outcomes(session, [failed], run_date, run_id)
            outcomes.append(failed)
    return outcomes


def load_subscription(session: Session, subscription_id: int) -> Row[Any]:
    row = session.execute(
        text("SELECT id, status, next_delivery_date FROM subscriptions WHERE id = :id"), {"id": subscription_id}
    ).first()
    if row is None:
        raise NotFoundError(f"subscription {subscription_id} does not exist")
    return row


def created_order_ids(session: Session, run_id: str, after_id: int, limit: int) -> list[int]:
    """Orders this run created, in id pages (for bulk confirmations)."""
    return list(
        session.execute(
            text(
                "SELECT order_id FROM subscription_outcomes WHERE run_id = :r AND outcome = 'created' "
                "AND reason IS NULL AND order_id > :after ORDER BY order_id LIMIT :n"
            ),
            {"r": run_id, "after": after_id, "n": limit},
        ).scalars()
    )


def reminders_due(session: Session, day: dt.date, after_id: int, limit: int) -> list[int]:
    """One id page of the active subscriptions delivering on ``day``."""
    rows = session.execute(
        text(
            "SELECT id FROM subscriptions WHERE status = 'active' AND next_delivery_date = :d "
            "AND id > :a ORDER BY id LIMIT :n"
        ),
        {"d": day, "a": after_id, "n": limit},
    ).scalars()
    return list(rows)
