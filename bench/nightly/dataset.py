"""The nightly benchmark's data set: seeding a template database, a fresh copy of it for every run,
and what a run leaves behind (orders, stock, next dates, outcomes) compared with the reference's.

Used by bench.subscriptions, bench.two_workers and bench.capacity.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, text

from bench._common import database_url

BENCH_DB = "indostar_bench_subs"
DEFAULT_RUN_DATE = dt.date(2025, 1, 31)  # a month end: exercises the anchor-day rule
FREQUENCY_WEIGHTS = {"weekly": 30, "biweekly": 25, "monthly": 35, "quarterly": 10}
SUBSCRIPTION_COLUMNS = (
    "id",
    "customer_id",
    "product_id",
    "quantity",
    "frequency",
    "status",
    "next_delivery_date",
    "anchor_day",
)


@dataclass
class Dataset:
    n: int
    products: int
    template: str  # database name
    info: dict[str, Any] = field(default_factory=dict)


def _rows(n: int, products: int, run_date: dt.date, rng_seed: int, extra: float) -> tuple[list, list, list, dict]:
    """Customers, products and subscriptions; stock chosen from the due demand per product."""
    rng = random.Random(rng_seed)
    ncust = max(100, n // 4)
    freqs, weights = zip(*FREQUENCY_WEIGHTS.items(), strict=True)
    customers = [(i, f"Customer {i}", f"c{i}@example.in") for i in range(1, ncust + 1)]
    subs: list[tuple] = []
    demand = [0] * (products + 1)
    for i in range(1, n + 1):
        due = run_date - dt.timedelta(days=rng.choices((0, 1, 2, 3), (70, 10, 10, 10))[0])
        freq = rng.choices(freqs, weights)[0]
        anchor = due.day
        if freq in ("monthly", "quarterly") and (due + dt.timedelta(days=1)).month != due.month:
            anchor = rng.choice((due.day, 31))  # a month end may stand for a later anchor
        pid, qty = rng.randint(1, products), rng.choice((1, 1, 1, 2, 3))
        demand[pid] += qty
        subs.append((i, rng.randint(1, ncust), pid, qty, freq, "active", due, anchor))
    for i in range(n + 1, n + 1 + int(n * extra)):
        if rng.random() < 0.6:
            status, day = "active", run_date + dt.timedelta(days=rng.randint(1, 60))
        else:
            status, day = rng.choice(("paused", "cancelled")), run_date - dt.timedelta(days=rng.randint(0, 3))
        subs.append(
            (
                i,
                rng.randint(1, ncust),
                rng.randint(1, products),
                rng.choice((1, 2)),
                rng.choices(freqs, weights)[0],
                status,
                day,
                day.day,
            )
        )
    prods, short = [], 0
    for pid in range(1, products + 1):
        roll = rng.random()
        if roll < 0.02:
            stock = 0
        elif roll < 0.08:
            stock = int(demand[pid] * rng.uniform(0.4, 0.9))
        else:
            stock = demand[pid] + rng.randint(0, 50)
        short += stock < demand[pid]
        prods.append((pid, f"BENCH-{pid:05d}", f"Product {pid}", rng.randrange(99, 2499) * 100, stock))
    return customers, prods, subs, {"customers": ncust, "short_products": short}


def build_template(
    base_url: str,
    name: str,
    n: int,
    products: int,
    run_date: dt.date,
    extra: float,
    history: float,
    stats: str = "autovacuum",
) -> Dataset:
    """A migrated database holding the data set; no connection left open.

    ``stats``: "autovacuum" vacuums and analyzes the tables that hold rows, as autovacuum
    would after the load (it never visits a table nobody wrote to, so empty order tables
    stay never analyzed, as after `indostar-jobs migrate`); "none" leaves every table as
    loaded, with no statistics (a restore or import the first night follows at once).
    """
    from lib import db

    url = database_url(base_url, name)
    db.drop_database(url)
    db.migrate(url)
    started = time.perf_counter()
    customers, prods, subs, info = _rows(n, products, run_date, rng_seed=n, extra=extra)
    engine = db.build_engine(url, 1)
    try:
        with engine.begin() as conn:
            _copy(conn, customers, prods, subs)
            if history:  # earlier nights: orders, items and outcomes, so these tables are not empty
                _add_history(conn, run_date, history)
            for table in ("customers", "products", "subscriptions"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}"))
            info["history_orders"] = conn.execute(text("SELECT count(*) FROM orders")).scalar_one()
        if stats == "autovacuum":
            _vacuum_analyze(engine)
        info["analyzed"] = stats
    finally:
        engine.dispose()
    info.update(due=n, not_due=len(subs) - n, products=products, seed_seconds=round(time.perf_counter() - started, 2))
    return Dataset(n, products, name, info)


def _copy(conn: Connection, customers: list, prods: list, subs: list) -> None:
    from devtools.seed import copy_rows

    copy_rows(conn, "customers", ("id", "name", "email"), customers)
    copy_rows(conn, "products", ("id", "sku", "name", "price_paise", "stock"), prods)
    copy_rows(conn, "subscriptions", SUBSCRIPTION_COLUMNS, subs)


def _add_history(conn: Connection, run_date: dt.date, history: float) -> None:
    """Orders of earlier nights for a share ``history`` of the subscriptions, with their items and outcomes."""
    conn.execute(
        text(
            "INSERT INTO orders (customer_id, subscription_id, delivery_date, status, total_paise) "
            "SELECT customer_id, id, CAST(:d AS date) - CAST(28 + id % 60 AS int), 'delivered', "
            "10000 * quantity FROM subscriptions WHERE id % 1000 < :per_mille ORDER BY id"
        ),
        {"d": run_date, "per_mille": int(history * 1000)},
    )
    conn.execute(
        text(
            "INSERT INTO order_items (order_id, product_id, quantity, unit_price_paise) "
            "SELECT o.id, s.product_id, s.quantity, 10000 FROM orders o "
            "JOIN subscriptions s ON s.id = o.subscription_id ORDER BY o.id"
        )
    )
    conn.execute(
        text(
            "INSERT INTO subscription_outcomes (subscription_id, delivery_date, run_date, outcome, "
            "order_id, run_id) SELECT subscription_id, delivery_date, delivery_date, 'created', id, "
            "'history-' || delivery_date FROM orders ORDER BY id"
        )
    )


def _vacuum_analyze(engine: Engine) -> None:
    """VACUUM ANALYZE the tables that hold rows: autovacuum never visits a table nobody wrote to."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"))
        for table in sorted(tables.scalars()):
            if conn.execute(text(f'SELECT EXISTS (SELECT FROM "{table}")')).scalar():
                conn.execute(text(f'VACUUM ANALYZE "{table}"'))


