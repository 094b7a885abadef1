"""The variants the nightly benchmark times: (a) the reference, the whole night in one transaction of
set-based SQL written here; (b) the flow process-due-subscriptions; (c) the old design, one Prefect task
run per subscription.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from sqlalchemy import text

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
