"""Notification flows: plain and templated email/SMS, the order and subscription messages,
the bulk senders the subscription flows call, and the dead-letter replay.

Every message goes through the delivery log (lib.notify.log): recorded once under its
idempotency key, sent at most once, and left ``dead`` with the reason when it cannot be
delivered. Tasks wrap one side effect each (a transaction, one SMTP session, one httpx
client pass) under the shared retry policy, which retries transient errors only.
Providers are throttled by Prefect global concurrency limits when an operator has
created them (``smtp-provider``: concurrent SMTP sessions; ``sms-provider``: SMS per
second, with slot decay); without them, sends are not throttled.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import task_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import publish_table, retry_options
from lib import db
from lib.config import get_settings
from lib.errors import InvalidInputError, NotFoundError, PermanentError, TransientError
from lib.notify import delivery, messages
from lib.notify import log as dlog
from lib.notify.address import mask, normalize_phone, scrub, validate_email
from lib.notify.email_channel import SmtpConfig
from lib.notify.log import Outgoing
from lib.notify.sms_channel import SmsConfig
from lib.notify.templates import render_email, render_sms

SMTP_LIMIT = "smtp-provider"
SMS_LIMIT = "sms-provider"
RETRY = retry_options()
TASK = {"cache_policy": NO_CACHE, "persist_result": False}
BULK_RUNNER_THREADS = 4


# --- provider configuration and limits ------------------------------------------------------


def smtp_config() -> SmtpConfig:
    """SMTP settings, or the prefect-email block named by SMTP_CREDENTIALS_BLOCK (loaded now)."""
    s = get_settings()
    if not s.smtp_credentials_block:
        return SmtpConfig.from_settings(s)
    from prefect_email import EmailServerCredentials

    block = EmailServerCredentials.load(s.smtp_credentials_block)
    kind = getattr(block.smtp_type, "name", str(block.smtp_type)).upper()
    default_port = getattr(block.smtp_type, "value", 465)
    return SmtpConfig(
        host=getattr(block.smtp_server, "value", block.smtp_server),
        port=block.smtp_port or default_port,
        security={"SSL": "ssl", "STARTTLS": "starttls"}.get(kind, "none"),
        timeout=s.smtp_timeout,
        username=block.username,
        password=block.password.get_secret_value() or None,
        sender=s.smtp_from,
        verify_tls=block.verify is not False,
    )


_limits_seen: dict[str, tuple[float, bool]] = {}
_limits_lock = threading.Lock()


def limit_exists(name: str, ttl: float = 60.0) -> bool:
    """Whether the global concurrency limit exists (checked at most once a minute per process).

    Prefect 3.9 with strict=False lets a missing limit pass, but warns on every call;
    checking once keeps the log quiet when an operator has not created the limit.
    """
    now = time.monotonic()
    with _limits_lock:
        seen = _limits_seen.get(name)
        if seen and now - seen[0] < ttl:
            return seen[1]
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(name)
        exists = True
    except ObjectNotFound:
        exists = False
    with _limits_lock:
        _limits_seen[name] = (now, exists)
    return exists


def provider_session(name: str):
    """Hold one slot of the provider's concurrency limit for a session, if the limit exists."""
    from prefect.concurrency.sync import concurrency

    return concurrency(name, occupy=1, strict=False) if limit_exists(name) else nullcontext()


def provider_rate(name: str) -> None:
    """Wait for the provider's rate limit (a limit with slot decay), if it exists."""
    from prefect.concurrency.sync import rate_limit

    if limit_exists(name):
        rate_limit(name, occupy=1, strict=False)


# --- tasks ------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Keys recorded for one batch, by channel, and what was left out."""

    email_keys: list[str] = field(default_factory=list)
    sms_keys: list[str] = field(default_factory=list)
    missing: list[Any] = field(default_factory=list)
    opted_out: int = 0
    no_address: int = 0

    @property
    def keys(self) -> list[str]:
        return self.email_keys + self.sms_keys


