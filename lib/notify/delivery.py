"""One delivery pass: claim a batch of messages, render each at send time, send it, record it at once.

``deliver`` runs on a delivery session (lib.notify.delivery_log.delivery_session: an
autocommit connection holding an advisory lock) and commits every state change as it
happens: the batch is claimed (``sending``) in one statement, and each message is marked
``sent`` in its own statement right after the provider accepted it. A worker killed
mid-pass therefore leaves at most the one message that was on the wire unrecorded; its
row stays ``sending`` under a lock nobody holds, and the next claim takes it back.

Errors: a ``PermanentError`` kills the message it concerns (dead, with the reason); one
when the sender opens (SMTP login refused, a provider not configured) kills every claimed
message, since none can go out until someone fixes it, and ``replay-dead-letters`` sends
them after the fix. A ``TransientError`` stops the pass (the connection is suspect): the
rest go back to ``failed`` for the task's next retry, or, on the final attempt, ``dead``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import httpx
from sqlalchemy import Connection

from lib.errors import PermanentError, TransientError
from lib.notify import delivery_log as dlog
from lib.notify.address import mask, scrub
from lib.notify.email_channel import SmtpConfig, SmtpSession, build_message
from lib.notify.render import Outgoing, renderers
from lib.notify.sms_channel import SmsConfig, make_client, send_sms

log = logging.getLogger(__name__)

Sender = Callable[[Outgoing], str]
OpenSender = Callable[[], AbstractContextManager[Sender]]


@contextmanager
def email_sender(config: SmtpConfig) -> Iterator[Sender]:
    """One SMTP session for the pass; each message is built from its rendered content."""
    with SmtpSession(config) as smtp:

        def send(out: Outgoing) -> str:
            return smtp.send(
                build_message(config.sender, out.to, out.subject or "", out.text, out.html, out.message_id)
            )

        yield send


@contextmanager
def sms_sender(config: SmsConfig, client: httpx.Client | None = None) -> Iterator[Sender]:
    """One pooled httpx client for the pass (unless given one); raises ConfigError for a refused provider."""
    config.check_usable()
    own = client is None and config.provider != "log"
    if own:
        client = make_client(config)
    try:

        def send(out: Outgoing) -> str:
            return send_sms(client, config, out.to, out.text, out.dlt_template_id)

        yield send
    finally:
        if own and client is not None:
            client.close()


def _dead(conn: Connection, msg: dlog.Claimed, token: int, reason: str, report: dlog.DeliveryReport) -> None:
    dlog.mark_unsent(conn, [msg.id], token, scrub(reason), dead=True, tried=True)
    report.dead += 1
    report.dead_reasons.append(scrub(reason))
    log.warning("dead: %s %s to %s: %s", msg.kind, msg.channel, mask(msg.recipient), scrub(reason))


def deliver(
    conn: Connection,
    token: int,
    keys: list[str],
    channel: str,
    open_sender: OpenSender,
    *,
    final: bool,
    before_send: Callable[[], None] | None = None,
) -> dlog.DeliveryReport:
    """Send the sendable ``channel`` messages among ``keys``; every outcome is committed as it happens."""
    report = dlog.DeliveryReport()
    claimed = dlog.claim(conn, keys, token, channel)
    report.skipped = len(set(keys)) - len(claimed)
    report.recovered = sum(m.recovered for m in claimed)
    if not claimed:
        return report
    if report.recovered:
        log.warning("%d %s message(s) left `sending` by a stopped worker: sending again", report.recovered, channel)
    renders = renderers(conn, claimed)
    done = 0  # messages with a recorded outcome
    current: dlog.Claimed | None = None  # the message on the wire when an error comes
    try:
        with open_sender() as send:
            for msg in claimed:
                current = msg
                try:
                    out = renders[msg.id]()
                    if before_send is not None:
                        before_send()
                    provider_id = send(out)
                except PermanentError as exc:
                    _dead(conn, msg, token, str(exc), report)
                else:
                    dlog.mark_sent(conn, msg.id, token, provider_id, out.to, out.subject)
                    report.sent += 1
                current = None
                done += 1
    except PermanentError as exc:
        # Raised by opening the sender: nothing of this channel can go out until it is fixed.
        rest = claimed[done:]
        reason = f"could not open the {channel} sender: {exc}"
        dlog.mark_unsent(conn, [m.id for m in rest], token, scrub(reason), dead=True, tried=False)
        report.dead += len(rest)
        report.dead_reasons.append(scrub(reason))
        log.error("%d %s message(s) dead: %s", len(rest), channel, scrub(reason))
    except TransientError as exc:
        _release_after_transient(conn, token, claimed[done:], current, str(exc), report, channel, final=final)
    return report


def _release_after_transient(
    conn: Connection,
    token: int,
    rest: list[dlog.Claimed],
    current: dlog.Claimed | None,
    error: str,
    report: dlog.DeliveryReport,
    channel: str,
    *,
    final: bool,
) -> None:
    """After a transient error, the messages without an outcome go back to ``failed`` (``dead`` if ``final``)."""
    reason = scrub(error)
    report.transient_error = reason
    # On the wire: that message's attempt failed. Not on the wire: the session never opened.
    tried = [current.id] if current is not None else [m.id for m in rest]
    untried = [m.id for m in rest if m.id not in tried]
    dlog.mark_unsent(conn, tried, token, reason, dead=final, tried=True)
    dlog.mark_unsent(conn, untried, token, f"not attempted: {reason}", dead=final, tried=False)
    if final:
        report.dead += len(rest)
        report.dead_reasons.append(reason)
        log.warning("retries exhausted, %d %s message(s) dead: %s", len(rest), channel, scrub(reason))
    else:
        report.failed += len(rest)
