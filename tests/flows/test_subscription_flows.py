"""Subscription flows end to end under the Prefect harness: orders, artifacts, webhooks, reminders."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import threading
import time

import pytest
from sqlalchemy import text

from flows.subscriptions import (
    handle_razorpay_event,
    process_due_subscriptions,
    process_single_subscription,
    remind_upcoming_deliveries,
)
from lib.config import get_settings
from lib.errors import InvalidInputError, NotFoundError, RejectedError
from lib.razorpay import SignatureError, sign
from tests.builders import make_customer, make_product, make_subscription
from tests.unit.test_razorpay_signature import (
    RAW_CHARGE,
    RAW_CHARGE_SIGNATURE,
    RAW_CHARGE_SIGNATURE_OTHER_SECRET,
)

# Within the run-date bound (35 days back) whenever the suite runs: the flows refuse dates far from today.
TODAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


@pytest.fixture(autouse=True)
def _today_as_the_test_starts():
    """TODAY again for each test, so a suite that runs across 00:00 UTC does not use yesterday's date."""
    global TODAY
    TODAY = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=1)


SECRET = "test-webhook-secret"


def rows(pg, sql, **params):
    with pg.connect() as c:
        return c.execute(text(sql), params).all()


def count(pg, table):
    return rows(pg, f"SELECT count(*) FROM {table}")[0][0]


