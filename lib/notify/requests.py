"""What to send: one request class per message kind, each building the rows of the delivery log.

A request validates its own input when it is made (``InvalidInputError``, one line, before
anything is written) and ``build(session)`` reads what it needs to know who gets what,
returning a ``MessageBatch``: one ``Message`` per channel with its idempotency key and its
*intent*, what the message is about. Business and token messages store a reference
(``{"order_id": 42}``, ``{"customer_id": 7}``), never rendered text: the text is rendered
from the current data at send time (lib.notify.render), so a replay after fixing a
customer's address reaches the new address, and an OTP or a reset link exists only in
the run that sends it. Plain and templated messages store their text (they have no
entity to re-read); retention clears it after NOTIFICATION_PAYLOAD_RETENTION_DAYS.

Keys: ``order-confirmation:<order>:<channel>``, ``order-shipped:<order>:<tracking>:<channel>``,
``payment-failed:order:<order>:<channel>`` (or ``…:subscription:<id>:<cycle>:…``),
``renewal-reminder:<subscription>:<date>:<channel>``; a caller's own key replaces the part
before the channel. Transactional messages always go; renewal reminders honour opt-ins.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session

from lib.errors import InvalidInputError, NotFoundError, PermanentError, positive_int
from lib.models import Customer, Order, Product, Subscription
from lib.notify.address import check_header, normalize_phone, validate_email
from lib.notify.delivery_log import Message
from lib.notify.email_channel import new_message_id
from lib.notify.templates import TEMPLATES, render_email, render_sms

MAX_KEY = 160  # the column holds 200; the channel suffix and a prefix need room
MAX_SUBJECT = 300
MAX_TEXT = 100_000
_PURPOSE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass
class MessageBatch:
    """Messages to record, plus what was left out and why."""

    messages: list[Message] = field(default_factory=list)
    missing: list[Any] = field(default_factory=list)  # ids that name no row
    opted_out: int = 0
    no_address: int = 0

    def extend(self, other: MessageBatch) -> MessageBatch:
        self.messages += other.messages
        self.missing += other.missing
        self.opted_out += other.opted_out
        self.no_address += other.no_address
        return self

    def keys(self, channel: str | None = None) -> list[str]:
        return [m.key for m in self.messages if channel is None or m.channel == channel]


class MessageRequest(Protocol):
    """Anything that can build the delivery-log rows of its messages."""

    def build(self, session: Session) -> MessageBatch: ...


# ---- shared checks -----------------------------------------------------------------------------


positive_id = positive_int  # ids of orders, customers, subscriptions, notifications


def check_key(key: str | None) -> str | None:
    """A caller's idempotency key: 1-160 printable characters without line breaks."""
    if key is None:
        return None
    if not isinstance(key, str) or not key.strip() or len(key) > MAX_KEY or not key.isprintable():
        raise InvalidInputError(f"idempotency_key must be 1-{MAX_KEY} printable characters")
    return key


def check_text(value: Any, what: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInputError(f"{what} must be non-empty text")
    if len(value) > limit or "\x00" in value:
        raise InvalidInputError(f"{what} must be at most {limit} characters without NUL")
    return value


def _nonce(key: str | None) -> str:
    """The caller's key, or a new one: a request without a key is a new message, as each Celery call was.

    Callers that may repeat a request (a retried task, a recovered row, a flow run's retry)
    pass a key of their own (the row's or the run's id), so the repeat sends once.
    """
    return key or uuid.uuid4().hex


def _plain_json(context: dict[str, Any]) -> dict[str, Any]:
    """The context as stored (JSON): dates as ISO text, which the template filters accept."""
    try:
        return dict(json.loads(json.dumps(context, default=iso_default)))
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"context must be JSON-serialisable: {exc}") from None


