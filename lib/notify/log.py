"""The delivery log: one ``notifications`` row per message, keyed by its idempotency key.

A message is recorded ``pending`` (INSERT ... ON CONFLICT DO NOTHING, so a rerun adds
nothing), then becomes ``sent`` (provider message id, sent_at), ``failed`` (a transient
error; will be retried) or ``dead`` (permanent error or retries exhausted; last_error
kept). Only pending and failed rows are ever claimed for sending, with
``FOR UPDATE SKIP LOCKED``, so a sent message is never sent again and two runs at once
never send the same row. Functions take a session and never commit.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sqlalchemy import bindparam, select, text, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from lib.models import NOTIFICATION_STATUSES, Notification

SENDABLE = ("pending", "failed")


@dataclass(frozen=True)
class Outgoing:
    """A rendered message ready for the log; ``error`` set means it is recorded dead at once."""

    key: str
    channel: str
    template: str | None
    recipient: str
    subject: str | None
    payload: dict[str, Any]
    error: str | None = None


@dataclass(frozen=True)
class Claimed:
    id: int
    key: str
    channel: str
    template: str | None
    recipient: str
    payload: dict[str, Any]
    attempts: int


@dataclass
class Outcome:
    """What one delivery pass did; ``transient_error`` set means a retry may finish the job."""

    sent: int = 0
    dead: int = 0
    failed: int = 0
    skipped: int = 0
    transient_error: str | None = None
    dead_reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {"sent": self.sent, "dead": self.dead, "failed": self.failed, "skipped": self.skipped}


def record(session: Session, messages: list[Outgoing]) -> int:
    """Insert each message (pending, or dead with its error) unless its key exists; returns rows added."""
    if not messages:
        return 0
    rows = [
        {
            "idempotency_key": m.key,
            "channel": m.channel,
            "template": m.template,
            "recipient": m.recipient[:320],
            "subject": (m.subject or None) and m.subject[:300],
            "payload": m.payload,
            "status": "dead" if m.error else "pending",
            "last_error": m.error,
        }
        for m in messages
    ]
    # executemany + RETURNING: SQLAlchemy batches it into multi-row INSERTs (insertmanyvalues).
    stmt = (
        insert(Notification.__table__)
        .on_conflict_do_nothing(index_elements=["idempotency_key"])
        .returning(Notification.__table__.c.id)
    )
    added = len(session.connection().execute(stmt, rows).all())
    return added


def claim(session: Session, keys: list[str], channel: str | None = None) -> list[Claimed]:
    """Lock the sendable rows among ``keys`` (pending or failed), skipping rows another run holds."""
    if not keys:
        return []
    n = Notification.__table__.c
    stmt = (
        select(n.id, n.idempotency_key, n.channel, n.template, n.recipient, n.payload, n.attempts)
        .where(n.idempotency_key.in_(keys), n.status.in_(SENDABLE))
        .order_by(n.id)
        .with_for_update(skip_locked=True)
    )
    if channel:
        stmt = stmt.where(n.channel == channel)
    return [Claimed(*row) for row in session.execute(stmt)]


_MARK_SENT = text(
    """
    UPDATE notifications AS n
       SET status = 'sent', provider_message_id = v.pid, sent_at = now(), updated_at = now(),
           attempts = n.attempts + 1, last_error = NULL
      FROM unnest(CAST(:ids AS bigint[]), CAST(:pids AS text[])) AS v(id, pid)
     WHERE n.id = v.id
    """
)


def mark_sent(session: Session, sent: list[tuple[int, str]]) -> None:
    """Mark rows sent with their provider message ids, in one statement."""
    if sent:
        session.execute(_MARK_SENT, {"ids": [i for i, _ in sent], "pids": [p for _, p in sent]})


def mark_failed(session: Session, ids: list[int], error: str, dead: bool, tried: bool = True) -> None:
    """Record an error on rows: ``failed`` (will be retried) or ``dead``; count the attempt if tried."""
    if not ids:
        return
    session.execute(
        update(Notification)
        .where(Notification.id.in_(bindparam("ids", expanding=True)))
        .values(
            status="dead" if dead else "failed",
            last_error=error[:2000],
            attempts=Notification.attempts + (1 if tried else 0),
            updated_at=text("now()"),
        ),
        {"ids": ids},
    )


def summary_rows(session: Session, keys: list[str]) -> list[dict[str, Any]]:
    """Template, channel, status and last error of each of the keys' rows."""
    if not keys:
        return []
    rows = session.execute(
        select(Notification.template, Notification.channel, Notification.status, Notification.last_error).where(
            Notification.idempotency_key.in_(keys)
        )
    )
    return [{"template": t, "channel": c, "status": s, "last_error": e} for t, c, s, e in rows]


def find_dead(
    session: Session,
    ids: list[int] | None = None,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = 10_000,
) -> list[tuple[str, str]]:
    """(key, channel) of dead messages by id and/or last-update window, oldest first."""
    stmt = select(Notification.idempotency_key, Notification.channel).where(Notification.status == "dead")
    if ids is not None:
        stmt = stmt.where(Notification.id.in_(ids))
    if since is not None:
        stmt = stmt.where(Notification.updated_at >= since)
    if until is not None:
        stmt = stmt.where(Notification.updated_at < until)
    return [tuple(r) for r in session.execute(stmt.order_by(Notification.id).limit(limit))]


def requeue(session: Session, keys: list[str]) -> int:
    """Dead rows among ``keys`` back to pending (a replay); sent rows are never touched."""
    if not keys:
        return 0
    result = session.execute(
        update(Notification)
        .where(Notification.idempotency_key.in_(keys), Notification.status == "dead")
        .values(status="pending", updated_at=text("now()"))
    )
    return result.rowcount or 0


def summary_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Messages by template, channel and status (pure): columns template, channel, status, messages."""
    columns = ["template", "channel", "status"]
    frame = pd.DataFrame(rows, columns=columns)
    if frame.empty:
        return pd.DataFrame(columns=[*columns, "messages"])
    frame["template"] = frame["template"].fillna("(plain)")
    out = frame.groupby(columns, sort=True).size().reset_index(name="messages")
    order = {s: i for i, s in enumerate(NOTIFICATION_STATUSES)}
    out = out.sort_values(["template", "channel", "status"], key=lambda c: c.map(order) if c.name == "status" else c)
    return out.reset_index(drop=True)


def counts_by_status(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many of the rows are in each status, every status present (zero if none)."""
    counts = dict.fromkeys(NOTIFICATION_STATUSES, 0)
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts
