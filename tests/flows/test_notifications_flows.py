"""Notification flows end to end: real SMTP server and SMS gateway on loopback, real delivery log."""

import datetime as dt
import time
from collections import Counter

import pytest
from prefect import flow
from sqlalchemy import select, text

from flows import notifications as nf
from lib.config import get_settings
from lib.db import get_engine, session_scope
from lib.errors import InvalidInputError, PermanentError
from lib.models import Notification
from lib.notify.requests import EmailRequest, OrderConfirmationRequest, RenewalReminderRequest
from tests.builders import db_now, make_customer, make_order, make_product, make_subscription, today


def rows(**where) -> list[Notification]:
    with session_scope() as s:
        stmt = select(Notification).order_by(Notification.id)
        for k, v in where.items():
            stmt = stmt.where(getattr(Notification, k) == v)
        return list(s.scalars(stmt))


def body(message, subtype: str) -> str:
    return message.get_body(preferencelist=(subtype,)).get_content()


@pytest.fixture
def services(pg, smtp, sms_gateway):
    """Database, SMTP and SMS gateway, all empty."""
    return smtp, sms_gateway


def test_send_email_delivers_exact_message_once_per_key(services):
    """Headers, body and recipient arrive as given; the same key twice sends one message."""
    smtp, _ = services
    for _ in range(2):
        result = nf.send_email("asha@example.in", "Hello", "Plain body", "<p>Rich</p>", idempotency_key="k-1")
    assert result["sent"] == 1
    assert len(smtp.messages) == 1
    got = smtp.messages[0]
    assert got.rcpt_tos == ["asha@example.in"]
    assert got.message["Subject"] == "Hello" and got.message["Message-ID"]
    assert body(got.message, "plain").strip() == "Plain body" and "<p>Rich</p>" in body(got.message, "html")
    [row] = rows()
    assert (row.idempotency_key, row.status, row.attempts) == ("k-1", "sent", 1)
    assert row.provider_message_id == got.message["Message-ID"]


def test_keyless_runs_each_send_and_a_retried_run_sends_one_otp_code(services):
    """Celery's semantics: two runs without a key send twice (each keyed by its run id, not its content);
    one run whose SMS delivery is retried sends one code, the one that verifies."""
    import re

    from lib import tokens

    smtp, gateway = services
    states = [nf.send_email("asha@example.in", "Same", "Same body", return_state=True) for _ in range(2)]
    assert len(smtp.messages) == 2
    assert [r.idempotency_key for r in rows()] == [f"run-{st.state_details.flow_run_id}" for st in states]
    cid = make_customer(get_engine(), phone="+919812300001")
    gateway.fail_next(503)
    nf.send_otp(cid, "login")
    assert [r.status for r in gateway.requests] == [503, 200]
    [otp] = rows(kind="otp")
    assert (otp.status, otp.attempts) == ("sent", 2)
    code = re.search(r"\b(\d{6})\b is your", gateway.delivered[0].data()["sms"][0]["message"]).group(1)
    assert tokens.verify_otp(cid, code) == tokens.OtpResult.OK


def test_bad_address_fails_before_anything_is_written(services):
    """A malformed email or phone raises InvalidInputError and leaves no row and no message."""
    smtp, gateway = services
    with pytest.raises(InvalidInputError, match="not a valid email address"):
        nf.send_email("not-an-address", "Hi", "x")
    with pytest.raises(InvalidInputError, match="not a valid phone number"):
        nf.send_sms("12345", "Hi")
    assert rows() == [] and smtp.messages == [] and gateway.requests == []


def test_send_sms_reaches_gateway_in_e164(services):
    """A 10-digit number goes out as +91 and the gateway's id is stored."""
    _, gateway = services
    nf.send_sms("98765 43210", "Your OTP is 1234", idempotency_key="otp-1")
    [req] = gateway.requests
    assert req.data()["sms"] == [{"message": "Your OTP is 1234", "to": ["919876543210"]}]
    [row] = rows()
    assert row.status == "sent" and row.provider_message_id.startswith("gw-") and row.recipient == "+919876543210"


