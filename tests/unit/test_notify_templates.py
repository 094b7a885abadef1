"""Templates: rupee and IST formatting, autoescaping, strict variables, DLT registry drift."""

import datetime as dt
import re

import pytest

from lib.errors import PermanentError
from lib.notify import templates as t


@pytest.mark.parametrize(
    ("paise", "text"),
    [
        (0, "₹0.00"),
        (5, "₹0.05"),
        (129_900, "₹1,299.00"),
        (12_345_600, "₹1,23,456.00"),
        (1_234_567_899, "₹1,23,45,678.99"),
        (-99_950, "-₹999.50"),
    ],
)
def test_amounts_print_in_rupees_with_indian_grouping(paise, text):
    """Paise become rupees grouped in lakhs and crores (₹1,23,456.00)."""
    assert t.format_inr(paise) == text


def test_times_print_in_ist_and_dates_as_days():
    """A UTC timestamp shows in Asia/Kolkata (+05:30); a bare date keeps its day."""
    assert t.format_ist(dt.datetime(2026, 11, 28, 18, 30, tzinfo=dt.UTC)) == "29 Nov 2026, 12:00 AM IST"
    assert t.format_ist("2026-12-01") == "Tue, 01 Dec 2026"


CONTEXTS = {
    "order_confirmation": {
        "customer_name": "Priya",
        "order_id": 42,
        "items": [{"name": "Tulsi Tea", "quantity": 2, "unit_price_paise": 64950, "line_total_paise": 129900}],
        "total_paise": 129900,
        "ordered_at": "2026-11-28T10:00:00+00:00",
        "delivery_date": "2026-12-01",
    },
    "order_shipped": {
        "customer_name": "Priya",
        "order_id": 42,
        "total_paise": 129900,
        "tracking_number": "AWB123",
        "carrier": "Delhivery",
    },
    "payment_failed": {
        "customer_name": "Priya",
        "reference": "order #42",
        "amount_paise": 129900,
        "reason": "declined",
    },
    "renewal_reminder": {
        "customer_name": "Priya",
        "product_name": "Tulsi Tea",
        "quantity": 2,
        "amount_paise": 12345600,
        "delivery_date": "2026-12-01",
    },
}


@pytest.mark.parametrize("name", t.TEMPLATES)
def test_every_template_renders_subject_html_text_and_sms(name):
    """Each template has all four parts, with the amount in rupees and a DLT id on the SMS."""
    email = t.render_email(name, CONTEXTS[name])
    sms = t.render_sms(name, CONTEXTS[name])
    assert email.subject and "\n" not in email.subject
    assert email.html.lstrip().startswith("<!doctype html>")
    assert "Priya" in email.text and "Priya" in sms.text
    assert re.fullmatch(r"\d{19}", sms.dlt_template_id)
    assert "₹" not in sms.text  # SMS stays GSM-7


def test_html_is_autoescaped_but_text_is_not():
    """A name with markup is escaped in HTML and kept literally in the plain-text part."""
    ctx = dict(CONTEXTS["order_shipped"], customer_name="<b>Ravi & Co</b>")
    email = t.render_email("order_shipped", ctx)
    assert "&lt;b&gt;Ravi &amp; Co&lt;/b&gt;" in email.html
    assert "<b>Ravi & Co</b>" in email.text


def test_missing_variable_is_a_permanent_error_naming_it():
    """StrictUndefined: a context without tracking_number fails and says so."""
    ctx = {k: v for k, v in CONTEXTS["order_shipped"].items() if k != "tracking_number"}
    with pytest.raises(PermanentError, match="tracking_number"):
        t.render_email("order_shipped", ctx)


def test_unknown_template_is_a_permanent_error():
    """A template name that does not exist fails at once, listing the known ones."""
    with pytest.raises(PermanentError, match="unknown template 'welcome'"):
        t.render_email("welcome", {})


@pytest.mark.parametrize("name", t.TEMPLATES)
def test_sms_text_matches_its_dlt_registration(name):
    """An SMS template edited without re-registering with DLT would be blocked by operators: fail here first."""
    registered = t.dlt_registry()[name]
    assert t.dlt_text(name) == registered["text"], f"re-register {name} with DLT and update dlt.json"


def test_every_registered_dlt_template_exists():
    """The registry names no template that is gone, and ids are unique."""
    registry = t.dlt_registry()
    assert set(registry) == set(t.TEMPLATES) | {"otp"}
    ids = [e["template_id"] for e in registry.values()]
    assert len(set(ids)) == len(ids)


def test_rendered_sms_fills_exactly_the_registered_variables():
    """Rendered text matches the registered pattern with each {#var#} replaced by a value."""
    for name in t.TEMPLATES:
        pattern = re.escape(t.dlt_registry()[name]["text"]).replace(re.escape("{#var#}"), ".+?")
        assert re.fullmatch(pattern, t.render_sms(name, CONTEXTS[name]).text)
