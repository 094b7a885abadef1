"""The instant path end to end: what a migrating Celery shop calls most, against task-worker subprocesses.

A real Prefect server, real `indostar-jobs task-worker` processes, the loopback SMTP server and SMS
gateway; this test process is the backend, calling indostar_client.tasks. Speed is measured by
bench/notify_latency.py, not asserted here: these tests check what a customer would notice
(each message once, nothing early, nothing revoked sent, one OTP code that works).
"""

from __future__ import annotations

import datetime as dt
import re
import sys
import threading
import time
from collections import Counter

import pytest

from indostar_client import tasks as old
from lib import tokens
from tests.builders import make_customer

pytestmark = pytest.mark.e2e


def arrival(smtp, recipient: str, timeout: float = 30) -> float:
    """time.monotonic() when the first message to ``recipient`` was seen by this process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m.rcpt_tos == [recipient] for m in smtp.messages):
            return time.monotonic()
        time.sleep(0.02)
    raise AssertionError(f"nothing reached {recipient} within {timeout} s")


def test_30_back_to_back_delays_each_arrive_once_and_the_server_never_answers_503(pg, smtp, api, start_worker, e2e_dir):
    """Each call made the moment the previous email was accepted (what met "database is locked" and a 2 s
    client retry on SQLite): every email arrives once, and the Prefect server's log has no 503 and no lock."""
    worker = start_worker("worker-back-to-back")
    for i in range(30):
        to = f"b2b{i}@example.in"
        handle = old.send_email_task.delay(to_email=to, subject=f"Code {i}", body="b")
        arrival(smtp, to)
        assert handle.get(timeout=10)["sent"] == 1
    assert Counter(m.rcpt_tos[0] for m in smtp.messages) == Counter({f"b2b{i}@example.in": 1 for i in range(30)})
    # The Prefect client logs every retried 503 ("Received response with retryable status code 503"); the
    # backend (this process) talks to PostgreSQL only, the worker to the API for its batches' task runs.
    server_log = (e2e_dir / "server.log").read_text(errors="replace")
    worker_log = worker.log.read_text(errors="replace")
    assert "Uvicorn running" in server_log or "Check out the dashboard" in server_log  # it is the server's log
    assert "database is locked" not in server_log
    # Word-bounded: the log is full of run ids, and a UUID's hex can hold "503" ("...-50359d98351e").
    assert not re.search(r"retryable|\b503\b", worker_log)