def run_artifact(key, flow_run_id):
    """The artifact ``key`` published by that flow run (not merely the newest one under the key)."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )

    [artifact] = asyncio.run(read())
    return artifact


def test_nightly_flow_creates_orders_and_publishes_summary(pg):
    """The flow orders every due subscription once, returns counts and publishes a readable summary of its run."""
    product = make_product(pg, stock=5, price_paise=50_000, name="Moringa Powder 250 g")
    for _ in range(4):
        make_subscription(pg, product_id=product, due=TODAY, quantity=1)
    make_subscription(pg, product_id=product, due=TODAY, quantity=3)  # only 1 left: out of stock
    make_subscription(pg, due=TODAY + dt.timedelta(days=1))  # not due
    state = process_due_subscriptions(
        run_date=TODAY, batch_size=2, max_concurrency=2, send_confirmations=False, return_state=True
    )
    stats = state.result()
    assert (stats["created"], stats["out_of_stock"], stats["units"]) == (4, 1, 4)
    assert stats["revenue_inr"] == 2000.0
    assert count(pg, "orders") == 4
    artifact = run_artifact("process-due-subscriptions", state.state_details.flow_run_id)
    text_md = artifact.data
    assert artifact.type == "markdown"
    assert f"{TODAY}: created 4 orders (₹2,000.00), 1 out of stock, 0 failed" in text_md
    assert "| created | 4 | 4 | ₹2,000.00 |" in text_md and "| out_of_stock | 1 | 0 | ₹0.00 |" in text_md
    assert "| Moringa Powder 250 g | 4 | 4 | ₹2,000.00 |" in text_md
    assert "batch p50 ms" in text_md


def test_nightly_flow_twice_creates_nothing_the_second_time(pg):
    """A second run over the same night finds nothing due and writes no order."""
    for _ in range(3):
        make_subscription(pg, due=TODAY)
    assert process_due_subscriptions(run_date=TODAY, send_confirmations=False)["created"] == 3
    assert process_due_subscriptions(run_date=TODAY, send_confirmations=False)["created"] == 0
    assert count(pg, "orders") == 3


def test_nightly_run_past_its_soft_limit_orders_nothing_and_the_next_run_orders_everything_once(pg, monkeypatch):
    """A run whose soft limit is already spent claims no batch, says stopped_early, and the next run orders all once."""
    subs = [make_subscription(pg, due=TODAY) for _ in range(3)]
    monkeypatch.setattr(get_settings(), "flow_soft_limit_seconds", 1e-6)
    state = process_due_subscriptions(run_date=TODAY, send_confirmations=False, return_state=True)
    stats = state.result()
    assert stats["stopped_early"] and (stats["created"], stats["batches"]) == (0, 0)
    assert count(pg, "orders") == count(pg, "subscription_outcomes") == 0
    assert rows(pg, "SELECT DISTINCT next_delivery_date FROM subscriptions") == [(TODAY,)]
    assert (
        "stopped early at the soft limit"
        in run_artifact("process-due-subscriptions", state.state_details.flow_run_id).data
    )
    monkeypatch.undo()
    again = process_due_subscriptions(run_date=TODAY, send_confirmations=False)
    assert not again["stopped_early"] and again["created"] == 3
    assert rows(pg, "SELECT subscription_id, count(*) FROM orders GROUP BY 1 ORDER BY 1") == [(s, 1) for s in subs]


def _hold_row_lock(pg, sql: str, soft_limit: float, held: threading.Event, stop: threading.Event, seen: dict) -> None:
    """Hold a row lock until the nightly run waits on it, then until its soft limit has passed, then let go."""
    with pg.connect() as conn, conn.begin():
        conn.execute(text(sql))
        held.set()
        waiting = (
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        # Autocommit: within one transaction pg_stat_activity is a snapshot and would never change.
        with pg.connect().execution_options(isolation_level="AUTOCOMMIT") as probe:
            give_up = time.monotonic() + 60  # never hang the suite: the test then fails on `seen`
            while not stop.is_set() and time.monotonic() < give_up:
                if probe.execute(text(waiting)).scalar():
                    seen["waiting_at"] = time.monotonic()
                    break
                time.sleep(0.02)
        # The run computed its deadline before it claimed the batch that now waits: at most soft_limit from here.
        stop.wait(soft_limit + 0.3)


def test_nightly_run_stops_claiming_at_the_soft_limit_mid_night_and_the_next_run_finishes_once(pg, monkeypatch):
    """A batch running at the soft limit completes, no batch is claimed after it, the next run does the rest once."""
    soft_limit = 4.0  # room for the flow run to start on a loaded machine before its first claim
    product = make_product(pg, stock=10)
    subs = [make_subscription(pg, product_id=product, due=TODAY) for _ in range(5)]
    monkeypatch.setattr(get_settings(), "flow_soft_limit_seconds", soft_limit)
    held, stop, seen = threading.Event(), threading.Event(), {}
    # The first batch waits for its product's row lock until the soft limit has passed.
    holder = threading.Thread(
        target=_hold_row_lock,
        args=(pg, f"SELECT 1 FROM products WHERE id = {product} FOR UPDATE", soft_limit, held, stop, seen),
    )
    holder.start()
    try:
        assert held.wait(10)
        started = time.monotonic()
        stats = process_due_subscriptions(run_date=TODAY, batch_size=2, max_concurrency=1, send_confirmations=False)
    finally:
        stop.set()
        holder.join(30)
    assert seen.get("waiting_at", float("inf")) - started < soft_limit, "the run reached no batch within its soft limit"
    assert stats["stopped_early"] and (stats["created"], stats["batches"]) == (2, 1)
    assert rows(pg, "SELECT subscription_id FROM orders ORDER BY 1") == [(s,) for s in subs[:2]]  # oldest first
    monkeypatch.undo()
    again = process_due_subscriptions(run_date=TODAY, batch_size=2, max_concurrency=1, send_confirmations=False)
    assert not again["stopped_early"] and again["created"] == 3
    assert rows(pg, "SELECT subscription_id, count(*) FROM orders GROUP BY 1 ORDER BY 1") == [(s, 1) for s in subs]
    assert rows(pg, "SELECT stock FROM products") == [(5,)]


def test_dry_run_reports_and_writes_nothing(pg):
    """dry_run returns what would happen and leaves orders, outcomes, stock and dates untouched."""
    product = make_product(pg, stock=2)
    for _ in range(3):
        make_subscription(pg, product_id=product, due=TODAY)
    stats = process_due_subscriptions(run_date=TODAY, dry_run=True)
    assert stats["dry_run"] and (stats["created"], stats["out_of_stock"]) == (2, 1)
    assert count(pg, "orders") == count(pg, "subscription_outcomes") == 0
    assert rows(pg, "SELECT stock FROM products WHERE id=:p", p=product) == [(2,)]
    assert rows(pg, "SELECT DISTINCT next_delivery_date FROM subscriptions") == [(TODAY,)]


@pytest.mark.parametrize("params", [{"batch_size": 0}, {"max_concurrency": -1}])
def test_bad_knobs_fail_before_writing(pg, params):
    """A non-positive batch size or concurrency is refused by the typed parameters, naming it; nothing is written."""
    from prefect.exceptions import ParameterTypeError

    make_subscription(pg, due=TODAY)
    with pytest.raises(ParameterTypeError, match=f"{next(iter(params))}: Input should be greater than 0"):
        process_due_subscriptions(run_date=TODAY, send_confirmations=False, **params)
    assert count(pg, "orders") == 0


def test_nightly_flow_sends_confirmations(pg, smtp, sms_gateway):
    """Orders created by the night get their confirmation email and SMS through the notifications layer."""
    customer = make_customer(pg, email="meera.nair@example.in", phone="9876543210")
    make_subscription(pg, customer_id=customer, due=TODAY)
    stats = process_due_subscriptions(run_date=TODAY)
    assert stats["confirmations_requested"] == 1
    assert [m.rcpt_tos for m in smtp.messages] == [["meera.nair@example.in"]]
    assert len(sms_gateway.delivered) == 1


def test_single_subscription_on_demand(pg):
    """process-single-subscription orders one due subscription and leaves the others due."""
    one = make_subscription(pg, due=TODAY)
    other = make_subscription(pg, due=TODAY)
    stats = process_single_subscription(subscription_id=one, run_date=TODAY, send_confirmation=False)
    assert stats["created"] == 1
    assert rows(pg, "SELECT subscription_id FROM orders") == [(one,)]
    assert rows(pg, "SELECT next_delivery_date FROM subscriptions WHERE id=:s", s=other) == [(TODAY,)]


def test_single_subscription_unknown_or_inactive_fails_clearly(pg):
    """An unknown id or a paused subscription fails the run with a message naming it; nothing is written."""
    paused = make_subscription(pg, due=TODAY, status="paused")
    with pytest.raises(NotFoundError, match="subscription 999999 does not exist"):
        process_single_subscription(subscription_id=999999, run_date=TODAY)
    with pytest.raises(InvalidInputError, match=f"subscription {paused} is paused"):
        process_single_subscription(subscription_id=paused, run_date=TODAY)
    assert count(pg, "orders") == count(pg, "subscription_outcomes") == 0


def charged(rzp_sub: str, pay_id: str, amount=129_900, currency="INR", status="captured") -> str:
    return json.dumps(
        {
            "entity": "event",
            "account_id": "acc_test",
            "event": "subscription.charged",
            "contains": ["subscription", "payment"],
            "created_at": 1_795_000_000,
            "payload": {
                "subscription": {"entity": {"id": rzp_sub, "entity": "subscription", "status": "active"}},
                "payment": {
                    "entity": {
                        "id": pay_id,
                        "entity": "payment",
                        "amount": amount,
                        "currency": currency,
                        "status": status,
                    }
                },
            },
        }
    )


def deliver(body: str, event_id: str, **kwargs):
    """Hand a signed webhook to the flow, as the backend's endpoint does."""
    return handle_razorpay_event(body=body, signature=sign(body.encode(), SECRET), event_id=event_id, **kwargs)


