"""Background tasks: the messages a customer waits for, sent by a warm task worker in batches.

Where a customer waits (OTP, password reset, order confirmation) a deployment run is too
slow (a process start and Prefect's imports per message). ``indostar_client.tasks`` records
each ``.delay()`` as one row of the outbox (lib.outbox: one INSERT and a NOTIFY); a task
worker (``indostar-jobs task-worker``, ``TaskWorker`` here) wakes on the NOTIFY, claims
the due rows with SKIP LOCKED and sends them as one batch: every row's messages recorded
in the delivery log in one transaction, then one SMTP session and one pooled HTTP client
for the batch. Each batch is one Prefect task run (``send-background-batch``), so the UI
shows every send; the rows keep each task's own status, result and error, which is what a
caller's handle reads.

The same lib request and delivery code as the flows (flows.notifications): one message
per delivery-log key, dead letters, masking, transient-only retries with the shared
policy (a row waits in ``retry`` until its next try is due). A row without a caller's
key is keyed by its own id (``task-<id>``): every ``.delay()`` sends, and a retried or
recovered row sends once, with one OTP or link. A worker that dies loses nothing: its
rows are taken back by any live worker within TASK_POLL_SECONDS (lib.outbox). When the
Prefect API does not answer, a worker keeps sending and says so; the rows stay the record.
Webhooks: with TASK_WEBHOOK_URL set, each task that ends is POSTed there (flows.hooks).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.hooks import background_task_failed, background_task_finished
from flows.notifications import deliver_email_keys, deliver_sms_keys, undelivered_error
from lib import db, outbox, retry, tokens
from lib.errors import is_transient, rebuild
from lib.notify import delivery_log as dlog
from lib.notify import kinds
from lib.notify import requests as req
from lib.notify.address import scrub
from lib.notify.templates import environment
from lib.worker_metrics import record_task

log = logging.getLogger(__name__)

# ---- the tasks: one per message kind (lib.notify.kinds) ---------------------------------------------


def build_request(row: outbox.Claimed) -> req.MessageRequest:
    """The request a row names; without a caller's key the row's own id keys its messages."""
    params = dict(row.params)
    key = params.pop(kinds.KEY, None) or f"task-{row.id}"
    return kinds.by_task(row.name).request(params, key)


# ---- one batch -------------------------------------------------------------------------------------


@dataclass
class _Batch:
    """The rows of one batch and what became of each."""

    rows: Sequence[outbox.Claimed]
    keys: dict[uuid.UUID, tuple[list[str], list[str]]] = field(default_factory=dict)  # row -> (emails, sms)
    outcomes: dict[uuid.UUID, outbox.Outcome] = field(default_factory=dict)
    errors: dict[uuid.UUID, Exception] = field(default_factory=dict)  # a delivery pass that raised, per row

    def record(self) -> None:
        """Every row's messages into the delivery log, one transaction; a row with bad input fails alone."""
        with db.session_scope() as s:
            for row in self.rows:
                try:
                    with s.begin_nested():
                        made = build_request(row).build(s)
                        dlog.record(s, made.messages)
                except Exception as exc:  # noqa: BLE001 - the row fails with its reason, the others go on
                    self.outcomes[row.id] = _failure(row, exc)
                else:
                    self.keys[row.id] = (made.keys("email"), made.keys("sms"))

    def deliver(self) -> None:
        """Send the recorded messages: rows on their last try apart, so only they mark messages dead."""
        waiting = [r for r in self.rows if r.id in self.keys]
        for final in (False, True):
            group = [r for r in waiting if retry.is_final(r.tries) == final]
            emails = [k for r in group for k in self.keys[r.id][0]]
            texts = [k for r in group for k in self.keys[r.id][1]]
            for keys, send in ((emails, deliver_email_keys), (texts, deliver_sms_keys)):
                if not keys:
                    continue
                try:
                    send(keys, final=final)
                except Exception as exc:  # noqa: BLE001 - e.g. the SMTP server refused the session
                    for r in group:
                        self.errors[r.id] = exc

    def settle(self) -> None:
        """Each row's outcome from its messages' rows in the delivery log."""
        with db.session_scope() as s:
            summary = dlog.summary_by_key(s, [k for e, t in self.keys.values() for k in e + t])
        for row in self.rows:
            if row.id in self.outcomes:
                continue
            emails, texts = self.keys[row.id]
            rows = [summary[k] for k in emails + texts if k in summary]
            counts: dict[str, Any] = dlog.counts_by_status(rows)
            error: BaseException | None = self.errors.get(row.id) or undelivered_error(row.name, counts, rows)
            if error is None:
                self.outcomes[row.id] = outbox.Outcome(row.id, "done", result=counts)
            else:
                self.outcomes[row.id] = _failure(row, error)