def test_templated_email_and_sms_render_the_template(services):
    """Templated flows send the rendered subject/HTML/text and the DLT-registered SMS text."""
    smtp, gateway = services
    ctx = {
        "customer_name": "Ravi",
        "order_id": 7,
        "total_paise": 12345600,
        "tracking_number": "AWB9",
        "carrier": "BlueDart",
    }
    nf.send_templated_email("order_shipped", ctx, "ravi@example.in")
    nf.send_templated_sms("order_shipped", ctx, "9876543210")
    msg = smtp.messages[0].message
    assert msg["Subject"] == "Order #7 has shipped"
    assert "₹1,23,456.00" in body(msg, "plain") and "AWB9" in body(msg, "html")
    sms = gateway.requests[0].data()
    assert sms["DLT_TE_ID"] == "1107170000000000002"
    assert "via BlueDart, tracking no. AWB9." in sms["sms"][0]["message"]


def test_unknown_template_is_refused_before_anything_is_written(services):
    """An unknown template fails the run at once and writes nothing, so the caller's key stays usable."""
    smtp, _ = services
    with pytest.raises(InvalidInputError, match="unknown template 'welcome'"):
        nf.send_templated_email("welcome", {}, "ravi@example.in", idempotency_key="tpl-1")
    with pytest.raises(InvalidInputError, match="missing variable"):
        nf.send_templated_email("order_shipped", {"order_id": 7}, "ravi@example.in", idempotency_key="tpl-1")
    assert rows() == [] and smtp.messages == []
    ctx = {"customer_name": "Ravi", "order_id": 7, "total_paise": 100, "tracking_number": "A1", "carrier": "DTDC"}
    nf.send_templated_email("order_shipped", ctx, "ravi@example.in", idempotency_key="tpl-1")
    assert [r.status for r in rows()] == ["sent"] and len(smtp.messages) == 1


def test_order_confirmation_sends_email_and_sms(services, pg):
    """One order: an email with the items and total, and an SMS, under order-confirmation:<id>:<channel>."""
    smtp, gateway = services
    cid = make_customer(pg, name="Meera", email="meera@example.in", phone="9876500001")
    oid = make_order(pg, customer_id=cid, quantity=2)
    result = nf.send_order_confirmation(oid)
    assert result["sent"] == 2
    msg = smtp.messages[0].message
    assert smtp.messages[0].rcpt_tos == ["meera@example.in"]
    assert msg["Subject"] == f"Order #{oid} confirmed: ₹2,598.00"
    assert "Tulsi Green Tea 100 g x 2" in body(msg, "plain")
    assert gateway.requests[0].data()["sms"][0]["to"] == ["919876500001"]
    assert {r.idempotency_key for r in rows()} == {f"order-confirmation:{oid}:email", f"order-confirmation:{oid}:sms"}
    nf.send_order_confirmation(oid)
    assert len(smtp.messages) == 1 and len(gateway.requests) == 1


def test_unknown_order_is_rejected(services):
    """An order id that names no row fails with NotFoundError and writes nothing."""
    from lib.errors import NotFoundError

    with pytest.raises(NotFoundError, match="order 424242 does not exist"):
        nf.send_order_confirmation(424242)
    assert rows() == []


def test_order_shipped_and_payment_failed(services, pg):
    """Shipping and payment-failure notices reach both channels with their details."""
    smtp, gateway = services
    cid = make_customer(pg, name="Kabir", email="kabir@example.in", phone="9876500002")
    oid = make_order(pg, customer_id=cid)
    nf.send_order_shipped(oid, "AWB42", "Delhivery")
    nf.send_payment_failed(order_id=oid, reason="card declined")
    subjects = [m.message["Subject"] for m in smtp.messages]
    assert subjects == [f"Order #{oid} has shipped", f"Payment failed for your order #{oid}"]
    assert "card declined" in body(smtp.messages[1].message, "plain")
    assert "AWB42" in gateway.requests[0].data()["sms"][0]["message"]
    assert len(gateway.requests) == 2


