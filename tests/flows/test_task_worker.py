"""The outbox path of ``.delay()``: a task worker (run in a thread of this process) against the real
PostgreSQL, SMTP server, SMS gateway and the Prefect test harness; calls made exactly as the backend does.

Recovery from a dead worker is driven here by a second database connection that claims a row under
its own advisory lock and then closes (what a SIGKILL does to a worker's connection); the e2e module
kills real worker processes.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid

import pytest
from sqlalchemy import text

from indostar_client import tasks as old
from lib import db, outbox, tokens
from lib.errors import InvalidInputError, NotFoundError
from tests.builders import count_rows, make_customer, make_order
from tests.flows.conftest import POLL  # the worker fixture's poll interval


def _row(task_id: str) -> dict:
    with db.get_engine().connect() as c:
        return dict(c.execute(text("SELECT * FROM background_tasks WHERE id = :id"), {"id": task_id}).mappings().one())


def _body(received) -> str:
    return received.message.get_body(("plain",)).get_content().strip()


def _until(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError(f"not reached within {timeout} s")


def test_delay_sends_the_email_and_the_handle_reads_the_row_and_its_task_run(worker, smtp):
    from prefect.client.orchestration import get_client

    worker()
    handle = old.send_email_task.delay(to_email="asha@example.in", subject="Your order", body="Packed today")
    out = handle.get(timeout=10)
    assert out["sent"] == 1 and handle.status == "SUCCESS" and handle.ready()
    assert [(m.message["To"], m.message["Subject"]) for m in smtp.messages] == [("asha@example.in", "Your order")]
    assert _body(smtp.messages[0]) == "Packed today"
    row = _row(handle.id)
    assert (row["status"], row["tries"], row["name"]) == ("done", 1, "send-email-task")
    # The API records a task run from its events, a moment after the batch ran.
    _until(lambda: api_state(row["task_run_id"]) == "COMPLETED")
    with get_client(sync_client=True) as api:
        assert api.read_task_run(row["task_run_id"]).name == "send 1 background task(s)"
        # No credentials in Prefect's database: nothing of the path is saved as a block (no Redis or
        # database URL, no password), the task's parameters stay in our own table.
        blocks = api.read_block_documents(include_secrets=True)
    saved = repr([b.data for b in blocks])
    assert "redis://" not in saved and "postgresql" not in saved and "asha@example.in" not in saved


def api_state(run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as api:
        try:
            state = api.read_task_run(run_id).state
        except ObjectNotFound:
            return ""
    return state.type.value if state else ""


def test_keyless_calls_each_send_and_a_keyed_repeat_sends_once(worker, smtp):
    worker()
    args = {"to_email": "ravi@example.in", "subject": "Weekly note", "body": "Same text"}
    first, second = old.send_email_task.delay(**args), old.send_email_task.delay(**args)
    assert first.get(timeout=10)["sent"] == 1 and second.get(timeout=10)["sent"] == 1
    keyed = [old.send_email_task.delay(**args, idempotency_key="note-7") for _ in range(2)]
    # Both handles report the one message as sent; only one email went.
    assert [h.get(timeout=10)["sent"] for h in keyed] == [1, 1]
    time.sleep(3 * POLL)
    assert len(smtp.messages) == 3


def test_countdown_and_eta_wait_and_expires_and_revoke_never_send(worker, smtp):
    worker()
    args = {"to_email": "meera@example.in", "subject": "Later", "body": "Countdown"}
    started = time.monotonic()
    later = old.send_email_task.apply_async(kwargs=args, countdown=1.5)
    at = old.send_email_task.apply_async(
        kwargs=args | {"body": "Eta"}, eta=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1.5)
    )
    time.sleep(0.8)
    assert (later.status, at.status, len(smtp.messages)) == ("PENDING", "PENDING", 0)
    later.get(timeout=10), at.get(timeout=10)
    assert time.monotonic() - started >= 1.5 and len(smtp.messages) == 2

    doomed = old.send_email_task.apply_async(kwargs=args | {"body": "Expired"}, countdown=2, expires=0.5)
    with pytest.raises(old.TaskRevokedError, match=r"expired at .* before it ran"):
        doomed.get(timeout=10)
    revoked = old.send_email_task.apply_async(kwargs=args | {"body": "Revoked"}, countdown=30)
    assert revoked.revoke() is True and revoked.status == "REVOKED"
    with pytest.raises(old.TaskRevokedError, match="revoked by the caller"):
        revoked.get(timeout=1)
    time.sleep(3 * POLL)
    assert sorted(_body(m) for m in smtp.messages) == ["Countdown", "Eta"]


def test_an_option_we_cannot_honour_raises_type_error_and_records_nothing(pg):
    args = {"to_email": "a@example.in", "subject": "s", "body": "b"}
    with pytest.raises(TypeError, match=r"does not support priority, queue .*nothing was queued"):
        old.send_email_task.apply_async(kwargs=args, queue="critical", priority=9)
    with pytest.raises(TypeError, match="give countdown or eta, not both"):
        old.send_email_task.apply_async(kwargs=args, countdown=1, eta=dt.datetime.now(dt.UTC))
    with pytest.raises(TypeError, match="does not support expires"):
        old.cleanup_expired_carts.apply_async(kwargs={"days_old": 30}, expires=60)
    with pytest.raises(InvalidInputError, match=r"email"):
        old.send_email_task.delay(to_email="not-an-address", subject="s", body="b")
    assert count_rows(pg, "background_tasks") == 0


def test_a_task_id_given_twice_records_one_task_and_sends_once(worker, smtp):
    worker()
    task_id = str(uuid.uuid4())
    args = {"to_email": "dev@example.in", "subject": "Once", "body": "One row"}
    first = old.send_email_task.apply_async(kwargs=args, task_id=task_id)
    again = old.send_email_task.apply_async(kwargs=args, task_id=task_id)
    assert first.id == again.id == task_id
    assert first.get(timeout=10)["sent"] == 1
    time.sleep(3 * POLL)
    assert len(smtp.messages) == 1 and count_rows(db.get_engine(), "background_tasks") == 1


def _claim_as_another_worker(task_id: str):
    """A connection that takes a row as a worker would (lock + claim) and stays open until closed."""
    conn = db.get_engine().connect().execution_options(isolation_level="AUTOCOMMIT")
    key = 4242
    conn.execute(text("SELECT pg_advisory_lock(:ns, :k)"), {"ns": outbox.HOLDER_NAMESPACE, "k": key})
    taken = outbox.claim(conn, key, "doomed-worker", 10)
    assert [str(r.id) for r in taken] == [task_id]
    return conn


def test_a_row_of_a_dead_worker_is_sent_once_by_a_live_one_and_a_live_workers_row_is_left_alone(pg, worker, smtp):
    handle = old.send_email_task.delay(to_email="kiran@example.in", subject="Recovered", body="Once")
    holder = _claim_as_another_worker(handle.id)
    worker()
    time.sleep(5 * POLL)
    assert handle.status == "STARTED" and smtp.messages == []  # its holder is alive: nobody takes it
    holder.invalidate()  # the connection dies as a killed process's does: its advisory lock goes with it
    holder.close()
    assert handle.get(timeout=10)["sent"] == 1
    row = _row(handle.id)
    assert (row["status"], row["tries"], len(smtp.messages)) == ("done", 2, 1)


def test_an_otp_whose_first_send_gets_503_is_retried_and_sends_one_code_that_verifies(worker, sms_gateway):
    cid = make_customer(db.get_engine(), phone="+919812345678")
    worker()
    sms_gateway.fail_next(503)
    handle = old.send_otp_task.delay(customer_id=cid, purpose="login")
    out = handle.get(timeout=20)
    assert out["sent"] == 1 and _row(handle.id)["tries"] == 2
    assert [r.status for r in sms_gateway.requests] == [503, 200]
    text_sent = sms_gateway.delivered[0].data()["sms"][0]["message"]
    code = re.search(r"\b(\d{6})\b is your IndoStar Naturals code for login", text_sent).group(1)
    assert tokens.verify_otp(cid, code) == tokens.OtpResult.OK


def test_a_task_with_bad_data_fails_alone_with_its_error_and_its_batch_goes_on(worker, smtp, sms_gateway):
    engine = db.get_engine()
    order = make_order(engine)
    missing = old.send_order_confirmation_task.delay(order_id=987654)
    good = old.send_order_confirmation_task.delay(order_id=order)
    worker()  # both rows wait, so they go in one batch
    with pytest.raises(NotFoundError, match="order 987654 does not exist"):
        missing.get(timeout=10)
    assert missing.status == "FAILURE" and _row(missing.id)["tries"] == 1
    assert good.get(timeout=10)["sent"] == 2
    assert len(smtp.messages) == 1 and len(sms_gateway.delivered) == 1
    assert _row(missing.id)["task_run_id"] == _row(good.id)["task_run_id"]


def test_calling_a_task_runs_it_here_without_a_row(pg, smtp):
    out = old.send_email_task(to_email="here@example.in", subject="Direct", body="No worker")
    assert out["sent"] == 1 and [m.message["To"] for m in smtp.messages] == ["here@example.in"]
    assert count_rows(pg, "background_tasks") == 0


def test_finished_tasks_are_deleted_after_the_storage_ttl_and_waiting_ones_are_kept(pg):
    from flows.cleanup import cleanup_delivery_log
    from lib.config import get_settings

    ttl = dt.timedelta(seconds=get_settings().task_storage_ttl_seconds)
    ids = {
        name: outbox.enqueue(pg, "send-email-task", {"to": "x@example.in", "subject": "s", "body": name})[0]
        for name in ("old-done", "new-done", "old-queued", "old-revoked")
    }
    now = dt.datetime.now(dt.UTC)  # the flow's cutoff comes from its run's scheduled time: the same clock
    with pg.begin() as c:
        for name, status, age in (
            ("old-done", "done", ttl + dt.timedelta(hours=1)),
            ("new-done", "done", ttl - dt.timedelta(hours=1)),
            ("old-revoked", "revoked", ttl + dt.timedelta(minutes=5)),
        ):
            c.execute(
                text("UPDATE background_tasks SET status = :s, finished_at = :t WHERE id = :id"),
                {"s": status, "t": now - age, "id": ids[name]},
            )
        c.execute(
            text("UPDATE background_tasks SET created_at = :t WHERE id = :id"),
            {"t": now - 3 * ttl, "id": ids["old-queued"]},
        )
    out = cleanup_delivery_log()
    assert out["removed"]["tasks_deleted"] == 2
    with pg.connect() as c:
        left = set(c.execute(text("SELECT id FROM background_tasks")).scalars())
    assert left == {ids["new-done"], ids["old-queued"]}


def test_a_nul_in_any_argument_is_refused_in_one_line_before_anything_is_recorded(pg):
    """PostgreSQL holds no U+0000 (ours, or Prefect's flow-run parameters): refused by name, nothing written."""
    from indostar_client import client

    context = {"customer_name": "A\x00", "order_id": 1, "total_paise": 1, "tracking_number": "T", "carrier": "C"}
    with pytest.raises(InvalidInputError, match=r"^context\.customer_name contains a NUL character$"):
        old.send_templated_email_task.delay(to_email="a@example.in", template_name="order_shipped", context=context)
    with pytest.raises(InvalidInputError, match=r"^body contains a NUL character$"):
        client.send_email("a@example.in", "Hi", "b\x00")
    assert count_rows(pg, "background_tasks") == 0 and count_rows(pg, "notifications") == 0


def test_a_batch_that_fails_before_it_settles_is_queued_again_by_its_own_worker(worker, smtp, monkeypatch):
    """A fake, said so: the first batch raises before anything is sent (as when the database goes away
    mid-batch, which the real one cannot be made to do on demand here). The live worker does not leave its
    rows running forever: its next poll queues them again and they are sent once."""
    import flows.background as background

    real, calls = background.run_batch, []

    def failing_once(rows):
        calls.append(len(rows))
        if len(calls) == 1:
            raise RuntimeError("lost the database mid-batch")
        return real(rows)

    monkeypatch.setattr(background, "run_batch", failing_once)
    worker()
    handle = old.send_email_task.delay(to_email="again@example.in", subject="Again", body="Once")
    assert handle.get(timeout=10)["sent"] == 1
    assert len(calls) == 2 and _row(handle.id)["tries"] == 2 and len(smtp.messages) == 1


def test_a_worker_whose_database_connection_is_cut_connects_again_and_keeps_sending(pg, worker, smtp, capsys):
    """pg_terminate_backend on the worker's own connection (what a PostgreSQL restart or a proxy does to it):
    the worker says so, connects again under a new holder key, and the next .delay still goes out once."""
    worker()
    first = old.send_email_task.delay(to_email="before@example.in", subject="Before", body="b")
    assert first.get(timeout=10)["sent"] == 1
    with pg.connect() as c:
        cut = (
            c.execute(
                text(
                    """SELECT pg_terminate_backend(pid) FROM pg_locks
                    WHERE locktype = 'advisory' AND classid = :ns AND granted AND database =
                          (SELECT oid FROM pg_database WHERE datname = current_database())"""
                ),
                {"ns": outbox.HOLDER_NAMESPACE},
            )
            .scalars()
            .all()
        )
    assert cut == [True]  # the one worker's holder connection
    said: list[str] = []

    def listening_again() -> bool:
        said.append(capsys.readouterr().out)
        return "".join(said).count("listening (holder") >= 2 and _holders() == 1

    _until(listening_again, timeout=15)
    assert "lost its database connection" in "".join(said)
    after = old.send_email_task.delay(to_email="after@example.in", subject="After", body="b")
    assert after.get(timeout=15)["sent"] == 1
    assert sorted(m.rcpt_tos[0] for m in smtp.messages) == ["after@example.in", "before@example.in"]


def _holders() -> int:
    with db.get_engine().connect() as c:
        return int(
            c.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = :ns AND granted"),
                {"ns": outbox.HOLDER_NAMESPACE},
            ).scalar()
        )