def event_row(pg, event_id):
    return rows(
        pg,
        "SELECT status, reason, payment_id, amount_paise, expected_paise FROM webhook_events WHERE event_id = :e",
        e=event_id,
    )[0]


def test_webhook_charge_for_a_due_cycle_creates_one_paid_order_confirms_it_and_replay_is_noop(pg, smtp, sms_gateway):
    """A valid charge for a due cycle makes that order, paid, and sends one email and one SMS; a replay adds nothing."""
    customer = make_customer(pg, email="nisha.gill@example.in", phone="9876512345")
    sid = make_subscription(pg, customer_id=customer, due=TODAY, razorpay_subscription_id="sub_RZP1", stock=5)
    first = deliver(charged("sub_RZP1", "pay_ABC"), "evt_1")
    assert first["status"] == "applied" and first["order_created"]
    assert deliver(charged("sub_RZP1", "pay_ABC"), "evt_1")["status"] == "replay"
    assert rows(pg, "SELECT subscription_id, status, razorpay_payment_id FROM orders") == [(sid, "paid", "pay_ABC")]
    assert rows(pg, "SELECT stock FROM products") == [(4,)]
    assert [m.rcpt_tos for m in smtp.messages] == [["nisha.gill@example.in"]] and len(sms_gateway.delivered) == 1
    assert event_row(pg, "evt_1")[:3] == (
        "applied",
        f"payment pay_ABC on new order {first['order_id']} ({TODAY})",
        "pay_ABC",
    )
    # The nightly run later finds the cycle done: no second order, no second confirmation.
    process_due_subscriptions(run_date=TODAY)
    assert count(pg, "orders") == 1 and len(smtp.messages) == 1


