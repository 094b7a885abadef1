"""Task webhooks against an HTTP server on loopback: signed bodies, retries on what may succeed later."""

import datetime as dt
import hashlib
import hmac

from lib import webhooks
from lib.config import get_settings


def _url() -> str:
    return f"{get_settings().sms_base_url}/hooks/test"


def test_signature_is_hmac_sha256_of_the_exact_bytes():
    """The header is sha256=<hex HMAC> of the body bytes, computed here with hashlib; any change breaks it."""
    finished = dt.datetime.now(dt.UTC).isoformat()
    body = webhooks.body("run-1", "task", "send-email-task", "COMPLETED", finished, {"sent": 1})
    expected = "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
    assert webhooks.signature(body, "k") == expected
    assert webhooks.verify(body, expected, "k")
    assert not webhooks.verify(body + b" ", expected, "k") and not webhooks.verify(body, expected, "other")
    assert not webhooks.verify(body, None, "k")


def test_post_retries_5xx_then_delivers_once(sms_gateway):
    """A 503 then a 200: the receiver gets the same signed body twice and the second answer counts."""
    sms_gateway.fail_next(503)
    body = webhooks.body("run-2", "flow", "cleanup-expired-carts", "COMPLETED", "now", None)
    assert webhooks.post(_url(), body, "s3cret", delays=(0.01, 0.01))
    assert [r.status for r in sms_gateway.requests] == [503, 200]
    assert all(
        r.body == body and webhooks.verify(r.body, r.headers["x-indostar-signature"], "s3cret")
        for r in sms_gateway.requests
    )


def test_post_gives_up_on_a_4xx_at_once(sms_gateway):
    """A receiver that refuses (400) is not asked again; the call reports failure."""
    sms_gateway.fail_next(400)
    assert not webhooks.post(_url(), b"{}", "s3cret", delays=(0.01, 0.01))
    assert len(sms_gateway.requests) == 1


def test_summary_keeps_plain_counts_only():
    """What goes out is the run's plain numbers and strings, never nested data."""
    assert webhooks.summary({"sent": 2, "reasons": ["x"], "note": "ok", "rows": [{"a": 1}]}) == {
        "sent": 2,
        "note": "ok",
    }
    assert webhooks.summary(None) is None