def test_a_background_task_that_fails_for_good_sends_one_sentry_event(worker, sentry_server):
    """Its tags find the row and the batch's task run; nothing for the task of the same batch that was sent."""
    from lib import sentry

    missing = old.send_order_confirmation_task.delay(order_id=987654)
    good = old.send_order_confirmation_task.delay(order_id=make_order(db.get_engine()))
    worker()
    with pytest.raises(NotFoundError, match="order 987654 does not exist"):
        missing.get(timeout=10)
    assert good.get(timeout=10)["sent"] == 2
    # The worker reports right after it settles the rows, which is when get() returns: wait for it.
    events = _until(lambda: sentry.flush() or sentry_server.events(), timeout=10)
    time.sleep(0.5)
    sentry.flush()
    assert len(sentry_server.events()) == 1, sentry_server.events()
    row = _row(missing.id)
    tags = events[0]["tags"]
    assert tags["task"] == row["name"] and tags["task_id"] == str(missing.id)
    assert tags["task_run_id"] == str(row["task_run_id"]) and tags["work_queue"] == "background-tasks"
    # The error's text, with every 4-8 digit number masked as a possible one-time code (an order id too).
    assert tags["attempt"] == "1" and "order ****** does not exist" in events[0]["contexts"]["prefect"]["message"]
