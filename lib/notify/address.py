"""Recipient addresses: validation, E.164 normalisation, and masking for logs and artifacts.

Bad input raises ``InvalidInputError`` so a flow rejects it before anything is written.
"""

from __future__ import annotations

import re

from lib.errors import InvalidInputError

# Deliberately modest: one @, a dotted domain, no spaces or angle brackets. The SMTP
# server is the final judge; this only catches what is certainly wrong.
_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$")
_DIGITS = re.compile(r"\d+")


def validate_email(address: str) -> str:
    """The address trimmed, with the domain lower-cased; InvalidInputError if malformed."""
    if not isinstance(address, str):
        raise InvalidInputError(f"email address must be text, got {type(address).__name__}")
    value = address.strip()
    if len(value) > 320 or not _EMAIL.match(value) or ".." in value:
        raise InvalidInputError(f"not a valid email address: {mask_email(value)!r}")
    local, domain = value.rsplit("@", 1)
    return f"{local}@{domain.lower()}"


def normalize_phone(phone: str, default_country: str = "91") -> str:
    """The number in E.164 (+<country><number>); 10-digit numbers are taken as Indian."""
    if not isinstance(phone, str | int):
        raise InvalidInputError(f"phone number must be text, got {type(phone).__name__}")
    raw = str(phone).strip()
    if re.search(r"[^\d\s()+.-]", raw) or not raw:
        raise InvalidInputError(f"not a valid phone number: {mask_phone(raw)!r}")
    digits = "".join(_DIGITS.findall(raw))
    if raw.startswith("+"):
        e164 = "+" + digits
    elif raw.startswith("00"):
        e164 = "+" + digits[2:]
    elif len(digits) == 11 and digits.startswith("0"):  # trunk prefix: 0 98765 43210
        e164 = f"+{default_country}{digits[1:]}"
    elif len(digits) == 10:
        e164 = f"+{default_country}{digits}"
    elif len(digits) == 12 and digits.startswith("91"):
        e164 = "+" + digits
    else:
        raise InvalidInputError(f"not a valid phone number: {mask_phone(raw)!r}")
    if not 8 <= len(e164) - 1 <= 15:
        raise InvalidInputError(f"not a valid phone number: {mask_phone(raw)!r}")
    if e164.startswith("+91") and (len(e164) != 13 or e164[3] not in "6789"):
        raise InvalidInputError(f"not a valid Indian mobile number: {mask_phone(raw)!r}")
    return e164


def mask_email(address: str) -> str:
    """a***@example.com: first character of the local part, the domain kept."""
    if "@" not in address:
        return "***"
    local, domain = address.rsplit("@", 1)
    return f"{local[:1]}***@{domain}"


def mask_phone(phone: str) -> str:
    """+91******3210: country code and last four digits kept."""
    digits = "".join(_DIGITS.findall(str(phone)))
    if len(digits) < 8:
        return "***"
    if str(phone).strip().startswith("+") and digits.startswith("91") and len(digits) == 12:
        return f"+91{'*' * 6}{digits[-4:]}"
    if str(phone).strip().startswith("+"):
        return f"+{digits[:2]}{'*' * (len(digits) - 6)}{digits[-4:]}"
    return f"{'*' * (len(digits) - 4)}{digits[-4:]}"


def mask(recipient: str) -> str:
    """Mask an email address or a phone number, whichever it is."""
    return mask_email(recipient) if "@" in recipient else mask_phone(recipient)


_EMAIL_ANYWHERE = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_PHONE_ANYWHERE = re.compile(r"\+?\d[\d\s-]{8,}\d")


def scrub(text: str) -> str:
    """Text safe for a log or an artifact: any email address or phone number in it masked."""
    text = _EMAIL_ANYWHERE.sub(lambda m: mask_email(m.group(0)), text)
    return _PHONE_ANYWHERE.sub(lambda m: mask_phone(m.group(0)), text)


_CONTROL = re.compile(r"[\r\n\x00]")


def check_header(value: str, name: str) -> str:
    """A header value (subject, name, address) without CR, LF or NUL; InvalidInputError naming the field.

    A line break in a header would let the value add headers of its own (header injection),
    and smtplib refuses it only at send time with an error that looks transient.
    """
    if not isinstance(value, str):
        raise InvalidInputError(f"{name} must be text, got {type(value).__name__}")
    if _CONTROL.search(value):
        raise InvalidInputError(f"{name} contains a line break or NUL character, which a mail header cannot carry")
    return value


_URL = re.compile(r"https?://[^\s]+")
_CODE = re.compile(r"\b\d{4,8}\b")


def mask_secrets(text: str) -> str:
    """Text with links and one-time codes masked (for the log SMS provider and stored errors)."""
    text = _URL.sub(
        lambda m: m.group(0).split("?", 1)[0].split("#", 1)[0] + ("?***" if "?" in m.group(0) else ""), text
    )
    return scrub(_CODE.sub("******", text))