def restore(base_url: str, ds: Dataset, name: str = BENCH_DB) -> None:
    """Replace the working database ``name`` by a fresh copy of the template; flush it to disk."""
    from lib import db

    db.reset_engine()
    admin = db.build_engine(database_url(base_url, "postgres"), 1)
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{ds.template}"'))
            conn.execute(text("CHECKPOINT"))
    finally:
        admin.dispose()


@dataclass
class State:
    orders: set[tuple[int, dt.date]]
    stock: dict[int, int]
    next_dates: dict[int, dt.date]
    order_items: int
    outcomes: dict[str, int]


def snapshot(engine: Engine) -> State:
    with engine.connect() as conn:
        orders = set(map(tuple, conn.execute(text("SELECT subscription_id, delivery_date FROM orders")).all()))
        stock = dict(map(tuple, conn.execute(text("SELECT id, stock FROM products")).all()))
        nxt = dict(map(tuple, conn.execute(text("SELECT id, next_delivery_date FROM subscriptions")).all()))
        items = conn.execute(text("SELECT count(*) FROM order_items")).scalar_one()
        outcomes = dict(
            map(tuple, conn.execute(text("SELECT outcome, count(*) FROM subscription_outcomes GROUP BY outcome")).all())
        )
    return State(orders, stock, nxt, items, outcomes)


def differences(got: State, ref: State) -> list[str]:
    """Human-readable differences from the reference; empty when the run is correct."""
    out = []
    if got.orders != ref.orders:
        extra, missing = got.orders - ref.orders, ref.orders - got.orders
        out.append(
            f"orders differ: {len(extra)} extra, {len(missing)} missing "
            f"(e.g. extra {sorted(extra)[:3]}, missing {sorted(missing)[:3]})"
        )
    bad = sorted(p for p in ref.stock if got.stock.get(p) != ref.stock[p])
    if bad:
        eg = [(p, got.stock.get(p), ref.stock[p]) for p in bad[:3]]
        out.append(f"stock differs on {len(bad)} products (e.g. {eg})")
    bad = sorted(s for s in ref.next_dates if got.next_dates.get(s) != ref.next_dates[s])
    if bad:
        eg = [(s, str(got.next_dates.get(s)), str(ref.next_dates[s])) for s in bad[:3]]
        out.append(f"next_delivery_date differs on {len(bad)} subscriptions (e.g. {eg})")
    if got.order_items != len(got.orders):
        out.append(f"{got.order_items} order items for {len(got.orders)} orders")
    if got.outcomes != ref.outcomes:
        out.append(f"outcomes {got.outcomes} != reference {ref.outcomes}")
    if min(got.stock.values(), default=0) < 0:
        out.append("negative stock")
    return out
