"""The outbox behind ``.delay()``: background tasks as rows, claimed by task workers in batches.

A call records one ``background_tasks`` row (one INSERT, and a NOTIFY that wakes the
workers at commit) and returns its id, the caller's handle. Task workers claim due rows
with ``FOR UPDATE SKIP LOCKED``, so two workers never take the same row, and send them in
batches. The row is the truth: its status, result and error are what the handle reports,
whatever happened to the Prefect API meanwhile.

States::

    queued --claim--> running --sent--> done
      ^                 |------transient, tries left---> retry --(not_before)--> claimed again
      |                 |------permanent or last try---> failed
      +--holder gone----+      (and queued/retry --revoke() or past expires_at--> revoked)

Who holds a ``running`` row: every task worker holds a PostgreSQL session-level advisory
lock (namespace ``HOLDER_NAMESPACE``, key ``holder``) on a connection of its own for as
long as it lives. The lock goes when the connection goes (a SIGKILLed worker included), so
a ``running`` row whose lock nobody holds was abandoned: any worker's next poll puts it back
to ``queued`` (within TASK_POLL_SECONDS), and the delivery log keeps each of its messages to
one send. Settling a row checks the holder, so a worker that lost its row cannot overwrite
what another worker did with it.

Functions that change rows take a Connection in AUTOCOMMIT mode (one committed statement
each) or an Engine; ``enqueue`` and ``revoke`` are what the backend calls.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from lib.db import advisory_session, lock_held
from lib.errors import InvalidInputError, no_nul

CHANNEL = "indostar_background_tasks"  # NOTIFY channel: a task became due now
HOLDER_NAMESPACE = 0x1D06  # classid of the workers' advisory locks (the delivery log's is 0x1D05)
FINAL = ("done", "failed", "revoked")
MAX_NAME = 64


@dataclass(frozen=True)
class Claimed:
    """A row a worker took: which task, with what, on which try (1 = first)."""

    id: uuid.UUID
    name: str
    params: dict[str, Any]
    tries: int


@dataclass(frozen=True)
class TaskRow:
    """What a handle reads."""

    id: uuid.UUID
    name: str
    status: str
    tries: int
    result: dict[str, Any] | None
    error: str | None
    error_type: str | None
    worker: str | None
    task_run_id: uuid.UUID | None
    created_at: dt.datetime
    finished_at: dt.datetime | None

    @property
    def ready(self) -> bool:
        return self.status in FINAL


@dataclass(frozen=True)
class Outcome:
    """How a worker settles a row it ran: done (result), retry (error, delay) or failed (error)."""

    id: uuid.UUID
    status: str  # done | retry | failed
    result: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None
    delay: float = 0.0


# ---- the backend's side ---------------------------------------------------------------------------

_ENQUEUE = text(
    """
    INSERT INTO background_tasks (id, name, params, not_before, expires_at)
    VALUES (:id, :name, :params, COALESCE(:eta, now() + make_interval(secs => :countdown)),
            COALESCE(:expires_at, now() + make_interval(secs => :expires_in)))
    ON CONFLICT (id) DO NOTHING
    RETURNING not_before <= now()
    """
).bindparams(bindparam("params", type_=JSONB))


def enqueue(
    engine: Engine,
    name: str,
    params: dict[str, Any],
    *,
    task_id: uuid.UUID | None = None,
    countdown: float = 0.0,
    eta: dt.datetime | None = None,
    expires_in: float | None = None,
    expires_at: dt.datetime | None = None,
) -> tuple[uuid.UUID, bool]:
    """Record one background task (one transaction); returns (its id, whether this call added it).

    ``countdown`` and ``expires_in`` count on the database's clock, so a backend whose clock
    drifts still gets the delay it asked for. A ``task_id`` already recorded adds nothing.
    """
    if not name or len(name) > MAX_NAME:
        raise InvalidInputError(f"task name must be 1-{MAX_NAME} characters")
    for value, what in ((eta, "eta"), (expires_at, "expires")):
        if value is not None and value.tzinfo is None:
            raise InvalidInputError(f"{what} must be a timezone-aware datetime (e.g. datetime.now(UTC) + ...)")
    for key, value in params.items():
        no_nul(value, key)
    task_id = task_id or uuid.uuid4()
    args = {
        "id": task_id,
        "name": name,
        "params": params,
        "eta": eta,
        "countdown": float(countdown),
        "expires_at": expires_at,
        "expires_in": None if expires_in is None else float(expires_in),
    }
    with engine.begin() as conn:
        due_now = conn.execute(_ENQUEUE, args).scalar()
        if due_now:
            # Delivered to the listening workers when this transaction commits, not before.
            conn.execute(text("SELECT pg_notify(:c, '')"), {"c": CHANNEL})
    return task_id, due_now is not None


def read(engine: Engine, task_id: uuid.UUID) -> TaskRow | None:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                """SELECT id, name, status, tries, result, error, error_type, worker, task_run_id, created_at,
                          finished_at FROM background_tasks WHERE id = :id"""
            ),
            {"id": task_id},
        ).one_or_none()
    return TaskRow(**row._mapping) if row else None


def revoke(engine: Engine, task_id: uuid.UUID, reason: str = "revoked by the caller") -> bool:
    """Cancel a task that has not started (queued or waiting to retry); True if this call revoked it."""
    with engine.begin() as conn:
        done = conn.execute(
            text(
                """UPDATE background_tasks SET status = 'revoked', error = :reason, error_type = 'TaskRevokedError',
                          finished_at = now(), updated_at = now()
                    WHERE id = :id AND status IN ('queued', 'retry') RETURNING id"""
            ),
            {"id": task_id, "reason": reason},
        ).first()
    return done is not None


# ---- the worker's side -------------------------------------------------------------------------


@contextmanager
def holder(engine: Engine) -> Iterator[tuple[Connection, int]]:
    """An AUTOCOMMIT connection holding a new worker's advisory lock for as long as the block runs.

    The same connection LISTENs for new tasks (``wait``), so it is the worker's own, not pooled work.
    """
    with advisory_session(engine, HOLDER_NAMESPACE) as (conn, key):
        conn.execute(text(f"LISTEN {CHANNEL}"))
        try:
            yield conn, key
        finally:
            if not conn.invalidated and not conn.closed:  # a dead connection took its LISTEN along
                conn.execute(text(f"UNLISTEN {CHANNEL}"))


def wait(conn: Connection, timeout: float) -> bool:
    """Block until a NOTIFY arrives on the holder's connection or ``timeout`` passes; True if one came."""
    import select

    raw: Any = conn.connection.dbapi_connection
    raw.poll()
    if not raw.notifies:
        select.select([raw], [], [], max(timeout, 0.0))
        raw.poll()
    woke = bool(raw.notifies)
    raw.notifies.clear()
    return woke


