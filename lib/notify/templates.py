"""Message text from Jinja2 files in lib/notify/templates: email (subject, HTML, text) and SMS.

HTML is autoescaped; every template uses StrictUndefined, so a missing variable is a
``PermanentError`` naming it, as is an unknown template. Amounts are paise in the
context and print as rupees with Indian digit grouping (₹1,23,456.00); times print in
IST. Each SMS template is registered with its DLT template id in ``templates/dlt.json``
(Indian senders must use registered text); ``dlt_text`` turns a template into the
registered form so a test can catch drift.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import jinja2

from lib.errors import PermanentError

TEMPLATE_DIR = Path(__file__).parent / "templates"
DLT_REGISTRY = TEMPLATE_DIR / "dlt.json"
IST = ZoneInfo("Asia/Kolkata")
# Templates a caller may name (send-templated-email / -sms).
TEMPLATES = ("order_confirmation", "order_shipped", "payment_failed", "renewal_reminder")
# Templates of the token messages: rendered only inside the run that issued the token.
TOKEN_TEMPLATES = ("otp", "password_reset", "email_verification")


@dataclass(frozen=True)
class EmailContent:
    subject: str
    text: str
    html: str


@dataclass(frozen=True)
class SmsContent:
    text: str
    dlt_template_id: str


def _group_indian(whole: int) -> str:
    s = str(whole)
    if len(s) <= 3:
        return s
    head, tail = s[:-3], s[-3:]
    pairs: list[str] = []
    while len(head) > 2:
        pairs.insert(0, head[-2:])
        head = head[:-2]
    return ",".join([head, *pairs, tail])


def format_inr(paise: int, symbol: str = "₹") -> str:
    """Paise as rupees with Indian grouping: 12345600 -> ₹1,23,456.00."""
    if isinstance(paise, bool) or not isinstance(paise, int):
        raise PermanentError(f"amount must be an integer number of paise, got {paise!r}")
    sign = "-" if paise < 0 else ""
    rupees, rest = divmod(abs(paise), 100)
    return f"{sign}{symbol}{_group_indian(rupees)}.{rest:02d}"


def _as_datetime(value: Any) -> dt.datetime | dt.date:
    if isinstance(value, dt.datetime | dt.date):
        return value
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value) if "T" in value or " " in value else dt.date.fromisoformat(value)
        except ValueError:
            pass
    raise PermanentError(f"not a date or time: {value!r}")


def format_ist(value: Any) -> str:
    """A timestamp in IST (28 Nov 2026, 11:55 PM IST); a bare date as 'Sat, 28 Nov 2026'."""
    when = _as_datetime(value)
    if isinstance(when, dt.datetime):
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)  # the database and Prefect speak UTC
        return when.astimezone(IST).strftime("%d %b %Y, %I:%M %p IST")
    return when.strftime("%a, %d %b %Y")


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE_DIR),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
    )
    env.filters["inr"] = format_inr
    # SMS says "Rs." not "₹": the rupee sign forces UCS-2 and halves the characters per SMS.
    env.filters["rs"] = lambda paise: format_inr(paise, "Rs.")
    env.filters["ist"] = format_ist
    return env


def _render(name: str, filename: str, context: dict[str, Any]) -> str:
    if name not in TEMPLATES and name not in TOKEN_TEMPLATES:
        raise PermanentError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    try:
        return environment().get_template(filename).render(**context)
    except jinja2.TemplateNotFound as exc:
        raise PermanentError(f"template {name!r} has no file {exc.name!r} in {TEMPLATE_DIR}") from None
    except jinja2.UndefinedError as exc:
        raise PermanentError(f"template {name!r}: missing variable: {exc.message}") from None
    except (TypeError, ValueError) as exc:
        raise PermanentError(f"template {name!r}: bad value in context: {exc}") from None


def render_email(name: str, context: dict[str, Any]) -> EmailContent:
    """Subject, plain text and HTML of one email template."""
    subject = " ".join(_render(name, f"{name}.subject.txt", context).split())
    text = _render(name, f"{name}.txt", context).strip() + "\n"
    html = _render(name, f"{name}.html", context)
    return EmailContent(subject=subject, text=text, html=html)


@lru_cache(maxsize=1)
def dlt_registry() -> dict[str, dict[str, str]]:
    """Template name -> {"template_id", "text"} as registered with the DLT platform."""
    registry: dict[str, dict[str, str]] = json.loads(DLT_REGISTRY.read_text(encoding="utf-8"))
    return registry


def render_sms(name: str, context: dict[str, Any]) -> SmsContent:
    """SMS text of one template and the DLT template id it is registered under."""
    text = " ".join(_render(name, f"{name}.sms.txt", context).split())
    entry = dlt_registry().get(name)
    if entry is None:
        raise PermanentError(f"SMS template {name!r} has no DLT registration in {DLT_REGISTRY.name}")
    return SmsContent(text=text, dlt_template_id=entry["template_id"])


_EXPR = re.compile(r"\{\{.*?\}\}", re.S)


def dlt_text(name: str) -> str:
    """The SMS template as DLT registers it: each {{ expression }} becomes {#var#}."""
    source = (TEMPLATE_DIR / f"{name}.sms.txt").read_text(encoding="utf-8")
    if "{%" in source:
        raise PermanentError(f"SMS template {name!r} uses a Jinja statement; DLT text allows only variables")
    return " ".join(_EXPR.sub("{#var#}", source).split())
