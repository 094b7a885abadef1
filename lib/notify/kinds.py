"""The background tasks by name, each the request (lib.notify.messages) its parameters make.

One table both sides read: ``indostar_client.tasks`` checks a call's parameters with it before
recording the row (bad input never reaches the outbox) and the task worker builds the same
request from the stored row (flows.background). The names are the Prefect-era task names,
kept so rows and dashboards read the same.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from lib.notify import messages as req


def _reminder(
    subscription_id: int, delivery_date: dt.date | str | None = None, idempotency_key: str | None = None
) -> req.MessageRequest:
    return req.RenewalReminderRequest(((subscription_id, delivery_date),), idempotency_key, require_all=True)  # type: ignore[arg-type]


def _payment_failed(
    order_id: int | None = None,
    subscription_id: int | None = None,
    reason: str = "the payment was declined",
    idempotency_key: str | None = None,
) -> req.MessageRequest:
    return req.PaymentFailedRequest(order_id, subscription_id, reason, idempotency_key)


BACKGROUND_TASKS: dict[str, Callable[..., req.MessageRequest]] = {
    "send-email-task": lambda to, subject, body, html=None, idempotency_key=None: req.EmailRequest(
        to, subject, body, html, idempotency_key
    ),
    "send-sms-task": lambda phone, text, idempotency_key=None: req.SmsRequest(phone, text, idempotency_key),
    "send-templated-email-task": lambda template, context, to, idempotency_key=None: req.TemplatedRequest(
        "email", template, context, to, idempotency_key
    ),
    "send-templated-sms-task": lambda template, context, phone, idempotency_key=None: req.TemplatedRequest(
        "sms", template, context, phone, idempotency_key
    ),
    "send-order-confirmation-task": lambda order_id, idempotency_key=None: req.OrderConfirmationRequest(
        (order_id,), idempotency_key, require_all=True
    ),
    "send-order-shipped-task": lambda order_id, tracking_number, carrier, idempotency_key=None: req.OrderShippedRequest(
        order_id, tracking_number, carrier, idempotency_key
    ),
    "send-payment-failed-task": _payment_failed,
    "send-subscription-renewal-reminder-task": _reminder,
    "send-otp-task": lambda customer_id, purpose="login", idempotency_key=None: req.OtpRequest(
        customer_id, purpose, idempotency_key
    ),
    "send-password-reset-task": lambda customer_id, idempotency_key=None: req.LinkRequest(
        "password_reset", customer_id, idempotency_key
    ),
    "send-email-verification-task": lambda customer_id, idempotency_key=None: req.LinkRequest(
        "email_verification", customer_id, idempotency_key
    ),
}
