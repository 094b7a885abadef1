"""What the backend calls: start a notification deployment through the Prefect API.

Each function starts ``<flow>/default`` with ``run_deployment(timeout=0)`` (returns at
once; a worker or ``indostar-jobs serve`` runs it) and an idempotency key, and returns
the flow run id. The same key twice returns the same flow run, so a backend retry
never starts a second run. Without a key, one is derived from what the message is
about (``order-confirmation:<order>``); pass your own (e.g. a Razorpay event id) when
the same thing may legitimately be sent again.

Equivalent operator commands::

    prefect deployment run send-order-confirmation/default -p order_id=42
    prefect deployment run send-email/default -p to=you@example.in -p subject=Hi -p body=Hello
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any
from uuid import UUID

from lib.errors import InvalidInputError

DEPLOYMENT = "default"


def _run(flow_name: str, parameters: dict[str, Any], idempotency_key: str | None) -> Any:
    from prefect.deployments import run_deployment

    return run_deployment(
        name=f"{flow_name}/{DEPLOYMENT}",
        parameters=parameters,
        timeout=0,
        idempotency_key=idempotency_key,
        as_subflow=False,
    )


def _start(flow_name: str, parameters: dict[str, Any], idempotency_key: str | None) -> UUID:
    return UUID(str(_run(flow_name, parameters, idempotency_key).id))


def _digest(*parts: Any) -> str:
    raw = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()[:40]


def _positive(value: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInputError(f"{what} must be a positive integer, got {value!r}")
    return value


def send_email(to: str, subject: str, body: str, html: str | None = None, idempotency_key: str | None = None) -> UUID:
    """Start send-email; the message key is the given key or a hash of the content."""
    key = idempotency_key or f"email:{_digest(to, subject, body, html)}"
    params = {"to": to, "subject": subject, "body": body, "html": html, "idempotency_key": key}
    return _start("send-email", params, key)


def send_sms(phone: str, text: str, idempotency_key: str | None = None) -> UUID:
    """Start send-sms; the message key is the given key or a hash of the content."""
    key = idempotency_key or f"sms:{_digest(phone, text)}"
    return _start("send-sms", {"phone": phone, "text": text, "idempotency_key": key}, key)


def send_templated_email(template: str, context: dict[str, Any], to: str, idempotency_key: str | None = None) -> UUID:
    """Start send-templated-email with a template name and its context."""
    key = idempotency_key or f"{template}:email:{_digest(to, context)}"
    params = {"template": template, "context": context, "to": to, "idempotency_key": key}
    return _start("send-templated-email", params, key)


def send_templated_sms(template: str, context: dict[str, Any], phone: str, idempotency_key: str | None = None) -> UUID:
    """Start send-templated-sms with a template name and its context."""
    key = idempotency_key or f"{template}:sms:{_digest(phone, context)}"
    params = {"template": template, "context": context, "phone": phone, "idempotency_key": key}
    return _start("send-templated-sms", params, key)


def send_order_confirmation(order_id: int, idempotency_key: str | None = None) -> UUID:
    """Start send-order-confirmation (email + SMS); one run per order unless a key says otherwise."""
    _positive(order_id, "order_id")
    return _start(
        "send-order-confirmation", {"order_id": order_id}, idempotency_key or f"order-confirmation:{order_id}"
    )


def send_order_shipped(order_id: int, tracking_number: str, carrier: str, idempotency_key: str | None = None) -> UUID:
    """Start send-order-shipped; one run per order and tracking number."""
    _positive(order_id, "order_id")
    params = {"order_id": order_id, "tracking_number": tracking_number, "carrier": carrier}
    return _start("send-order-shipped", params, idempotency_key or f"order-shipped:{order_id}:{tracking_number}")


def send_payment_failed(
    order_id: int | None = None,
    subscription_id: int | None = None,
    reason: str = "the payment was declined",
    idempotency_key: str | None = None,
) -> UUID:
    """Start send-payment-failed; pass the payment gateway's event id as the key."""
    if order_id is None and subscription_id is None:
        raise InvalidInputError("give order_id or subscription_id")
    params: dict[str, Any] = {"order_id": order_id, "subscription_id": subscription_id, "reason": reason}
    if idempotency_key:
        params["idempotency_key"] = f"payment-failed:{idempotency_key}"
    key = idempotency_key or f"payment-failed:{order_id}:{subscription_id}:{_digest(reason)}"
    return _start("send-payment-failed", params, key)


