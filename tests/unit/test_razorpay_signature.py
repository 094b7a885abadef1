"""The Razorpay webhook signature against vectors computed outside our code, not against our own sign().

The expected digests were computed with OpenSSL over the exact bytes below
(`openssl dgst -sha256 -hmac <secret> body.bin`), and the first one is published in
RFC 4231 (HMAC-SHA256 test case 2): if sign() or verify_signature() drifted from
HMAC-SHA256 over the raw body, these constants would no longer match.
"""

from __future__ import annotations

import json

import pytest

from lib.errors import SignatureError
from lib.razorpay import sign, verify_signature

WEBHOOK_SECRET = "test-webhook-secret"  # the suite's RAZORPAY_WEBHOOK_SECRET (tests/conftest.py)

# A subscription.charged body as Razorpay might send it: keys in no sorted order, uneven
# spacing, a newline, and raw UTF-8 (Pune in Devanagari) that json.dumps would escape.
RAW_CHARGE = (
    '{"payload":{"payment":{"entity":{"status":"captured","currency":"INR","amount":129900,'
    '"id":"pay_VEC1","entity":"payment","notes":{"city":"पुणे"}}},'
    '"subscription":{"entity":{"status":"active","id":"sub_VEC1"}}},  "event" : "subscription.charged",\n'
    ' "contains":["subscription","payment"],"account_id":"acc_test","created_at":1795000000}'
).encode()
# openssl dgst -sha256 -hmac test-webhook-secret (RAW_CHARGE written to a file)
RAW_CHARGE_SIGNATURE = "28a5e42b7674d6d8d9dfd7c2b6d0f1a8dc2f0351f9bb4c0762f44513828c7955"
# openssl dgst -sha256 -hmac not-the-webhook-secret (same file)
RAW_CHARGE_SIGNATURE_OTHER_SECRET = "093d9ee2db149ddb0cf855d8fde61556c89174ee919aed48ce463ff3b0a7be7c"


def test_sign_matches_the_rfc_4231_hmac_sha256_vector():
    """sign() is plain hex HMAC-SHA256: RFC 4231 test case 2 (key "Jefe") gives the published digest."""
    assert sign(b"what do ya want for nothing?", "Jefe") == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    )


def test_sign_and_verify_match_a_digest_computed_with_openssl_over_the_raw_body():
    """The raw body, unusual spacing, key order and UTF-8 included, verifies against OpenSSL's digest."""
    assert sign(RAW_CHARGE, WEBHOOK_SECRET) == RAW_CHARGE_SIGNATURE
    verify_signature(RAW_CHARGE, RAW_CHARGE_SIGNATURE, WEBHOOK_SECRET)
    verify_signature(RAW_CHARGE, f" {RAW_CHARGE_SIGNATURE}\n", WEBHOOK_SECRET)  # header whitespace is not the body


@pytest.mark.parametrize(
    "reserialised",
    [
        pytest.param(lambda doc: json.dumps(doc).encode(), id="json.dumps (spaces, escaped UTF-8)"),
        pytest.param(
            lambda doc: json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode(), id="compact, same order"
        ),
        pytest.param(
            lambda doc: json.dumps(doc, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode(),
            id="compact, sorted keys",
        ),
        pytest.param(lambda doc: RAW_CHARGE + b"\n", id="one trailing newline"),
    ],
)
def test_a_reserialised_body_with_the_original_signature_is_rejected(reserialised):
    """The same JSON document in other bytes fails: the signature covers the raw body, not its meaning."""
    doc = json.loads(RAW_CHARGE)
    body = reserialised(doc)
    assert json.loads(body) == doc and body != RAW_CHARGE
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(body, RAW_CHARGE_SIGNATURE, WEBHOOK_SECRET)


def test_a_signature_made_with_another_secret_is_rejected():
    """A body signed under a different secret, or checked under one, fails verification."""
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(RAW_CHARGE, RAW_CHARGE_SIGNATURE_OTHER_SECRET, WEBHOOK_SECRET)
    with pytest.raises(SignatureError, match="does not match"):
        verify_signature(RAW_CHARGE, RAW_CHARGE_SIGNATURE, "not-the-webhook-secret")


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        (None, "missing X-Razorpay-Signature"),
        ("", "missing X-Razorpay-Signature"),
        (RAW_CHARGE_SIGNATURE[:-1], "does not match the body"),
        (RAW_CHARGE_SIGNATURE[1:] + "0", "does not match the body"),
    ],
)
def test_a_missing_truncated_or_shifted_signature_is_rejected(signature, message):
    """A missing signature, or one that is not exactly the digest, is refused."""
    with pytest.raises(SignatureError, match=message):
        verify_signature(RAW_CHARGE, signature, WEBHOOK_SECRET)
