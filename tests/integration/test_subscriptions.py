"""The nightly batch against the real PostgreSQL: one order per cycle, stock never negative."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import contextmanager

import pytest
from sqlalchemy import event, text

from lib import pg_arrays
from lib import subscription_lanes as sub_lanes
from lib import subscription_stats as sub_stats
from lib import subscriptions as subs
from lib.db import session_scope
from tests.builders import make_customer, make_product, make_subscription, month_end, today

TODAY = today()


@pytest.fixture(autouse=True)
def _today_as_the_test_starts():
    """TODAY again for each test, so a suite that runs across 00:00 UTC does not use yesterday's date."""
    global TODAY
    TODAY = today()


def run_night(run_date=None, batch_size=50, run_id=None):
    return sub_lanes.run_lane(session_scope, run_date or TODAY, batch_size, run_id or str(uuid.uuid4()))


def scalar(pg, sql, **params):
    with pg.connect() as c:
        return c.execute(text(sql), params).scalar()


def test_out_of_stock_makes_no_order_and_stays_due(pg):
    """With no stock: no order, an out_of_stock outcome with reason, and the date unchanged."""
    sid = make_subscription(pg, due=TODAY, stock=0)
    lane = run_night()
    assert sub_stats.headline(lane.groups)["out_of_stock"] == 1
    assert scalar(pg, "SELECT count(*) FROM orders") == 0
    assert scalar(pg, "SELECT next_delivery_date FROM subscriptions WHERE id=:i", i=sid) == TODAY
    assert "in stock" in scalar(pg, "SELECT reason FROM subscription_outcomes WHERE subscription_id=:i", i=sid)


def test_scarce_stock_serves_the_oldest_due_first(pg):
    """Stock for two of three: the two longest overdue get orders, the newest waits; stock ends at 0."""
    product = make_product(pg, stock=4)
    oldest = make_subscription(pg, product_id=product, due=TODAY - dt.timedelta(days=3), quantity=2)
    middle = make_subscription(pg, product_id=product, due=TODAY - dt.timedelta(days=1), quantity=2)
    newest = make_subscription(pg, product_id=product, due=TODAY, quantity=2)
    run_night()
    with pg.connect() as c:
        ordered = set(c.execute(text("SELECT subscription_id FROM orders")).scalars())
        stock = c.execute(text("SELECT stock FROM products WHERE id=:p"), {"p": product}).scalar()
    assert ordered == {oldest, middle}
    assert newest not in ordered and stock == 0


def test_paused_and_cancelled_are_never_processed(pg):
    """Only active subscriptions get orders; paused and cancelled keep their dates and get no outcome."""
    active = make_subscription(pg, due=TODAY)
    paused = make_subscription(pg, due=TODAY, status="paused")
    cancelled = make_subscription(pg, due=TODAY - dt.timedelta(days=5), status="cancelled")
    run_night()
    with pg.connect() as c:
        assert set(c.execute(text("SELECT subscription_id FROM orders")).scalars()) == {active}
        assert (
            c.execute(
                text("SELECT count(*) FROM subscription_outcomes WHERE subscription_id IN (:p, :c)"),
                {"p": paused, "c": cancelled},
            ).scalar()
            == 0
        )


def test_two_days_overdue_gets_one_order_and_moves_past_today(pg):
    """A weekly subscription missed for two nights gets exactly one order; its next date is after today."""
    sid = make_subscription(pg, due=TODAY - dt.timedelta(days=2), frequency="weekly")
    run_night()
    with pg.connect() as c:
        dates = c.execute(text("SELECT delivery_date FROM orders WHERE subscription_id=:s"), {"s": sid}).all()
        nxt = c.execute(text("SELECT next_delivery_date FROM subscriptions WHERE id=:s"), {"s": sid}).scalar()
    assert dates == [(TODAY - dt.timedelta(days=2),)]
    assert nxt == TODAY + dt.timedelta(days=5)


