"""Messages under faults: a killed sender resends at most one, permanent failures become dead letters at
once, token messages keep their secrets out of every store, replays re-read the customer, retention.

Real PostgreSQL, aiosmtpd and the HTTP SMS gateway on loopback; the sending process that gets killed
is a real subprocess running the same delivery code the flows run.
"""

from __future__ import annotations

import datetime as dt
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from pydantic import SecretStr
from sqlalchemy import text

from devtools.smtp_sink import DevSMTPServer, free_port
from flows import notifications as nf
from flows.cleanup import cleanup_delivery_log
from lib import token_store, tokens
from lib.config import get_settings
from lib.db import session_scope
from lib.errors import InvalidInputError, PermanentError
from lib.notify import delivery_log as dlog
from lib.notify.requests import EmailRequest, MessageBatch, SmsRequest
from tests.builders import db_now, make_customer, make_order

ROOT = Path(__file__).resolve().parents[2]

# The subprocess a test kills: one delivery pass over the given keys, exactly as deliver_emails/deliver_sms run it.
SENDER_SCRIPT = """
import sys
from lib.config import get_settings
from lib.db import get_engine
from lib.notify import delivery, delivery_log as dlog
from lib.notify.email_channel import SmtpConfig
from lib.notify.sms_channel import SmsConfig

channel, keys = sys.argv[1], sys.argv[2:]
s = get_settings()
opener = (lambda: delivery.email_sender(SmtpConfig.from_settings(s))) if channel == "email" else (
    lambda: delivery.sms_sender(SmsConfig.from_settings(s)))
with dlog.delivery_session(get_engine()) as (conn, token):
    delivery.deliver(conn, token, keys, channel, opener, final=False)
"""


def statuses() -> dict[str, str]:
    with session_scope() as s:
        return dict(s.execute(text("SELECT idempotency_key, status FROM notifications")).tuples().all())


def record(*requests) -> list[str]:
    batch = MessageBatch()
    with session_scope() as s:
        for r in requests:
            batch.extend(r.build(s))
        dlog.record(s, batch.messages)
    return batch.keys()


