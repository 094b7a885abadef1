"""The channels and the delivery log against real PostgreSQL, aiosmtpd and the HTTP gateway."""

import pytest
from sqlalchemy import select

from lib.config import get_settings
from lib.db import get_engine, session_scope
from lib.errors import PermanentError, TransientError
from lib.models import Notification
from lib.notify import delivery
from lib.notify import delivery_log as dlog
from lib.notify import requests as req
from lib.notify.email_channel import SmtpConfig, SmtpSession, build_message
from lib.notify.sms_channel import SmsConfig, make_client, send_sms
from tests.builders import make_customer, make_order, today

SENDER = "IndoStar Naturals <orders@indostar.example>"


def _emails(n: int, prefix: str = "bulk") -> list[dlog.Message]:
    batch = req.MessageBatch()
    for i in range(n):
        batch.extend(
            req.EmailRequest(f"user{i}@example.in", f"Hello {i}", f"body {i}", None, f"{prefix}:{i}").build(None)
        )  # type: ignore[arg-type]  # plain emails read nothing
    return batch.messages


def _deliver(keys: list[str], final: bool = False) -> dlog.DeliveryReport:
    config = SmtpConfig.from_settings(get_settings())
    with dlog.delivery_session(get_engine()) as (conn, token):
        return delivery.deliver(conn, token, keys, "email", lambda: delivery.email_sender(config), final=final)


def _status(key: str) -> tuple[str, int, str | None]:
    with session_scope() as s:
        row = s.scalars(select(Notification).where(Notification.idempotency_key == key)).one()
        return row.status, row.attempts, row.last_error


def test_batch_goes_over_one_session_and_rerun_sends_nothing(pg, smtp):
    """A batch is delivered once; delivering the same keys again sends nothing more."""
    out = _emails(5)
    with session_scope() as s:
        assert dlog.record(s, out) == 5
        assert dlog.record(s, out) == 0  # ON CONFLICT DO NOTHING
    keys = [m.key for m in out]
    for _ in range(2):
        result = _deliver(keys)
    assert result.as_dict() == {"sent": 0, "dead": 0, "failed": 0, "skipped": 5, "recovered": 0}
    assert sorted(m.rcpt_tos[0] for m in smtp.messages) == sorted(f"user{i}@example.in" for i in range(5))
    assert _status("bulk:0")[0] == "sent"


def test_rejected_recipient_is_dead_and_the_rest_go(pg, smtp):
    """A 550 for one recipient kills that message only, with the server's reason kept."""
    smtp.handler.rcpt_replies["user2@example.in"] = "550 5.1.1 no such user"
    out = _emails(4)
    with session_scope() as s:
        dlog.record(s, out)
    result = _deliver([m.key for m in out])
    assert (result.sent, result.dead) == (3, 1)
    status, attempts, error = _status("bulk:2")
    assert (status, attempts) == ("dead", 1) and "550" in error and "no such user" in error
    assert len(smtp.messages) == 3


def test_server_down_leaves_batch_failed_then_dead_on_final_attempt(pg, smtp):
    """Connection refused is transient: rows stay failed for a retry, and die only on the last attempt."""
    smtp.stop()
    out = _emails(2, "down")
    with session_scope() as s:
        dlog.record(s, out)
    first = _deliver([m.key for m in out])
    assert first.transient_error and first.failed == 2
    assert _status("down:0")[:2] == ("failed", 1)
    last = _deliver([m.key for m in out], final=True)
    assert last.dead == 2 and _status("down:1")[0] == "dead"


def test_session_to_a_closed_port_is_transient(smtp):
    """Nothing listening: TransientError naming the address and the setting."""
    smtp.stop()
    with pytest.raises(TransientError, match="SMTP_HOST"), SmtpSession(SmtpConfig.from_settings(get_settings())):
        pass


def test_smtp_session_sends_exact_headers(smtp):
    """Subject, To, From and Message-ID arrive as built."""
    msg = build_message(SENDER, "a@example.in", "Subject ₹1,299.00", "text", "<p>html</p>")
    with SmtpSession(SmtpConfig.from_settings(get_settings())) as session:
        mid = session.send(msg)
    got = smtp.messages[0].message
    assert got["Message-ID"] == mid and got["Subject"] == "Subject ₹1,299.00"
    assert got["To"] == "a@example.in" and "orders@indostar.example" in got["From"]


def _msg91() -> SmsConfig:
    s = get_settings()
    return SmsConfig("msg91", s.sms_base_url, api_key="test-sms-key", sender_id="INDSTR", timeout=1)


def test_msg91_request_carries_authkey_dlt_id_and_number(sms_gateway):
    """MSG91-style: JSON with the DLT template id, number without +, key in the authkey header."""
    config = _msg91()
    with make_client(config) as client:
        pid = send_sms(client, config, "+919876543210", "Hello", "1107170000000000001")
    req = sms_gateway.requests[0]
    assert pid.startswith("gw-")
    assert req.path == "/api/v2/sendsms" and req.headers["authkey"] == "test-sms-key"
    body = req.data()
    assert body["DLT_TE_ID"] == "1107170000000000001" and body["sender"] == "INDSTR"
    assert body["sms"] == [{"message": "Hello", "to": ["919876543210"]}]


