"""Background tasks end to end: `indostar-jobs task-worker` processes, the old Celery API, crash recovery, webhooks.

A real Prefect server and real task-worker subprocesses; the backend side is this test process
calling deployments.tasks exactly as the shop's backend does.
"""

from __future__ import annotations

import datetime as dt
import signal
import time
from collections import Counter

import pytest
from sqlalchemy import text

from deployments import tasks as old
from lib import webhooks
from tests.builders import make_customer, make_order, make_subscription

pytestmark = pytest.mark.e2e

WEBHOOK_SECRET = "e2e-webhook-secret"


@pytest.fixture
def worker_env(sms_gateway):
    """Settings every task worker of these tests gets: webhooks to the loopback gateway."""
    return {
        "TASK_WEBHOOK_URL": f"{sms_gateway_url()}/hooks/indostar",
        "TASK_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }


def sms_gateway_url() -> str:
    from lib.config import get_settings

    return get_settings().sms_base_url


@pytest.fixture
def start_worker(spawn, worker_env):
    """Start `indostar-jobs task-worker` processes; they are stopped when the test ends."""

    def start(name: str = "task-worker", **extra: str):
        return spawn(name, "-m", "deployments.cli", "task-worker", "--sweep-every", "1", extra_env=worker_env | extra)

    return start


def first_delivery(smtp, timeout: float = 90):
    """Wait for a worker to take its first run (it imports Prefect and warms up first)."""
    result = old.send_email_task.delay(to_email="warmup@example.in", subject="Warm up", body="w")
    result.get(timeout=timeout)
    smtp.handler.reset()


def test_old_send_email_task_delay_reaches_smtp_once_with_one_and_two_workers(pg, smtp, sms_gateway, api, start_worker):
    """send_email_task.delay(to_email=..., subject=..., body=...).get() sends once, with one worker or two."""
    one = start_worker("worker-a")
    first_delivery(smtp)
    result = old.send_email_task.delay(to_email="asha@example.in", subject="Hello", body="From the old API")
    out = result.get(timeout=10)
    assert out["sent"] == 1 and result.status == "SUCCESS" and result.ready()
    assert [(m.rcpt_tos, m.message["Subject"]) for m in smtp.messages] == [(["asha@example.in"], "Hello")]
    start_worker("worker-b")
    handles = [
        old.send_email_task.delay(to_email=f"user{i}@example.in", subject=f"Two {i}", body="b") for i in range(12)
    ]
    assert all(h.get(timeout=30)["sent"] == 1 for h in handles)
    delivered = Counter(m.rcpt_tos[0] for m in smtp.messages)
    assert delivered == Counter({"asha@example.in": 1} | {f"user{i}@example.in": 1 for i in range(12)})
    one.check_alive()


def test_a_task_worker_killed_while_it_sends_leaves_the_message_to_be_sent_exactly_once(pg, smtp, api, start_worker):
    """SIGKILL mid-SMTP (before the server accepted), start another worker: its sweeper reruns the same task
    run and the message arrives once; the backend's handle on that run returns the result."""
    doomed = start_worker("worker-doomed")
    first_delivery(smtp)
    smtp.handler.hold_rcpt_at = 1  # the worker's SMTP conversation stops at RCPT: on the wire, not accepted
    handle = old.send_email_task.delay(to_email="kill@example.in", subject="Survives", body="once")
    deadline = time.monotonic() + 30
    while smtp.handler.rcpt_seen < 1:
        assert time.monotonic() < deadline, doomed.tail()
        time.sleep(0.05)
    doomed.stop(signal.SIGKILL)
    smtp.handler.release.set()
    assert handle.status == "STARTED"  # Prefect leaves it Running: nothing re-delivers it by itself
    start_worker("worker-rescuer", TASK_SWEEP_AFTER_SECONDS="3")  # the doomed run is stuck after 3 s
    assert handle.get(timeout=90)["sent"] == 1
    assert [m.rcpt_tos for m in smtp.messages] == [["kill@example.in"]]
    with pg.connect() as c:
        assert c.execute(
            text("SELECT status, attempts FROM notifications WHERE recipient = 'kill@example.in'")
        ).one() == ("sent", 1)


def test_every_old_task_name_takes_its_old_arguments(pg, smtp, sms_gateway, api, start_worker, prefect_server):
    """Each message task sends with the old argument names; each job task starts its deployment with them."""
    from prefect.client.orchestration import get_client

    start_worker("worker-all")
    first_delivery(smtp)
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
    assert all(r["dead"] == 0 and r["sent"] >= 1 for r in outcome.values()), outcome
    assert outcome["send_order_confirmation_task"]["sent"] == 2  # email and SMS
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


def test_a_finished_background_task_posts_a_signed_webhook(pg, smtp, sms_gateway, api, start_worker):
    """With TASK_WEBHOOK_URL set, the backend receives a signed POST naming the task run, its state and counts."""
    start_worker("worker-hooks")
    first_delivery(smtp)
    sms_gateway.reset()
    handle = old.send_email_task.delay(to_email="hook@example.in", subject="Hook", body="b")
    handle.get(timeout=10)
    deadline = time.monotonic() + 15
    while not [r for r in sms_gateway.requests if r.path == "/hooks/indostar"]:
        assert time.monotonic() < deadline, "no webhook arrived"
        time.sleep(0.05)
    [hook] = [r for r in sms_gateway.requests if r.path == "/hooks/indostar"]
    assert webhooks.verify(hook.body, hook.headers["x-indostar-signature"], WEBHOOK_SECRET)
    assert not webhooks.verify(hook.body, hook.headers["x-indostar-signature"], "another-secret")
    doc = hook.data()
    assert (doc["id"], doc["kind"], doc["name"], doc["state"]) == (handle.id, "task", "send-email-task", "COMPLETED")
    assert doc["result"]["sent"] == 1