def iso_default(value: Any) -> str:
    """``json.dumps``'s default for what messages carry: dates and datetimes as ISO text; TypeError otherwise."""
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _customer_messages(
    base: str,
    kind: str,
    intent: dict[str, Any],
    customer: Customer,
    template: str,
    *,
    email: bool,
    sms: bool,
) -> MessageBatch:
    """The email and/or SMS of one customer; an address known to be bad is recorded dead with the reason."""
    out = MessageBatch()
    if email:
        error = _address_error(lambda: validate_email(customer.email))
        out.messages.append(
            Message(
                f"{base}:email",
                "email",
                kind,
                customer.email,
                {**intent, "message_id": new_message_id(None)},
                template,
                error=error,
            )
        )
    if sms:
        if not customer.phone:
            out.no_address += 1
        else:
            error = _address_error(lambda: normalize_phone(customer.phone or ""))
            out.messages.append(
                Message(f"{base}:sms", "sms", kind, customer.phone, dict(intent), template, error=error)
            )
    return out


def _address_error(check: Any) -> str | None:
    try:
        check()
    except InvalidInputError as exc:
        return f"{exc}; fix the customer's address, then replay-dead-letters"
    return None


# ---- plain and templated ---------------------------------------------------------------------


@dataclass(frozen=True)
class EmailRequest:
    """One plain email (text, optional HTML alternative), once per idempotency key."""

    to: str
    subject: str
    body: str
    html: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "to", validate_email(check_header(self.to, "to")))
        check_header(check_text(self.subject, "subject", MAX_SUBJECT), "subject")
        check_text(self.body, "body")
        if self.html is not None:
            check_text(self.html, "html")
        check_key(self.key)

    def build(self, session: Session) -> MessageBatch:
        key = self.key or f"email:{_nonce(None)}"
        intent = {
            "to": self.to,
            "subject": self.subject,
            "text": self.body,
            "html": self.html,
            "message_id": new_message_id(None),
        }
        return MessageBatch([Message(key, "email", "email", self.to, intent, None, self.subject)])


@dataclass(frozen=True)
class SmsRequest:
    """One free-text SMS (no DLT template: for the log provider or non-Indian routes)."""

    phone: str
    text: str
    key: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "phone", normalize_phone(self.phone))
        check_text(self.text, "text", 2000)
        check_key(self.key)

    def build(self, session: Session) -> MessageBatch:
        key = self.key or f"sms:{_nonce(None)}"
        return MessageBatch([Message(key, "sms", "sms", self.phone, {"to": self.phone, "text": self.text})])


@dataclass(frozen=True)
class TemplatedRequest:
    """One templated email or SMS to a given address; the template is rendered now to catch errors early.

    A template or context error raises before anything is written, so it never uses up
    the caller's idempotency key.
    """

    channel: str  # email | sms
    template: str
    context: dict[str, Any]
    to: str
    key: str | None = None

    def __post_init__(self) -> None:
        if self.template not in TEMPLATES:
            raise InvalidInputError(f"unknown template {self.template!r}; known: {', '.join(TEMPLATES)}")
        if not isinstance(self.context, dict):
            raise InvalidInputError("context must be an object of template variables")
        address = validate_email(check_header(self.to, "to")) if self.channel == "email" else normalize_phone(self.to)
        object.__setattr__(self, "to", address)
        object.__setattr__(self, "context", _plain_json(self.context))
        check_key(self.key)
        try:
            if self.channel == "email":
                check_header(render_email(self.template, self.context).subject, "rendered subject")
            else:
                render_sms(self.template, self.context)
        except PermanentError as exc:
            raise InvalidInputError(str(exc)) from None

    def build(self, session: Session) -> MessageBatch:
        key = self.key or f"{self.template}:{self.channel}:{_nonce(None)}"
        intent: dict[str, Any] = {"template": self.template, "context": self.context, "to": self.to}
        if self.channel == "email":
            intent["message_id"] = new_message_id(None)
        return MessageBatch([Message(key, self.channel, "templated", self.to, intent, self.template)])


# ---- orders ------------------------------------------------------------------------------------


def _orders(session: Session, order_ids: Sequence[int]) -> dict[int, tuple[Order, Customer]]:
    rows = session.execute(
        select(Order, Customer).join(Customer, Customer.id == Order.customer_id).where(Order.id.in_(list(order_ids)))
    )
    return {o.id: (o, c) for o, c in rows.tuples()}


