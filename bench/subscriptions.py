"""Benchmark of the nightly subscription run: set-based SQL reference, the flow, one task per row.

    python -m bench.subscriptions --n 100000
    python -m bench.subscriptions --n 100000,1000000 --repeats 3 --sweep '' --skip-old-design

Seeds N due subscriptions over --products products once into a template database
(mixed frequencies and quantities, due on the run date or 1-3 days overdue, stock
such that a few percent are out of stock, plus N/2 rows that are not due: future or
paused/cancelled, and --history: orders, items and outcomes of earlier nights, so the
order tables are not empty as in production); the tables holding rows are VACUUM
ANALYZEd as autovacuum would (empty ones never are, as after a migration).
Every measured run gets a fresh copy of it (CREATE DATABASE ... TEMPLATE, then
CHECKPOINT; not timed). A warm-up flow run (small data) precedes the measurements.

- (a) reference: the whole night in one transaction of set-based SQL written here
  (products locked in id order, stock allocated oldest due first, orders, items,
  stock, next dates computed in SQL with lib.schedule's anchor rule, outcomes).
- (b) flow: process-due-subscriptions(run_date, send_confirmations=False) with the
  configured batch size and concurrency, end to end (flow run included); plus a
  sweep over a few batch sizes and concurrencies (one run each).
- (c) old design: one Prefect task run per subscription (process_batch with
  only_ids=[id] in its own transaction) at --old-n, extrapolated linearly to N;
  tasks of one product are chained so that the oldest due is still served first
  (--skip-old-design leaves it out).
- first night: (b) again on the same N with --history 0 (empty orders, items and
  outcomes, never analyzed, as on the night after the first deployment); its ratio to
  (b) with history is ``first_night.ratio`` (--no-first-night leaves it out;
  --first-night-stats none: no table analyzed at all, as right after a restore).

--n takes several sizes (comma-separated); (a), (b) and the first night run for each,
interleaved repeat by repeat (a, b, first night, a, b, ...) so that a change in the
machine's load hits every variant alike; ``ratios.b_over_a`` is keyed by N. --split adds
one untimed, instrumented flow run per N that says where the flow's time goes
(statement classes, Python inside a batch, commit, lane bookkeeping, Prefect).

Each run must leave the same orders (subscription, delivery date), the same stock
per product and the same next_delivery_date per subscription as the reference on
the same data, else the bench says which and exits 1. Memory: tracemalloc peak of
the Python heap during a separate (untimed) run of each variant, and the peak RSS
growth sampled from /proc/self/statm during every timed run. (b) runs at N/4 too, to
show that its peak does not grow with N. Lock waits of the lanes are sampled from
pg_stat_activity. Prints a table on stderr and one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import os
import random
import re
import statistics
import sys
import threading
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.engine import make_url

# Set before lib reads its settings (lib is imported lazily below): the bench runs on dev
# defaults, which an unset INDOSTAR_ENV (production) refuses.
os.environ.setdefault("INDOSTAR_ENV", "dev")

BENCH_DB = "indostar_bench_subs"
DEFAULT_RUN_DATE = dt.date(2025, 1, 31)  # a month end: exercises the anchor-day rule
FREQUENCY_WEIGHTS = {"weekly": 30, "biweekly": 25, "monthly": 35, "quarterly": 10}
PAGE = os.sysconf("SC_PAGE_SIZE")

log = logging.getLogger("bench.subscriptions")


# --- data ---------------------------------------------------------------------------------------


@dataclass
class Dataset:
    n: int
    products: int
    template: str  # database name
    info: dict[str, Any] = field(default_factory=dict)


def _url(base: str, database: str) -> str:
    return make_url(base).set(database=database).render_as_string(hide_password=False)


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
    from deployments.dev.seed import copy_rows
    from lib import db

    url = _url(base_url, name)
    db.drop_database(url)
    db.migrate(url)
    started = time.perf_counter()
    customers, prods, subs, info = _rows(n, products, run_date, rng_seed=n, extra=extra)
    engine = db.build_engine(url, 1)
    try:
        with engine.begin() as conn:
            copy_rows(conn, "customers", ("id", "name", "email"), customers)
            copy_rows(conn, "products", ("id", "sku", "name", "price_paise", "stock"), prods)
            copy_rows(
                conn,
                "subscriptions",
                (
                    "id",
                    "customer_id",
                    "product_id",
                    "quantity",
                    "frequency",
                    "status",
                    "next_delivery_date",
                    "anchor_day",
                ),
                subs,
            )
            if history:  # earlier nights: orders, items and outcomes, so these tables are not empty
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
            for table in ("customers", "products", "subscriptions"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id)) FROM {table}"))
            info["history_orders"] = conn.execute(text("SELECT count(*) FROM orders")).scalar_one()
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            tables = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"))
            for table in sorted(tables.scalars()) if stats == "autovacuum" else ():
                if conn.execute(text(f'SELECT EXISTS (SELECT FROM "{table}")')).scalar():
                    conn.execute(text(f'VACUUM ANALYZE "{table}"'))
            info["analyzed"] = stats
    finally:
        engine.dispose()
    info.update(due=n, not_due=len(subs) - n, products=products, seed_seconds=round(time.perf_counter() - started, 2))
    return Dataset(n, products, name, info)


def restore(base_url: str, ds: Dataset, name: str = BENCH_DB) -> None:
    """Replace the working database ``name`` by a fresh copy of the template; flush it to disk."""
    from lib import db

    db.reset_engine()
    admin = db.build_engine(_url(base_url, "postgres"), 1)
    try:
        with admin.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{ds.template}"'))
            conn.execute(text("CHECKPOINT"))
    finally:
        admin.dispose()


# --- what a run leaves behind ------------------------------------------------------------------


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


# --- probes: wall time, memory, lock waits -----------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Probe:
    """Times a block; samples RSS (always), the Python heap (trace=True) and lock waits (lock_url)."""

    def __init__(self, trace: bool = False, lock_url: str | None = None, every: float = 0.02):
        self.trace, self.lock_url, self.every = trace, lock_url, every
        self.seconds = 0.0
        self.rss_peak_delta = 0
        self.heap_peak: int | None = None
        self.lock_samples = [0, 0]  # backends waiting on a lock, backends active
        self._stop = threading.Event()

    def _sample_rss(self) -> None:
        while not self._stop.wait(self.every):
            self.rss_peak_delta = max(self.rss_peak_delta, _rss() - self._base)

    def _sample_locks(self) -> None:
        from lib import db

        engine = db.build_engine(self.lock_url, 1)
        query = text(
            "SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'), count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'"
        )
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                while not self._stop.wait(0.05):
                    waiting, active = conn.execute(query).one()
                    self.lock_samples[0] += waiting
                    self.lock_samples[1] += active
        finally:
            engine.dispose()

    def __enter__(self) -> Probe:
        gc.collect()
        self._base = _rss()
        self._threads = [threading.Thread(target=self._sample_rss, daemon=True)]
        if self.lock_url:
            self._threads.append(threading.Thread(target=self._sample_locks, daemon=True))
        for t in self._threads:
            t.start()
        if self.trace:
            tracemalloc.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self.trace:
            self.heap_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        self.rss_peak_delta = max(self.rss_peak_delta, _rss() - self._base)
        self._stop.set()
        for t in self._threads:
            t.join()

    @property
    def lock_wait_share(self) -> float | None:
        waiting, active = self.lock_samples
        return round(waiting / active, 3) if active else None


# --- where the flow's time goes ----------------------------------------------------------------

_SQL_HEAD = re.compile(
    r"^\s*(?:(?P<verb>INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(?P<table>\w+)|(?P<word>\w+(?:\s+LOCAL)?))", re.I
)
_PARENS = re.compile(r"\([^()]*\)")
_FROM = re.compile(r"\bFROM\s+(\w+)", re.I)


def statement_class(sql: str) -> str:
    """'insert orders', 'update products', 'select subscriptions', 'savepoint', ... for a statement."""
    m = _SQL_HEAD.match(sql)
    if m is None:
        return "other"
    if m["verb"]:
        return f"{m['verb'].split()[0].lower()} {m['table'].lower()}"
    word = m["word"].lower()
    if word in ("select", "with"):
        outer = sql
        while (inner := _PARENS.sub(" ", outer)) != outer:  # drop subqueries: the outer FROM names the table
            outer = inner
        found = _FROM.search(outer)
        return f"{word} {found[1].lower()}" if found else word
    return word


class Split:
    """Thread-seconds by statement class, Python inside a batch, commit, lane bookkeeping, Prefect.

    Engine events time every statement as the client sees it (parameter adaptation, round
    trip, server work); lib.subscription_lanes' process_batch and run_lane are wrapped to time the
    batch and the lane. With several lanes the figures are thread-seconds, so they add up to
    the lanes' total, not to the wall time.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.lane_walls: list[float] = []
        self._lock = threading.Lock()
        self._local = threading.local()

    def _add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.seconds[key] += seconds
            self.counts[key] += 1

    @contextmanager
    def attached(self, engine: Engine) -> Iterator[Split]:
        from lib import subscription_lanes as sub_lanes

        def before(conn, cursor, statement, parameters, context, executemany) -> None:
            self._local.t = time.perf_counter()

        def after(conn, cursor, statement, parameters, context, executemany) -> None:
            elapsed = time.perf_counter() - self._local.t
            self._add("sql: " + statement_class(statement), elapsed)
            self._local.sql = getattr(self._local, "sql", 0.0) + elapsed

        def process_batch(*args: Any, **kwargs: Any) -> Any:
            self._local.sql, started = 0.0, time.perf_counter()
            try:
                return batch(*args, **kwargs)
            finally:
                self._add("python inside process_batch", time.perf_counter() - started - self._local.sql)
                self._add("process_batch", time.perf_counter() - started)

        def run_lane(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = lane(*args, **kwargs)
            elapsed = time.perf_counter() - started
            self._add("lane", elapsed)
            with self._lock:
                self.lane_walls.append(elapsed)
            self._add("batches", sum(result.batch_ms) / 1000)
            with self._lock:
                self.counts["batch"] += result.batches
            return result

        batch, lane = sub_lanes.process_batch, sub_lanes.run_lane
        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        sub_lanes.process_batch, sub_lanes.run_lane = process_batch, run_lane
        try:
            yield self
        finally:
            sub_lanes.process_batch, sub_lanes.run_lane = batch, lane
            event.remove(engine, "before_cursor_execute", before)
            event.remove(engine, "after_cursor_execute", after)

    def report(self, wall: float) -> dict[str, Any]:
        """Thread-seconds per part; ``prefect_and_report_s``: the flow's wall time outside its slowest lane."""
        s, n = self.seconds, self.counts
        sql = {k[5:]: (round(v, 3), n[k]) for k, v in sorted(s.items(), key=lambda kv: -kv[1]) if k.startswith("sql: ")}
        lanes = n["lane"]
        return {
            "flow_wall_s": round(wall, 3),
            "lanes": lanes,
            "batches": n["batch"],
            "lane_thread_s": round(s["lane"], 3),
            "lane_wall_max_s": round(max(self.lane_walls, default=0.0), 3),
            "prefect_and_report_s": round(wall - max(self.lane_walls, default=0.0), 3),
            "parts_thread_s": {
                "sql statements": round(sum(v for v, _ in sql.values()), 3),
                "python inside process_batch": round(s["python inside process_batch"], 3),
                "commit and session": round(s["batches"] - s["process_batch"], 3),
                "lane bookkeeping between batches": round(s["lane"] - s["batches"], 3),
            },
            "sql_thread_s_and_count": sql,
            "statements_per_batch": round(sum(c for _, c in sql.values()) / max(n["batch"], 1), 1),
        }


# --- (a) the reference: the whole night in one transaction of set-based SQL -------------------

ADD_MONTHS = """
CREATE FUNCTION pg_temp.bench_add_months(d date, k int, anchor int) RETURNS date
LANGUAGE sql IMMUTABLE AS $$
  SELECT m + least(anchor, extract(day FROM m + interval '1 month - 1 day')::int) - 1
  FROM (SELECT make_date(i / 12, i % 12 + 1, 1) AS m
        FROM (SELECT extract(year FROM d)::int * 12 + extract(month FROM d)::int - 1 + k AS i) a) b
$$
"""

# lib.schedule.next_after in SQL: day steps straight past the run date; month steps from the
# anchor, one more cycle when the first candidate is not after the run date (never two).
NEXT_DATE = """
CASE WHEN d.frequency IN ('weekly', 'biweekly') THEN
  d.next_delivery_date + st.days * ((CAST(:run_date AS date) - d.next_delivery_date) / st.days + 1)
ELSE (SELECT CASE WHEN c1 > CAST(:run_date AS date) THEN c1 ELSE c2 END FROM (
        SELECT pg_temp.bench_add_months(d.next_delivery_date, st.months * cyc, d.anchor_day) AS c1,
               pg_temp.bench_add_months(d.next_delivery_date, st.months * (cyc + 1), d.anchor_day) AS c2
        FROM (SELECT greatest(1, ((extract(year FROM CAST(:run_date AS date))::int
                                   - extract(year FROM d.next_delivery_date)::int) * 12
                                  + extract(month FROM CAST(:run_date AS date))::int
                                  - extract(month FROM d.next_delivery_date)::int) / st.months) AS cyc) k) c)
END
"""

REFERENCE = [
    ADD_MONTHS,
    # Due rows with their rank per product, oldest due first.
    "CREATE TEMP TABLE bench_due ON COMMIT DROP AS "
    "SELECT s.id, s.customer_id, s.product_id, s.quantity, s.frequency, s.next_delivery_date, s.anchor_day, "
    "       CAST(row_number() OVER (PARTITION BY s.product_id ORDER BY s.next_delivery_date, s.id) AS int) AS rn "
    "FROM subscriptions s WHERE s.status = 'active' AND s.next_delivery_date <= :run_date",
    "CREATE INDEX ON bench_due (product_id, rn)",
    "ANALYZE bench_due",
    "SELECT id FROM products WHERE id IN (SELECT product_id FROM bench_due) ORDER BY id FOR UPDATE",
    # Oldest due first, a row that does not fit is skipped and a later smaller one may still fit
    # (lib.subscriptions.allocate). A running sum <= stock would stop at the first row that does
    # not fit, so it is used only where the whole demand fits; the rest walk rank by rank.
    "CREATE TEMP TABLE bench_alloc ON COMMIT DROP AS "
    "WITH demand AS (SELECT d.product_id, sum(d.quantity) AS qty FROM bench_due d GROUP BY 1), "
    "short AS (SELECT p.id, p.stock FROM products p JOIN demand ON demand.product_id = p.id "
    "          WHERE demand.qty > p.stock), "
    "walk AS MATERIALIZED ("
    "  WITH RECURSIVE w(product_id, rn, left_stock, id, served) AS ("
    "    SELECT short.id, 0, short.stock, CAST(NULL AS bigint), CAST(NULL AS boolean) FROM short "
    "    UNION ALL "
    "    SELECT w.product_id, w.rn + 1, "
    "           CASE WHEN d.quantity <= w.left_stock THEN w.left_stock - d.quantity ELSE w.left_stock END, "
    "           d.id, d.quantity <= w.left_stock "
    "    FROM w JOIN bench_due d ON d.product_id = w.product_id AND d.rn = w.rn + 1) "
    "  SELECT id, served FROM w WHERE id IS NOT NULL) "
    "SELECT d.id, true AS served FROM bench_due d WHERE d.product_id NOT IN (SELECT id FROM short) "
    "UNION ALL SELECT id, served FROM walk",
    "CREATE TEMP TABLE bench_made (order_id bigint, sub_id bigint) ON COMMIT DROP",
    "WITH ins AS ("
    "  INSERT INTO orders (customer_id, subscription_id, delivery_date, total_paise) "
    "  SELECT d.customer_id, d.id, d.next_delivery_date, p.price_paise * d.quantity "
    "  FROM bench_due d JOIN bench_alloc a ON a.id = d.id AND a.served JOIN products p ON p.id = d.product_id "
    "  ORDER BY d.next_delivery_date, d.id "
    "  ON CONFLICT (subscription_id, delivery_date) DO NOTHING RETURNING id, subscription_id) "
    "INSERT INTO bench_made SELECT id, subscription_id FROM ins",
    "INSERT INTO order_items (order_id, product_id, quantity, unit_price_paise) "
    "SELECT m.order_id, d.product_id, d.quantity, p.price_paise "
    "FROM bench_made m JOIN bench_due d ON d.id = m.sub_id JOIN products p ON p.id = d.product_id",
    "UPDATE products p SET stock = p.stock - t.qty, updated_at = now() "
    "FROM (SELECT d.product_id, sum(d.quantity) AS qty FROM bench_made m JOIN bench_due d ON d.id = m.sub_id "
    "      GROUP BY 1) t WHERE p.id = t.product_id",
    "UPDATE subscriptions s SET next_delivery_date = n.day, updated_at = now() "
    f"FROM (SELECT d.id, {NEXT_DATE} AS day "
    "      FROM bench_made m JOIN bench_due d ON d.id = m.sub_id "
    "      JOIN (VALUES ('weekly', 7, 0), ('biweekly', 14, 0), ('monthly', 0, 1), ('quarterly', 0, 3)) "
    "           AS st(frequency, days, months) ON st.frequency = d.frequency) n "
    "WHERE s.id = n.id",
    "INSERT INTO subscription_outcomes (subscription_id, delivery_date, run_date, outcome, reason, order_id, run_id) "
    "SELECT d.id, d.next_delivery_date, :run_date, "
    "       CASE WHEN m.order_id IS NULL THEN 'out_of_stock' ELSE 'created' END, "
    "       CASE WHEN m.order_id IS NULL THEN 'needs ' || d.quantity || ' (reference run)' END, m.order_id, :run_id "
    "FROM bench_due d LEFT JOIN bench_made m ON m.sub_id = d.id",
]


def run_reference(run_date: dt.date) -> None:
    from lib import db

    params = {"run_date": run_date, "run_id": "bench-reference"}
    with db.get_engine().begin() as conn:
        for sql in REFERENCE:
            conn.execute(text(sql), {k: v for k, v in params.items() if f":{k}" in sql})


def prefix_rule_differences(run_date: dt.date) -> int:
    """On a fresh copy: how many due rows a plain running sum <= stock would decide otherwise."""
    from lib import db

    with db.get_engine().begin() as conn:
        for sql in REFERENCE[:6]:
            conn.execute(text(sql), {"run_date": run_date} if ":run_date" in sql else {})
        return conn.execute(
            text(
                "SELECT count(*) FROM ("
                "  SELECT d.id, sum(d.quantity) OVER (PARTITION BY d.product_id ORDER BY d.rn) <= p.stock AS served "
                "  FROM bench_due d JOIN products p ON p.id = d.product_id) w "
                "JOIN bench_alloc a ON a.id = w.id WHERE a.served <> w.served"
            )
        ).scalar_one()


# --- (b) the flow, (c) the old design ----------------------------------------------------------


def run_flow(run_date: dt.date, batch_size: int | None, concurrency: int | None) -> dict[str, Any]:
    from flows.subscriptions import process_due_subscriptions

    # The run date is fixed (a month end, same data every time), so it is soon more than the
    # flow's 35 days in the past: allow_any_date, or the flow refuses it.
    knobs = {"batch_size": batch_size, "max_concurrency": concurrency}  # None: the flow's default
    return process_due_subscriptions(
        run_date=run_date,
        send_confirmations=False,
        allow_any_date=True,
        **{k: v for k, v in knobs.items() if v is not None},
    )


def old_design_flow(workers: int) -> Callable[[dt.date], dict[str, int]]:
    """One task run per subscription, as the Celery design did; defined once the environment is set.

    Tasks of the same product are chained (wait_for), so oldest due is served first
    as in the other variants; different products run ``workers`` at a time.
    """
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.runtime import flow_run
    from prefect.task_runners import ThreadPoolTaskRunner

    from lib import subscriptions as subs
    from lib.db import session_scope

    @task(name="bench-process-one-subscription", cache_policy=NO_CACHE, persist_result=False)
    def process_one(subscription_id: int, run_date: dt.date, run_id: str) -> str:
        """One subscription, one transaction."""
        with session_scope() as session:
            result = subs.process_batch(session, subs.Due(run_date, run_id, only_ids=[subscription_id]), 1)
        return result.outcomes[0].outcome if result.outcomes else "none"

    @flow(name="bench-one-task-per-subscription", task_runner=ThreadPoolTaskRunner(max_workers=workers))
    def per_subscription(run_date: dt.date) -> dict[str, int]:
        """Submit one task per due subscription, oldest first."""
        with session_scope() as session:
            due = session.execute(
                text(
                    "SELECT id, product_id FROM subscriptions WHERE status = 'active' AND next_delivery_date <= :d "
                    "ORDER BY next_delivery_date, id"
                ),
                {"d": run_date},
            ).all()
        run_id, last, futures = flow_run.get_id(), {}, []
        for sid, pid in due:
            prev = last.get(pid)
            last[pid] = f = process_one.submit(sid, run_date, run_id, wait_for=[prev] if prev else None)
            futures.append(f)
        counts: dict[str, int] = {}
        for f in futures:
            counts[f.result()] = counts.get(f.result(), 0) + 1
        return counts

    return per_subscription


# --- main ----------------------------------------------------------------------------------------


def _pg_settings(engine: Engine) -> dict[str, str]:
    names = ("server_version", "shared_buffers", "synchronous_commit", "fsync", "work_mem", "max_wal_size")
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name = ANY(:n)"), {"n": list(names)}
        ).all()
    return dict(map(tuple, rows))