def test_an_applied_payment_redelivered_naming_an_unknown_subscription_stays_applied(pg, smtp, sms_gateway):
    """A payment on record as applied is never turned into held: redelivered under a new event id whose body names
    a subscription we do not know (e.g. relinked since), it is a replay; order and payment are unchanged."""
    make_subscription(pg, due=TODAY, razorpay_subscription_id="sub_KEEP", stock=5)
    first = deliver(charged("sub_KEEP", "pay_KEEP"), "evt_keep")
    assert first["status"] == "applied"
    with pg.begin() as c:
        c.execute(text("UPDATE subscriptions SET razorpay_subscription_id = 'sub_RELINKED'"))
    again = deliver(charged("sub_KEEP", "pay_KEEP"), "evt_keep_redelivered")
    assert (again["status"], again["order_id"]) == ("replay", first["order_id"])
    assert rows(pg, "SELECT status, order_id, reason FROM payments") == [("applied", first["order_id"], None)]
    assert rows(pg, "SELECT status, razorpay_payment_id FROM orders") == [("paid", "pay_KEEP")]
    assert len(smtp.messages) == 1 and len(sms_gateway.delivered) == 1


def test_webhook_charge_after_nightly_run_pays_the_existing_order_with_one_confirmation(pg, smtp, sms_gateway):
    """When the night already made (and confirmed) the order, the charge pays it and no second message goes."""
    make_subscription(pg, due=TODAY, razorpay_subscription_id="sub_RZP2")
    process_due_subscriptions(run_date=TODAY)
    assert len(smtp.messages) == 1
    out = deliver(charged("sub_RZP2", "pay_DEF"), "evt_2")
    assert out["status"] == "applied" and not out["order_created"]
    assert rows(pg, "SELECT status, razorpay_payment_id FROM orders") == [("paid", "pay_DEF")]
    assert len(smtp.messages) == 1 and len(sms_gateway.delivered) == 1