@dataclass(frozen=True)
class OrderConfirmationRequest:
    """Email and SMS confirmations of orders; ids that name no order are reported as missing."""

    order_ids: tuple[int, ...]
    key: str | None = None
    require_all: bool = False  # an id that names no order raises NotFoundError instead of being skipped

    def __post_init__(self) -> None:
        ids = tuple(dict.fromkeys(positive_id(i, "order id") for i in self.order_ids))
        if self.key is not None and len(ids) != 1:
            raise InvalidInputError("an idempotency_key names the messages of one order only")
        object.__setattr__(self, "order_ids", ids)
        check_key(self.key)

    def build(self, session: Session) -> MessageBatch:
        found = _orders(session, self.order_ids)
        out = MessageBatch(missing=[i for i in self.order_ids if i not in found])
        if out.missing and self.require_all:
            raise NotFoundError(f"order {out.missing[0]} does not exist")
        for oid in self.order_ids:
            if oid in found:
                customer = found[oid][1]
                base = self.key or f"order-confirmation:{oid}"
                intent = {"order_id": oid}
                out.extend(
                    _customer_messages(
                        base, "order_confirmation", intent, customer, "order_confirmation", email=True, sms=True
                    )
                )
        return out


@dataclass(frozen=True)
class OrderShippedRequest:
    """Shipping notice of one order, with carrier and tracking number."""

    order_id: int
    tracking_number: str
    carrier: str
    key: str | None = None

    def __post_init__(self) -> None:
        positive_id(self.order_id, "order_id")
        for name in ("tracking_number", "carrier"):
            value = check_header(check_text(getattr(self, name), name, 64), name).strip()
            object.__setattr__(self, name, value)
        check_key(self.key)

    def build(self, session: Session) -> MessageBatch:
        found = _orders(session, [self.order_id])
        if self.order_id not in found:
            raise NotFoundError(f"order {self.order_id} does not exist")
        base = self.key or f"order-shipped:{self.order_id}:{self.tracking_number}"
        intent = {"order_id": self.order_id, "tracking_number": self.tracking_number, "carrier": self.carrier}
        return _customer_messages(
            base, "order_shipped", intent, found[self.order_id][1], "order_shipped", email=True, sms=True
        )


def _subscriptions(session: Session, ids: Sequence[int]) -> dict[int, tuple[Subscription, Customer, Product]]:
    rows = session.execute(
        select(Subscription, Customer, Product)
        .join(Customer, Customer.id == Subscription.customer_id)
        .join(Product, Product.id == Subscription.product_id)
        .where(Subscription.id.in_(list(ids)))
    )
    return {s.id: (s, c, p) for s, c, p in rows.tuples()}


@dataclass(frozen=True)
class PaymentFailedRequest:
    """Payment-failure notice for an order (preferred when both are given) or a subscription's cycle."""

    order_id: int | None
    subscription_id: int | None
    reason: str = "the payment was declined"
    key: str | None = None

    def __post_init__(self) -> None:
        if self.order_id is None and self.subscription_id is None:
            raise InvalidInputError("give order_id or subscription_id")
        if self.order_id is not None:
            positive_id(self.order_id, "order_id")
            object.__setattr__(self, "subscription_id", None)  # an order names the exact amount; it wins
        else:
            positive_id(self.subscription_id, "subscription_id")
        object.__setattr__(self, "reason", " ".join(check_text(self.reason, "reason", 300).split()))
        check_key(self.key)

    def build(self, session: Session) -> MessageBatch:
        if self.order_id is not None:
            found = _orders(session, [self.order_id])
            if self.order_id not in found:
                raise NotFoundError(f"order {self.order_id} does not exist")
            customer = found[self.order_id][1]
            base = self.key or f"payment-failed:order:{self.order_id}"
            intent: dict[str, Any] = {"order_id": self.order_id, "reason": self.reason}
        else:
            assert self.subscription_id is not None
            row = _subscriptions(session, [self.subscription_id]).get(self.subscription_id)
            if row is None:
                raise NotFoundError(f"subscription {self.subscription_id} does not exist")
            sub, customer, _ = row
            cycle = sub.next_delivery_date.isoformat()
            # One notice per subscription cycle: a failure next month is a new message.
            base = self.key or f"payment-failed:subscription:{sub.id}:{cycle}"
            intent = {"subscription_id": sub.id, "cycle": cycle, "reason": self.reason}
        return _customer_messages(base, "payment_failed", intent, customer, "payment_failed", email=True, sms=True)