def _failure(row: outbox.Claimed, exc: BaseException) -> outbox.Outcome:
    """Retry later what may pass (while tries are left), fail the rest with the reason."""
    message = scrub(str(exc))[:2000] or type(exc).__name__
    if is_transient(exc) and not retry.is_final(row.tries):
        return outbox.Outcome(
            row.id, "retry", error=message, error_type=type(exc).__name__, delay=retry.delay_after(row.tries)
        )
    return outbox.Outcome(row.id, "failed", error=message, error_type=type(exc).__name__)


def run_batch(rows: Sequence[outbox.Claimed]) -> dict[uuid.UUID, outbox.Outcome]:
    """Record, deliver and settle one batch of claimed rows (no Prefect, no outbox writes)."""
    batch = _Batch(rows)
    batch.record()
    if batch.keys:
        batch.deliver()
        batch.settle()
    return batch.outcomes


@task(
    name="send-background-batch",
    task_run_name="send {size} background task(s)",
    cache_policy=NO_CACHE,
    persist_result=False,
    retries=0,  # a row retries on its own schedule (status retry), not the whole batch
)
def send_background_batch(size: int, task_ids: list[str], run: Callable[[], dict[str, int]]) -> dict[str, int]:
    """One batch of background tasks (the ids are the rows in background_tasks); returns rows by outcome."""
    return run()


# ---- the task worker ------------------------------------------------------------------------------


def warm_up() -> None:
    """Open what the first message needs (database pool, Redis, the templates), so it does not pay for it."""
    db.ping()
    tokens.ping()
    environment().get_template("order_confirmation.txt")


