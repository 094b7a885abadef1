"""Recipient validation, E.164 normalisation and masking."""

import pytest

from lib.errors import InvalidInputError
from lib.notify.address import mask, mask_email, mask_phone, normalize_phone, scrub, validate_email


@pytest.mark.parametrize(
    ("raw", "e164"),
    [
        ("9876543210", "+919876543210"),
        ("98765 43210", "+919876543210"),
        ("098765-43210", "+919876543210"),
        ("+91 98765 43210", "+919876543210"),
        ("919876543210", "+919876543210"),
        ("0091 9876543210", "+919876543210"),
        ("+1 (415) 555-0100", "+14155550100"),
        ("+44 7700 900123", "+447700900123"),
    ],
)
def test_phone_numbers_become_e164_with_india_as_default(raw, e164):
    """Ten-digit, trunk-prefixed and international forms all normalise to one E.164 number."""
    assert normalize_phone(raw) == e164


@pytest.mark.parametrize("raw", ["", "12345", "98765abc10", "+91 12345 67890", "+9198765432101", "phone"])
def test_malformed_phone_numbers_are_rejected(raw):
    """Garbage, short numbers and impossible Indian mobiles raise InvalidInputError."""
    with pytest.raises(InvalidInputError, match=r"not a valid (Indian mobile|phone) number"):
        normalize_phone(raw)


@pytest.mark.parametrize("raw", ["a@b", "no-at.example.in", "two@@example.in", "a b@example.in", "x@example..in", ""])
def test_malformed_emails_are_rejected(raw):
    """Addresses that cannot be delivered raise InvalidInputError before anything is written."""
    with pytest.raises(InvalidInputError, match="not a valid email address"):
        validate_email(raw)


def test_valid_email_is_trimmed_and_domain_lowercased():
    """Surrounding spaces go and the domain is case-folded; the local part is kept."""
    assert validate_email("  Priya.S@Example.IN ") == "Priya.S@example.in"


def test_masking_keeps_only_a_hint_of_the_recipient():
    """Logs show a***@example.com and +91******3210, never the full address or number."""
    assert mask_email("asha@example.com") == "a***@example.com"
    assert mask_phone("+919876543210") == "+91******3210"
    assert mask("+919876543210") == "+91******3210"
    assert mask("asha@example.com") == "a***@example.com"


def test_scrub_masks_addresses_inside_free_text():
    """Provider error text that echoes a recipient is masked before it reaches a log or artifact."""
    out = scrub("550 <asha@example.com> rejected; sms to +919876543210 failed")
    assert "asha@" not in out and "9876543210" not in out
    assert "a***@example.com" in out and "+91******3210" in out