def test_a_burst_of_500_delays_from_8_threads_is_delivered_exactly_once(pg, smtp, api, start_worker):
    start_worker("worker-burst-1")
    start_worker("worker-burst-2")
    handles: list = []
    lock = threading.Lock()

    def submit(thread: int) -> None:
        for i in range(thread, 500, 8):
            h = old.send_email_task.delay(to_email=f"burst{i}@example.in", subject=f"Burst {i}", body="b")
            with lock:
                handles.append(h)

    threads = [threading.Thread(target=submit, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({h.id for h in handles}) == 500
    assert all(h.get(timeout=120)["sent"] == 1 for h in handles)
    assert Counter(m.rcpt_tos[0] for m in smtp.messages) == Counter({f"burst{i}@example.in": 1 for i in range(500)})
    assert {h.status for h in handles} == {"SUCCESS"}


def test_keyless_repeats_send_twice_countdown_and_eta_wait_expired_and_revoked_never_send(pg, smtp, api, start_worker):
    start_worker("worker-semantics")
    args = {"to_email": "same@example.in", "subject": "Weekly note", "body": "Same text"}
    twice = [old.send_email_task.delay(**args) for _ in range(2)]
    assert [h.get(timeout=30)["sent"] for h in twice] == [1, 1]
    assert len([m for m in smtp.messages if m.rcpt_tos == ["same@example.in"]]) == 2

    called = time.monotonic()
    later = old.send_email_task.apply_async(kwargs=args | {"to_email": "countdown@example.in"}, countdown=4)
    eta = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=4)
    at = old.send_email_task.apply_async(kwargs=args | {"to_email": "eta@example.in"}, eta=eta)
    expired = old.send_email_task.apply_async(kwargs=args | {"to_email": "expired@example.in"}, countdown=3, expires=1)
    revoked = old.send_email_task.apply_async(kwargs=args | {"to_email": "revoked@example.in"}, countdown=3)
    assert revoked.revoke() is True
    assert later.status == at.status == "PENDING"
    assert arrival(smtp, "countdown@example.in") - called >= 4  # not before its countdown
    assert arrival(smtp, "eta@example.in") - called >= 4
    with pytest.raises(old.TaskRevokedError, match="expired at"):
        expired.get(timeout=30)
    with pytest.raises(old.TaskRevokedError, match="revoked by the caller"):
        revoked.get(timeout=5)
    time.sleep(4)  # past both countdowns: a worker that ignored the revocation or the expiry would have sent
    assert not [m for m in smtp.messages if m.rcpt_tos[0] in ("expired@example.in", "revoked@example.in")]
    assert (expired.status, revoked.status, later.status) == ("REVOKED", "REVOKED", "SUCCESS")


def test_an_otp_whose_send_is_retried_sends_one_code_and_it_verifies(pg, sms_gateway, api, start_worker):
    cid = make_customer(pg, phone="+919812399999")
    start_worker("worker-otp")
    sms_gateway.fail_next(503, 503)
    handle = old.send_otp_task.delay(customer_id=cid, purpose="login")
    assert handle.get(timeout=60)["sent"] == 1
    assert [r.status for r in sms_gateway.requests if r.path != "/hooks/indostar"] == [503, 503, 200]
    [delivered] = [r for r in sms_gateway.delivered if r.path != "/hooks/indostar"]
    code = re.search(r"\b(\d{6})\b is your", delivered.data()["sms"][0]["message"]).group(1)
    assert tokens.verify_otp(cid, code) == tokens.OtpResult.OK


def test_tasks_queued_across_an_api_restart_go_out_and_answer_get_while_the_api_is_down(
    pg, smtp, tmp_path, redis_session, sms_gateway, prefect_database
):
    """The Prefect API is only the operators' view: tasks recorded while it restarts go out once a worker
    runs (within 60 s of it listening), and with the API down a worker keeps sending and every handle
    still answers from its row."""
    from sqlalchemy import text

    from devtools.processes import Proc
    from devtools.smtp_sink import free_port
    from tests.e2e import task_workers
    from tests.e2e.conftest import server_env, start_server

    env = server_env(tmp_path, free_port(), prefect_database("restart"))
    server = start_server(env, tmp_path, "server-first")
    worker = None

    def task_worker(name: str) -> Proc:
        proc = Proc(
            name, [sys.executable, "-m", "deployments.cli", "task-worker"], env | {"TASK_POLL_SECONDS": "0.5"}, tmp_path
        )
        task_workers.wait_listening(proc)
        return proc

    try:
        queued = [
            old.send_email_task.delay(to_email=f"queued{i}@example.in", subject="Queued", body="b") for i in range(3)
        ]
        server.stop()  # the API restarts with three tasks waiting and no worker
        server = start_server(env, tmp_path, "server-again")
        worker = task_worker("task-worker")
        listening = time.monotonic()
        assert all(h.get(timeout=60)["sent"] == 1 for h in queued)
        assert time.monotonic() - listening < 60
        with pg.connect() as c:
            runs = c.execute(
                text("SELECT count(task_run_id) FROM background_tasks WHERE id = ANY(CAST(:ids AS uuid[]))"),
                {"ids": [h.id for h in queued]},
            ).scalar()
        assert runs == 3  # sent in task runs of the restarted API

        server.stop()  # now the API is down for good, and a worker starts without ever having reached it
        worker.stop()
        worker = task_worker("task-worker-no-api")
        during = [old.send_email_task.delay(to_email=f"down{i}@example.in", subject="Down", body="b") for i in range(2)]
        assert [h.get(timeout=60)["sent"] for h in during] == [1, 1]
        assert {h.status for h in during} == {"SUCCESS"}
        assert task_workers.logged(worker, {h.id for h in during}) == {h.id for h in during}
        recipients = Counter(m.rcpt_tos[0] for m in smtp.messages)
        assert recipients == Counter(
            [f"queued{i}@example.in" for i in range(3)] + ["down0@example.in", "down1@example.in"]
        )
    finally:
        if worker:
            worker.stop()
        server.stop()