def test_payment_failed_for_subscription_is_keyed_by_cycle(services, pg):
    """A subscription's failure notice names the product; its key carries the delivery date."""
    smtp, _ = services
    due = today() + dt.timedelta(days=2)
    sid = make_subscription(pg, customer_id=make_customer(pg, phone=None), quantity=3, due=due)
    nf.send_payment_failed(subscription_id=sid, reason="UPI mandate revoked")
    assert f"subscription #{sid}" in smtp.messages[0].message["Subject"]
    assert "₹3,897.00" in body(smtp.messages[0].message, "plain")
    assert [r.idempotency_key for r in rows()] == [f"payment-failed:subscription:{sid}:{due.isoformat()}:email"]


def test_renewal_reminder_respects_opt_out(services, pg):
    """A reminder goes only to opted-in channels: SMS opt-out means email only."""
    smtp, gateway = services
    cid = make_customer(pg, sms_opt_in=False)
    sid = make_subscription(pg, customer_id=cid, product_id=make_product(pg, name="Neem Soap"), quantity=2)
    nf.send_subscription_renewal_reminder(sid, today() + dt.timedelta(days=1))
    assert len(smtp.messages) == 1 and gateway.requests == []
    assert "Neem Soap" in smtp.messages[0].message["Subject"]


def test_smtp_421_then_accepted_delivers_once(services):
    """A 421 (try later) is transient: the task retries and the server's next 250 is the only delivery."""
    smtp, _ = services
    smtp.handler.data_replies.append("421 4.3.2 service busy, try later")
    result = nf.send_email("asha@example.in", "Retry me", "body", idempotency_key="down-up")
    assert result["sent"] == 1 and len(smtp.messages) == 1
    [row] = rows()
    assert row.status == "sent" and row.attempts == 2 and row.last_error is None


def test_smtp_550_is_dead_without_retry(services):
    """A rejected recipient is not retried: one attempt, dead, the server's reason kept."""
    smtp, _ = services
    smtp.handler.rcpt_replies["x@example.in"] = "550 5.1.1 no such user"
    with pytest.raises(PermanentError, match="no such user"):
        nf.send_email("x@example.in", "Hi", "body", idempotency_key="k550")
    [row] = rows()
    assert (row.status, row.attempts) == ("dead", 1) and "550 5.1.1 no such user" in row.last_error
    assert smtp.messages == []


def test_gateway_503_then_200_delivers_once(services):
    """A 503 is retried and the retry's 200 is the only delivery."""
    _, gateway = services
    gateway.fail_next(503)
    nf.send_sms("9876543210", "hello", idempotency_key="s503")
    assert [r.status for r in gateway.requests] == [503, 200]
    assert len(gateway.delivered) == 1
    [row] = rows()
    assert (row.status, row.attempts) == ("sent", 2)


def test_gateway_400_is_dead_after_one_try(services):
    """A 400 is permanent: one request, dead, reason kept."""
    _, gateway = services
    gateway.fail_next(400)
    with pytest.raises(PermanentError, match="HTTP 400"):
        nf.send_sms("9876543210", "hello", idempotency_key="s400")
    assert len(gateway.requests) == 1
    [row] = rows()
    assert (row.status, row.attempts) == ("dead", 1) and "HTTP 400" in row.last_error


def test_gateway_timeout_is_retried(services):
    """A gateway slower than SMS_TIMEOUT is retried and the message ends sent."""
    _, gateway = services
    gateway.delay_next(1.5)
    nf.send_sms("9876543210", "slow", idempotency_key="slow-1")
    [row] = rows()
    assert row.status == "sent" and row.attempts == 2 and "timed out" not in (row.last_error or "")