_HELD = lock_held(HOLDER_NAMESPACE, "t.holder")


def reclaim_abandoned(conn: Connection) -> list[uuid.UUID]:
    """Put ``running`` rows whose worker is gone (its lock released: killed, crashed) back to ``queued``."""
    rows = conn.execute(
        text(
            f"""UPDATE background_tasks t SET status = 'queued', holder = NULL, not_before = now(), updated_at = now()
                 WHERE t.status = 'running' AND NOT {_HELD} RETURNING t.id"""
        )
    )
    return [r[0] for r in rows]


def expire(conn: Connection) -> list[uuid.UUID]:
    """Revoke waiting rows past their ``expires_at``: never sent, reported REVOKED with the reason."""
    rows = conn.execute(
        text(
            """UPDATE background_tasks SET status = 'revoked', error_type = 'TaskRevokedError',
                      error = 'expired at ' || to_char(expires_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
                              || ' before it ran',
                      finished_at = now(), updated_at = now()
                WHERE status IN ('queued', 'retry') AND expires_at <= now() RETURNING id"""
        )
    )
    return [r[0] for r in rows]


_CLAIM = text(
    """
    WITH c AS (
        SELECT id FROM background_tasks
         WHERE status IN ('queued', 'retry') AND not_before <= now()
           AND (expires_at IS NULL OR expires_at > now())
         ORDER BY not_before
         LIMIT :limit
         FOR UPDATE SKIP LOCKED
    )
    UPDATE background_tasks t SET status = 'running', holder = :holder, worker = :worker, tries = t.tries + 1,
           updated_at = now()
      FROM c WHERE t.id = c.id
    RETURNING t.id, t.name, t.params, t.tries
    """
)


