"""Sentry error tracking against a loopback server that accepts envelopes at the DSN's address.

What an operator would see in Sentry: one event per run that ended badly (after its
retries), tagged so the run can be found, with a link to it in the UI; nothing for a
retry that later succeeded; a check-in for a cron deployment's run; and never a customer's
address, phone, code, link or any configured secret in anything that left the process.
"""

from __future__ import annotations

import time
import uuid

from prefect import flow, task

from flows.common import flow_options, task_options
from flows.notifications import send_otp
from lib import sentry
from lib.config import get_settings
from lib.errors import PermanentError, TransientError
from tests.builders import make_customer


def settled() -> None:
    """Everything queued has reached the loopback server (flush returns once the transport has sent it)."""
    sentry.flush()
    time.sleep(0.2)


CALLS: dict[str, int] = {}


@task(**(task_options("flaky-once") | {"retries": 1, "retry_delay_seconds": 0, "retry_condition_fn": None}))
def flaky_once(key: str) -> int:
    CALLS[key] = CALLS.get(key, 0) + 1
    if CALLS[key] == 1:
        raise TransientError("first try fails")
    return CALLS[key]


@flow(**flow_options("tracking-flaky-then-fine"))
def flaky_then_fine(key: str) -> int:
    return flaky_once(key)


@flow(**(flow_options("tracking-always-fails") | {"retries": 2, "retry_delay_seconds": 0}))
def always_fails(customer_email: str, phone: str) -> None:
    raise PermanentError(
        f"could not reach {customer_email} at {phone}, token {get_settings().token_secret.get_secret_value()}"
    )


@flow(**flow_options("tracking-nightly"))
def nightly(fail: bool = False) -> str:
    if fail:
        raise PermanentError("the night went wrong")
    return "done"


def test_a_failed_run_sends_one_event_with_its_tags_and_a_retry_that_succeeds_sends_none(pg, sentry_server):
    assert flaky_then_fine(str(uuid.uuid4())) == 2
    settled()
    assert sentry_server.events() == []

    state = always_fails("priya.sharma@example.in", "+919876543210", return_state=True)
    assert state.is_failed()
    settled()
    events = sentry_server.events()
    assert len(events) == 1, [e.get("message") or e.get("exception") for e in events]
    event = events[0]
    run_id = str(state.state_details.flow_run_id)
    assert event["tags"]["flow"] == "tracking-always-fails"
    assert event["tags"]["flow_run_id"] == run_id
    assert event["tags"]["attempt"] == "3"  # two retries, one event
    assert event["contexts"]["prefect"]["url"].endswith(f"/runs/flow-run/{run_id}")
    assert event["environment"] == "test"
    raw = sentry_server.raw().decode(errors="replace")
    for secret in ("priya.sharma@example.in", "9876543210", get_settings().token_secret.get_secret_value()):
        assert secret not in raw
    assert "p***@example.in" in raw  # masked as in the logs, still useful


def test_an_otp_run_the_gateway_refuses_sends_one_event_without_the_phone_or_the_code(
    pg, redis_client, sentry_server, sms_gateway
):
    customer = make_customer(pg, phone="+919812345678")
    sms_gateway.fail_next(400)
    state = send_otp(customer_id=customer, return_state=True)
    assert state.is_failed()
    settled()
    events = sentry_server.events()
    assert len(events) == 1 and events[0]["tags"]["flow"] == "send-otp"
    sent = sms_gateway.requests[0].data()
    code = next(w for w in str(sent).replace("'", " ").split() if w.isdigit() and len(w) == 6)
    raw = sentry_server.raw().decode(errors="replace")
    assert code not in raw and "9812345678" not in raw
    for secret in (get_settings().token_secret, get_settings().sentry_dsn):
        assert secret.get_secret_value() not in raw


def test_a_cron_deployments_runs_check_in_to_their_monitor_with_its_schedule(pg, sentry_server):
    """in_progress then ok (or error) under one check-in id, the monitor told the deployment's current cron."""
    from prefect.client.orchestration import get_client
    from prefect.schedules import Cron

    from flows.prefect_compat import run_flow_run

    deployment_id = nightly.to_deployment(name="nightly", schedules=[Cron("20 1 * * *", timezone="UTC")]).apply()
    outcomes = []
    for fail in (False, True):
        with get_client(sync_client=True) as client:
            run = client.create_flow_run_from_deployment(deployment_id, parameters={"fail": fail})
        outcomes.append(run_flow_run(nightly, run, {"fail": fail}))
    assert outcomes[0].is_completed() and outcomes[1].is_failed()
    settled()
    check_ins = sentry_server.check_ins()
    assert [c["status"] for c in check_ins] == ["in_progress", "ok", "in_progress", "error"]
    assert {c["monitor_slug"] for c in check_ins} == {"tracking-nightly-nightly"}
    assert check_ins[0]["monitor_config"]["schedule"] == {"type": "crontab", "value": "20 1 * * *"}
    assert check_ins[0]["check_in_id"] == check_ins[1]["check_in_id"] != check_ins[2]["check_in_id"]
    assert len(sentry_server.events()) == 1  # the failed night, once