def test_retries_exhausted_end_dead_with_reason(services):
    """Four 503s (first try + 3 retries) leave the message dead with the last error."""
    _, gateway = services
    gateway.fail_next(503, 503, 503, 503)
    with pytest.raises(PermanentError, match="503"):
        nf.send_sms("9876543210", "never", idempotency_key="s503x4")
    [row] = rows()
    assert (row.status, row.attempts) == ("dead", 4) and "HTTP 503" in row.last_error
    assert len(gateway.requests) == 4


def test_replay_delivers_dead_letter_once_after_fix(services):
    """After a 550 is fixed, replay-dead-letters sends the stored message once; a second replay sends nothing."""
    smtp, _ = services
    smtp.handler.rcpt_replies["x@example.in"] = "550 5.1.1 no such user"
    with pytest.raises(PermanentError, match=r"1 message\(s\) dead: .*550 5\.1\.1 no such user"):
        nf.send_email("x@example.in", "Replay me", "stored body", idempotency_key="replay-1")
    smtp.handler.rcpt_replies.clear()
    [dead] = rows()
    result = nf.replay_dead_letters(ids=[dead.id])
    assert result["replayed"] == 1 and result["sent"] == 1
    assert nf.replay_dead_letters(ids=[dead.id])["replayed"] == 0
    assert nf.replay_dead_letters(since=db_now() - dt.timedelta(hours=1))["replayed"] == 0
    [msg] = smtp.messages
    assert msg.message["Subject"] == "Replay me"
    assert msg.message["Message-ID"] == dead.payload["message_id"]
    with pytest.raises(InvalidInputError, match="give ids or a time window"):
        nf.replay_dead_letters()


@flow
def bulk_emails(recipients: list[str], prefix: str) -> dict:
    """Test harness: plain emails through the bulk path, one request each, keyed <prefix>-<n>."""
    requests = [EmailRequest(to, f"Window {i}", "stored body", key=f"{prefix}-{i}") for i, to in enumerate(recipients)]
    return nf.send_in_batches(requests, "bulk-emails")


def test_replay_takes_dead_letters_last_updated_in_since_until_only(services, pg):
    """replay-dead-letters(since, until) resends, once each, the dead emails and SMS (a 400 and a retries-exhausted
    503) last updated in [since, until): a row at `since` goes, rows before it or at `until` stay dead."""
    smtp, gateway = services
    names = ["before", "at-since", "inside", "at-until"]
    for name in names:
        smtp.handler.rcpt_replies[f"{name}@example.in"] = "550 5.1.1 mailbox unavailable"
    with pytest.raises(PermanentError, match=r"bulk-emails: 4 message\(s\) dead"):
        bulk_emails([f"{n}@example.in" for n in names], "window")
    gateway.fail_next(400)
    with pytest.raises(PermanentError, match="HTTP 400"):
        nf.send_sms("9876500101", "rejected once", idempotency_key="window-sms-400")
    gateway.fail_next(503, 503, 503, 503)
    with pytest.raises(PermanentError, match="HTTP 503"):
        nf.send_sms("9876500102", "retries exhausted", idempotency_key="window-sms-503")
    nf.send_email("sent@example.in", "Already sent", "body", idempotency_key="window-sent")
    assert [r.status for r in rows(idempotency_key="window-sms-503")] == ["dead"]
    assert rows(idempotency_key="window-sms-503")[0].attempts == 4

    since = db_now(pg).replace(microsecond=0) - dt.timedelta(days=1)
    until = since + dt.timedelta(hours=6)
    updated = {
        "window-0": since - dt.timedelta(microseconds=1),
        "window-1": since,
        "window-2": since + dt.timedelta(hours=1),
        "window-3": until,
        "window-sms-400": since + dt.timedelta(hours=2),
        "window-sms-503": until - dt.timedelta(microseconds=1),
        "window-sent": since + dt.timedelta(hours=3),
    }
    with pg.begin() as conn:
        for key, at in updated.items():
            conn.execute(
                text("UPDATE notifications SET updated_at = :t WHERE idempotency_key = :k"), {"t": at, "k": key}
            )
    smtp.handler.reset()
    gateway.reset()

    result = nf.replay_dead_letters(since=since, until=until)
    assert (result["replayed"], result["sent"], result["dead"]) == (4, 4, 0)
    assert sorted(m.rcpt_tos[0] for m in smtp.messages) == ["at-since@example.in", "inside@example.in"]
    assert Counter(r.data()["sms"][0]["to"][0] for r in gateway.delivered) == {"919876500101": 1, "919876500102": 1}
    status = {r.idempotency_key: (r.status, r.attempts) for r in rows()}
    assert status["window-0"] == status["window-3"] == ("dead", 1)
    assert status["window-sms-503"] == ("sent", 5) and status["window-sms-400"] == ("sent", 2)
    assert status["window-sent"] == ("sent", 1)
    assert nf.replay_dead_letters(since=since, until=until)["replayed"] == 0
    assert len(smtp.messages) == 2 and len(gateway.requests) == 2