def test_charge_before_the_cycle_is_due_waits_then_pays_that_cycles_order(pg, smtp, sms_gateway):
    """An early charge takes no stock and makes no order; the run on the delivery date makes it, paid, once."""
    due = TODAY + dt.timedelta(days=2)  # tomorrow: not due today, and a run date the flow accepts
    make_subscription(pg, due=due, razorpay_subscription_id="sub_EARLY", stock=3)
    out = deliver(charged("sub_EARLY", "pay_EARLY"), "evt_early")
    assert out["status"] == "awaiting_cycle"
    assert count(pg, "orders") == 0 and rows(pg, "SELECT stock FROM products") == [(3,)]
    assert rows(pg, "SELECT status, delivery_date FROM payments") == [("awaiting_cycle", due)]
    # A second charge for the same cycle is never applied: it is held for a refund, and the run fails.
    with pytest.raises(Exception, match="already paid by pay_EARLY"):
        deliver(charged("sub_EARLY", "pay_TWICE"), "evt_twice")
    stats = process_due_subscriptions(run_date=due)
    assert stats["created"] == 1 and stats["payments_attached"] == {"applied": 1, "held": 0}
    assert rows(pg, "SELECT status, razorpay_payment_id, delivery_date FROM orders") == [("paid", "pay_EARLY", due)]
    assert rows(pg, "SELECT razorpay_payment_id, status FROM payments ORDER BY id") == [
        ("pay_EARLY", "applied"),
        ("pay_TWICE", "held"),
    ]
    assert len(smtp.messages) == 1


@pytest.mark.parametrize(
    ("money", "reason"),
    [
        ({"amount": 1}, "amount 1 paise, expected 129900 paise"),
        ({"currency": "USD"}, "currency is 'USD', not 'INR'"),
        ({"status": "failed"}, "payment status is 'failed', not 'captured'"),
        ({"amount": "abc"}, "amount 'abc' is not a whole number of paise"),
    ],
)
def test_a_bad_charge_is_rejected_recorded_and_changes_nothing(pg, smtp, money, reason):
    """A signed charge of the wrong amount, currency or status pays nothing, takes no stock and fails the run."""
    make_subscription(
        pg,
        due=TODAY,
        razorpay_subscription_id="sub_BAD",
        stock=5,
    )
    with pytest.raises(RejectedError, match=re.escape(reason)):
        deliver(charged("sub_BAD", "pay_BAD", **money), "evt_bad")
    assert count(pg, "orders") == 0 and rows(pg, "SELECT stock FROM products") == [(5,)]
    status, stored_reason, payment_id, *_ = event_row(pg, "evt_bad")
    assert (status, payment_id) == ("rejected", "pay_BAD") and reason in stored_reason
    assert smtp.messages == []
    # Redelivered, it is refused again, still without an order.
    with pytest.raises(RejectedError, match=re.escape(reason)):
        deliver(charged("sub_BAD", "pay_BAD", **money), "evt_bad")
    assert count(pg, "orders") == 0


def test_out_of_stock_charge_is_kept_then_applied_once_after_restock(pg, smtp, sms_gateway):
    """A charge whose order cannot be made is held on record; after a restock the same event makes it, paid, once."""
    sid = make_subscription(pg, due=TODAY, razorpay_subscription_id="sub_OOS", stock=0)
    body = charged("sub_OOS", "pay_OOS")
    with pytest.raises(Exception, match=r"needs 1, 0 in stock"):
        deliver(body, "evt_oos")
    assert rows(
        pg, "SELECT status, subscription_id, amount_paise FROM payments WHERE razorpay_payment_id = 'pay_OOS'"
    ) == [("held", sid, 129_900)]
    assert event_row(pg, "evt_oos")[0] == "failed" and count(pg, "orders") == 0
    with pg.begin() as c:
        c.execute(text("UPDATE products SET stock = 4"))
    out = deliver(body, "evt_oos")
    assert out["status"] == "applied" and out["order_created"]
    assert rows(pg, "SELECT status, razorpay_payment_id FROM orders") == [("paid", "pay_OOS")]
    assert rows(pg, "SELECT status FROM payments") == [("applied",)]
    assert deliver(body, "evt_oos")["status"] == "replay"
    assert count(pg, "orders") == 1 and len(smtp.messages) == 1 and len(sms_gateway.delivered) == 1