def _sizes(value: str) -> list[int]:
    sizes = sorted({int(v) for v in value.split(",") if v.strip()})
    if not sizes or sizes[0] <= 0:
        raise argparse.ArgumentTypeError(f"--n needs positive sizes, got {value!r}")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=_sizes, default=[100_000], help="due subscriptions; several: 100000,1000000")
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of (a) and (b); the median is reported")
    parser.add_argument("--old-n", type=int, default=2000, help="due subscriptions for the one-task-per-row design")
    parser.add_argument("--old-workers", type=int, default=4, help="task runner threads of the old design")
    parser.add_argument("--skip-old-design", action="store_true", help="leave out (c), one task run per row")
    parser.add_argument(
        "--no-first-night", dest="first_night", action="store_false", help="leave out the --history 0 runs of (b)"
    )
    parser.add_argument(
        "--first-night-stats",
        choices=("autovacuum", "none"),
        default="autovacuum",
        help="statistics of the first night's data: of the loaded tables (default), or none at all",
    )
    parser.add_argument("--split", action="store_true", help="add an instrumented flow run per N: where time goes")
    parser.add_argument(
        "--sweep",
        default="500x1,1000x1,2000x1,1000x2,1000x4,2000x4",
        help="extra (b) runs at the largest N, BATCHxCONCURRENCY, comma-separated ('' for none)",
    )
    parser.add_argument("--run-date", type=dt.date.fromisoformat, default=DEFAULT_RUN_DATE)
    parser.add_argument(
        "--history",
        type=float,
        default=0.5,
        help="share of subscriptions with an order from an earlier night (0: empty order tables)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the databases (for EXPLAIN afterwards)")
    args = parser.parse_args(argv)
    if args.history == 0:
        args.first_night = False  # the measured night already is the first one

    os.environ.update(
        {
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
        }
    )
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    from lib import db
    from lib import subscriptions as subs
    from lib.config import get_settings

    get_settings.cache_clear()
    base = get_settings().database_url
    url = _url(base, BENCH_DB)
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    db.reset_engine()
    sizes: dict[str, tuple[int, float, str]] = {}
    for n in args.n:
        sizes[str(n)] = (n, args.history, "autovacuum")
        if args.first_night:
            sizes[f"{n}-first-night"] = (n, 0.0, args.first_night_stats)
    if len(args.n) == 1:
        sizes["quarter"] = (max(1, args.n[0] // 4), args.history, "autovacuum")
    sizes["old"] = (min(args.old_n, args.n[0]), args.history, "autovacuum")  # also the warm-up's data
    datasets: dict[str, Dataset] = {}
    started = time.perf_counter()
    try:
        for key, (n, history, stats) in sizes.items():
            log.info("seeding %s: %d due subscriptions over %d products, history %s", key, n, args.products, history)
            datasets[key] = build_template(
                base, f"{BENCH_DB}_tpl_{key.replace('-', '_')}", n, args.products, args.run_date, 0.5, history, stats
            )
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=120):
            results = _measure(args, base, url, datasets, subs.BATCH_SIZE, subs.LANES)
            time.sleep(3)  # let the harness record the last task runs before it shuts down
        results["pg"] = _pg_settings(db.get_engine())
    finally:
        db.reset_engine()
        if not args.keep:
            for name in [BENCH_DB, *(d.template for d in datasets.values())]:
                db.drop_database(_url(base, name))
    results["bench_seconds"] = round(time.perf_counter() - started, 1)
    _print(results)
    if results["problems"]:
        print("\nFAILED: " + "\n  ".join(results["problems"]), file=sys.stderr)
        return 1
    return 0


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _stats(n: int, probes: list[Probe]) -> dict[str, Any]:
    secs = [p.seconds for p in probes]
    med = statistics.median(secs)
    out: dict[str, Any] = {
        "n": n,
        "seconds": [round(x, 3) for x in secs],
        "median_seconds": round(med, 3),
        "subs_per_s": round(n / med),
        "rss_peak_delta_mib": round(max(p.rss_peak_delta for p in probes) / 2**20, 1),
    }
    if probes[0].lock_url:
        out["lock_wait_share"] = [p.lock_wait_share for p in probes]
    return out


def _measure(args, base: str, url: str, datasets: dict[str, Dataset], batch: int, conc: int) -> dict[str, Any]:
    from lib import db

    run_date = args.run_date
    problems: list[str] = []
    refs: dict[str, State] = {}
    loads: list[list[float]] = []

    def once(label: str, ds_key: str, fn: Callable[[], Any], trace: bool = False, locks: bool = False) -> Probe:
        ds = datasets[ds_key]
        restore(base, ds)
        loads.append(_load())
        with Probe(trace=trace, lock_url=url if locks else None) as probe:
            fn()
        state = snapshot(db.get_engine())
        if ds_key not in refs:
            refs[ds_key] = state  # the first run on each data set is the reference (a)
        for p in differences(state, refs[ds_key]):
            problems.append(f"{label} (N={ds.n}, data {ds_key}): {p}")
        log.info(
            "%-34s N=%-7d %7.2f s  rss +%5.1f MiB%s%s  load %s",
            label,
            ds.n,
            probe.seconds,
            probe.rss_peak_delta / 2**20,
            f"  heap peak {probe.heap_peak / 2**20:.1f} MiB" if probe.heap_peak is not None else "",
            f"  lock-wait share {probe.lock_wait_share}" if locks else "",
            loads[-1],
        )
        return probe

    def reference() -> None:
        run_reference(run_date)

    def default_flow() -> None:
        run_flow(run_date, None, None)

    out: dict[str, Any] = {
        "n": args.n,
        "products": args.products,
        "run_date": run_date.isoformat(),
        "cpus": os.cpu_count(),
        "data": {k: d.info for k, d in datasets.items()},
        "defaults": {"batch_size": batch, "max_concurrency": conc},
        "repeats": args.repeats,
    }
    restore(base, datasets["old"])
    default_flow()  # warm-up: imports, first flow run against the harness; not measured

    by_n: dict[str, dict[str, Any]] = {}
    first_night: dict[str, dict[str, Any]] = {}
    for n in args.n:
        key, fkey = str(n), f"{n}-first-night"
        a: list[Probe] = []
        b: list[Probe] = []
        f: list[Probe] = []
        if args.first_night:
            once("(a) reference SQL, first night", fkey, reference)  # the first night's data reference
        for _ in range(args.repeats):  # interleaved, so that a change of load hits every variant alike
            a.append(once("(a) reference SQL", key, reference))
            b.append(once(f"(b) flow {batch}x{conc}", key, default_flow, locks=True))
            if args.first_night:
                f.append(once(f"(b) flow {batch}x{conc}, first night", fkey, default_flow))
        sa, sb = _stats(n, a), _stats(n, b)
        sb["heap_peak_mib"] = round(
            once(f"(b) flow {batch}x{conc}, traced", key, default_flow, trace=True).heap_peak / 2**20, 2
        )
        by_n[key] = {
            "a_reference": sa,
            "b_flow": sb,
            "b_over_a": round(sb["median_seconds"] / sa["median_seconds"], 2),
            "b_over_a_per_repeat": [round(y.seconds / x.seconds, 2) for x, y in zip(a, b, strict=True)],
        }
        if args.first_night:
            sf = _stats(n, f)
            first_night[key] = {
                "history_orders": datasets[key].info["history_orders"],
                "b_flow_with_history": sb["median_seconds"],
                "b_flow_first_night": sf,
                "ratio": round(sf["median_seconds"] / sb["median_seconds"], 2),
                "ratio_per_repeat": [round(y.seconds / x.seconds, 2) for x, y in zip(b, f, strict=True)],
            }
        if args.split:
            split = Split()
            restore(base, datasets[key])
            loads.append(_load())
            with split.attached(db.get_engine()):
                started = time.perf_counter()
                default_flow()
                wall = time.perf_counter() - started
            by_n[key]["split"] = split.report(wall)
            log.info("split at N=%d: %s", n, json.dumps(by_n[key]["split"]))

    largest = str(args.n[-1])
    a_big, b_big = by_n[largest]["a_reference"], by_n[largest]["b_flow"]
    prefix_ds = datasets[largest]
    restore(base, prefix_ds)
    out["prefix_rule_would_differ_on"] = prefix_rule_differences(run_date)
    # Memory of (a), in an untimed run with tracemalloc on (it slows allocation-heavy code down).
    traced = once("(a) reference SQL, traced", largest, reference, trace=True)
    a_big["heap_peak_mib"] = round(traced.heap_peak / 2**20, 2)
    heap = {k: v["b_flow"]["heap_peak_mib"] for k, v in by_n.items()}
    rss = {k: v["b_flow"]["rss_peak_delta_mib"] for k, v in by_n.items()}
    if "quarter" in datasets:
        once("(a) reference SQL", "quarter", reference)
        q = once(f"(b) flow {batch}x{conc}, traced", "quarter", default_flow, trace=True)
        qn = str(datasets["quarter"].n)
        heap[qn], rss[qn] = round(q.heap_peak / 2**20, 2), round(q.rss_peak_delta / 2**20, 1)
    out["memory"] = {
        "measure": "tracemalloc peak of the Python heap during an untimed run (C buffers of libpq not included); "
        "rss_peak_delta_mib: peak RSS growth sampled every 20 ms from /proc/self/statm",
        "flow_heap_peak_mib": dict(sorted(heap.items(), key=lambda kv: int(kv[0]))),
        "flow_rss_peak_delta_mib": dict(sorted(rss.items(), key=lambda kv: int(kv[0]))),
    }

    sweep = []
    for spec in filter(None, (x.strip() for x in args.sweep.split(","))):
        bs, cc = (int(v) for v in spec.split("x"))
        probe = once(f"(b) flow {bs}x{cc}", largest, lambda bs=bs, cc=cc: run_flow(run_date, bs, cc), locks=True)
        sweep.append({"batch_size": bs, "max_concurrency": cc, **_stats(int(largest), [probe])})
    sweep.append({"batch_size": batch, "max_concurrency": conc, **b_big})
    out["sweep"] = sorted(sweep, key=lambda r: r["median_seconds"])

    out["variants"] = {"a_reference": a_big, "b_flow": b_big}
    out["by_n"] = by_n
    out["ratios"] = {"b_over_a": {k: v["b_over_a"] for k, v in by_n.items()}}
    if args.first_night:
        out["first_night"] = {"ratio": {k: v["ratio"] for k, v in first_night.items()}, "by_n": first_night}
        out["ratios"]["first_night"] = out["first_night"]["ratio"]
    if not args.skip_old_design:
        old_flow = old_design_flow(args.old_workers)
        once("(a) reference SQL", "old", reference)
        probe = once(f"(c) task per row, {args.old_workers} threads", "old", lambda: old_flow(run_date))
        c = _stats(datasets["old"].n, [probe])
        c.update(
            workers=args.old_workers,
            extrapolated=c["n"] < int(largest),
            extrapolated_seconds_for_n=round(c["median_seconds"] * int(largest) / c["n"], 1),
        )
        out["variants"]["c_task_per_row"] = c
        out["ratios"]["c_over_b"] = round(c["extrapolated_seconds_for_n"] / b_big["median_seconds"], 1)
    out["target_met"] = all(r <= 1.5 for r in out["ratios"]["b_over_a"].values()) and all(
        r <= 1.2 for r in out["ratios"].get("first_night", {}).values()
    )
    out["load_average_1m_before_each_run"] = {"min": min(x[0] for x in loads), "max": max(x[0] for x in loads)}
    out["problems"] = problems
    return out


def _print(r: dict[str, Any]) -> None:
    v = r["variants"]
    err = sys.stderr
    largest = str(r["n"][-1])
    print(
        f"\nN = {', '.join(f'{n:,}' for n in r['n'])} due subscriptions over {r['products']} products, "
        f"run date {r['run_date']}, {r['cpus']} CPUs, PostgreSQL {r['pg'].get('server_version')}, "
        f"medians of {r['repeats']}, load average (1 min) {r['load_average_1m_before_each_run']}",
        file=err,
    )
    print(f"{'variant':<46} {'N':>9} {'seconds':>9} {'subs/s':>8} {'heap MiB':>9} {'RSS+ MiB':>9}  note", file=err)
    rows: list[tuple[str, dict[str, Any], str]] = []
    for key, x in r["by_n"].items():
        rows.append(("(a) reference: one transaction of SQL", x["a_reference"], ""))
        rows.append(
            (
                f"(b) process-due-subscriptions {r['defaults']['batch_size']}x{r['defaults']['max_concurrency']}",
                x["b_flow"],
                f"b/a {x['b_over_a']}",
            )
        )
        if key in r.get("first_night", {}).get("by_n", {}):
            fn = r["first_night"]["by_n"][key]
            rows.append(("(b) the same, first night (--history 0)", fn["b_flow_first_night"], f"ratio {fn['ratio']}"))
    if "c_task_per_row" in v:
        c = v["c_task_per_row"]
        rows.append(
            (
                f"(c) one task per row ({c['workers']} threads)",
                c,
                f"c/b {r['ratios']['c_over_b']} (measured at N={c['n']}, extrapolated to N={largest})",
            )
        )
    for label, x, note in rows:
        secs = x.get("extrapolated_seconds_for_n", x["median_seconds"])
        n = int(largest) if "extrapolated_seconds_for_n" in x else x["n"]
        heap = x.get("heap_peak_mib")
        print(
            f"{label:<46} {n:>9} {secs:>9.2f} {x['subs_per_s']:>8} {heap if heap is not None else '-':>9} "
            f"{x['rss_peak_delta_mib']:>9}  {note}",
            file=err,
        )
    print(f"\nflow heap peak by N: {r['memory']['flow_heap_peak_mib']} MiB (tracemalloc)", file=err)
    for key, x in r["by_n"].items():
        if "split" in x:
            sp = x["split"]
            print(
                f"\nsplit at N={key} (one instrumented run, thread-seconds over {sp['lanes']} lanes, "
                f"{sp['batches']} batches, {sp['statements_per_batch']} statements per batch): "
                f"flow {sp['flow_wall_s']} s, slowest lane {sp['lane_wall_max_s']} s, "
                f"Prefect and report {sp['prefect_and_report_s']} s",
                file=err,
            )
            for part, secs in sp["parts_thread_s"].items():
                print(f"  {part:<40} {secs:>9.2f}", file=err)
            for cls, (secs, count) in sp["sql_thread_s_and_count"].items():
                print(f"    {cls:<38} {secs:>9.2f}  ({count} statements)", file=err)
    print(f"\n{'batch x concurrency':<22} {'seconds':>9} {'subs/s':>8} {'lock-wait share':>16}", file=err)
    for x in r["sweep"]:
        print(
            f"{str(x['batch_size']) + ' x ' + str(x['max_concurrency']):<22} {x['median_seconds']:>9.2f} "
            f"{x['subs_per_s']:>8} {x.get('lock_wait_share')!s:>16}",
            file=err,
        )
    print(f"\nbench took {r['bench_seconds']} s", file=err)
    print(json.dumps(r, indent=2, default=str))


if __name__ == "__main__":
    raise SystemExit(main())