def wait_until(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def kill_sender_mid_send(channel: str, keys: list[str], arrived) -> None:
    """Start the sending subprocess, wait until the k-th message reached the server, SIGKILL it."""
    proc = subprocess.Popen([sys.executable, "-c", SENDER_SCRIPT, channel, *keys], cwd=ROOT)
    try:
        wait_until(lambda: arrived() or proc.poll() is not None)
        assert proc.poll() is None, "the sender finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=10)


@pytest.fixture
def services(pg, smtp, sms_gateway):
    return smtp, sms_gateway


def test_killed_email_sender_resends_at_most_one_message(services):
    """SIGKILL after 3 of 6 emails reached the server (the 3rd unacknowledged): the rerun delivers all, one twice."""
    smtp, _ = services
    keys = record(*(EmailRequest(f"crash{i}@example.in", f"Crash {i}", "body", key=f"crash-{i}") for i in range(6)))
    smtp.handler.hold_at = 3
    kill_sender_mid_send("email", keys, lambda: len(smtp.messages) >= 3)
    smtp.handler.release.set()
    states = statuses()
    assert [states[k] for k in keys] == ["sent", "sent", "sending", "sending", "sending", "sending"]
    result = nf.resend_stuck_messages()
    assert result["sent"] == 4 and result["recovered"] == 4
    delivered = Counter(m.rcpt_tos[0] for m in smtp.messages)
    assert set(delivered) == {f"crash{i}@example.in" for i in range(6)}
    assert sum(delivered.values()) == 7 and delivered["crash2@example.in"] == 2
    assert set(statuses().values()) == {"sent"}


def test_killed_sms_sender_resends_at_most_one_message(services):
    """SIGKILL while the gateway holds the 2nd of 5 SMS: the rerun delivers every SMS, the 2nd twice at most."""
    _, gateway = services
    keys = record(*(SmsRequest(f"98765000{i:02d}", f"Crash {i}", key=f"sms-crash-{i}") for i in range(5)))
    gateway.hold_at = 2
    kill_sender_mid_send("sms", keys, lambda: gateway.arrived >= 2)
    gateway.release.set()
    wait_until(lambda: len(gateway.requests) >= 2)  # the held request is answered (to nobody) and counted
    nf.resend_stuck_messages()
    delivered = Counter(r.data()["sms"][0]["to"][0] for r in gateway.delivered)
    assert set(delivered) == {f"9198765000{i:02d}" for i in range(5)}
    assert sum(delivered.values()) == 6 and delivered["919876500001"] == 2
    assert set(statuses().values()) == {"sent"}


@pytest.fixture
def smtp_with_login(pg, monkeypatch):
    """An SMTP server that requires AUTH as shop/right, and settings that log in as shop/wrong."""
    server = DevSMTPServer("127.0.0.1", free_port(), login=("shop", "right")).start()
    settings = get_settings()
    monkeypatch.setattr(settings, "smtp_port", server.port)
    monkeypatch.setattr(settings, "smtp_username", "shop")
    monkeypatch.setattr(settings, "smtp_password", SecretStr("wrong"))
    yield server
    server.stop()


def test_refused_smtp_login_makes_every_message_dead_then_replay_delivers_each_once(smtp_with_login, monkeypatch):
    """SMTP 535 at login: all of the run's emails are dead with the reason, the run fails; after the fix, one each."""
    for i in range(3):
        state = nf.send_email(f"auth{i}@example.in", "Auth", "body", idempotency_key=f"auth-{i}", return_state=True)
        assert state.is_failed() and "535" in state.message
    with session_scope() as s:
        reasons = s.execute(text("SELECT status, last_error FROM notifications")).all()
    assert {st for st, _ in reasons} == {"dead"} and all("could not open the email sender" in e for _, e in reasons)
    monkeypatch.setattr(get_settings(), "smtp_password", SecretStr("right"))
    result = nf.replay_dead_letters(since=db_now() - dt.timedelta(hours=1))
    assert result["replayed"] == 3 and result["sent"] == 3
    assert sorted(m.rcpt_tos[0] for m in smtp_with_login.messages) == [f"auth{i}@example.in" for i in range(3)]
    assert nf.replay_dead_letters(since=db_now() - dt.timedelta(hours=1))["replayed"] == 0


def test_missing_sms_key_makes_the_messages_dead_then_replay_delivers_once(services, monkeypatch):
    """MSG91 without SMS_API_KEY: dead at once naming the setting, run failed; set the key, replay: one SMS."""
    _, gateway = services
    monkeypatch.setattr(get_settings(), "sms_api_key", None)
    state = nf.send_sms("9876543210", "hello", idempotency_key="nokey", return_state=True)
    assert state.is_failed() and "SMS_API_KEY" in state.message
    assert statuses() == {"nokey": "dead"} and gateway.requests == []
    monkeypatch.setattr(get_settings(), "sms_api_key", SecretStr("test-sms-key"))
    assert nf.replay_dead_letters(since=db_now() - dt.timedelta(hours=1))["sent"] == 1
    assert len(gateway.delivered) == 1


def test_bad_address_then_fixed_customer_replay_reaches_the_new_address(services, pg):
    """A customer's malformed email is dead at once; after fixing the customer, replay delivers once to the new one."""
    smtp, gateway = services
    cid = make_customer(pg, email="meera@@example", phone="9876500005")
    oid = make_order(pg, customer_id=cid)
    state = nf.send_order_confirmation(oid, return_state=True)
    assert state.is_failed() and "fix the customer's address" in state.message
    assert "meera@@example" not in state.message  # what reaches Prefect is masked
    assert len(gateway.delivered) == 1 and smtp.messages == []
    with pg.begin() as c:
        c.execute(text("UPDATE customers SET email = 'meera.nair@example.in' WHERE id = :c"), {"c": cid})
    assert nf.replay_dead_letters(since=db_now() - dt.timedelta(hours=1))["sent"] == 1
    assert [m.rcpt_tos for m in smtp.messages] == [["meera.nair@example.in"]]
    assert f"Order #{oid} confirmed" in smtp.messages[0].message["Subject"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: nf.send_email("asha@example.in", "Hi\r\nBcc: all@example.in", "body"), "subject contains a line"),
        (lambda: nf.send_email("asha@example.in\n", "Hi", "body"), "to contains a line break"),
        (lambda: EmailRequest("asha@example.in", "Hi\x00", "body"), "subject must be at most 300 characters"),
        (lambda: nf.send_order_shipped(1, "AWB1\r\nX-Evil: 1", "BlueDart"), "tracking_number contains a line"),
    ],
)
def test_line_breaks_in_header_fields_are_refused_before_any_write(services, call, message):
    """CR, LF or NUL in a subject, an address or a shipping field fails in one line; no row, no message."""
    smtp, _ = services
    with pytest.raises(InvalidInputError, match=message) as err:
        call()
    assert "\n" not in str(err.value)
    assert statuses() == {} and smtp.messages == []