@pytest.mark.parametrize(
    ("body", "signature", "error", "message"),
    [
        (charged("sub_X", "pay_X"), "0" * 64, SignatureError, "X-Razorpay-Signature does not match the body"),
        (charged("sub_X", "pay_X"), "", SignatureError, "missing X-Razorpay-Signature"),
        ("{not json", None, InvalidInputError, "webhook body is not JSON"),
        (json.dumps({"event": "subscription.charged"}), None, InvalidInputError, "webhook body has no 'payload'"),
        (charged("sub_X", 12345), None, InvalidInputError, "payload.payment.entity.id must be a non-empty string"),
        (charged({"id": "sub_X"}, "pay_X"), None, InvalidInputError, "payload.subscription.entity.id must be a"),
        (charged("sub_X", "p" * 100), None, InvalidInputError, "payload.payment.entity.id must be at most 64"),
    ],
)
def test_forged_or_malformed_webhook_writes_nothing(pg, body, signature, error, message):
    """A wrong signature, a malformed body, a wrong JSON type or an over-long id is refused in one line, unwritten."""
    make_subscription(pg, due=TODAY, razorpay_subscription_id="sub_X")
    sig = signature if signature is not None else sign(body.encode(), SECRET)
    with pytest.raises(error, match=re.escape(message)) as err:
        handle_razorpay_event(body=body, signature=sig, event_id="evt_bad")
    assert "\n" not in str(err.value) and len(str(err.value)) < 200
    assert count(pg, "orders") == count(pg, "webhook_events") == 0


def test_webhook_checks_the_raw_body_against_an_independently_computed_signature(pg, smtp, sms_gateway):
    """OpenSSL's digest of the raw body (odd spacing, key order, UTF-8) is applied; the same JSON re-serialised,
    or signed under another secret, is refused with nothing written."""
    make_subscription(pg, due=TODAY, razorpay_subscription_id="sub_VEC1", stock=5)
    raw = RAW_CHARGE.decode()
    doc = json.loads(raw)
    refused = [
        (json.dumps(doc), RAW_CHARGE_SIGNATURE),
        (json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":")), RAW_CHARGE_SIGNATURE),
        (raw, RAW_CHARGE_SIGNATURE_OTHER_SECRET),
    ]
    for body, signature in refused:
        with pytest.raises(SignatureError, match="does not match"):
            handle_razorpay_event(body=body, signature=signature, event_id="evt_vec1")
    assert count(pg, "webhook_events") == count(pg, "orders") == 0
    out = handle_razorpay_event(body=raw, signature=RAW_CHARGE_SIGNATURE, event_id="evt_vec1")
    assert out["status"] == "applied" and out["order_created"]
    assert rows(pg, "SELECT razorpay_payment_id, status FROM orders") == [("pay_VEC1", "paid")]
    assert event_row(pg, "evt_vec1")[0] == "applied"


def test_over_long_event_id_is_refused_before_any_write(pg):
    """A 100-character event id fails in one line naming the header; nothing is recorded."""
    body = charged("sub_X", "pay_X")
    with pytest.raises(InvalidInputError, match="X-Razorpay-Event-Id"):
        deliver(body, "e" * 100)
    assert count(pg, "webhook_events") == 0


def test_unknown_event_is_acknowledged_and_ignored(pg):
    """An event type we do not handle is recorded as ignored and changes nothing else."""
    body = json.dumps({"event": "refund.processed", "payload": {"refund": {"entity": {"id": "rfnd_1"}}}})
    out = deliver(body, "evt_9")
    assert out["status"] == "ignored"
    assert rows(pg, "SELECT event_id, status FROM webhook_events") == [("evt_9", "ignored")]