def test_order_rows_carry_price_quantity_and_stock_moves(pg):
    """The order totals price x quantity, has one item, and stock drops by the quantity."""
    product = make_product(pg, stock=10, price_paise=45_000)
    sid = make_subscription(pg, product_id=product, due=TODAY, quantity=3)
    run_night()
    with pg.connect() as c:
        (total,) = c.execute(text("SELECT total_paise FROM orders WHERE subscription_id=:s"), {"s": sid}).one()
        items = c.execute(text("SELECT product_id, quantity, unit_price_paise FROM order_items")).all()
        stock = c.execute(text("SELECT stock FROM products WHERE id=:p"), {"p": product}).scalar()
    assert total == 135_000 and items == [(product, 3, 45_000)] and stock == 7


def test_second_run_creates_nothing(pg):
    """Running the night twice: the second run finds nothing due and writes no order."""
    for _ in range(30):
        make_subscription(pg, due=TODAY)
    first = sub_stats.headline(run_night().groups)
    orders = scalar(pg, "SELECT count(*) FROM orders")
    second = sub_stats.headline(run_night().groups)
    assert first["created"] == 30 and second["created"] == 0
    assert scalar(pg, "SELECT count(*) FROM orders") == orders == 30


def _seed_many(pg, n, products, stock):
    with pg.begin() as c:
        c.execute(
            text(
                "INSERT INTO customers (name, email) SELECT 'C', 'c' || g || '@example.in' "
                "FROM generate_series(1, :n) g"
            ),
            {"n": n},
        )
        c.execute(
            text(
                "INSERT INTO products (sku, name, price_paise, stock) SELECT 'P' || g, 'P', 10000, :s "
                "FROM generate_series(1, :p) g"
            ),
            {"p": products, "s": stock},
        )
        c.execute(
            text(
                "INSERT INTO subscriptions (customer_id, product_id, quantity, frequency, next_delivery_date, "
                "anchor_day) SELECT g, 1 + g % :p, 1 + g % 3, 'monthly', :d - (g % 4), 28 FROM generate_series(1, :n) g"
            ),
            {"n": n, "p": products, "d": TODAY},
        )
        total = c.execute(text("SELECT sum(stock) FROM products")).scalar()
    with pg.begin() as c:  # as autovacuum would after a bulk load
        c.execute(text("ANALYZE subscriptions, products, subscription_outcomes, orders"))
    return total


def _check_exactly_once(pg, initial_stock):
    with pg.connect() as c:
        dupes = c.execute(
            text(
                "SELECT count(*) FROM (SELECT subscription_id FROM orders "
                "GROUP BY subscription_id HAVING count(*) > 1) d"
            )
        ).scalar()
        ordered_units = c.execute(text("SELECT coalesce(sum(quantity), 0) FROM order_items")).scalar()
        stock = c.execute(text("SELECT sum(stock) FROM products")).scalar()
        still_due_with_stock = c.execute(
            text(
                "SELECT count(*) FROM subscriptions s JOIN products p ON p.id = s.product_id "
                "WHERE s.next_delivery_date <= :d AND p.stock >= s.quantity"
            ),
            {"d": TODAY},
        ).scalar()
        orders = c.execute(text("SELECT count(*) FROM orders")).scalar()
    assert dupes == 0
    assert stock == initial_stock - ordered_units
    assert still_due_with_stock == 0
    return orders


def test_concurrent_runs_make_each_order_once(pg):
    """Four runs at once over the same night: one order per subscription, stock exactly reduced."""
    initial = _seed_many(pg, 3000, products=40, stock=100)  # demand > stock: runs compete for units
    errors = []

    def worker():
        try:
            run_night(batch_size=60)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    orders = _check_exactly_once(pg, initial)
    assert 0 < orders < 3000
    assert scalar(pg, "SELECT min(stock) FROM products") >= 0


KILLABLE = """
import datetime as dt, uuid
from lib.db import session_scope
from lib.subscription_lanes import run_lane
run_lane(session_scope, dt.date.fromisoformat('{day}'), 10, str(uuid.uuid4()))
"""


