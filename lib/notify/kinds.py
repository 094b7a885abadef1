"""The message kinds: one entry each, from which every surface is built.

An entry names the kind (``send-email``), its parameters, the request its parameters make
(lib.notify.requests), its work queue and tags, how a deployment run of it is keyed, and the
old Celery task's argument names. From it come the flow and its deployment
(flows.notifications, prefect.yaml's generated block), the background task the task worker
runs (flows.background), the client function and its awaitable twin (indostar_client.client,
.aclient) and the old Celery task (indostar_client.tasks). Adding a kind is one entry here,
its templates (lib/notify/templates) and ``python -m devtools.prefect_yaml``.

Names follow from the kind's: flow ``send-email``, function ``send_email``, background task
``send-email-task``, Celery task ``send_email_task``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import inspect
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lib.errors import InvalidInputError
from lib.notify import requests as req

REQUIRED = inspect.Parameter.empty
KEY = "idempotency_key"
RunKeys = Callable[[Mapping[str, Any], str | None], tuple[str | None, str | None]]


@dataclass(frozen=True)
class Param:
    """One parameter of a kind, as every surface spells it."""

    name: str
    type: Any  # the annotation flows and the client show
    default: Any = REQUIRED
    is_id: bool = False  # a positive id: flows check it before the run starts
    old_names: tuple[str, ...] = ()  # what the old Celery task also called it
    old_default: Any = REQUIRED  # a default only the old task had


def as_given(params: Mapping[str, Any], key: str | None) -> tuple[str | None, str | None]:
    """Without the caller's key every run is new (its messages keyed by the run's id); with it, one run."""
    return key, key


def about(template: str) -> RunKeys:
    """One run per what the message is about (``template`` filled from the parameters) unless keyed."""
    return lambda params, key: (key or template.format(**params), key)


def scoped(template: str) -> RunKeys:
    """The caller's key, scoped to what it is about (``template``), keys the run; without it, a new run."""
    return lambda params, key: (f"{template.format(**params)}:{key}" if key else None, key)


def digest(*parts: Any) -> str:
    """A short stable digest of ``parts`` (JSON), for keys that must tell contents apart."""
    raw = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(raw.encode()).hexdigest()[:40]


@dataclass(frozen=True, eq=False)  # each kind is one object: compared and hashed by identity
class Kind:
    """One message kind and everything its surfaces need to know."""

    name: str
    doc: str  # the flow's UI description and the client function's docstring
    params: tuple[Param, ...]
    build: Callable[..., req.MessageRequest]  # (**every param, idempotency_key) -> the request
    queue: Literal["critical", "notifications"] = "notifications"
    tags: tuple[str, ...] = ()
    # Without a caller's key, does a flow run key its messages by the run (each run new, as a Celery
    # call was) or leave them keyed by what they are about (one confirmation per order)?
    keyless: Literal["run", "about"] = "run"
    run_keys: RunKeys = as_given  # a deployment run's idempotency key, and the key its flow gets
    old_positional: tuple[str, ...] | None = None  # the old task's positional order, where it differs

    @property
    def function(self) -> str:
        return self.name.replace("-", "_")

    @property
    def task_name(self) -> str:
        return f"{self.name}-task"

    @property
    def celery_name(self) -> str:
        return f"{self.function}_task"

    def request(self, params: Mapping[str, Any], key: str | None) -> req.MessageRequest:
        """The request these parameters make (the declared defaults filled in, so a row recorded before a
        parameter existed still builds); a missing or unknown parameter is bad input, named."""
        defaults = {p.name: p.default for p in self.params if p.default is not REQUIRED}
        try:
            return self.build(**(defaults | dict(params)), idempotency_key=key)
        except TypeError as exc:
            raise InvalidInputError(f"{self.name}: {exc}") from None

    def signature(self, id_type: Any = int, key_type: Any = str) -> inspect.Signature:
        """The parameters as a Python signature, the idempotency key last (flows pass their checked types)."""
        out = [
            inspect.Parameter(
                p.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=p.default, annotation=_type(p, id_type)
            )
            for p in self.params
        ]
        out.append(
            inspect.Parameter(KEY, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None, annotation=key_type | None)
        )
        return inspect.Signature(out, return_annotation=dict[str, Any])