# ---- subscriptions -------------------------------------------------------------------------------


def parse_reminder_items(items: Iterable[Any]) -> list[tuple[int, dt.date | None]]:
    """(subscription id, delivery date or None for its next one) pairs; InvalidInputError if malformed."""
    out = []
    for item in items:
        try:
            sub_id, when = item
            if when is not None and not isinstance(when, dt.date):
                when = dt.date.fromisoformat(str(when))
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(
                f"renewal reminder item {item!r} is not (subscription_id, 'YYYY-MM-DD'): {exc}"
            ) from None
        out.append((positive_id(sub_id, "subscription id"), when))
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class RenewalReminderRequest:
    """Reminders per (subscription, delivery date), to opted-in channels only."""

    items: tuple[tuple[int, dt.date | None], ...]
    key: str | None = None
    require_all: bool = False  # a subscription id that names no row raises NotFoundError instead of being skipped

    def __post_init__(self) -> None:
        items = tuple(parse_reminder_items(self.items))
        if self.key is not None and len(items) != 1:
            raise InvalidInputError("an idempotency_key names the reminder of one subscription only")
        object.__setattr__(self, "items", items)
        check_key(self.key)

    def build(self, session: Session) -> MessageBatch:
        subs = _subscriptions(session, list({sid for sid, _ in self.items}))
        out = MessageBatch(missing=[sid for sid, _ in self.items if sid not in subs])
        if out.missing and self.require_all:
            raise NotFoundError(f"subscription {out.missing[0]} does not exist")
        for sid, when in self.items:
            if sid not in subs:
                continue
            sub, customer = subs[sid][0], subs[sid][1]
            when = when or sub.next_delivery_date
            out.opted_out += (not customer.email_opt_in) + (not customer.sms_opt_in)
            if customer.email_opt_in or customer.sms_opt_in:
                base = self.key or f"renewal-reminder:{sid}:{when.isoformat()}"
                intent = {"subscription_id": sid, "delivery_date": when.isoformat()}
                out.extend(
                    _customer_messages(
                        base,
                        "renewal_reminder",
                        intent,
                        customer,
                        "renewal_reminder",
                        email=customer.email_opt_in,
                        sms=customer.sms_opt_in,
                    )
                )
        return out


# ---- token messages: the token is issued at send time, in the run that sends it ---------------------


def _customer(session: Session, customer_id: int) -> Customer:
    customer = session.get(Customer, customer_id)
    if customer is None:
        raise NotFoundError(f"customer {customer_id} does not exist")
    return customer


@dataclass(frozen=True)
class OtpRequest:
    """A one-time code by SMS for ``purpose`` (e.g. login, checkout); issued and sent in the same run."""

    customer_id: int
    purpose: str = "login"
    key: str | None = None

    def __post_init__(self) -> None:
        positive_id(self.customer_id, "customer_id")
        if not isinstance(self.purpose, str) or not _PURPOSE.match(self.purpose):
            raise InvalidInputError("purpose must be 1-32 lower-case letters, digits or _ (e.g. login)")
        check_key(self.key)

    def build(self, session: Session) -> MessageBatch:
        customer = _customer(session, self.customer_id)
        if not customer.phone:
            raise InvalidInputError(f"customer {self.customer_id} has no phone number for an OTP")
        base = f"otp:{self.customer_id}:{self.purpose}:{_nonce(self.key)}"
        intent = {"customer_id": self.customer_id, "purpose": self.purpose}
        return _customer_messages(base, "otp", intent, customer, "otp", email=False, sms=True)


@dataclass(frozen=True)
class LinkRequest:
    """A password-reset or email-verification link by email; the token is issued in the sending run."""

    kind: str  # password_reset | email_verification
    customer_id: int
    key: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("password_reset", "email_verification"):
            raise InvalidInputError(f"unknown link kind {self.kind!r}")
        positive_id(self.customer_id, "customer_id")
        check_key(self.key)

    def build(self, session: Session) -> MessageBatch:
        customer = _customer(session, self.customer_id)
        base = f"{self.kind.replace('_', '-')}:{self.customer_id}:{_nonce(self.key)}"
        return _customer_messages(
            base, self.kind, {"customer_id": self.customer_id}, customer, self.kind, email=True, sms=False
        )
