"""Subscription flows end to end under the Prefect harness: orders, artifacts, webhooks, reminders."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

import pytest
from sqlalchemy import text

from flows.subscriptions import (
    handle_razorpay_event,
    process_due_subscriptions,
    process_single_subscription,
    send_subscription_renewal_reminders,
)
from lib.errors import InvalidInputError, NotFoundError
from lib.razorpay import SignatureError, sign
from tests.builders import make_customer, make_product, make_subscription

TODAY = dt.date(2026, 11, 28)
SECRET = "test-webhook-secret"


def rows(pg, sql, **params):
    with pg.connect() as c:
        return c.execute(text(sql), params).all()


def count(pg, table):
    return rows(pg, f"SELECT count(*) FROM {table}")[0][0]


def latest_artifact(key):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                sort=ArtifactSort.CREATED_DESC,
                limit=1,
            )
            return found[0] if found else None

    return asyncio.run(read())


def test_nightly_flow_creates_orders_and_publishes_summary(pg):
    """The flow orders every due subscription once, returns counts and publishes the summary table."""
    product = make_product(pg, stock=5, price_paise=50_000)
    for _ in range(4):
        make_subscription(pg, product_id=product, due=TODAY, quantity=1)
    make_subscription(pg, product_id=product, due=TODAY, quantity=3)  # only 1 left: out of stock
    make_subscription(pg, due=TODAY + dt.timedelta(days=1))  # not due
    stats = process_due_subscriptions(run_date=TODAY, batch_size=2, max_concurrency=2, send_confirmations=False)
    assert (stats["created"], stats["out_of_stock"], stats["units"]) == (4, 1, 4)
    assert stats["revenue_inr"] == 2000.0
    assert count(pg, "orders") == 4
    artifact = latest_artifact("process-due-subscriptions")
    table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    by_outcome = {r["key"]: r["subscriptions"] for r in table if r["dimension"] == "outcome"}
    assert by_outcome == {"created": 4, "out_of_stock": 1}
    assert any(r["dimension"] == "batch duration (ms)" for r in table)


def test_nightly_flow_twice_creates_nothing_the_second_time(pg):
    """A second run over the same night finds nothing due and writes no order."""
    for _ in range(3):
        make_subscription(pg, due=TODAY)
    assert process_due_subscriptions(run_date=TODAY, send_confirmations=False)["created"] == 3
    assert process_due_subscriptions(run_date=TODAY, send_confirmations=False)["created"] == 0
    assert count(pg, "orders") == 3


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
    """A non-positive batch size or concurrency fails the run and writes nothing."""
    make_subscription(pg, due=TODAY)
    with pytest.raises(InvalidInputError):
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


def charged(rzp_sub: str, pay_id: str, amount: int = 129_900) -> str:
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
                        "currency": "INR",
                        "status": "captured",
                    }
                },
            },
        }
    )


def test_webhook_charge_creates_one_paid_order_and_replay_is_noop(pg):
    """A signed subscription.charged creates the cycle's order, paid; the same event again adds nothing."""
    sid = make_subscription(pg, due=TODAY + dt.timedelta(days=1), razorpay_subscription_id="sub_RZP1", stock=5)
    body = charged("sub_RZP1", "pay_ABC")
    first = handle_razorpay_event(body=body, signature=sign(body.encode(), SECRET), event_id="evt_1")
    assert first["status"] == "recorded"
    again = handle_razorpay_event(body=body, signature=sign(body.encode(), SECRET), event_id="evt_1")
    assert again["status"] == "replay"
    assert rows(pg, "SELECT subscription_id, status, razorpay_payment_id FROM orders") == [(sid, "paid", "pay_ABC")]
    assert rows(pg, "SELECT stock FROM products") == [(4,)]
    # The nightly run later finds the cycle done: no second order.
    process_due_subscriptions(run_date=TODAY + dt.timedelta(days=1), send_confirmations=False)
    assert count(pg, "orders") == 1


def test_webhook_charge_after_nightly_run_pays_the_existing_order(pg):
    """When the night already made the order, the charge is recorded on it instead of a new one."""
    make_subscription(pg, due=TODAY, razorpay_subscription_id="sub_RZP2")
    process_due_subscriptions(run_date=TODAY, send_confirmations=False)
    body = charged("sub_RZP2", "pay_DEF")
    handle_razorpay_event(body=body, signature=sign(body.encode(), SECRET), event_id="evt_2")
    assert rows(pg, "SELECT status, razorpay_payment_id FROM orders") == [("paid", "pay_DEF")]


@pytest.mark.parametrize(
    ("body", "signature", "error"),
    [
        (charged("sub_X", "pay_X"), "0" * 64, SignatureError),
        (charged("sub_X", "pay_X"), "", SignatureError),
        ("{not json", None, InvalidInputError),
        (json.dumps({"event": "subscription.charged"}), None, InvalidInputError),
    ],
)
def test_forged_or_malformed_webhook_writes_nothing(pg, body, signature, error):
    """A wrong signature or a malformed body is rejected before anything is written."""
    make_subscription(pg, due=TODAY, razorpay_subscription_id="sub_X")
    sig = signature if signature is not None else sign(body.encode(), SECRET)
    with pytest.raises(error):
        handle_razorpay_event(body=body, signature=sig, event_id="evt_bad")
    assert count(pg, "orders") == count(pg, "webhook_events") == 0


def test_unknown_event_is_acknowledged_and_ignored(pg):
    """An event type we do not handle is recorded as ignored and changes nothing else."""
    body = json.dumps({"event": "refund.processed", "payload": {"refund": {"entity": {"id": "rfnd_1"}}}})
    out = handle_razorpay_event(body=body, signature=sign(body.encode(), SECRET), event_id="evt_9")
    assert out["status"] == "ignored"
    assert rows(pg, "SELECT event_id, result FROM webhook_events") == [("evt_9", "ignored")]


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
        handle_razorpay_event(body=body, signature=sign(body.encode(), SECRET), event_id="evt_pf1")
    assert [m.rcpt_tos for m in smtp.messages] == [["arjun.iyer@example.in"]]
    assert "Card declined" in smtp.messages[0].message.get_body(("plain",)).get_content()


def test_renewal_reminders_go_to_tomorrows_deliveries_once(pg, smtp, sms_gateway):
    """Subscriptions delivering tomorrow get one reminder each, even when the flow runs twice."""
    tomorrow_customer = make_customer(pg, email="kavya.rao@example.in")
    make_subscription(pg, customer_id=tomorrow_customer, due=TODAY + dt.timedelta(days=1))
    make_subscription(pg, due=TODAY + dt.timedelta(days=2))
    make_subscription(pg, due=TODAY + dt.timedelta(days=1), status="paused")
    for _ in range(2):
        out = send_subscription_renewal_reminders(run_date=TODAY)
    assert out["subscriptions"] == 1
    assert [m.rcpt_tos for m in smtp.messages] == [["kavya.rao@example.in"]]