def claim(conn: Connection, holder_key: int, worker: str, limit: int) -> list[Claimed]:
    """Take up to ``limit`` due rows for this worker (committed), oldest due first."""
    rows = conn.execute(_CLAIM, {"limit": limit, "holder": holder_key, "worker": worker[:128]})
    return [Claimed(**r._mapping) for r in rows]


def next_due_in(conn: Connection) -> float | None:
    """Seconds until the earliest waiting row is due (0 if one is due now), None if nothing waits."""
    value = conn.execute(
        text(
            """SELECT GREATEST(EXTRACT(EPOCH FROM min(not_before) - now()), 0) FROM background_tasks
                WHERE status IN ('queued', 'retry')"""
        )
    ).scalar()
    return None if value is None else float(value)


def mark_task_run(conn: Connection, holder_key: int, ids: Sequence[uuid.UUID], task_run_id: uuid.UUID) -> None:
    """Name the Prefect task run sending these rows (what an operator opens in the UI)."""
    conn.execute(
        text("UPDATE background_tasks SET task_run_id = :run WHERE id = ANY(:ids) AND holder = :h"),
        {"run": task_run_id, "ids": list(ids), "h": holder_key},
    )


_SETTLE = text(
    """
    UPDATE background_tasks t SET status = o.status, result = o.result, error = o.error, error_type = o.error_type,
           not_before = now() + make_interval(secs => o.delay),
           holder = CASE WHEN o.status = 'retry' THEN NULL ELSE t.holder END,
           finished_at = CASE WHEN o.status IN ('done', 'failed') THEN now() END,
           updated_at = now()
      FROM jsonb_to_recordset(:outcomes) AS o(id uuid, status text, result jsonb, error text, error_type text,
                                                delay float8)
     WHERE t.id = o.id AND t.holder = :holder AND t.status = 'running'
    RETURNING t.id
    """
).bindparams(bindparam("outcomes", type_=JSONB))


def settle(conn: Connection, holder_key: int, outcomes: Sequence[Outcome]) -> list[uuid.UUID]:
    """Record how each row ended, the whole batch in one statement; returns the ids this worker still held."""
    if not outcomes:
        return []
    rows = [
        {
            "id": str(o.id),
            "status": o.status,
            "result": o.result,
            "error": o.error[:2000] if o.error else None,
            "error_type": o.error_type,
            "delay": float(o.delay),
        }
        for o in outcomes
    ]
    return [r[0] for r in conn.execute(_SETTLE, {"outcomes": rows, "holder": holder_key})]


def requeue_held(conn: Connection, holder_key: int, busy: Sequence[uuid.UUID]) -> int:
    """Queue again the rows this worker holds but is not sending (a batch that failed before it settled)."""
    return len(
        conn.execute(
            text(
                """UPDATE background_tasks SET status = 'queued', holder = NULL, not_before = now(), updated_at = now()
                    WHERE holder = :h AND status = 'running' AND NOT (id = ANY(CAST(:busy AS uuid[])))
                   RETURNING id"""
            ),
            {"h": holder_key, "busy": [str(b) for b in busy]},
        ).all()
    )


def release(conn: Connection, holder_key: int) -> int:
    """Give back every row this worker still holds (on shutdown): queued again, the try not counted."""
    return len(
        conn.execute(
            text(
                """UPDATE background_tasks SET status = 'queued', holder = NULL, tries = GREATEST(tries - 1, 0),
                          updated_at = now()
                    WHERE holder = :h AND status = 'running' RETURNING id"""
            ),
            {"h": holder_key},
        ).all()
    )


# ---- retention ----------------------------------------------------------------------


def delete_finished(session: Session, before: dt.datetime, limit: int) -> int:
    """Delete up to ``limit`` rows finished (done, failed, revoked) before ``before``; their handles are gone."""
    return len(
        session.execute(
            text(
                """DELETE FROM background_tasks WHERE id IN (
                       SELECT id FROM background_tasks WHERE finished_at < :before
                        ORDER BY finished_at LIMIT :limit FOR UPDATE SKIP LOCKED)
                   RETURNING id"""
            ),
            {"before": before, "limit": limit},
        ).all()
    )
