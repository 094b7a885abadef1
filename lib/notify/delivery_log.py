"""The delivery log: one ``notifications`` row per message, keyed by its idempotency key.

States::

    pending --claim--> sending --accepted--> sent
       ^                  |----transient---> failed --claim--> sending ...
       |                  |----permanent---> dead   (also: retries exhausted)
       +----replay (dead rows only)-----------+

A row is recorded ``pending`` (INSERT ... ON CONFLICT DO NOTHING: a rerun adds nothing),
or ``dead`` at once when its address is already known to be bad. Sending is claimed one
committed step at a time, so a crash can resend at most the one message that was on the
wire: ``claim`` moves a batch to ``sending`` (with the delivery session's lock key and the
time) in one committed statement, and each message is marked ``sent`` in its own
committed statement right after the provider accepted it.

Who holds a ``sending`` row: every delivery session holds a PostgreSQL session-level
advisory lock (namespace ``LOCK_NAMESPACE``, key ``claimed_by``) for as long as it sends.
The lock goes when its connection goes (a killed worker included), so a ``sending`` row
whose lock nobody holds was abandoned mid-send; the next claim takes it back (``recovered``:
it may have reached the provider once already, which the run's artifact reports).

The functions that change rows take a Connection in AUTOCOMMIT mode and run one statement
each, so every state change is committed the moment it is made: this module is the one
place that commits inside a call, because committing around each send is its purpose.
Read-only and bulk functions take a Session and never commit.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from lib.db import advisory_session, lock_held
from lib.errors import InvalidInputError
from lib.models import NOTIFICATION_STATUSES, Notification

SENDABLE = ("pending", "failed")  # statuses a claim takes (besides abandoned `sending` rows)
# SENDABLE as an SQL list, for IN: a literal of this module's constants, so the statements' text stays fixed.
_SENDABLE_SQL = ", ".join(f"'{status}'" for status in SENDABLE)
# classid of our advisory locks; the objid is the delivery session's random key (claimed_by).
LOCK_NAMESPACE = 0x1D05
MAX_ERROR = 2000
# Every key a request derives (its prefix, ids, the caller's key, the channel) must fit the column.
KEY_LENGTH: int = Notification.__table__.c.idempotency_key.type.length  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Message:
    """A message to record: what it is about (``intent``), where it goes, under which key."""

    key: str
    channel: str  # email | sms
    kind: str  # lib.models.MESSAGE_KINDS
    recipient: str
    intent: dict[str, Any]
    template: str | None = None
    subject: str | None = None
    error: str | None = None  # set: recorded dead at once (e.g. the customer's address is malformed)

    def __post_init__(self) -> None:
        # Checked where the key is built, so an over-long key is bad input before any row is written,
        # not a database error halfway through a batch.
        if len(self.key) > KEY_LENGTH:
            raise InvalidInputError(
                f"the delivery-log key {self.key[:40]!r}... would be {len(self.key)} characters, more than the "
                f"{KEY_LENGTH} the log holds; use a shorter idempotency_key"
            )


@dataclass(frozen=True)
class Claimed:
    """A row claimed for sending by this session."""

    id: int
    key: str
    channel: str
    kind: str
    template: str | None
    recipient: str
    intent: dict[str, Any]
    attempts: int
    cleared: bool  # the intent's text was removed by retention
    recovered: bool  # it was `sending` under a session that is gone: maybe sent once already


@dataclass
class DeliveryReport:
    """What one delivery pass did; ``transient_error`` set means a retry may finish the job."""

    sent: int = 0
    dead: int = 0
    failed: int = 0
    skipped: int = 0
    recovered: int = 0
    transient_error: str | None = None
    dead_reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "sent": self.sent,
            "dead": self.dead,
            "failed": self.failed,
            "skipped": self.skipped,
            "recovered": self.recovered,
        }


# ---- recording (a Session; the caller commits) ---------------------------------------------------


def record(session: Session, messages: Sequence[Message]) -> int:
    """Insert each message (pending, or dead with its error) unless its key exists; returns rows added."""
    if not messages:
        return 0
    rows = [
        {
            "idempotency_key": m.key,
            "channel": m.channel,
            "kind": m.kind,
            "template": m.template,
            "recipient": m.recipient[:320],
            "subject": m.subject[:300] if m.subject else None,
            "payload": m.intent,
            "status": "dead" if m.error else "pending",
            "last_error": m.error[:MAX_ERROR] if m.error else None,
        }
        for m in messages
    ]
    stmt = insert(Notification).on_conflict_do_nothing(index_elements=["idempotency_key"]).returning(Notification.id)
    return len(session.connection().execute(stmt, rows).all())


# ---- the delivery session: claims and marks, each committed by itself ----------------------------


@contextmanager
def delivery_session(engine: Engine, *, durable: bool | None = None) -> Iterator[tuple[Connection, int]]:
    """An AUTOCOMMIT connection holding this session's advisory lock; yields (connection, lock key).

    Unless ``durable`` (default: NOTIFICATION_DURABLE_MARKS), the session's commits do not wait
    for the WAL flush (synchronous_commit off): a commit is visible and kept the moment it
    returns, so a killed worker loses nothing, but a PostgreSQL crash may forget the last
    fraction of a second of marks (those messages would go out again). Waiting for the disk
    on every message made a send cost several times what the SMTP round trip costs.
    """
    from lib.config import get_settings

    durable = get_settings().notification_durable_marks if durable is None else durable
    with advisory_session(engine, LOCK_NAMESPACE) as (conn, token):
        if not durable:
            conn.execute(text("SET synchronous_commit = off"))
        try:
            yield conn, token
        finally:
            # A session-level setting would outlive us on the pooled connection.
            conn.execute(text("RESET synchronous_commit"))


# A `sending` row is abandoned when no session of this database holds the advisory lock it names.
_ABANDONED = f"n.status = 'sending' AND NOT {lock_held(LOCK_NAMESPACE, 'n.claimed_by')}"

_CLAIM = text(
    f"""
    WITH c AS (
        SELECT n.id, n.status AS was FROM notifications n
         WHERE n.idempotency_key = ANY(:keys) AND (:channel IS NULL OR n.channel = :channel)
           AND (n.status IN ({_SENDABLE_SQL}) OR ({_ABANDONED}))
         ORDER BY n.id
         FOR UPDATE OF n SKIP LOCKED
    )
    UPDATE notifications n SET status = 'sending', claimed_by = :token, claimed_at = now(), updated_at = now()
      FROM c WHERE n.id = c.id
    RETURNING n.id, n.idempotency_key AS key, n.channel, n.kind, n.template, n.recipient, n.payload AS intent,
              n.attempts, n.payload_cleared_at IS NOT NULL AS cleared, c.was = 'sending' AS recovered
    """
)


def claim(conn: Connection, keys: Sequence[str], token: int, channel: str | None = None) -> list[Claimed]:
    """Move the sendable rows among ``keys`` to ``sending`` under ``token`` (committed); oldest first.

    Sendable: pending, failed, or sending under a session that is gone. Rows another live
    session holds are skipped.
    """
    if not keys:
        return []
    rows = conn.execute(_CLAIM, {"keys": list(keys), "channel": channel, "token": token}).all()
    return sorted((Claimed(**r._mapping) for r in rows), key=lambda c: c.id)


_MARK_SENT = (
    "UPDATE notifications SET status = 'sent', provider_message_id = %s, sent_at = now(), updated_at = now(), "
    "attempts = attempts + 1, last_error = NULL, recipient = %s, subject = coalesce(%s, subject), "
    "claimed_by = NULL WHERE id = %s AND status = 'sending' AND claimed_by = %s"
)


def mark_sent(conn: Connection, msg_id: int, token: int, provider_id: str, to: str, subject: str | None) -> None:
    """Record that the provider accepted the message (one committed statement).

    On the driver's cursor: it runs once per message sent, where SQLAlchemy's statement
    handling would cost as much client time as the UPDATE itself.
    """
    params = (provider_id[:200], to[:320], subject[:300] if subject else None, msg_id, token)
    conn.exec_driver_sql(_MARK_SENT, params)


def mark_unsent(conn: Connection, ids: Sequence[int], token: int, error: str, *, dead: bool, tried: bool) -> None:
    """Release rows with an error: ``failed`` (claimable again) or ``dead``; count the attempt if tried."""
    if not ids:
        return
    conn.execute(
        update(Notification)
        .where(
            Notification.id.in_(bindparam("ids", expanding=True)),
            Notification.status == "sending",
            Notification.claimed_by == token,
        )
        .values(
            status="dead" if dead else "failed",
            last_error=error[:MAX_ERROR],
            attempts=Notification.attempts + (1 if tried else 0),
            claimed_by=None,
            updated_at=text("now()"),
        ),
        {"ids": list(ids)},
    )


# ---- reading, replaying, sweeping and retention (a Session; the caller commits) --------------------


def summary_by_key(session: Session, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Kind, template, channel, status and last error of each of the keys' rows, by key."""
    if not keys:
        return {}
    # One array parameter: an IN list of a night's thousands of keys costs more to build than to run.
    rows = session.execute(
        text(
            "SELECT idempotency_key, kind, template, channel, status, last_error FROM notifications "
            "WHERE idempotency_key = ANY(CAST(:keys AS varchar[]))"
        ),
        {"keys": list(keys)},
    )
    return {key: {"kind": k, "template": t, "channel": c, "status": s, "last_error": e} for key, k, t, c, s, e in rows}


