"""Background tasks end to end: `indostar-jobs task-worker` processes, the old Celery API, crash recovery, webhooks.

A real Prefect server and real task-worker subprocesses; the backend side is this test process
calling indostar_client.tasks exactly as the shop's backend does.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import time
from collections import Counter

import pytest
from sqlalchemy import text

from indostar_client import tasks as old
from lib import webhooks
from tests.builders import make_customer, make_order, make_subscription
from tests.e2e.conftest import WEBHOOK_SECRET
from tests.e2e.task_workers import logged, sent_by

pytestmark = pytest.mark.e2e


def body_of(received) -> str:
    return received.message.get_body(("plain",)).get_content()


def test_two_task_workers_share_the_work_each_message_once(pg, smtp, sms_gateway, api, start_worker):
    """Two workers, batches of one: while the first holds a message on the wire the second sends; each sends
    at least one, every message arrives once, and each handle's result is the row's."""
    one = start_worker("worker-a", "--batch-size", "1", "--concurrency", "1")
    two = start_worker("worker-b", "--batch-size", "1", "--concurrency", "1")
    smtp.handler.hold_at = 1  # the first message's 250 waits: its worker is busy until released
    handles = [
        old.send_email_task.delay(to_email=f"user{i}@example.in", subject=f"Two {i}", body="b") for i in range(12)
    ]
    deadline = time.monotonic() + 30
    while len(smtp.messages) < 2:  # the held one (received, not yet acknowledged) and one from the other worker
        assert time.monotonic() < deadline, one.tail() + two.tail()
        time.sleep(0.05)
    smtp.handler.release.set()
    assert all(h.get(timeout=30)["sent"] == 1 for h in handles)
    assert Counter(m.rcpt_tos[0] for m in smtp.messages) == Counter({f"user{i}@example.in": 1 for i in range(12)})
    ids = {h.id for h in handles}
    deadline = time.monotonic() + 10  # each log line is written a moment after its rows settle
    while not ids <= sent_by(one) | sent_by(two) and time.monotonic() < deadline:
        time.sleep(0.05)
    by_a, by_b = sent_by(one), sent_by(two)
    assert by_a and by_b, (by_a, by_b)
    assert by_a.isdisjoint(by_b) and by_a | by_b == ids
    one.check_alive(), two.check_alive()


def test_a_task_worker_killed_while_it_sends_leaves_the_message_to_be_sent_once_by_another(pg, smtp, api, start_worker):
    """SIGKILL mid-SMTP (before the server accepted) with another worker running: the other worker takes the
    row back (the killed worker's lock is gone) and the message arrives once, well within 60 s."""
    rescuer = start_worker("worker-rescuer")
    os.kill(rescuer.popen.pid, signal.SIGSTOP)  # paused, so the doomed worker is the one that takes the row
    doomed = start_worker("worker-doomed", "--batch-size", "1", SMTP_TIMEOUT="60")
    smtp.handler.hold_rcpt_at = 1  # the SMTP conversation stops at RCPT: on the wire, nothing accepted
    handle = old.send_email_task.delay(to_email="kill@example.in", subject="Survives", body="once")
    deadline = time.monotonic() + 30
    while smtp.handler.rcpt_seen < 1:
        assert time.monotonic() < deadline, doomed.tail()
        time.sleep(0.05)
    doomed.stop(signal.SIGKILL)
    killed = time.monotonic()
    os.kill(rescuer.popen.pid, signal.SIGCONT)
    smtp.handler.release.set()
    assert handle.get(timeout=60)["sent"] == 1
    recovered_in = time.monotonic() - killed
    assert recovered_in < 60
    assert [m.rcpt_tos for m in smtp.messages] == [["kill@example.in"]]
    assert logged(rescuer, {handle.id}) == {handle.id} and "took back 1 task(s)" in rescuer.log.read_text()
    with pg.connect() as c:
        status, attempts = c.execute(
            text("SELECT status, attempts FROM notifications WHERE recipient = 'kill@example.in'")
        ).one()
        tries = c.execute(text("SELECT tries FROM background_tasks WHERE id = :id"), {"id": handle.id}).scalar()
    assert (status, tries) == ("sent", 2) and attempts in (1, 2)


def test_every_old_task_name_takes_its_old_arguments(pg, smtp, sms_gateway, api, start_worker, prefect_server):
    """Each message task sends with the old argument names; each job task starts its deployment with them."""
    from prefect.client.orchestration import get_client

    start_worker("worker-all")
    customer = make_customer(pg, email="old.api@example.in", phone="9876501234")
    order = make_order(pg, customer_id=customer)
    sub = make_subscription(pg, customer_id=customer, due=dt.date.today() + dt.timedelta(days=3))
    calls = {
        old.send_email_task: dict(to_email="old.api@example.in", subject="S", body="B", html_body="<p>B</p>"),
        old.send_sms_task: dict(phone="9876501234", message="plain text"),
        old.send_templated_email_task: dict(
            to_email="old.api@example.in",
            template_name="order_shipped",
            context={
                "customer_name": "A",
                "order_id": 1,
                "total_paise": 100,
                "tracking_number": "T1",
                "carrier": "DTDC",
            },
        ),
        old.send_templated_sms_task: dict(
            to_phone="9876501234",
            template_name="order_shipped",
            context={"customer_name": "A", "order_id": 1, "tracking_number": "T1", "carrier": "DTDC"},
        ),
        old.send_order_confirmation_task: dict(order_id=order),
        old.send_order_shipped_task: dict(order_id=order, tracking_number="EE1IN", carrier="India Post"),
        old.send_payment_failed_task: dict(order_id=order, reason="card declined"),
        old.send_subscription_renewal_reminder_task: dict(subscription_id=sub),
        old.send_otp_task: dict(customer_id=customer, purpose="login"),
        old.send_password_reset_task: dict(customer_id=customer),
        old.send_email_verification_task: dict(customer_id=customer),
    }
    assert set(calls) == set(old.MESSAGE_TASKS)
    results = {t.name: t.delay(**kwargs) for t, kwargs in calls.items()}
    outcome = {name: h.get(timeout=30) for name, h in results.items()}
    assert all(r["dead"] == 0 for r in outcome.values()), outcome
    assert {name: r["sent"] for name, r in outcome.items()} == {
        "send_email_task": 1,
        "send_sms_task": 1,
        "send_templated_email_task": 1,
        "send_templated_sms_task": 1,
        "send_order_confirmation_task": 2,  # email and SMS
        "send_order_shipped_task": 2,
        "send_payment_failed_task": 2,
        "send_subscription_renewal_reminder_task": 2,
        "send_otp_task": 1,
        "send_password_reset_task": 1,
        "send_email_verification_task": 1,
    }
    emails = {m.message["Subject"]: m for m in smtp.messages}
    assert {m.rcpt_tos[0] for m in smtp.messages} == {"old.api@example.in"} and len(smtp.messages) == 8
    assert body_of(emails["S"]).strip() == "B"
    assert emails["S"].message.get_body(("html",)).get_content().strip() == "<p>B</p>"  # html_body kept
    shipped = [m for m in smtp.messages if "T1" in body_of(m) and "DTDC" in body_of(m)]
    assert len(shipped) == 1  # the templated email, rendered from its context
    assert any("EE1IN" in body_of(m) and "India Post" in body_of(m) for m in smtp.messages)
    assert any("card declined" in body_of(m) for m in smtp.messages)
    assert any(re.search(r"https?://\S+reset\S*token=", body_of(m)) for m in smtp.messages), [
        m.message["Subject"] for m in smtp.messages
    ]
    texts = [r.data()["sms"][0]["message"] for r in sms_gateway.delivered if r.path != "/hooks/indostar"]
    assert "plain text" in texts and len(texts) == 7
    assert any(re.search(r"\b\d{6}\b is your IndoStar Naturals code for login", t) for t in texts)
    assert any("T1" in t and "DTDC" in t for t in texts)
    with pytest.raises(TypeError, match="to_emial"):
        old.send_email_task.delay(to_emial="typo@example.in", subject="S", body="B")

    from flows import cleanup as cf
    from flows import subscriptions as sf

    for fl, name in (
        (sf.process_due_subscriptions, "daily"),
        (sf.process_single_subscription, "default"),
        (sf.remind_upcoming_deliveries, "daily"),
        (cf.cleanup_expired_carts, "daily"),
        (cf.cleanup_expired_tokens, "daily"),
        (cf.cleanup_old_audit_logs, "default"),
        (cf.cleanup_abandoned_sessions, "default"),
    ):
        fl.to_deployment(name=name).apply()
    jobs = {
        old.process_due_subscriptions: ({}, {}),
        old.process_single_subscription: ({"subscription_id": sub}, {"subscription_id": sub}),
        old.send_subscription_renewal_reminders: ({}, {}),
        old.cleanup_expired_carts: ({"days_old": 30}, {"days_old": 30}),
        old.cleanup_expired_tokens: ({}, {}),
        old.cleanup_old_audit_logs: ({"days": 120}, {"days": 120}),
        old.cleanup_abandoned_sessions: ({"days": 45}, {"inactive_days": 45}),
    }
    assert set(jobs) == set(old.JOB_TASKS)
    with get_client(sync_client=True) as client:
        for job, (kwargs, params) in jobs.items():
            handle = job.delay(**kwargs)
            run = client.read_flow_run(handle.id)
            assert run.parameters == params and "backend" in run.tags, job.name
            assert handle.status == "PENDING"
            with pytest.raises(TimeoutError, match=r"not finished after 0\.2 s"):
                handle.get(timeout=0.2)

        # Celery's countdown on a job task: a Scheduled run an hour ahead; revoke() cancels it before it starts.
        later = old.cleanup_expired_carts.apply_async(kwargs={"days_old": 30}, countdown=3600)
        run = client.read_flow_run(later.id)
        ahead = (run.expected_start_time - dt.datetime.now(dt.UTC)).total_seconds()
        assert run.state_type.value == "SCHEDULED" and 3500 < ahead <= 3600, (run.state_type, ahead)
        assert later.revoke() is True and later.status == "REVOKED"


def test_a_finished_background_task_posts_a_signed_webhook(pg, smtp, sms_gateway, api, start_worker):
    """With TASK_WEBHOOK_URL set, the backend receives a signed POST naming the task, its state and counts."""
    start_worker("worker-hooks")
    handle = old.send_email_task.delay(to_email="hook@example.in", subject="Hook", body="b")
    handle.get(timeout=10)

    def mine() -> list:
        return [r for r in sms_gateway.requests if r.path == "/hooks/indostar" and r.data()["id"] == handle.id]

    deadline = time.monotonic() + 15
    while not mine():
        assert time.monotonic() < deadline, "no webhook arrived"
        time.sleep(0.05)
    [hook] = mine()
    assert webhooks.verify(hook.body, hook.headers["x-indostar-signature"], WEBHOOK_SECRET)
    assert not webhooks.verify(hook.body, hook.headers["x-indostar-signature"], "another-secret")
    doc = hook.data()
    assert (doc["id"], doc["kind"], doc["name"], doc["state"]) == (handle.id, "task", "send-email-task", "COMPLETED")
    assert doc["result"]["sent"] == 1
