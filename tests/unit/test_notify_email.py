"""MIME building and SMTP error classification (no network)."""

import email
import email.policy
import io
import smtplib
from email.generator import BytesGenerator

import pytest

from lib.errors import PermanentError, TransientError
from lib.notify.email_channel import build_message, classify, wire_bytes


def test_message_has_message_id_and_plain_text_alternative():
    """Every email carries a Message-ID; with HTML it is multipart/alternative, text first."""
    built = build_message("Shop <orders@indostar.example>", "a@example.in", "₹1,299.00 paid", "plain ₹", "<p>₹</p>")
    msg = email.message_from_bytes(built.as_bytes(), policy=email.policy.default)
    assert msg["Message-ID"].endswith("@indostar.example>")
    assert msg["Subject"] == "₹1,299.00 paid" and msg["From"] == "Shop <orders@indostar.example>"
    assert msg.get_content_type() == "multipart/alternative"
    parts = [p.get_content_type() for p in msg.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    assert msg.get_body(("plain",)).get_content().strip() == "plain ₹"


def test_text_only_message_is_single_part():
    """Without HTML the message is plain text only."""
    msg = build_message("orders@indostar.example", "a@example.in", "Hi", "plain body")
    assert msg.get_content_type() == "text/plain"
    assert msg["Message-ID"]


@pytest.mark.parametrize(
    "subject",
    [
        "Hello 1",
        "  two  spaces  ",
        "trailing ",
        "=?utf-8?q?x?=",
        "a" * 73,
        "a " * 40,
        "₹1,299 paid",
        "tab\there",
        "x" * 200,
    ],
)
@pytest.mark.parametrize("html", [None, "<p>hi</p>"])
def test_wire_bytes_are_what_smtplib_send_message_writes(subject, html):
    """Our flattening (short ASCII headers written directly) sends the bytes smtplib's own send_message would."""
    msg = build_message("IndoStar Naturals <orders@indostar.example>", "a@example.in", subject, "body é", html)
    smtplib_way = io.BytesIO()
    BytesGenerator(smtplib_way).flatten(msg, linesep="\r\n")  # as smtplib.SMTP.send_message does
    assert wire_bytes(msg) == smtplib_way.getvalue()
    assert b"\r\n" in wire_bytes(msg) and b"\n" not in wire_bytes(msg).replace(b"\r\n", b"")


def test_smtp_5xx_is_permanent_and_4xx_transient():
    """550 recipient rejected never retries; 421/451 and dropped connections do."""
    refused = smtplib.SMTPRecipientsRefused({"x@example.in": (550, b"5.1.1 no such user")})
    assert isinstance(classify(refused, "t"), PermanentError)
    assert "no such user" in str(classify(refused, "t"))
    assert isinstance(classify(smtplib.SMTPRecipientsRefused({"x": (451, b"later")}), "t"), TransientError)
    assert isinstance(classify(smtplib.SMTPDataError(554, b"rejected"), "t"), PermanentError)
    assert isinstance(classify(smtplib.SMTPSenderRefused(421, b"busy", "f"), "t"), TransientError)
    assert isinstance(classify(smtplib.SMTPServerDisconnected("gone"), "t"), TransientError)
    assert isinstance(classify(ConnectionRefusedError(111, "refused"), "t"), TransientError)
    assert isinstance(classify(TimeoutError("timed out"), "t"), TransientError)