def _prepared(built: messages.Built) -> Prepared:
    live = [m for m in built.messages if not m.error]
    return Prepared(
        email_keys=[m.key for m in live if m.channel == "email"],
        sms_keys=[m.key for m in live if m.channel == "sms"],
        missing=built.missing,
        opted_out=built.opted_out,
        no_address=built.no_address,
    )


def _record(built: messages.Built, session) -> Prepared:
    dlog.record(session, built.messages)
    prepared = _prepared(built)
    # Dead-on-arrival messages (bad address) still count in the run's summary.
    prepared.email_keys += [m.key for m in built.messages if m.error and m.channel == "email"]
    prepared.sms_keys += [m.key for m in built.messages if m.error and m.channel == "sms"]
    return prepared


@task(name="record-messages", **TASK, **RETRY)
def record_messages(outgoing: list[Outgoing]) -> Prepared:
    """Write rendered messages to the delivery log; keys already there are left as they are."""
    with db.session_scope() as s:
        return _record(messages.Built(messages=outgoing), s)


@task(name="prepare-order-confirmations", **TASK, **RETRY)
def prepare_order_confirmations(order_ids: list[int]) -> Prepared:
    """Render and record email + SMS confirmations for a batch of orders (one transaction)."""
    with db.session_scope() as s:
        return _record(messages.order_confirmations(s, order_ids, get_settings().smtp_from), s)


@task(name="prepare-renewal-reminders", **TASK, **RETRY)
def prepare_renewal_reminders(items: list[tuple[int, dt.date]]) -> Prepared:
    """Render and record renewal reminders for a batch, honouring opt-outs (one transaction)."""
    with db.session_scope() as s:
        return _record(messages.renewal_reminders(s, items, get_settings().smtp_from), s)


def _final_attempt() -> bool:
    return task_run.get_run_count() > RETRY["retries"]


def _finish(outcome: dlog.Outcome, channel: str, final: bool) -> dict[str, int]:
    logger = get_run_logger()
    logger.info("%s: %s", channel, outcome.as_dict())
    if outcome.transient_error and not final:
        raise TransientError(outcome.transient_error)
    return outcome.as_dict()


@task(name="deliver-emails", **TASK, **RETRY)
def deliver_emails(keys: list[str]) -> dict[str, int]:
    """Send the unsent emails among these keys over one SMTP session; record each outcome."""
    final = _final_attempt()
    with provider_session(SMTP_LIMIT), db.session_scope() as s:  # wait for a slot before locking rows
        outcome = delivery.deliver(s, keys, lambda: delivery.email_sender(smtp_config()), final)
    return _finish(outcome, "email", final)


@task(name="deliver-sms", **TASK, **RETRY)
def deliver_sms(keys: list[str]) -> dict[str, int]:
    """Send the unsent SMS among these keys through one pooled HTTP client; record each outcome."""
    final, config = _final_attempt(), SmsConfig.from_settings(get_settings())
    with db.session_scope() as s:
        outcome = delivery.deliver(
            s, keys, lambda: delivery.sms_sender(config), final, before_send=lambda: provider_rate(SMS_LIMIT)
        )
    return _finish(outcome, "sms", final)