def send_subscription_renewal_reminder(
    subscription_id: int, delivery_date: dt.date | str, idempotency_key: str | None = None
) -> UUID:
    """Start send-subscription-renewal-reminder; one run per subscription and delivery date."""
    _positive(subscription_id, "subscription_id")
    day = delivery_date.isoformat() if isinstance(delivery_date, dt.date) else str(delivery_date)
    params = {"subscription_id": subscription_id, "delivery_date": day}
    return _start(
        "send-subscription-renewal-reminder", params, idempotency_key or f"renewal-reminder:{subscription_id}:{day}"
    )


def replay_dead_letters(
    ids: list[int] | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    idempotency_key: str | None = None,
) -> UUID:
    """Start replay-dead-letters for ids or a time window (a new run per call unless keyed)."""
    params = {
        "ids": ids,
        "since": since.isoformat() if since else None,
        "until": until.isoformat() if until else None,
    }
    return _start("replay-dead-letters", params, idempotency_key)


MAX_EVENT_RUNS = 20


def handle_razorpay_event(body: str | bytes, signature: str, event_id: str) -> UUID:
    """Start handle-razorpay-event with the raw webhook body; Razorpay's event id keys the run.

    Pass the body exactly as received (the signature covers its bytes) and the
    X-Razorpay-Signature and X-Razorpay-Event-Id header values. A redelivered webhook
    returns the run already started for it, unless that run ended Failed or Crashed:
    then a new run tries again (keys razorpay:<id>, razorpay:<id>:2, ...), and the inbox
    in the database makes sure an event applied once is never applied twice.
    """
    if not isinstance(event_id, str) or not event_id or len(event_id) > 64:
        raise InvalidInputError("event_id (the X-Razorpay-Event-Id header) must be 1-64 characters")
    text = body.decode() if isinstance(body, bytes) else body
    params = {"body": text, "signature": signature, "event_id": event_id}
    for attempt in range(1, MAX_EVENT_RUNS + 1):
        key = f"razorpay:{event_id}" if attempt == 1 else f"razorpay:{event_id}:{attempt}"
        run = _run("handle-razorpay-event", params, key)
        state = getattr(run.state, "type", None)
        if getattr(state, "value", None) not in ("FAILED", "CRASHED"):
            return UUID(str(run.id))
    raise InvalidInputError(f"razorpay event {event_id} failed {MAX_EVENT_RUNS} runs; see the inbox row and the runs")


def send_otp(customer_id: int, purpose: str = "login", idempotency_key: str | None = None) -> UUID:
    """Start send-otp: the run issues the code and sends it by SMS (the code never passes through here).

    Without a key every call sends a new code; pass your request id to make a retried call safe.
    """
    _positive(customer_id, "customer_id")
    params: dict[str, Any] = {"customer_id": customer_id, "purpose": purpose, "idempotency_key": idempotency_key}
    return _start("send-otp", params, f"otp:{customer_id}:{purpose}:{idempotency_key}" if idempotency_key else None)


def send_password_reset(customer_id: int, idempotency_key: str | None = None) -> UUID:
    """Start send-password-reset: the run issues the token and emails the link."""
    _positive(customer_id, "customer_id")
    params = {"customer_id": customer_id, "idempotency_key": idempotency_key}
    return _start(
        "send-password-reset", params, f"password-reset:{customer_id}:{idempotency_key}" if idempotency_key else None
    )


def send_email_verification(customer_id: int, idempotency_key: str | None = None) -> UUID:
    """Start send-email-verification: the run issues the token and emails the link."""
    _positive(customer_id, "customer_id")
    params = {"customer_id": customer_id, "idempotency_key": idempotency_key}
    return _start(
        "send-email-verification",
        params,
        f"email-verification:{customer_id}:{idempotency_key}" if idempotency_key else None,
    )


def process_single_subscription(subscription_id: int, idempotency_key: str | None = None) -> UUID:
    """Start process-single-subscription now (e.g. after a customer reactivates); unkeyed calls start a new run."""
    _positive(subscription_id, "subscription_id")
    return _start("process-single-subscription", {"subscription_id": subscription_id}, idempotency_key)
