"""Razorpay webhooks: signature check, event parsing, and what each event does to our tables.

The signature is HMAC-SHA256 of the raw body with the webhook secret, compared in
constant time, before the body is even parsed. The event id (the
X-Razorpay-Event-Id header, or for a charge the payment id) is the idempotency key:
``webhook_events`` has it as primary key, so a replay changes nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from lib.errors import InvalidInputError, NotFoundError, PermanentError
from lib.subscriptions import Outcome, process_batch, record_outcomes

log = logging.getLogger(__name__)


class SignatureError(PermanentError):
    """The webhook signature does not match the body: rejected, nothing written."""


@dataclass(frozen=True)
class RazorpayEvent:
    event_id: str
    event: str
    payload: dict[str, Any]
    created_at: int | None


def sign(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, signature: str | None, secret: str) -> None:
    if not signature:
        raise SignatureError("missing X-Razorpay-Signature")
    if not hmac.compare_digest(sign(body, secret), signature.strip()):
        raise SignatureError("X-Razorpay-Signature does not match the body (wrong secret or altered body)")


def _entity(payload: dict[str, Any], name: str) -> dict[str, Any]:
    ent = payload.get(name, {})
    ent = ent.get("entity", ent) if isinstance(ent, dict) else None
    if not isinstance(ent, dict):
        raise InvalidInputError(f"payload.{name}.entity is missing or not an object")
    return ent


def parse_event(body: bytes, event_id: str | None = None) -> RazorpayEvent:
    """Parse a webhook body; raises InvalidInputError for anything malformed."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"webhook body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("event"), str):
        raise InvalidInputError("webhook body has no 'event' field")
    payload = doc.get("payload")
    if not isinstance(payload, dict):
        raise InvalidInputError("webhook body has no 'payload' object")
    event = doc["event"]
    if not event_id:
        # Razorpay sends the id in a header; a charge also carries its own unique payment id.
        payment = payload.get("payment", {}).get("entity", {}) if isinstance(payload.get("payment"), dict) else {}
        if not payment.get("id"):
            raise InvalidInputError("no event id: pass the X-Razorpay-Event-Id header value")
        event_id = f"{event}:{payment['id']}"
    return RazorpayEvent(event_id, event, payload, doc.get("created_at"))


@dataclass(frozen=True)
class ChargeResult:
    status: str  # recorded | replay | inactive
    order_id: int | None = None
    subscription_id: int | None = None


def _claim_event(session: Session, ev: RazorpayEvent, result: str) -> bool:
    """Insert the event id; False means we have handled it before."""
    return (
        session.execute(
            text(
                "INSERT INTO webhook_events (event_id, event_type, result) VALUES (:i, :t, :r) "
                "ON CONFLICT (event_id) DO NOTHING RETURNING event_id"
            ),
            {"i": ev.event_id, "t": ev.event, "r": result},
        ).first()
        is not None
    )


def _set_result(session: Session, ev: RazorpayEvent, result: str) -> None:
    session.execute(text("UPDATE webhook_events SET result = :r WHERE event_id = :i"), {"r": result, "i": ev.event_id})


def handle_charged(session: Session, ev: RazorpayEvent, today: dt.date) -> ChargeResult:
    """subscription.charged: record the payment on this cycle's order, creating it if needed."""
    sub_ent = _entity(ev.payload, "subscription")
    pay = _entity(ev.payload, "payment")
    rzp_sub, pay_id = sub_ent.get("id"), pay.get("id")
    if not rzp_sub or not pay_id:
        raise InvalidInputError("subscription.charged needs payload.subscription.entity.id and payment.entity.id")
    if not _claim_event(session, ev, "processing"):
        return ChargeResult("replay")
    sub = session.execute(
        text("SELECT id, status, next_delivery_date FROM subscriptions WHERE razorpay_subscription_id = :r FOR UPDATE"),
        {"r": rzp_sub},
    ).first()
    if sub is None:
        raise NotFoundError(f"no subscription has razorpay_subscription_id {rzp_sub}")
    paid = session.execute(text("SELECT id FROM orders WHERE razorpay_payment_id = :p"), {"p": pay_id}).scalar()
    if paid is not None:
        _set_result(session, ev, f"payment already on order {paid}")
        return ChargeResult("replay", paid, sub.id)
    if sub.status != "active":
        record_outcomes(
            session,
            [Outcome(sub.id, 0, "", sub.next_delivery_date, "inactive", f"charged while {sub.status}")],
            today,
            ev.event_id,
        )
        _set_result(session, ev, f"subscription {sub.id} is {sub.status}")
        return ChargeResult("inactive", None, sub.id)
    # This cycle's order: an unpaid one the nightly run made, else make it now the same way.
    order_id = session.execute(
        text(
            "SELECT id FROM orders WHERE subscription_id = :s AND razorpay_payment_id IS NULL "
            "AND delivery_date <= :nd ORDER BY delivery_date DESC LIMIT 1 FOR UPDATE"
        ),
        {"s": sub.id, "nd": sub.next_delivery_date},
    ).scalar()
    if order_id is None:
        cycle = sub.next_delivery_date
        batch = process_batch(session, max(today, cycle), 1, ev.event_id, only_ids=[sub.id])
        made = [o for o in batch.outcomes if o.order_id is not None]
        if not made:
            reason = batch.outcomes[0].reason if batch.outcomes else "not processed"
            raise PermanentError(f"could not create the order for subscription {sub.id}: {reason}")
        order_id = made[0].order_id
    session.execute(
        text("UPDATE orders SET razorpay_payment_id = :p, status = 'paid', paid_at = now() WHERE id = :o"),
        {"p": pay_id, "o": order_id},
    )
    _set_result(session, ev, f"payment {pay_id} on order {order_id}")
    return ChargeResult("recorded", order_id, sub.id)


@dataclass(frozen=True)
class FailedPayment:
    status: str  # notify | replay
    order_id: int | None
    subscription_id: int | None
    reason: str


def handle_payment_failed(session: Session, ev: RazorpayEvent) -> FailedPayment:
    """payment.failed: find our order or subscription; the caller asks for the notification."""
    pay = _entity(ev.payload, "payment")
    notes = pay.get("notes") if isinstance(pay.get("notes"), dict) else {}
    reason = str(pay.get("error_description") or pay.get("error_reason") or "payment failed")[:300]
    if not _claim_event(session, ev, "payment failed"):
        return FailedPayment("replay", None, None, reason)
    order_id = _int_or_none(notes.get("order_id"))
    sub_id = _int_or_none(notes.get("subscription_id"))
    if sub_id is None and pay.get("subscription_id"):
        sub_id = session.execute(
            text("SELECT id FROM subscriptions WHERE razorpay_subscription_id = :r"), {"r": pay["subscription_id"]}
        ).scalar()
    if order_id is None and sub_id is None:
        raise InvalidInputError("payment.failed names no order or subscription (notes.order_id / subscription_id)")
    return FailedPayment("notify", order_id, sub_id, reason)


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        raise InvalidInputError(f"expected an integer id in notes, got {v!r}") from None


def record_ignored(session: Session, ev: RazorpayEvent) -> bool:
    """Acknowledge an event type we do not act on; False if seen before."""
    return _claim_event(session, ev, "ignored")