# ---- token messages ------------------------------------------------------------------------------


@pytest.fixture
def debug_logs_to_the_api():
    """Every log line of flow and task runs, DEBUG included, shipped to the API while the test runs (the
    suite's default level, WARNING, would keep INFO and DEBUG lines out of what the scan reads)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("prefect", "prefect.flow_runs", "prefect.task_runs")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


def _runs_started(api, top: list) -> tuple[list, list]:
    """The flow runs the test started and every run under them (subflows, any depth), and their task runs."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    flows, frontier = list(top), list(top)
    while frontier:
        children = api.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier))
        )
        frontier = [r.id for r in children if r.id not in flows]
        flows += frontier
    # The server records task runs from their events, a moment after the runs end (longer on a busy machine).
    # Read until two reads a second apart agree (and found some), or 30 s have passed.
    deadline, before = time.monotonic() + 30, -1
    while True:
        task_runs = api.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=flows)))
        if (task_runs and len(task_runs) == before) or time.monotonic() > deadline:
            return flows, task_runs
        before = len(task_runs)
        time.sleep(1)


def _redis_values(client) -> list[str]:
    """Every key under the test's prefix with its value, whatever its type."""
    prefix = get_settings().redis_key_prefix
    out = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        kind = client.type(key)
        value = {
            "string": lambda k: client.get(k),
            "hash": lambda k: client.hgetall(k),
            "set": lambda k: client.smembers(k),
            "zset": lambda k: client.zrange(k, 0, -1, withscores=True),
            "list": lambda k: client.lrange(k, 0, -1),
        }.get(kind, lambda k: "")(key)
        out.append(f"{key} {value!r}")
    return out