def summary_rows(session: Session, keys: Sequence[str]) -> list[dict[str, Any]]:
    """Template, channel, status and last error of each of the keys' rows."""
    return list(summary_by_key(session, keys).values())


def find_dead(
    session: Session,
    ids: Sequence[int] | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 10_000,
) -> list[tuple[str, str]]:
    """(key, channel) of dead messages by id and/or last-update window [since, until), oldest first."""
    stmt = select(Notification.idempotency_key, Notification.channel).where(Notification.status == "dead")
    if ids is not None:
        stmt = stmt.where(Notification.id.in_(list(ids)))
    if since is not None:
        stmt = stmt.where(Notification.updated_at >= since)
    if until is not None:
        stmt = stmt.where(Notification.updated_at < until)
    return [(str(k), str(c)) for k, c in session.execute(stmt.order_by(Notification.id).limit(limit))]


def requeue(session: Session, keys: Sequence[str]) -> int:
    """Dead rows among ``keys`` back to pending (a replay); sent rows are never touched."""
    if not keys:
        return 0
    result = session.execute(
        update(Notification)
        .where(Notification.idempotency_key.in_(list(keys)), Notification.status == "dead")
        .values(status="pending", updated_at=text("now()"))
    )
    return int(getattr(result, "rowcount", 0) or 0)