def test_twilio_request_is_a_form_post_with_basic_auth(sms_gateway):
    """Twilio-style: form fields To/From/Body, basic auth with account sid and API key."""
    import base64

    config = SmsConfig("twilio", get_settings().sms_base_url, api_key="k3y", account_sid="AC123", timeout=1)
    with make_client(config) as client:
        assert send_sms(client, config, "+919876543210", "Hello", None).startswith("gw-")
    req = sms_gateway.requests[0]
    assert req.path == "/2010-04-01/Accounts/AC123/Messages.json"
    assert req.data() == {"To": "+919876543210", "From": "INDSTR", "Body": "Hello"}
    assert req.headers["authorization"] == "Basic " + base64.b64encode(b"AC123:k3y").decode()


@pytest.mark.parametrize(("status", "error"), [(503, TransientError), (429, TransientError), (400, PermanentError)])
def test_gateway_status_codes_are_classified(sms_gateway, status, error):
    """429 and 5xx are worth retrying; any other 4xx is not."""
    sms_gateway.fail_next(status)
    config = _msg91()
    with make_client(config) as client, pytest.raises(error, match=str(status)):
        send_sms(client, config, "+919876543210", "Hello", "1107170000000000001")


def test_gateway_timeout_is_transient(sms_gateway):
    """A gateway slower than SMS_TIMEOUT is a TransientError naming the setting."""
    sms_gateway.delay_next(1.5)
    config = _msg91()
    with make_client(config) as client, pytest.raises(TransientError, match="SMS_TIMEOUT"):
        send_sms(client, config, "+919876543210", "Hello", "1107170000000000001")


def test_log_provider_masks_the_number_codes_and_links(caplog):
    """The development provider logs the text with the number, one-time codes and link tokens masked."""
    import logging

    caplog.set_level(logging.INFO, logger="lib.notify.sms_channel")
    text = "482913 is your code; reset at https://indostar.example/r?token=s3cr3tT0ken"
    pid = send_sms(None, SmsConfig("log", "http://unused", production=False), "+919876543210", text, None)
    assert pid.startswith("log-")
    assert "+91******3210" in caplog.text and "9876543210" not in caplog.text
    assert "482913" not in caplog.text and "s3cr3tT0ken" not in caplog.text


def test_log_provider_is_refused_in_production():
    """With INDOSTAR_ENV production the log provider refuses to 'send', naming SMS_PROVIDER."""
    from lib.errors import ConfigError

    with pytest.raises(ConfigError, match="SMS_PROVIDER=log"):
        send_sms(None, SmsConfig("log", "http://unused", production=True), "+919876543210", "Hello", None)


def test_gateway_error_body_is_scrubbed_before_it_is_stored(sms_gateway):
    """A gateway that echoes the API key, a code and the number gets none of them into the error we keep."""
    sms_gateway.fail_next(400)
    sms_gateway.error_body = "bad request authkey=test-sms-key text='123456 is your code' to +919876543210"
    config = _msg91()
    with make_client(config) as client, pytest.raises(PermanentError, match="HTTP 400") as err:
        send_sms(client, config, "+919876543210", "123456 is your code", None)
    message = str(err.value)
    assert "HTTP 400" in message and "test-sms-key" not in message
    assert "123456" not in message and "9876543210" not in message


def test_order_confirmation_builder_records_bad_phone_as_dead(pg):
    """A customer's malformed phone becomes a dead SMS with the reason; the email still goes out."""
    cid = make_customer(pg, phone="12345", email="bad-phone@example.in")
    oid = make_order(pg, customer_id=cid)
    with session_scope() as s:
        built = req.OrderConfirmationRequest((oid, 999_999)).build(s)
    by_channel = {m.channel: m for m in built.messages}
    assert by_channel["email"].error is None and by_channel["email"].key == f"order-confirmation:{oid}:email"
    assert "phone" in by_channel["sms"].error
    assert built.missing == [999_999]


def test_reminders_honour_opt_outs(pg):
    """Reminders skip channels the customer opted out of; counts say so."""
    import datetime as dt

    from tests.builders import make_subscription

    cid = make_customer(pg, email_opt_in=False, sms_opt_in=True)
    sid = make_subscription(pg, customer_id=cid)
    with session_scope() as s:
        built = req.RenewalReminderRequest(((sid, today() + dt.timedelta(days=1)),)).build(s)
    assert [m.channel for m in built.messages] == ["sms"]
    assert built.messages[0].key == f"renewal-reminder:{sid}:{today() + dt.timedelta(days=1)}:sms"
    assert built.opted_out == 1