def _everything_stored(pg, redis_client, run_ids) -> dict[str, list[str]]:
    """What every store holds after the runs: Prefect's logs, parameters, task runs and artifacts of every run
    they made, every text column of every table, every Redis key of the test's prefix."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # the runs' log lines reach the API in batches; send what is queued
    stored: dict[str, list[str]] = {}
    with get_client(sync_client=True) as api:
        flows, task_runs = _runs_started(api, list(run_ids))
        logs = api.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=flows)))
        stored["logs"] = [f"{log.level} {log.name} {log.message}" for log in logs]
        stored["parameters"] = [repr(api.read_flow_run(run_id).parameters) for run_id in flows]
        stored["task_runs"] = [repr((t.name, t.task_inputs, t.state and t.state.message)) for t in task_runs]
        artifacts = api.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=flows)))
        stored["artifacts"] = [repr(a.data) for a in artifacts]
    stored["database"] = []
    with pg.connect() as c:
        columns = c.execute(
            text(
                "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public' "
                "AND data_type IN ('text', 'character varying', 'jsonb')"
            )
        ).all()
        for table, column in columns:
            stored["database"] += [str(v) for v in c.execute(text(f'SELECT "{column}" FROM "{table}"')).scalars() if v]
    stored["redis"] = _redis_values(redis_client)
    return stored


def _absent(secret: str, haystack: str) -> bool:
    return re.search(rf"(?<![0-9A-Za-z_-]){re.escape(secret)}(?![0-9A-Za-z_-])", haystack) is None


def test_token_messages_deliver_working_secrets_that_are_stored_nowhere(
    services, pg, redis_client, debug_logs_to_the_api
):
    """send-otp, send-password-reset, send-email-verification with every log line at DEBUG: each code or link
    works, and none is in any log line, parameter, task run or artifact of any run they made, in any table or
    in any Redis key (the tokens' own keys hold only their HMAC)."""
    smtp, gateway = services
    cid = make_customer(pg, name="Kavya", email="kavya@example.in", phone="9876512340")
    runs = [
        nf.send_otp(cid, "login", return_state=True),
        nf.send_password_reset(cid, return_state=True),
        nf.send_email_verification(cid, return_state=True),
    ]
    assert all(r.is_completed() for r in runs)
    otp_text = gateway.delivered[0].data()["sms"][0]["message"]
    code = re.search(r"\b(\d{6})\b is your IndoStar Naturals code for login", otp_text).group(1)
    bodies = [m.message.get_body(("plain",)).get_content() for m in smtp.messages]
    reset = re.search(r"reset\?token=([\w-]+)", bodies[0]).group(1)
    verify = re.search(r"verify\?token=([\w-]+)", bodies[1]).group(1)
    stored = _everything_stored(pg, redis_client, [r.state_details.flow_run_id for r in runs])
    # The scan read something from every store, DEBUG and INFO lines included: it cannot pass by reading nothing.
    assert {name for name, found in stored.items() if not found} == set(), {k: len(v) for k, v in stored.items()}
    assert any(line.startswith("10 ") for line in stored["logs"]), "no DEBUG line reached the API"
    assert any(line.startswith("20 ") and "email: {" in line for line in stored["logs"]), "no INFO line of ours"
    assert len(stored["artifacts"]) >= 3 and len(stored["task_runs"]) >= 6
    assert any(token_store.token_key("otp", str(cid)) in line for line in stored["redis"])
    haystack = "\n".join(line for lines in stored.values() for line in lines)
    for secret in (code, reset, verify):
        assert _absent(secret, haystack), "a token or code was found at rest"
    assert tokens.verify_otp(cid, code) == tokens.OtpResult.OK
    assert tokens.consume("password_reset", reset) == str(cid)
    assert tokens.consume("email_verification", verify) == str(cid)


# ---- stuck messages and retention ----------------------------------------------------------------


def test_resend_stuck_messages_finishes_old_pending_rows_only(services):
    """A message a dead run left pending for long is sent; a fresh pending one is left to the run that owns it."""
    smtp, _ = services
    keys = record(
        EmailRequest("old@example.in", "Old", "body", key="old"),
        EmailRequest("new@example.in", "New", "body", key="new"),
    )
    with session_scope() as s:
        s.execute(text("UPDATE notifications SET updated_at = now() - interval '1 hour' WHERE idempotency_key = 'old'"))
    result = nf.resend_stuck_messages(older_than_minutes=15)
    assert result["found"] == 1 and result["sent"] == 1
    assert [m.rcpt_tos for m in smtp.messages] == [["old@example.in"]] and statuses()[keys[1]] == "pending"


def test_retention_clears_old_texts_and_deletes_old_rows_but_keeps_references_and_open_work(services, pg):
    """After 7 days plain texts are emptied (business references stay); after 180 days finished rows go."""
    oid = make_order(pg)
    record(EmailRequest("a@example.in", "A", "secret text", key="plain-old"))
    record(EmailRequest("b@example.in", "B", "fresh text", key="plain-new"))
    record(EmailRequest("c@example.in", "C", "ancient", key="plain-ancient"))
    record(EmailRequest("d@example.in", "D", "still pending", key="pending-old"))
    with session_scope() as s:
        from lib.notify.requests import OrderConfirmationRequest

        dlog.record(s, OrderConfirmationRequest((oid,), "conf-old").build(s).messages)
        s.execute(text("UPDATE notifications SET status = 'sent' WHERE idempotency_key <> 'pending-old'"))
        # Ages on the flows' clock: retention's cutoff comes from the run's scheduled time.
        now = dt.datetime.now(dt.UTC)
        s.execute(text("UPDATE notifications SET updated_at = :t"), {"t": now})
        s.execute(
            text(
                "UPDATE notifications SET updated_at = :t "
                "WHERE idempotency_key IN ('plain-old', 'conf-old:email', 'pending-old')"
            ),
            {"t": now - dt.timedelta(days=8)},
        )
        s.execute(
            text("UPDATE notifications SET updated_at = :t WHERE idempotency_key = 'plain-ancient'"),
            {"t": now - dt.timedelta(days=200)},
        )
    out = cleanup_delivery_log()
    assert out["removed"] == {"rows_deleted": 1, "payloads_cleared": 1, "tasks_deleted": 0}
    with session_scope() as s:
        payloads = dict(s.execute(text("SELECT idempotency_key, payload FROM notifications")).tuples().all())
    assert payloads["plain-old"] == {} and payloads["plain-new"]["text"] == "fresh text"
    assert payloads["conf-old:email"]["order_id"] == oid and payloads["pending-old"]["text"] == "still pending"
    assert "plain-ancient" not in payloads
    with pytest.raises(PermanentError, match="cleared by retention"):
        with session_scope() as s:
            s.execute(text("UPDATE notifications SET status = 'dead' WHERE idempotency_key = 'plain-old'"))
        nf.replay_dead_letters(since=db_now() - dt.timedelta(days=30))
