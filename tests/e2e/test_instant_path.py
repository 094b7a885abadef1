"""The instant path end to end: what a migrating Celery shop calls most, against task-worker subprocesses.

A real Prefect server, real `indostar-jobs task-worker` processes, the loopback SMTP server and SMS
gateway; this test process is the backend, calling deployments.tasks. Speed is measured by
bench/notify_latency.py, not asserted here: these tests check what a customer would notice
(each message once, nothing early, nothing revoked sent, one OTP code that works).
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections import Counter

import pytest

from deployments import tasks as old
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