def stuck(session: Session, older_than_minutes: int, limit: int = 10_000) -> list[tuple[str, str]]:
    """(key, channel) of messages nobody is finishing: abandoned `sending` rows, and pending/failed
    rows untouched for ``older_than_minutes`` (a run that died before delivering them)."""
    # The age is measured on the database's clock, which stamped updated_at: a worker whose clock is
    # off would otherwise take a fresh row for a stuck one (and send it beside its own run).
    rows = session.execute(
        text(
            f"SELECT n.idempotency_key, n.channel FROM notifications n WHERE ({_ABANDONED}) OR "
            f"(n.status IN ({_SENDABLE_SQL}) AND n.updated_at < now() - make_interval(mins => :m)) "
            "ORDER BY n.id LIMIT :n"
        ),
        {"m": older_than_minutes, "n": limit},
    )
    return [(str(k), str(c)) for k, c in rows]


# Plain and templated kinds carry their text in the payload; business and token kinds carry
# only references, which stay so that an old dead letter can still be replayed.
TEXT_KINDS = ("email", "sms", "templated")


def _on_finished_batch(session: Session, action: str, also: str, params: dict[str, Any]) -> int:
    """``action`` on up to ``:n`` sent or dead rows last touched before ``:t`` (and ``also``), by id; the row count."""
    result = session.execute(
        text(
            f"{action} WHERE id = ANY(ARRAY("
            f"  SELECT id FROM notifications WHERE status IN ('sent', 'dead') AND updated_at < :t {also}"
            "  ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED))"
        ),
        params,
    )
    return int(getattr(result, "rowcount", 0) or 0)


def clear_payloads(session: Session, before: dt.datetime, batch: int) -> int:
    """Empty the payload of up to ``batch`` finished text messages last touched before ``before``."""
    return _on_finished_batch(
        session,
        "UPDATE notifications SET payload = '{}'::jsonb, payload_cleared_at = now()",
        "AND kind = ANY(:kinds) AND payload_cleared_at IS NULL",
        {"t": before, "kinds": list(TEXT_KINDS), "n": batch},
    )


def delete_finished(session: Session, before: dt.datetime, batch: int) -> int:
    """Delete up to ``batch`` sent or dead rows last touched before ``before``."""
    return _on_finished_batch(session, "DELETE FROM notifications", "", {"t": before, "n": batch})


# ---- summaries (pure; plain Python: the notification path does not load pandas) --------------------


def summary_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages by kind, channel and status, sorted, statuses in lifecycle order: artifact rows."""
    order = {s: i for i, s in enumerate(NOTIFICATION_STATUSES)}
    counts = Counter((r["kind"], r["channel"], r["status"]) for r in rows)
    return [
        {"kind": k, "channel": c, "status": s, "messages": n}
        for (k, c, s), n in sorted(counts.items(), key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], 99)))
    ]


def counts_by_status(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many of the rows are in each status, every status present (zero if none)."""
    counts = dict.fromkeys(NOTIFICATION_STATUSES, 0)
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts
