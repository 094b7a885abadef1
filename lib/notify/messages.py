"""Building rendered messages (``Outgoing``) for orders and subscriptions from the database.

Each builder reads what it needs in one query or two, renders the templates and returns
one message per channel with its idempotency key (``order-confirmation:<order>:<channel>``
and the like). A customer's bad address becomes a message recorded dead with the reason,
so one bad row neither hides nor aborts the rest. Transactional messages always go;
renewal reminders honour email_opt_in / sms_opt_in.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lib.errors import InvalidInputError, NotFoundError
from lib.models import Customer, Order, OrderItem, Product, Subscription
from lib.notify.address import normalize_phone, validate_email
from lib.notify.email_channel import new_message_id
from lib.notify.log import Outgoing
from lib.notify.templates import render_email, render_sms


@dataclass
class Built:
    """Messages to record, plus what was left out and why."""

    messages: list[Outgoing] = field(default_factory=list)
    missing: list[Any] = field(default_factory=list)  # ids that name no row
    opted_out: int = 0
    no_address: int = 0

    def extend(self, other: Built) -> None:
        self.messages += other.messages
        self.missing += other.missing
        self.opted_out += other.opted_out
        self.no_address += other.no_address


def content_key(prefix: str, *parts: Any) -> str:
    """A key from a hash of the message content, for sends that bring no key of their own."""
    raw = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return f"{prefix}:{hashlib.sha256(raw.encode()).hexdigest()[:40]}"


def email_message(
    key: str, to: str, subject: str, text: str, html: str | None, sender: str, template: str | None = None
) -> Outgoing:
    """An email ready for the log; InvalidInputError if the address is malformed."""
    address = validate_email(to)
    if not subject.strip():
        raise InvalidInputError("email subject is empty")
    payload = {
        "to": address,
        "from": sender,
        "subject": subject,
        "text": text,
        "html": html,
        "message_id": new_message_id(sender),
    }
    return Outgoing(key, "email", template, address, subject, payload)


def sms_message(key: str, phone: str, text: str, dlt_template_id: str | None, template: str | None = None) -> Outgoing:
    """An SMS ready for the log; InvalidInputError if the number is malformed."""
    number = normalize_phone(phone)
    if not text.strip():
        raise InvalidInputError("SMS text is empty")
    payload = {"to": number, "text": text, "dlt_template_id": dlt_template_id}
    return Outgoing(key, "sms", template, number, None, payload)


def templated(
    base_key: str,
    template: str,
    context: dict[str, Any],
    sender: str,
    email: str | None = None,
    phone: str | None = None,
) -> Built:
    """Render ``template`` for each channel with an address; a bad address is recorded dead."""
    out = Built()
    if email is not None:
        content = render_email(template, context)
        out.messages.append(
            _or_dead(
                lambda: email_message(
                    f"{base_key}:email", email, content.subject, content.text, content.html, sender, template
                ),
                f"{base_key}:email",
                "email",
                template,
                email,
            )
        )
    if phone:
        sms = render_sms(template, context)
        out.messages.append(
            _or_dead(
                lambda: sms_message(f"{base_key}:sms", phone, sms.text, sms.dlt_template_id, template),
                f"{base_key}:sms",
                "sms",
                template,
                phone,
            )
        )
    elif phone == "":  # the customer has no phone number on file
        out.no_address += 1
    return out


def _or_dead(build: Callable[[], Outgoing], key: str, channel: str, template: str, recipient: str) -> Outgoing:
    try:
        return build()
    except InvalidInputError as exc:
        return Outgoing(key, channel, template, recipient, None, {}, error=str(exc))


# --- orders ---------------------------------------------------------------------------


def _orders(session: Session, order_ids: list[int]) -> dict[int, tuple[Order, Customer]]:
    rows = session.execute(
        select(Order, Customer).join(Customer, Customer.id == Order.customer_id).where(Order.id.in_(order_ids))
    )
    return {o.id: (o, c) for o, c in rows.tuples()}


def _items(session: Session, order_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    rows = session.execute(
        select(OrderItem.order_id, Product.name, OrderItem.quantity, OrderItem.unit_price_paise)
        .join(Product, Product.id == OrderItem.product_id)
        .where(OrderItem.order_id.in_(order_ids))
        .order_by(OrderItem.order_id, OrderItem.id)
    )
    items: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for order_id, name, qty, unit in rows.tuples():
        items[order_id].append(
            {"name": name, "quantity": qty, "unit_price_paise": unit, "line_total_paise": qty * unit}
        )
    return items


def order_confirmations(session: Session, order_ids: Iterable[int], sender: str, key_base: str | None = None) -> Built:
    """Email and SMS confirmations for orders; keys order-confirmation:<order>:<channel>.

    ``key_base`` replaces ``order-confirmation:<order>`` (a caller's own key; one order only).
    """
    ids = list(dict.fromkeys(order_ids))
    orders, items = _orders(session, ids), _items(session, ids)
    out = Built(missing=[i for i in ids if i not in orders])
    for oid in ids:
        if oid not in orders:
            continue
        order, customer = orders[oid]
        context = {
            "customer_name": customer.name,
            "order_id": order.id,
            "items": items.get(oid, []),
            "total_paise": order.total_paise,
            "ordered_at": order.created_at,
            "delivery_date": order.delivery_date,
        }
        base = key_base or f"order-confirmation:{oid}"
        out.extend(templated(base, "order_confirmation", context, sender, customer.email, customer.phone or ""))
    return out


def order_shipped(
    session: Session, order_id: int, tracking_number: str, carrier: str, sender: str, key_base: str | None = None
) -> Built:
    """Shipping notice for one order; key order-shipped:<order>:<tracking>:<channel>."""
    if not tracking_number.strip() or not carrier.strip():
        raise InvalidInputError("tracking number and carrier must not be empty")
    found = _orders(session, [order_id])
    if order_id not in found:
        raise NotFoundError(f"order {order_id} does not exist")
    order, customer = found[order_id]
    context = {
        "customer_name": customer.name,
        "order_id": order.id,
        "total_paise": order.total_paise,
        "tracking_number": tracking_number.strip(),
        "carrier": carrier.strip(),
    }
    base = key_base or f"order-shipped:{order_id}:{tracking_number.strip()}"
    return templated(base, "order_shipped", context, sender, customer.email, customer.phone or "")


def payment_failed(
    session: Session,
    order_id: int | None,
    subscription_id: int | None,
    reason: str,
    sender: str,
    key_base: str | None = None,
) -> Built:
    """Payment-failure notice for an order or a subscription's next delivery (always sent)."""
    if (order_id is None) == (subscription_id is None):
        raise InvalidInputError("give exactly one of order_id or subscription_id")
    if not reason.strip():
        raise InvalidInputError("reason must not be empty")
    if order_id is not None:
        found = _orders(session, [order_id])
        if order_id not in found:
            raise NotFoundError(f"order {order_id} does not exist")
        order, customer = found[order_id]
        reference, amount = f"order #{order.id}", order.total_paise
        base = key_base or f"payment-failed:order:{order_id}"
    else:
        row = _subscriptions(session, [subscription_id]).get(subscription_id)  # type: ignore[list-item]
        if row is None:
            raise NotFoundError(f"subscription {subscription_id} does not exist")
        sub, customer, product = row
        reference, amount = f"subscription #{sub.id} ({product.name})", sub.quantity * product.price_paise
        # One notice per subscription cycle: a failure next month is a new message.
        base = key_base or f"payment-failed:subscription:{sub.id}:{sub.next_delivery_date.isoformat()}"
    context = {"customer_name": customer.name, "reference": reference, "amount_paise": amount, "reason": reason.strip()}
    return templated(base, "payment_failed", context, sender, customer.email, customer.phone or "")


# --- subscriptions --------------------------------------------------------------------


def _subscriptions(session: Session, ids: list[int]) -> dict[int, tuple[Subscription, Customer, Product]]:
    rows = session.execute(
        select(Subscription, Customer, Product)
        .join(Customer, Customer.id == Subscription.customer_id)
        .join(Product, Product.id == Subscription.product_id)
        .where(Subscription.id.in_(ids))
    )
    return {s.id: (s, c, p) for s, c, p in rows.tuples()}


def parse_reminder_items(items: Iterable[Any]) -> list[tuple[int, dt.date]]:
    """(subscription id, delivery date) pairs from ids and ISO dates; InvalidInputError if malformed."""
    out = []
    for item in items:
        try:
            sub_id, when = item
            sub_id = int(sub_id)
            when = when if isinstance(when, dt.date) else dt.date.fromisoformat(str(when))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"renewal reminder item {item!r} is not (subscription_id, 'YYYY-MM-DD'): {exc}"
            ) from None
        if sub_id <= 0:
            raise InvalidInputError(f"subscription id must be positive, got {sub_id}")
        out.append((sub_id, when))
    return list(dict.fromkeys(out))


def renewal_reminders(
    session: Session, items: list[tuple[int, dt.date]], sender: str, key_base: str | None = None
) -> Built:
    """Reminders per (subscription, delivery date), to opted-in channels only.

    Keys renewal-reminder:<subscription>:<date>:<channel>; ``key_base`` replaces the part
    before the channel (a caller's own key; one item only).
    """
    subs = _subscriptions(session, list({sid for sid, _ in items}))
    out = Built(missing=[sid for sid, _ in items if sid not in subs])
    for sid, when in items:
        if sid not in subs:
            continue
        sub, customer, product = subs[sid]
        context = {
            "customer_name": customer.name,
            "product_name": product.name,
            "quantity": sub.quantity,
            "amount_paise": sub.quantity * product.price_paise,
            "delivery_date": when,
        }
        email = customer.email if customer.email_opt_in else None
        phone = (customer.phone or "") if customer.sms_opt_in else None
        out.opted_out += (not customer.email_opt_in) + (not customer.sms_opt_in)
        if email is None and phone is None:
            continue
        built = templated(
            key_base or f"renewal-reminder:{sid}:{when.isoformat()}", "renewal_reminder", context, sender, email, phone
        )
        out.extend(built)
    return out