def test_killed_run_then_rerun_equals_one_clean_run(pg):
    """SIGKILL a run mid-night, run again: every due subscription has one order and stock adds up."""
    initial = _seed_many(pg, 2000, products=50, stock=10_000)
    with pg.begin() as c:
        # Slow each batch a little (a real trigger) so the kill lands mid-run.
        c.execute(
            text(
                "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN PERFORM pg_sleep(0.01); RETURN NULL; END $$"
            )
        )
        c.execute(text("CREATE TRIGGER slow AFTER INSERT ON orders FOR EACH STATEMENT EXECUTE FUNCTION slow()"))
    try:
        proc = subprocess.Popen([sys.executable, "-c", KILLABLE.format(day=TODAY)], env=dict(os.environ))
        deadline = time.monotonic() + 60
        while scalar(pg, "SELECT count(*) FROM orders") < 300 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial = scalar(pg, "SELECT count(*) FROM orders")
        assert 300 <= partial < 2000, "the kill must land in the middle of the run"
    finally:
        with pg.begin() as c:
            c.execute(text("DROP TRIGGER IF EXISTS slow ON orders"))
            c.execute(text("DROP FUNCTION IF EXISTS slow()"))
    run_night()
    assert _check_exactly_once(pg, initial) == 2000


def test_one_bad_row_fails_alone(pg):
    """A row the database refuses is recorded failed with the reason; the rest of the batch gets orders."""
    good = [make_subscription(pg, due=TODAY) for _ in range(5)]
    bad = make_subscription(pg, due=TODAY)
    with pg.begin() as c:
        c.execute(
            text(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF NEW.subscription_id = {bad} THEN RAISE EXCEPTION 'order for % refused by test trigger', "
                "NEW.subscription_id; END IF; RETURN NEW; END $$"
            )
        )
        c.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON orders FOR EACH ROW EXECUTE FUNCTION refuse()"))
    try:
        lane = run_night()
    finally:
        with pg.begin() as c:
            c.execute(text("DROP TRIGGER refuse ON orders"))
            c.execute(text("DROP FUNCTION refuse()"))
    assert lane.isolated_batches == 1
    with pg.connect() as c:
        assert set(c.execute(text("SELECT subscription_id FROM orders")).scalars()) == set(good)
        outcome, reason = c.execute(
            text("SELECT outcome, reason FROM subscription_outcomes WHERE subscription_id=:s"), {"s": bad}
        ).one()
        due = c.execute(text("SELECT next_delivery_date FROM subscriptions WHERE id=:s"), {"s": bad}).scalar()
    assert outcome == "failed" and "refused by test trigger" in reason and due == TODAY


def test_dry_run_predicts_and_writes_nothing(pg):
    """The dry run's counts match what a real run then does, and it leaves every table as it was."""
    product = make_product(pg, stock=3)
    for _ in range(5):
        make_subscription(pg, product_id=product, due=TODAY)
    with session_scope() as s:
        predicted = sub_stats.headline(sub_lanes.dry_run(s, TODAY, 2).groups)
    assert scalar(pg, "SELECT count(*) FROM orders") == 0
    assert scalar(pg, "SELECT count(*) FROM subscription_outcomes") == 0
    assert scalar(pg, "SELECT stock FROM products WHERE id=:p", p=product) == 3
    actual = sub_stats.headline(run_night(batch_size=2).groups)
    assert predicted == actual == {**actual, "created": 3, "out_of_stock": 2}


@pytest.mark.parametrize("bad", [0, -5])
def test_bad_batch_size_is_rejected(bad):
    """batch_size <= 0 is refused with a clear message."""
    from lib.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="batch_size"):
        subs.validate_knobs(bad)


def test_customer_builder_sanity(pg):
    """Builders make linked rows (guards the other tests' setup)."""
    cid = make_customer(pg)
    sid = make_subscription(pg, customer_id=cid)
    assert scalar(pg, "SELECT customer_id FROM subscriptions WHERE id=:s", s=sid) == cid