def _type(param: Param, id_type: Any) -> Any:
    if not param.is_id:
        return param.type
    return id_type | None if param.default is None else id_type


def bind(kind: Kind, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], str | None]:
    """A call's arguments by parameter name with defaults filled, and its idempotency key; TypeError as Python's."""
    bound = kind.signature().bind(*args, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    return params, params.pop(KEY)


def plain(params: Mapping[str, Any]) -> dict[str, Any]:
    """Parameters as JSON carries them (a deployment run, an outbox row): dates as ISO text."""
    return dict(json.loads(json.dumps(params, default=req.iso_default)))


# ---- the registry ------------------------------------------------------------------------------

KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add a kind; its name (and so every name made from it) must be new."""
    if kind.name in KINDS:
        raise ValueError(f"message kind {kind.name} is already registered")
    KINDS[kind.name] = kind
    return kind


@contextlib.contextmanager
def registered(kind: Kind) -> Iterator[Kind]:
    """A kind registered for the block only (tests)."""
    register(kind)
    try:
        yield kind
    finally:
        KINDS.pop(kind.name, None)


def find(value: str, attribute: str) -> Kind | None:
    """The kind whose ``attribute`` (name, function, task_name, celery_name) is ``value``."""
    return next((k for k in KINDS.values() if getattr(k, attribute) == value), None)


def expose(namespace: dict[str, Any], attribute: str, make: Callable[[Kind], Any]) -> Callable[[str], Any]:
    """Put ``make(kind)`` in ``namespace`` (a module's globals) under each kind's ``attribute`` (function,
    celery_name), and return the module's ``__getattr__``, which makes it for a kind registered later."""
    for kind in KINDS.values():
        namespace[getattr(kind, attribute)] = make(kind)

    def getattr_(name: str) -> Any:
        kind = find(name, attribute)
        if kind is None:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        return make(kind)

    return getattr_


def by_task(task_name: str) -> Kind:
    """The kind of a background task name; InvalidInputError naming the known ones."""
    kind = find(task_name, "task_name")
    if kind is None:
        known = ", ".join(k.task_name for k in KINDS.values())
        raise InvalidInputError(f"unknown background task {task_name!r}; known: {known}")
    return kind


# ---- the kinds ---------------------------------------------------------------------------------

ORDER_ID = Param("order_id", int, is_id=True)
CUSTOMER_ID = Param("customer_id", int, is_id=True)
CONTEXT = Param("context", dict[str, Any], old_default={})
TEMPLATE = Param("template", str, old_names=("template_name",))


def _payment_failed_keys(params: Mapping[str, Any], key: str | None) -> tuple[str | None, str | None]:
    # The gateway's event id is the usual key: prefixed, it cannot meet another kind's messages.
    order, sub = params.get("order_id"), params.get("subscription_id")
    return key or f"payment-failed:{order}:{sub}:{digest(params.get('reason'))}", key and f"payment-failed:{key}"


def _reminder_keys(params: Mapping[str, Any], key: str | None) -> tuple[str | None, str | None]:
    return key or f"renewal-reminder:{params['subscription_id']}:{params.get('delivery_date') or 'next'}", key


for _kind in (
    Kind(
        "send-email",
        "Send one email (plain text, optional HTML alternative), once per idempotency key.",
        (
            Param("to", str, old_names=("to_email",)),
            Param("subject", str),
            Param("body", str, old_names=("text", "message")),
            Param("html", str | None, None, old_names=("html_body",)),
        ),
        lambda to, subject, body, html, idempotency_key: req.EmailRequest(to, subject, body, html, idempotency_key),
        old_positional=("to_email", "subject", "body"),
    ),
    Kind(
        "send-sms",
        "Send one free-text SMS (no DLT template: for the log provider or non-Indian routes).",
        (
            Param("phone", str, old_names=("to_phone", "phone_number")),
            Param("text", str, old_names=("message", "body")),
        ),
        lambda phone, text, idempotency_key: req.SmsRequest(phone, text, idempotency_key),
        old_positional=("phone", "message"),
    ),
    Kind(
        "send-templated-email",
        "Render a template's subject, HTML and text with the context and email it once.",
        (TEMPLATE, CONTEXT, Param("to", str, old_names=("to_email",))),
        lambda template, context, to, idempotency_key: req.TemplatedRequest(
            "email", template, context, to, idempotency_key
        ),
        old_positional=("to_email", "template_name", "context"),
    ),
    Kind(
        "send-templated-sms",
        "Render a template's DLT-registered SMS text with the context and send it once.",
        (TEMPLATE, CONTEXT, Param("phone", str, old_names=("to_phone",))),
        lambda template, context, phone, idempotency_key: req.TemplatedRequest(
            "sms", template, context, phone, idempotency_key
        ),
        old_positional=("phone", "template_name", "context"),
    ),
    Kind(
        "send-order-confirmation",
        "Email and SMS the confirmation of one order (keys order-confirmation:<order>:<channel>).",
        (ORDER_ID,),
        lambda order_id, idempotency_key: req.OrderConfirmationRequest((order_id,), idempotency_key, require_all=True),
        tags=("orders",),
        keyless="about",
        run_keys=about("order-confirmation:{order_id}"),
    ),
    Kind(
        "send-order-shipped",
        "Email and SMS that an order has shipped, with carrier and tracking number.",
        (ORDER_ID, Param("tracking_number", str), Param("carrier", str)),
        lambda order_id, tracking_number, carrier, idempotency_key: req.OrderShippedRequest(
            order_id, tracking_number, carrier, idempotency_key
        ),
        tags=("orders",),
        keyless="about",
        run_keys=about("order-shipped:{order_id}:{tracking_number}"),
    ),
    Kind(
        "send-payment-failed",
        "Tell a customer a payment failed, for an order (preferred when both are given) or a subscription.",
        (
            Param("order_id", int, None, is_id=True),
            Param("subscription_id", int, None, is_id=True),
            Param("reason", str, "the payment was declined"),
        ),
        lambda order_id, subscription_id, reason, idempotency_key: req.PaymentFailedRequest(
            order_id, subscription_id, reason, idempotency_key
        ),
        queue="critical",
        tags=("payments",),
        keyless="about",
        run_keys=_payment_failed_keys,
    ),
    Kind(
        "send-subscription-renewal-reminder",
        "Remind a customer of a coming delivery (the next one unless a date is given), on the channels they "
        "opted in to.",
        (Param("subscription_id", int, is_id=True), Param("delivery_date", dt.date | None, None)),
        lambda subscription_id, delivery_date, idempotency_key: req.RenewalReminderRequest(
            ((subscription_id, delivery_date),), idempotency_key, require_all=True
        ),
        tags=("subscriptions",),
        keyless="about",
        run_keys=_reminder_keys,
    ),
    Kind(
        "send-otp",
        "Issue a one-time code for the customer and send it by SMS; the code exists only inside this run.",
        (CUSTOMER_ID, Param("purpose", str, "login")),
        lambda customer_id, purpose, idempotency_key: req.OtpRequest(customer_id, purpose, idempotency_key),
        queue="critical",
        tags=("tokens",),
        run_keys=scoped("otp:{customer_id}:{purpose}"),
    ),
    Kind(
        "send-password-reset",
        "Issue a password-reset token and email its link; the token exists only inside this run.",
        (CUSTOMER_ID,),
        lambda customer_id, idempotency_key: req.LinkRequest("password_reset", customer_id, idempotency_key),
        queue="critical",
        tags=("tokens",),
        run_keys=scoped("password-reset:{customer_id}"),
    ),
    Kind(
        "send-email-verification",
        "Issue an email-verification token and email its link; the token exists only inside this run.",
        (CUSTOMER_ID,),
        lambda customer_id, idempotency_key: req.LinkRequest("email_verification", customer_id, idempotency_key),
        tags=("tokens",),
        run_keys=scoped("email-verification:{customer_id}"),
    ),
):
    register(_kind)
