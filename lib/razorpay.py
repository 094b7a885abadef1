"""Razorpay webhooks: the signature check, and parsing a body into a typed event.

The signature is HMAC-SHA256 of the raw body with the webhook secret, compared in
constant time, before the body is even parsed. Parsing checks every field we use for
its JSON type and length and fails with one line naming the field, so nothing is
written for a malformed body. The money fields of a charge (amount, currency, status)
are parsed leniently on purpose: a correctly signed charge with a wrong amount is a
fact to record and refuse (lib.payments), not a malformed request.

What an event does to our tables is lib.payments.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any

from lib.errors import InvalidInputError, SignatureError, positive_int

MAX_ID = 64
MAX_REASON = 300
# Razorpay ids are short ASCII tokens (evt_…, pay_…, sub_…); anything else is not one of theirs.
_ID = re.compile(r"^[A-Za-z0-9_.:-]+$")
HANDLED = ("subscription.charged", "payment.failed")


def sign(body: bytes, secret: str) -> str:
    """The X-Razorpay-Signature Razorpay sends for ``body``: hex HMAC-SHA256 under the webhook secret."""
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(body: bytes, signature: str | None, secret: str) -> None:
    """Raise SignatureError unless ``signature`` is the HMAC of exactly these bytes."""
    if not signature or not isinstance(signature, str):
        raise SignatureError("missing X-Razorpay-Signature")
    if not hmac.compare_digest(sign(body, secret).encode(), signature.strip().encode()):
        raise SignatureError("X-Razorpay-Signature does not match the body (wrong secret or altered body)")


@dataclass(frozen=True)
class Charge:
    """What a subscription.charged event says was charged; money fields as sent (checked later)."""

    razorpay_subscription_id: str
    payment_id: str
    amount: Any
    currency: Any
    status: Any

    @property
    def amount_paise(self) -> int | None:
        """The amount when it is a whole number of paise, else None."""
        ok = isinstance(self.amount, int) and not isinstance(self.amount, bool) and self.amount >= 0
        return self.amount if ok else None


@dataclass(frozen=True)
class PaymentFailure:
    """What a payment.failed event names: our order or subscription, and why the payment failed."""

    payment_id: str
    order_id: int | None
    subscription_id: int | None
    razorpay_subscription_id: str | None
    reason: str


@dataclass(frozen=True)
class RazorpayEvent:
    event_id: str
    event: str
    charge: Charge | None = None
    failure: PaymentFailure | None = None


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_id(value: Any, where: str, *, required: bool = True) -> str | None:
    """A Razorpay id: text of 1-64 safe characters; InvalidInputError (one line) otherwise."""
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{where} must be a non-empty string, got {_describe(value)}")
    if len(value) > MAX_ID or not _ID.match(value):
        raise InvalidInputError(f"{where} must be at most {MAX_ID} letters, digits or _.:-, got {_describe(value)}")
    return value


def _object(doc: Any, path: str) -> dict[str, Any]:
    node = doc
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            raise InvalidInputError(f"webhook body: {path} is missing or not an object")
    return dict(node)


def _notes_id(notes: dict[str, Any], name: str) -> int | None:
    value = notes.get(name)
    if value is None or value == "":
        return None
    try:
        # Razorpay notes are strings: "42" is an id, "4.2", "abc" and true are not.
        return positive_int(int(value) if isinstance(value, str) and value.isdigit() else value, name)
    except InvalidInputError:
        raise InvalidInputError(
            f"payment.entity.notes.{name} must be a positive integer id, got {_describe(value)}"
        ) from None


def parse_event(body: bytes, event_id: Any) -> RazorpayEvent:
    """Parse a verified webhook body; InvalidInputError with one line for anything malformed."""
    eid = check_id(event_id, "event_id (the X-Razorpay-Event-Id header)")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError(f"webhook body is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidInputError("webhook body is not a JSON object")
    event = doc.get("event")
    if not isinstance(event, str) or not event or len(event) > MAX_ID:
        raise InvalidInputError(f"webhook body: 'event' must be a short string, got {_describe(event)}")
    if not isinstance(doc.get("payload"), dict):
        raise InvalidInputError("webhook body has no 'payload' object")
    assert eid is not None
    if event == "subscription.charged":
        sub = _object(doc, "payload.subscription.entity")
        pay = _object(doc, "payload.payment.entity")
        charge = Charge(
            razorpay_subscription_id=check_id(sub.get("id"), "payload.subscription.entity.id") or "",
            payment_id=check_id(pay.get("id"), "payload.payment.entity.id") or "",
            amount=pay.get("amount"),
            currency=pay.get("currency"),
            status=pay.get("status"),
        )
        return RazorpayEvent(eid, event, charge=charge)
    if event == "payment.failed":
        pay = _object(doc, "payload.payment.entity")
        raw_notes = pay.get("notes")
        notes: dict[str, Any] = raw_notes if isinstance(raw_notes, dict) else {}
        reason = pay.get("error_description") or pay.get("error_reason") or "the payment was declined"
        if not isinstance(reason, str):
            raise InvalidInputError(f"payload.payment.entity.error_description must be text, got {_describe(reason)}")
        failure = PaymentFailure(
            payment_id=check_id(pay.get("id"), "payload.payment.entity.id") or "",
            order_id=_notes_id(notes, "order_id"),
            subscription_id=_notes_id(notes, "subscription_id"),
            razorpay_subscription_id=check_id(
                pay.get("subscription_id"), "payload.payment.entity.subscription_id", required=False
            ),
            reason=" ".join(reason.split())[:MAX_REASON] or "the payment was declined",
        )
        return RazorpayEvent(eid, event, failure=failure)
    return RazorpayEvent(eid, event)