def test_payment_failed_event_notifies_the_customer(pg, smtp, sms_gateway):
    """payment.failed asks for the payment-failed email, once even if the event is replayed."""
    customer = make_customer(pg, email="arjun.iyer@example.in")
    sid = make_subscription(pg, customer_id=customer, due=TODAY)
    body = json.dumps(
        {
            "event": "payment.failed",
            "payload": {
                "payment": {
                    "entity": {
                        "id": "pay_F1",
                        "status": "failed",
                        "error_description": "Card declined by bank",
                        "notes": {"subscription_id": str(sid)},
                    }
                }
            },
        }
    )
    for _ in range(2):
        deliver(body, "evt_pf1")
    assert [m.rcpt_tos for m in smtp.messages] == [["arjun.iyer@example.in"]]
    assert "Card declined" in smtp.messages[0].message.get_body(("plain",)).get_content()


def test_renewal_reminders_go_to_tomorrows_deliveries_once(pg, smtp, sms_gateway):
    """Subscriptions delivering tomorrow get one reminder each, even when the flow runs twice."""
    tomorrow_customer = make_customer(pg, email="kavya.rao@example.in")
    make_subscription(pg, customer_id=tomorrow_customer, due=TODAY + dt.timedelta(days=1))
    make_subscription(pg, due=TODAY + dt.timedelta(days=2))
    make_subscription(pg, due=TODAY + dt.timedelta(days=1), status="paused")
    for _ in range(2):
        out = remind_upcoming_deliveries(run_date=TODAY)
    assert out["subscriptions"] == 1
    assert [m.rcpt_tos for m in smtp.messages] == [["kavya.rao@example.in"]]


def test_run_date_far_ahead_is_refused_with_nothing_written(pg, smtp):
    """A run date centuries ahead fails at once naming allow_any_date; orders, stock and dates stay as they were."""
    far = TODAY + dt.timedelta(days=100_000)
    product = make_product(pg, stock=10)
    for days in (0, 40, 400):
        make_subscription(pg, product_id=product, due=TODAY + dt.timedelta(days=days))
    before = rows(pg, "SELECT id, next_delivery_date FROM subscriptions ORDER BY id")
    with pytest.raises(InvalidInputError, match="allow_any_date"):
        process_due_subscriptions(run_date=far)
    with pytest.raises(InvalidInputError, match="more than 35 days before"):
        process_due_subscriptions(run_date=TODAY - dt.timedelta(days=60))
    assert count(pg, "orders") == count(pg, "subscription_outcomes") == 0
    assert rows(pg, "SELECT stock FROM products") == [(10,)]
    assert rows(pg, "SELECT id, next_delivery_date FROM subscriptions ORDER BY id") == before
    preview = process_due_subscriptions(run_date=far, dry_run=True)
    assert preview["created"] == 3 and count(pg, "orders") == 0  # dry_run reports any date, writes nothing
    stats = process_due_subscriptions(run_date=far, allow_any_date=True, send_confirmations=False)
    assert stats["created"] == 3 and count(pg, "orders") == 3


def test_webhook_refuses_the_dev_secret_in_production(pg, smtp, sms_gateway, monkeypatch):
    """With INDOSTAR_ENV unset (production) the public dev webhook secret is refused before anything is written."""
    from lib.config import get_settings

    make_subscription(pg, due=TODAY, razorpay_subscription_id="sub_DEV")
    body = charged("sub_DEV", "pay_DEV")
    signed_with_default = sign(body.encode(), "dev-webhook-secret")
    monkeypatch.delenv("INDOSTAR_ENV")
    monkeypatch.delenv("RAZORPAY_WEBHOOK_SECRET")
    get_settings.cache_clear()
    try:
        with pytest.raises(Exception, match="RAZORPAY_WEBHOOK_SECRET is the public development default"):
            handle_razorpay_event(body=body, signature=signed_with_default, event_id="evt_dev")
        assert count(pg, "webhook_events") == count(pg, "orders") == 0
        monkeypatch.setenv("INDOSTAR_ENV", "dev")
        get_settings.cache_clear()
        out = handle_razorpay_event(body=body, signature=signed_with_default, event_id="evt_dev")
        assert out["status"] == "applied" and count(pg, "orders") == 1
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