@flow
def bulk_confirmations_paced(order_ids: list[int], pause_after_first: float) -> dict:
    """Test harness: the bulk path when the requests after the first come later than the soft limit
    (as the nightly run's confirmation pages do after a long night)."""

    def requests():
        for i in range(0, len(order_ids), 2):
            if i == 2:
                time.sleep(pause_after_first)
            yield OrderConfirmationRequest(tuple(order_ids[i : i + 2]))

    return nf.send_in_batches(requests(), "bulk-confirmations")


def test_bulk_path_defers_requests_past_the_soft_limit_and_the_rerun_sends_each_once(services, pg, monkeypatch):
    """Requests reached after the soft limit are recorded but not sent, without failing the run; the stuck-message
    sweep (or a rerun) sends every message once, the ones already sent untouched."""
    smtp, gateway = services
    ids = [make_order(pg, customer_id=make_customer(pg, phone=f"98765001{i:02d}")) for i in range(6)]
    monkeypatch.setattr(get_settings(), "flow_soft_limit_seconds", 0.3)
    first = bulk_confirmations_paced(ids, pause_after_first=0.5)
    assert (first["deferred_batches"], first["sent"], first["pending"]) == (2, 4, 8)
    assert len(smtp.messages) == 2 and len(gateway.requests) == 2
    assert {r.idempotency_key.split(":")[1] for r in rows(status="pending")} == {str(i) for i in ids[2:]}
    monkeypatch.undo()
    swept = nf.resend_stuck_messages(older_than_minutes=0)  # what the every-10-minutes deployment does
    assert (swept["found"], swept["sent"]) == (8, 8)
    second = bulk_confirmations(ids)
    assert (second["deferred_batches"], second["sent"]) == (0, 12)
    assert Counter(m.rcpt_tos[0] for m in smtp.messages) == {rows_email(i): 1 for i in ids}
    assert sorted(Counter(r.data()["sms"][0]["to"][0] for r in gateway.delivered).values()) == [1] * 6
    assert {r.status for r in rows()} == {"sent"} and len(rows()) == 12


@flow
def bulk_confirmations(order_ids: list[int]) -> dict:
    """Test harness: the bulk path the nightly run uses, over confirmation requests of two orders each."""
    requests = (OrderConfirmationRequest(tuple(order_ids[i : i + 2])) for i in range(0, len(order_ids), 2))
    return nf.send_in_batches(requests, "bulk-confirmations")


@flow
def bulk_reminders(items: list[tuple[int, str]]) -> dict:
    """Test harness: the bulk path of the daily reminders."""
    return nf.send_in_batches([RenewalReminderRequest(tuple(items))], "bulk-reminders")