@task(name="summarise-notifications", **TASK, **RETRY)
def summarise(keys: list[str], flow_name: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Count this run's messages by status and publish them by template, channel and status."""
    with db.session_scope() as s:
        rows = dlog.summary_rows(s, keys)
    publish_table(
        f"notifications-{flow_name}", dlog.summary_frame(rows), f"Messages of this `{flow_name}` run by status"
    )
    counts: dict[str, Any] = dlog.counts_by_status(rows) | (extra or {})
    counts["dead_reasons"] = sorted({scrub(r["last_error"] or "") for r in rows if r["status"] == "dead"})
    return counts


# --- shared flow steps ------------------------------------------------------------------------


def _submit_deliveries(prepared: Prepared) -> list:
    """Start the email and SMS deliveries of one prepared batch (they run at the same time)."""
    futures = []
    if prepared.email_keys:
        futures.append(deliver_emails.submit(prepared.email_keys))
    if prepared.sms_keys:
        futures.append(deliver_sms.submit(prepared.sms_keys))
    return futures


def _await(futures: list) -> int:
    """Wait for delivery tasks; log and count the ones that failed (their rows stay pending/failed)."""
    wait(futures)
    failed = [f for f in futures if not f.state.is_completed()]
    for f in failed:
        get_run_logger().error("delivery task failed: %s", scrub(str(f.state.message)))
    return len(failed)


def _deliver(prepared: Prepared) -> int:
    """Send one prepared batch, email and SMS at the same time; returns how many tasks failed."""
    return _await(_submit_deliveries(prepared))


def _send_and_report(outgoing: list[Outgoing], flow_name: str) -> dict[str, Any]:
    """Record, deliver and summarise the messages of a single-entity flow; fail if any is dead."""
    prepared = record_messages(outgoing)
    failed_tasks = _deliver(prepared)
    result = summarise(prepared.keys, flow_name)
    for m in outgoing:
        get_run_logger().info("%s %s to %s", m.template or "plain", m.channel, mask(m.recipient))
    reasons = result.pop("dead_reasons")
    if result["dead"]:
        raise PermanentError(f"{result['dead']} message(s) dead: {'; '.join(reasons)}")
    if failed_tasks:
        raise TransientError(f"{result['pending'] + result['failed']} message(s) not delivered yet; rerun to finish")
    return result


def _positive(value: int, what: str) -> int:
    if value <= 0:
        raise InvalidInputError(f"{what} must be a positive id, got {value}")
    return value


def _built_or_dead(key: str, channel: str, template: str, recipient: str, context: dict, build) -> Outgoing:
    """Build a templated message; a template error records it dead (nothing to send) with the reason."""
    try:
        return build()
    except InvalidInputError:
        raise
    except PermanentError as exc:
        stored = json.loads(json.dumps({"template": template, "context": context}, default=str))
        return Outgoing(key, channel, template, recipient, None, stored, error=str(exc))


# --- flows: plain and templated -----------------------------------------------------------------


@flow(name="send-email", timeout_seconds=get_settings().flow_timeout_seconds)
def send_email(
    to: str, subject: str, body: str, html: str | None = None, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Send one email (plain text, optional HTML alternative), once per idempotency key."""
    sender, address = get_settings().smtp_from, validate_email(to)
    key = idempotency_key or messages.content_key("email", address, subject, body, html)
    return _send_and_report([messages.email_message(key, address, subject, body, html, sender)], "send-email")


@flow(name="send-sms", timeout_seconds=get_settings().flow_timeout_seconds)
def send_sms(phone: str, text: str, idempotency_key: str | None = None) -> dict[str, Any]:
    """Send one free-text SMS (no DLT template: for the log provider or non-Indian routes)."""
    number = normalize_phone(phone)
    key = idempotency_key or messages.content_key("sms", number, text)
    return _send_and_report([messages.sms_message(key, number, text, None)], "send-sms")


@flow(name="send-templated-email", timeout_seconds=get_settings().flow_timeout_seconds)
def send_templated_email(
    template: str, context: dict[str, Any], to: str, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Render a template's subject, HTML and text with the context and email it once."""
    sender, address = get_settings().smtp_from, validate_email(to)
    key = idempotency_key or messages.content_key(f"{template}:email", address, context)

    def build() -> Outgoing:
        c = render_email(template, context)
        return messages.email_message(key, address, c.subject, c.text, c.html, sender, template)

    return _send_and_report([_built_or_dead(key, "email", template, address, context, build)], "send-templated-email")


@flow(name="send-templated-sms", timeout_seconds=get_settings().flow_timeout_seconds)
def send_templated_sms(
    template: str, context: dict[str, Any], phone: str, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Render a template's DLT-registered SMS text with the context and send it once."""
    number = normalize_phone(phone)
    key = idempotency_key or messages.content_key(f"{template}:sms", number, context)

    def build() -> Outgoing:
        sms = render_sms(template, context)
        return messages.sms_message(key, number, sms.text, sms.dlt_template_id, template)

    return _send_and_report([_built_or_dead(key, "sms", template, number, context, build)], "send-templated-sms")


# --- flows: orders and subscriptions ------------------------------------------------------------


@task(name="build-messages", **TASK, **RETRY)
def build_messages(kind: str, params: dict[str, Any]) -> list[Outgoing]:
    """Read one order or subscription and render its messages (a read-only transaction)."""
    sender = get_settings().smtp_from
    with db.session_scope() as s:
        if kind == "order-confirmation":
            built = messages.order_confirmations(s, [params["order_id"]], sender, params.get("key_base"))
            if built.missing:
                raise NotFoundError(f"order {params['order_id']} does not exist")
        elif kind == "order-shipped":
            built = messages.order_shipped(s, sender=sender, **params)
        elif kind == "payment-failed":
            built = messages.payment_failed(s, sender=sender, **params)
        else:
            items = [(params["subscription_id"], params["delivery_date"])]
            built = messages.renewal_reminders(s, items, sender, params.get("key_base"))
            if built.missing:
                raise NotFoundError(f"subscription {params['subscription_id']} does not exist")
    return built.messages


@flow(name="send-order-confirmation", timeout_seconds=get_settings().flow_timeout_seconds)
def send_order_confirmation(order_id: int, idempotency_key: str | None = None) -> dict[str, Any]:
    """Email and SMS the confirmation of one order (keys order-confirmation:<order>:<channel>)."""
    _positive(order_id, "order_id")
    outgoing = build_messages("order-confirmation", {"order_id": order_id, "key_base": idempotency_key})
    return _send_and_report(outgoing, "send-order-confirmation")


@flow(name="send-order-shipped", timeout_seconds=get_settings().flow_timeout_seconds)
def send_order_shipped(
    order_id: int, tracking_number: str, carrier: str, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Email and SMS that an order has shipped, with carrier and tracking number."""
    _positive(order_id, "order_id")
    if not tracking_number.strip() or not carrier.strip():
        raise InvalidInputError("tracking_number and carrier must not be empty")
    params = {"order_id": order_id, "tracking_number": tracking_number, "carrier": carrier, "key_base": idempotency_key}
    return _send_and_report(build_messages("order-shipped", params), "send-order-shipped")


@flow(name="send-payment-failed", timeout_seconds=get_settings().flow_timeout_seconds)
def send_payment_failed(
    order_id: int | None = None,
    subscription_id: int | None = None,
    reason: str = "the payment was declined",
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    """Tell a customer a payment failed, for an order (preferred when both are given) or a subscription."""
    if order_id is None and subscription_id is None:
        raise InvalidInputError("give order_id or subscription_id")
    if order_id is not None:
        _positive(order_id, "order_id")
        subscription_id = None  # an order names the exact amount that failed; it wins
    else:
        _positive(subscription_id, "subscription_id")
    if not reason.strip():
        raise InvalidInputError("reason must not be empty")
    params = {"order_id": order_id, "subscription_id": subscription_id, "reason": reason, "key_base": idempotency_key}
    return _send_and_report(build_messages("payment-failed", params), "send-payment-failed")


@flow(name="send-subscription-renewal-reminder", timeout_seconds=get_settings().flow_timeout_seconds)
def send_subscription_renewal_reminder(
    subscription_id: int, delivery_date: dt.date, idempotency_key: str | None = None
) -> dict[str, Any]:
    """Remind a customer of a coming delivery, on the channels they opted in to."""
    _positive(subscription_id, "subscription_id")
    params = {"subscription_id": subscription_id, "delivery_date": delivery_date, "key_base": idempotency_key}
    return _send_and_report(build_messages("renewal-reminder", params), "send-subscription-renewal-reminder")


# --- bulk flows (called as subflows by the subscription flows) ------------------------------------


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _bulk(prepare, items: list, flow_name: str) -> dict[str, Any]:
    """Prepare and deliver ``items`` in batches (concurrently), stopping at the soft time limit."""
    s = get_settings()
    started, logger = time.monotonic(), get_run_logger()
    total = Prepared()
    deferred = 0
    futures = []
    for chunk in _chunks(items, s.notification_batch_size):
        if time.monotonic() - started > s.flow_soft_limit_seconds:
            deferred += len(chunk)  # left for the next run: their keys make the rerun safe
            continue
        futures.append(prepare.submit(chunk))
    deliveries = []
    for f in futures:
        prepared = f.result()
        deliveries += _submit_deliveries(prepared)
        total.email_keys += prepared.email_keys
        total.sms_keys += prepared.sms_keys
        total.missing += prepared.missing
        total.opted_out += prepared.opted_out
        total.no_address += prepared.no_address
    _await(deliveries)
    if total.missing:
        logger.warning("%d id(s) name no row and were skipped: %s", len(total.missing), total.missing[:20])
    extra = {"missing": len(total.missing), "opted_out": total.opted_out, "no_address": total.no_address}
    result = summarise(total.keys, flow_name, extra | {"deferred": deferred})
    reasons = result.pop("dead_reasons")
    if result["dead"]:
        logger.warning("%d message(s) dead, e.g. %s", result["dead"], "; ".join(reasons[:5]))
    return result


@flow(
    name="send-order-confirmations",
    task_runner=ThreadPoolTaskRunner(max_workers=BULK_RUNNER_THREADS),
    timeout_seconds=get_settings().flow_timeout_seconds,
)
def send_order_confirmations(order_ids: list[int]) -> dict:
    """Email and SMS the confirmations of many orders, in batches with one SMTP session each."""
    ids = list(dict.fromkeys(_positive(int(i), "order id") for i in order_ids))
    return _bulk(prepare_order_confirmations, ids, "send-order-confirmations")


@flow(
    name="send-renewal-reminders",
    task_runner=ThreadPoolTaskRunner(max_workers=BULK_RUNNER_THREADS),
    timeout_seconds=get_settings().flow_timeout_seconds,
)
def send_renewal_reminders(items: list[tuple[int, str]]) -> dict:
    """Remind many subscribers of their next delivery, once per subscription and date, opt-ins honoured."""
    parsed = messages.parse_reminder_items(items)
    return _bulk(prepare_renewal_reminders, parsed, "send-renewal-reminders")


# --- dead letters ---------------------------------------------------------------------------------


@task(name="requeue-dead-letters", **TASK, **RETRY)
def requeue_dead_letters(
    ids: list[int] | None, since: dt.datetime | None, until: dt.datetime | None
) -> list[tuple[str, str]]:
    """Put the chosen dead messages back to pending; returns (key, channel) of each."""
    with db.session_scope() as s:
        found = dlog.find_dead(s, ids, since, until)
        dlog.requeue(s, [k for k, _ in found])
    return found


@flow(name="replay-dead-letters", timeout_seconds=get_settings().flow_timeout_seconds)
def replay_dead_letters(
    ids: list[int] | None = None, since: dt.datetime | None = None, until: dt.datetime | None = None
) -> dict[str, Any]:
    """Resend dead messages exactly as stored (by ids or a time window), once each."""
    if ids is None and since is None and until is None:
        raise InvalidInputError("give ids or a time window (since and/or until) to replay")
    if ids is not None:
        ids = [_positive(int(i), "notification id") for i in ids]
    found = requeue_dead_letters(ids, since, until)
    size = get_settings().notification_batch_size
    for channel in ("email", "sms"):
        keys = [k for k, c in found if c == channel]
        for chunk in _chunks(keys, size):
            _deliver(Prepared(**{f"{channel}_keys": chunk}))
    result = summarise([k for k, _ in found], "replay-dead-letters", {"replayed": len(found)})
    result.pop("dead_reasons")
    return result
