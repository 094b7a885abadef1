"""Delivering claimed messages: one pass over a batch through one channel session.

``deliver`` claims the batch's sendable rows (pending or failed, skipping rows another
run holds), sends each through one sender (one SMTP session, one httpx client), and
records each outcome in the same transaction. A permanent error kills that message
only; a transient error stops the pass (the connection is suspect) and leaves the rest
for the task's next retry, or, on the final attempt, marks them dead with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import httpx
from sqlalchemy.orm import Session

from lib.errors import PermanentError, TransientError
from lib.notify import log as dlog
from lib.notify.address import mask, scrub
from lib.notify.email_channel import SmtpConfig, SmtpSession, build_message
from lib.notify.sms_channel import SmsConfig, make_client, send_sms

log = logging.getLogger(__name__)

Sender = Callable[[dlog.Claimed], str]


@contextmanager
def email_sender(config: SmtpConfig) -> Iterator[Sender]:
    """One SMTP session; the sender rebuilds each message from its stored payload."""
    with SmtpSession(config) as smtp:

        def send(msg: dlog.Claimed) -> str:
            p = msg.payload
            try:
                mime = build_message(
                    p.get("from") or config.sender, p["to"], p["subject"], p["text"], p.get("html"), p["message_id"]
                )
            except KeyError as exc:
                raise PermanentError(f"stored email payload lacks {exc}; cannot send") from None
            return smtp.send(mime)

        yield send


@contextmanager
def sms_sender(config: SmsConfig, client: httpx.Client | None = None) -> Iterator[Sender]:
    """One pooled httpx client (unless given one); the sender posts each stored SMS."""
    own = client is None and config.provider != "log"
    if own:
        client = make_client(config)
    try:

        def send(msg: dlog.Claimed) -> str:
            p = msg.payload
            if "to" not in p or "text" not in p:
                raise PermanentError("stored SMS payload lacks 'to' or 'text'; cannot send")
            return send_sms(client, config, p["to"], p["text"], p.get("dlt_template_id"))

        yield send
    finally:
        if own and client is not None:
            client.close()


def deliver(
    session: Session,
    keys: list[str],
    open_sender: Callable[[], AbstractContextManager[Sender]],
    final: bool,
    before_send: Callable[[], None] | None = None,
) -> dlog.Outcome:
    """Send the sendable messages among ``keys`` through one sender; record every outcome."""
    outcome = dlog.Outcome()
    claimed = dlog.claim(session, keys)
    outcome.skipped = len(keys) - len(claimed)
    if not claimed:
        return outcome
    sent: list[tuple[int, str]] = []
    done = 0  # messages with a recorded outcome
    current: dlog.Claimed | None = None  # the message on the wire when an error comes
    try:
        with open_sender() as send:
            for msg in claimed:
                if before_send is not None:
                    before_send()
                current = msg
                try:
                    sent.append((msg.id, send(msg)))
                except PermanentError as exc:
                    dlog.mark_failed(session, [msg.id], str(exc), dead=True)
                    outcome.dead += 1
                    outcome.dead_reasons.append(scrub(str(exc)))
                    log.warning(
                        "dead: %s %s to %s: %s", msg.template, msg.channel, mask(msg.recipient), scrub(str(exc))
                    )
                current = None
                done += 1
    except TransientError as exc:
        reason = str(exc)
        outcome.transient_error = scrub(reason)
        rest = claimed[done:]
        # On the wire: that message's attempt failed. Not on the wire: the session never
        # opened, so every claimed message's attempt failed.
        tried = [current.id] if current is not None else [m.id for m in rest]
        untried = [m.id for m in rest if m.id not in tried]
        dlog.mark_failed(session, tried, reason, dead=final, tried=True)
        dlog.mark_failed(session, untried, f"not attempted: {reason}", dead=final, tried=False)
        if final:
            outcome.dead += len(rest)
            outcome.dead_reasons.append(scrub(reason))
            log.warning("retries exhausted, %d message(s) dead: %s", len(rest), scrub(reason))
        else:
            outcome.failed += len(rest)
    dlog.mark_sent(session, sent)
    outcome.sent = len(sent)
    return outcome