def test_bulk_order_confirmations_batch_and_count(services, pg):
    """The bulk path sends email + SMS per order across batches, fails the run for a bad address, reruns as a no-op."""
    smtp, gateway = services
    ids = [make_order(pg, customer_id=make_customer(pg, phone=f"98765000{i:02d}")) for i in range(5)]
    smtp.handler.rcpt_replies[rows_email(ids[1])] = "550 5.1.1 no such user"
    state = bulk_confirmations([*ids, 999_999], return_state=True)
    assert state.is_failed() and "1 message(s) dead" in state.message
    assert len(smtp.messages) == 4 and len(gateway.requests) == 5
    assert {r.status for r in rows()} == {"sent", "dead"} and len(rows(status="sent")) == 9
    assert bulk_confirmations(ids, return_state=True).is_failed()  # the dead letter still fails the run
    assert len(smtp.messages) == 4 and len(gateway.requests) == 5


def rows_email(order_id: int) -> str:
    with session_scope() as s:
        return s.execute(
            text("SELECT c.email FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = :o"),
            {"o": order_id},
        ).scalar_one()


def test_bulk_renewal_reminders_once_per_subscription_and_date(services, pg):
    """(subscription, date) pairs: opt-outs honoured, product/quantity/amount/date in the text, one per date."""
    smtp, gateway = services
    product = make_product(pg, name="Amla Juice", price_paise=45_000)
    a = make_subscription(pg, product_id=product, quantity=2)
    b = make_subscription(pg, product_id=product, customer_id=make_customer(pg, email_opt_in=False, sms_opt_in=False))
    day, later = today() + dt.timedelta(days=1), (today() + dt.timedelta(days=15)).isoformat()
    result = bulk_reminders([(a, day.isoformat()), (b, day.isoformat()), (a, day.isoformat())])
    assert result["sent"] == 2 and result["opted_out"] == 2
    text_body = body(smtp.messages[0].message, "plain")
    assert "2 x Amla Juice" in text_body and "₹900.00" in text_body and f"{day:%d %b %Y}" in text_body
    bulk_reminders([(a, day.isoformat())])
    assert len(smtp.messages) == 1 and len(gateway.requests) == 1
    bulk_reminders([(a, later)])
    assert len(smtp.messages) == 2
    with pytest.raises(InvalidInputError, match="is not \\(subscription_id, 'YYYY-MM-DD'\\)"):
        RenewalReminderRequest(((a, "not-a-date"),))


BIG_ID = 2**63 - 1  # the largest customer id the column holds: the longest prefix a link key can have


@pytest.mark.parametrize(
    ("send", "key_around_callers"),
    [
        (
            lambda cid, key: nf.send_otp(cid, "p" * 32, idempotency_key=key),
            lambda cid: f"otp:{cid}:{'p' * 32}::sms",
        ),
        (lambda cid, key: nf.send_password_reset(cid, idempotency_key=key), lambda cid: f"password-reset:{cid}::email"),
        (
            lambda cid, key: nf.send_email_verification(cid, idempotency_key=key),
            lambda cid: f"email-verification:{cid}::email",
        ),
    ],
)
def test_a_token_request_whose_derived_key_overflows_the_log_is_refused_in_one_line(
    services, pg, redis_client, send, key_around_callers
):
    """A 160-character key (the most a caller may give) that makes the delivery-log key longer than its 200-character
    column fails as bad input in one line: no row, no message, no token; a key that makes exactly 200 is sent."""
    smtp, gateway = services
    with pg.begin() as c:
        c.execute(
            text(
                "INSERT INTO customers (id, name, email, phone) VALUES (:i, 'Big', 'limit@example.in', '+919876543210')"
            ),
            {"i": BIG_ID},
        )
    assert len(key_around_callers(BIG_ID)) + 160 > 200
    with pytest.raises(InvalidInputError, match="more than the 200 the log holds") as err:
        send(BIG_ID, "k" * 160)
    assert "\n" not in str(err.value)
    assert rows() == [] and smtp.messages == [] and gateway.requests == []
    assert list(redis_client.scan_iter(match=f"{get_settings().redis_key_prefix}tok*")) == []
    fits = "f" * (200 - len(key_around_callers(BIG_ID)))
    assert send(BIG_ID, fits)["sent"] == 1
    assert [len(r.idempotency_key) for r in rows()] == [200]
