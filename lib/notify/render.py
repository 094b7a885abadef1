"""Send time: turn claimed delivery-log rows (their intents) into the exact text to send.

``renderers(conn, claimed)`` reads, in one query per kind, the current data every row of
a batch is about (orders, customers, subscriptions) and returns one zero-argument
callable per row id. The delivery pass calls it right before that row's send: rendering
is lazy so that a token message issues its token (lib.tokens) only when it is about to go
out, and a retry issues a fresh one. A callable raises ``PermanentError`` when the row
cannot be sent (the order is gone, the address is malformed, the text was cleared by
retention); that message alone becomes a dead letter.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, select

from lib import tokens
from lib.config import get_settings
from lib.errors import InvalidInputError, PermanentError
from lib.models import Customer, Order, OrderItem, Product, Subscription
from lib.notify.address import normalize_phone, validate_email
from lib.notify.delivery_log import Claimed
from lib.notify.templates import render_email, render_sms


@dataclass(frozen=True)
class Outgoing:
    """One message exactly as it goes out."""

    to: str
    text: str
    subject: str | None = None
    html: str | None = None
    message_id: str | None = None
    dlt_template_id: str | None = None


Render = Callable[[], Outgoing]


def _address(channel: str, raw: str | None) -> str:
    if not raw:
        raise PermanentError(f"the customer has no {'email address' if channel == 'email' else 'phone number'}")
    try:
        return validate_email(raw) if channel == "email" else normalize_phone(raw)
    except InvalidInputError as exc:
        raise PermanentError(f"{exc}; fix the customer's address, then replay-dead-letters") from None


def _templated(msg: Claimed, template: str, context: dict[str, Any], to: str) -> Outgoing:
    if msg.channel == "email":
        content = render_email(template, context)
        return Outgoing(to, content.text, content.subject, content.html, msg.intent.get("message_id"))
    sms = render_sms(template, context)
    return Outgoing(to, sms.text, dlt_template_id=sms.dlt_template_id)


def _gone(what: str) -> Render:
    def fail() -> Outgoing:
        raise PermanentError(f"{what} no longer exists; nothing to send")

    return fail


# ---- plain and templated: the payload is the message ----------------------------------------------


def _plain(msg: Claimed) -> Render:
    def render() -> Outgoing:
        if msg.cleared:
            raise PermanentError("its text was cleared by retention (NOTIFICATION_PAYLOAD_RETENTION_DAYS); send anew")
        p = msg.intent
        try:
            if msg.kind == "templated":
                return _templated(msg, p["template"], p["context"], _address(msg.channel, p["to"]))
            if msg.channel == "email":
                return Outgoing(_address("email", p["to"]), p["text"], p["subject"], p.get("html"), p.get("message_id"))
            return Outgoing(_address("sms", p["to"]), p["text"])
        except KeyError as exc:
            raise PermanentError(f"stored message lacks {exc}; cannot send") from None

    return render


# ---- orders ----------------------------------------------------------------------------------


def _order_data(conn: Connection, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    ids = sorted(set(ids))
    if not ids:
        return {}
    rows = conn.execute(
        select(
            Order.id,
            Order.total_paise,
            Order.created_at,
            Order.delivery_date,
            Customer.name,
            Customer.email,
            Customer.phone,
        )
        .join(Customer, Customer.id == Order.customer_id)
        .where(Order.id.in_(ids))
    ).all()
    items: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for order_id, name, qty, unit in conn.execute(
        select(OrderItem.order_id, Product.name, OrderItem.quantity, OrderItem.unit_price_paise)
        .join(Product, Product.id == OrderItem.product_id)
        .where(OrderItem.order_id.in_(ids))
        .order_by(OrderItem.order_id, OrderItem.id)
    ).tuples():
        items[order_id].append(
            {"name": name, "quantity": qty, "unit_price_paise": unit, "line_total_paise": qty * unit}
        )
    return {
        r.id: {
            "order_id": r.id,
            "total_paise": r.total_paise,
            "ordered_at": r.created_at,
            "delivery_date": r.delivery_date,
            "customer_name": r.name,
            "email": r.email,
            "phone": r.phone,
            "items": items.get(r.id, []),
        }
        for r in rows
    }


def _order_message(msg: Claimed, data: dict[str, Any] | None) -> Render:
    if data is None:
        return _gone(f"order {msg.intent.get('order_id')}")

    def render() -> Outgoing:
        to = _address(msg.channel, data["email"] if msg.channel == "email" else data["phone"])
        p = msg.intent
        if msg.kind == "order_confirmation":
            context = {
                k: data[k] for k in ("customer_name", "order_id", "items", "total_paise", "ordered_at", "delivery_date")
            }
        elif msg.kind == "order_shipped":
            context = {
                "customer_name": data["customer_name"],
                "order_id": data["order_id"],
                "total_paise": data["total_paise"],
                "tracking_number": p["tracking_number"],
                "carrier": p["carrier"],
            }
        else:  # payment_failed for an order
            context = {
                "customer_name": data["customer_name"],
                "reference": f"order #{data['order_id']}",
                "amount_paise": data["total_paise"],
                "reason": p["reason"],
            }
        return _templated(msg, msg.kind, context, to)

    return render


# ---- subscriptions ----------------------------------------------------------------------------


def _subscription_data(conn: Connection, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    ids = sorted(set(ids))
    if not ids:
        return {}
    rows = conn.execute(
        select(
            Subscription.id,
            Subscription.quantity,
            Product.name.label("product"),
            Product.price_paise,
            Customer.name,
            Customer.email,
            Customer.phone,
        )
        .join(Customer, Customer.id == Subscription.customer_id)
        .join(Product, Product.id == Subscription.product_id)
        .where(Subscription.id.in_(ids))
    ).all()
    return {r.id: dict(r._mapping) for r in rows}


def _subscription_message(msg: Claimed, data: dict[str, Any] | None) -> Render:
    if data is None:
        return _gone(f"subscription {msg.intent.get('subscription_id')}")

    def render() -> Outgoing:
        to = _address(msg.channel, data["email"] if msg.channel == "email" else data["phone"])
        amount = data["quantity"] * data["price_paise"]
        if msg.kind == "renewal_reminder":
            context = {
                "customer_name": data["name"],
                "product_name": data["product"],
                "quantity": data["quantity"],
                "amount_paise": amount,
                "delivery_date": dt.date.fromisoformat(msg.intent["delivery_date"]),
            }
        else:  # payment_failed for a subscription's cycle
            context = {
                "customer_name": data["name"],
                "reference": f"subscription #{data['id']} ({data['product']})",
                "amount_paise": amount,
                "reason": msg.intent["reason"],
            }
        return _templated(msg, msg.kind, context, to)

    return render


# ---- token messages: issue the token now, render it, never store it ----------------------------------


def _customer_data(conn: Connection, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    ids = sorted(set(ids))
    if not ids:
        return {}
    rows = conn.execute(select(Customer.id, Customer.name, Customer.email, Customer.phone).where(Customer.id.in_(ids)))
    return {r.id: dict(r._mapping) for r in rows}


def _token_message(msg: Claimed, data: dict[str, Any] | None) -> Render:
    if data is None:
        return _gone(f"customer {msg.intent.get('customer_id')}")

    def render() -> Outgoing:
        s = get_settings()
        to = _address(msg.channel, data["email"] if msg.channel == "email" else data["phone"])
        uid = data["id"]
        if msg.kind == "otp":
            code = tokens.issue("otp", uid, s.otp_ttl_seconds)
            context: dict[str, Any] = {
                "code": code,
                "purpose": msg.intent["purpose"].replace("_", " "),
                "minutes": max(1, s.otp_ttl_seconds // 60),
            }
        elif msg.kind == "password_reset":
            token = tokens.issue("password_reset", uid, s.password_reset_ttl_seconds)
            context = {
                "customer_name": data["name"],
                "link": s.password_reset_url.replace("{token}", token),
                "minutes": max(1, s.password_reset_ttl_seconds // 60),
            }
        else:
            token = tokens.issue("email_verification", uid, s.email_verification_ttl_seconds)
            context = {
                "customer_name": data["name"],
                "link": s.email_verification_url.replace("{token}", token),
                "hours": max(1, s.email_verification_ttl_seconds // 3600),
            }
        return _templated(msg, msg.kind, context, to)

    return render


def renderers(conn: Connection, claimed: list[Claimed]) -> dict[int, Render]:
    """One lazy renderer per claimed row, reading the data of the whole batch in one query per kind."""
    order_ids = [m.intent["order_id"] for m in claimed if m.intent.get("order_id") is not None]
    sub_ids = [
        m.intent["subscription_id"]
        for m in claimed
        if m.kind in ("renewal_reminder", "payment_failed") and m.intent.get("order_id") is None
    ]
    customer_ids = [
        m.intent["customer_id"] for m in claimed if m.kind in ("otp", "password_reset", "email_verification")
    ]
    orders, subs = _order_data(conn, order_ids), _subscription_data(conn, sub_ids)
    customers = _customer_data(conn, customer_ids)
    out: dict[int, Render] = {}
    for m in claimed:
        if m.kind in ("email", "sms", "templated"):
            out[m.id] = _plain(m)
        elif m.intent.get("order_id") is not None:
            out[m.id] = _order_message(m, orders.get(m.intent["order_id"]))
        elif m.kind in ("renewal_reminder", "payment_failed"):
            out[m.id] = _subscription_message(m, subs.get(m.intent["subscription_id"]))
        else:
            out[m.id] = _token_message(m, customers.get(m.intent["customer_id"]))
    return out