class TaskWorker:
    """Claims due rows in batches and sends them, up to ``concurrency`` batches at a time, until ``stop()``."""

    API_RETRY_SECONDS = 30.0
    RECONNECT_SECONDS = (0.5, 1.0, 2.0, 5.0)  # waits before connecting again after losing the database

    def __init__(self, batch_size: int, concurrency: int, poll_seconds: float) -> None:
        self.batch_size = batch_size
        self.concurrency = concurrency
        self.poll_seconds = poll_seconds
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._slots = threading.BoundedSemaphore(concurrency)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="background-batch")
        self._holder = 0
        self._api_down_until = 0.0
        self._in_flight: set[uuid.UUID] = set()  # rows of the batches being sent now
        self._lock = threading.Lock()

    def stop(self) -> None:
        self._stop.set()

    def run(self, ready: Callable[[], None] | None = None) -> None:
        """Listen and send until ``stop()``; then finish the batches in hand and give back anything else.

        When the worker's own connection dies (PostgreSQL restarted, a proxy cut it) it connects again
        under a new holder key; the rows it held under the old one are taken back by the lock test.
        """
        failures = 0
        while not self._stop.is_set():
            try:
                self._listen(ready)
                return
            except Exception as exc:
                if not is_transient(exc):  # a lost connection is transient; anything else stops the worker
                    raise
                wait = self.RECONNECT_SECONDS[min(failures, len(self.RECONNECT_SECONDS) - 1)]
                failures += 1
                print(
                    f"task worker {self.name} lost its database connection ({type(exc).__name__}); "
                    f"connecting again in {wait:g} s",
                    flush=True,
                )
                ready = None
                self._stop.wait(wait)
        self._pool.shutdown(wait=True)

    def _listen(self, ready: Callable[[], None] | None) -> None:
        engine = db.get_engine()
        with outbox.holder(engine) as (conn, key):
            self._holder = key
            print(
                f"task worker {self.name} listening (holder {key}): {len(kinds.KINDS)} background tasks",
                flush=True,
            )
            if ready:
                ready()
            housekept = 0.0
            while not self._stop.is_set():
                if time.monotonic() - housekept >= self.poll_seconds:
                    self._housekeeping(conn)
                    housekept = time.monotonic()
                if self._take(conn):
                    continue
                due = outbox.next_due_in(conn)
                outbox.wait(conn, self.poll_seconds if due is None else min(self.poll_seconds, due + 0.01))
            self._pool.shutdown(wait=True)
            if released := outbox.release(conn, key):
                print(f"task worker {self.name} gave back {released} unfinished task(s)", flush=True)

    def _housekeeping(self, conn: Any) -> None:
        if taken := outbox.reclaim_abandoned(conn):
            log.warning("took back %d background task(s) of a worker that is gone: %s", len(taken), taken[:10])
            print(f"task worker {self.name} took back {len(taken)} task(s) of a stopped worker", flush=True)
        with self._lock:
            busy = list(self._in_flight)
        if stranded := outbox.requeue_held(conn, self._holder, busy):
            # A batch of ours that failed before it settled (e.g. the database went away mid-batch).
            log.warning("%d background task(s) of a batch that did not settle queued again", stranded)
        if expired := outbox.expire(conn):
            log.info("%d background task(s) expired before they ran", len(expired))

    def _take(self, conn: Any) -> bool:
        """Claim and start one batch if a slot is free; True if a full batch was taken (look again at once)."""
        if not self._slots.acquire(timeout=self.poll_seconds):
            return False
        rows = outbox.claim(conn, self._holder, self.name, self.batch_size)
        if not rows:
            self._slots.release()
            return False
        with self._lock:
            self._in_flight.update(r.id for r in rows)
        self._pool.submit(self._send, rows, self._holder)
        return len(rows) == self.batch_size

    def _send(self, rows: list[outbox.Claimed], key: int) -> None:
        try:
            ids = [str(r.id) for r in rows]
            counts, where = self._in_task_run(rows, ids, key)
            outcome = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
            print(f"batch {where} sent {len(rows)} task(s) [{outcome}]: {' '.join(ids)}", flush=True)
        except Exception:
            # The rows stay running under this worker until its next housekeeping queues them again
            # (or another worker takes them if this one dies). Say so loudly: the batch did not settle.
            log.exception("a background batch of %d task(s) failed before it settled", len(rows))
        finally:
            with self._lock:
                self._in_flight.difference_update(r.id for r in rows)
            self._slots.release()

    def _in_task_run(self, rows: list[outbox.Claimed], ids: list[str], key: int) -> tuple[dict[str, int], str]:
        """Run the batch as a Prefect task run; if the API does not answer, run it here and say so.

        Returns (rows by outcome, where it ran: the task run's id or "local")."""
        done: dict[str, Any] = {}  # "where" once the batch started, "counts" once it settled

        def run() -> dict[str, int]:
            from prefect.runtime import task_run

            done["where"] = task_run.id or "local"
            if task_run.id:
                with db.get_engine().connect() as c:
                    c = c.execution_options(isolation_level="AUTOCOMMIT")
                    outbox.mark_task_run(c, key, [r.id for r in rows], uuid.UUID(task_run.id))
            done["counts"] = self._settle(rows, key, task_run.id)
            return done["counts"]

        if time.monotonic() >= self._api_down_until:
            try:
                send_background_batch(len(rows), ids, run)
            except Exception as exc:  # the Prefect side failed, unless the batch itself did
                if "where" in done and "counts" not in done:
                    raise  # the batch started and failed: not the API's doing
                self._api_down_until = time.monotonic() + self.API_RETRY_SECONDS
                print(
                    f"task worker {self.name}: Prefect API unusable ({type(exc).__name__}); sending without it",
                    flush=True,
                )
        if "where" not in done:
            run()
        return done["counts"], done["where"]

    def _settle(self, rows: list[outbox.Claimed], key: int, task_run_id: str | None) -> dict[str, int]:
        """Run the batch and record each row's outcome under the holder key it was claimed with."""
        started = time.monotonic()
        outcomes = run_batch(rows)
        with db.get_engine().connect() as c:
            kept = outbox.settle(c.execution_options(isolation_level="AUTOCOMMIT"), key, list(outcomes.values()))
        each = (time.monotonic() - started) / max(1, len(rows))
        by_status: dict[str, int] = {}
        claimed = {r.id: r for r in rows}
        for o in outcomes.values():
            by_status[o.status] = by_status.get(o.status, 0) + 1
            if o.id not in kept:
                continue  # taken back from us meanwhile: whoever settles it counts it
            row = claimed[o.id]
            record_task(row.name, o.status, each)
            if o.status in ("done", "failed"):
                background_task_finished(row.name, o.id, o.status, o.result, o.error)
            if o.status == "failed":
                background_task_failed(row.name, o.id, task_run_id, row.tries, o.error)
        return by_status


def serve_background_tasks(batch_size: int, concurrency: int, poll_seconds: float) -> None:
    """Run the task worker in this process until SIGTERM/SIGINT (then finish the batches in hand)."""
    import signal

    warm_up()
    worker = TaskWorker(batch_size, concurrency, poll_seconds)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    worker.run()


def run_here(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """A task run in the calling process, as calling a Celery task does: no row, no worker; raises its error."""
    row = outbox.Claimed(uuid.uuid4(), name, params, tries=retry.policy().attempts + 1)  # one try, its last
    outcome = run_batch([row])[row.id]
    if outcome.status != "done":
        raise rebuild(outcome.error_type, outcome.error or outcome.status)
    return outcome.result or {}