def test_lanes_of_one_run_serve_the_oldest_due_first_per_product(pg):
    """Four lanes sharing a night order exactly the subscriptions a strict oldest-first allocation picks."""
    _seed_many(pg, 2000, products=30, stock=60)  # demand is about twice the stock
    with pg.connect() as c:
        due = [
            subs.DueSub(*r)
            for r in c.execute(
                text(
                    "SELECT id, customer_id, product_id, quantity, frequency, next_delivery_date, anchor_day "
                    "FROM subscriptions WHERE next_delivery_date <= :d"
                ),
                {"d": TODAY},
            )
        ]
        stock = dict(c.execute(text("SELECT id, stock FROM products")).all())
    expected, _, _ = subs.allocate(due, stock)
    run_id = str(uuid.uuid4())
    threads = [
        threading.Thread(target=sub_lanes.run_lane, args=(session_scope, TODAY, 40, run_id, None, (i, 4)))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with pg.connect() as c:
        ordered = set(c.execute(text("SELECT subscription_id FROM orders")).scalars())
    assert ordered == {s.id for s in expected}


def test_a_row_locked_while_the_lane_passes_is_picked_up_before_the_lane_ends(pg):
    """A due row another transaction holds is skipped, then claimed by the lane's last pass from the start."""
    product = make_product(pg, stock=100)
    held = make_subscription(pg, product_id=product, due=TODAY - dt.timedelta(days=2))
    rest = [make_subscription(pg, product_id=product, due=TODAY) for _ in range(7)]
    blocker = pg.connect()
    blocker.begin()
    blocker.execute(text("SELECT 1 FROM subscriptions WHERE id = :i FOR UPDATE"), {"i": held})
    calls = 0

    def factory():
        nonlocal calls
        calls += 1
        if calls == 2:  # the first batch has walked past the held row: let it go
            blocker.rollback()
            blocker.close()
        return session_scope()

    lane = sub_lanes.run_lane(factory, TODAY, 3, str(uuid.uuid4()))
    with pg.connect() as c:
        ordered = set(c.execute(text("SELECT subscription_id FROM orders")).scalars())
    assert ordered == {held, *rest}
    assert sub_stats.headline(lane.groups)["created"] == 8


def test_claims_go_on_from_the_last_row_claimed(pg):
    """With ``after``, a claim returns only rows after that (date, id) key, still oldest first."""
    ids = [make_subscription(pg, due=TODAY - dt.timedelta(days=d)) for d in (3, 2, 1, 0)]
    run_id = str(uuid.uuid4())
    with session_scope() as s:
        first = subs.claim_due(s, subs.Due(TODAY, run_id), 2)
    with session_scope() as s:
        rest = subs.claim_due(s, subs.Due(TODAY, run_id, after=(first[-1].next_delivery_date, first[-1].id)), 10)
    assert [d.id for d in first] == ids[:2]
    assert [d.id for d in rest] == ids[2:]


@contextmanager
def _claims_seen(pg):
    """The claim statements (SQL, parameters) run on ``pg`` inside the block, to EXPLAIN them."""
    seen: list[tuple[str, dict]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "FOR UPDATE OF s SKIP LOCKED" in statement:
            seen.append((statement, parameters))

    event.listen(pg, "before_cursor_execute", capture)
    try:
        yield seen
    finally:
        event.remove(pg, "before_cursor_execute", capture)


def test_the_claim_probes_outcomes_by_subscription_never_by_run_id(pg):
    """Even when statistics make a new run id look rare, the claim does not scan the run-id index per row."""
    _seed_many(pg, 2000, products=20, stock=0)  # all out of stock: every row stays due after its outcome
    with pg.begin() as c:  # earlier nights: a few run ids, all in the statistics
        c.execute(
            text(
                "INSERT INTO subscription_outcomes (subscription_id, delivery_date, run_date, outcome, run_id) "
                "SELECT id, next_delivery_date - 30, next_delivery_date - 30, 'out_of_stock', 'night-' || id % 20 "
                "FROM subscriptions"
            )
        )
        c.execute(text("ANALYZE subscription_outcomes"))
    with _claims_seen(pg) as seen:
        run_night(batch_size=500)
    with pg.connect() as c:
        raw = c.connection.dbapi_connection.cursor()
        raw.execute("EXPLAIN " + seen[-1][0], seen[-1][1])
        plan = "\n".join(r[0] for r in raw.fetchall())
    assert "ix_subscription_outcomes_run_order" not in plan, plan
    assert "uq_subscription_outcomes_subscription_id_run_id_delivery_date" in plan, plan


def test_a_batch_plans_index_walks_without_jit(pg):
    """The batch transaction keeps the planner to index access and off JIT; the next transaction is back to normal."""
    make_subscription(pg, due=TODAY)
    settings = ("jit", "enable_seqscan", "enable_bitmapscan")
    with session_scope() as s:
        subs.process_batch(s, subs.Due(TODAY, str(uuid.uuid4())), 10)
        assert [s.execute(text(f"SHOW {g}")).scalar() for g in settings] == ["off"] * 3
    with session_scope() as s:
        assert [s.execute(text(f"SHOW {g}")).scalar() for g in settings] == ["on"] * 3


@pytest.mark.parametrize(
    ("values", "kind"),
    [
        ([1, 2, 3], "bigint[]"),
        ([month_end(), month_end(2), today()], "date[]"),
        ([1, None, 3], "bigint[]"),
        (["needs 2, 1 in stock", 'a "quoted" \\ word', None, "", "{braces}", "NULL"], "text[]"),
        ([], "text[]"),
    ],
)
def test_array_parameters_round_trip_through_postgresql(pg, values, kind):
    """Array literals of ints, dates and text (commas, quotes, backslashes, braces, NULL) read back unchanged."""
    plain = all(isinstance(v, int | dt.date) for v in values)
    literal = pg_arrays.pg_array(values) if plain else pg_arrays.pg_text_array(values)
    with pg.connect() as c:
        back = c.execute(text(f"SELECT CAST(:a AS {kind})"), {"a": literal}).scalar()
    assert back == values


def test_the_lane_tally_equals_the_pandas_summary(pg):
    """Tally builds the same table as summarize(), for outcomes added in several batches."""
    outcomes = [
        subs.Outcome(
            i,
            i % 3,
            ("weekly", "monthly")[i % 2],
            TODAY,
            ("created", "out_of_stock")[i % 5 == 0],
            None,
            None,
            i % 4,
            100 * i,
        )
        for i in range(1, 200)
    ]
    tally = sub_stats.Tally(outcomes[:50])
    tally.add(outcomes[50:])
    expected = sub_stats.summarize(outcomes)
    got = tally.frame()
    assert got.to_dict("records") == expected.to_dict("records")
    assert sub_stats.Tally().frame().empty and list(sub_stats.Tally().frame().columns) == sub_stats.SUMMARY_COLUMNS


def test_out_of_stock_rows_are_not_claimed_again_by_the_same_run(pg):
    """A retried lane skips rows its run already decided (they stay due); a new run claims them again."""
    product = make_product(pg, stock=0)
    short = {make_subscription(pg, product_id=product, due=TODAY) for _ in range(3)}
    run_id = str(uuid.uuid4())
    run_night(run_id=run_id)
    with session_scope() as s:
        again = subs.claim_due(s, subs.Due(TODAY, run_id), 10)
    with session_scope() as s:
        next_run = subs.claim_due(s, subs.Due(TODAY, str(uuid.uuid4())), 10)
    assert again == [] and {d.id for d in next_run} == short


def test_a_claim_walks_the_due_index_in_order_even_when_the_estimates_say_otherwise(pg):
    """With the lane filter misjudged and the cursor deep in the range, the claim still reads the due index in order."""
    _seed_many(pg, 40_000, products=40, stock=10**6)
    with pg.begin() as c:  # most active subscriptions are not due tonight
        c.execute(
            text(
                "INSERT INTO subscriptions (customer_id, product_id, quantity, frequency, next_delivery_date, "
                "anchor_day) SELECT 1 + g % 1000, 1 + g % 40, 1, 'monthly', :d + 1 + g % 60, 28 "
                "FROM generate_series(1, 120000) g"
            ),
            {"d": TODAY},
        )
        c.execute(text("ANALYZE subscriptions"))
    with _claims_seen(pg) as seen, session_scope() as s:
        subs.process_batch(s, subs.Due(TODAY, str(uuid.uuid4()), lane=(1, 4), after=(TODAY, 10_000)), 1000)
        raw = s.connection().connection.dbapi_connection.cursor()
        raw.execute("EXPLAIN " + seen[-1][0], seen[-1][1])
        plan = "\n".join(r[0] for r in raw.fetchall())
    assert "Index Scan using ix_subscriptions_due" in plan and "Sort" not in plan, plan
