"""The ops-report flow under the Prefect harness: run history from the API, our tables, artifact, email."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from sqlalchemy import text

from flows.reports import ops_report
from lib.config import get_settings
from lib.errors import InvalidInputError
from tests.builders import make_subscription, today

_attempts = {"n": 0}


@task(retries=1, retry_delay_seconds=0)
def _flaky() -> int:
    _attempts["n"] += 1
    if _attempts["n"] == 1:
        raise ConnectionError("first attempt fails")
    return 1


@flow(name="report-probe-ok")
def _probe_ok() -> int:
    return _flaky()


@flow(name="report-probe-fails")
def _probe_fails() -> None:
    raise RuntimeError("boom")


@pytest.fixture
def reports_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("REPORTS_DIR", str(tmp_path / "reports"))
    get_settings.cache_clear()
    yield tmp_path / "reports"
    get_settings.cache_clear()


def _seed_tables(pg) -> None:
    # Stamped on the report's clock (the run's start), as the flows would stamp them.
    now, day = dt.datetime.now(dt.UTC), today()
    sub = make_subscription(pg, due=day)
    with pg.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO notifications (idempotency_key, channel, kind, template, recipient, payload, status, "
                "last_error, created_at, updated_at) VALUES ('k1', 'email', 'order_confirmation', "
                "'order_confirmation', 'a@example.in', '{}', 'sent', NULL, :t, :t), ('k2', 'email', "
                "'order_confirmation', 'order_confirmation', 'b@example.in', '{}', 'dead', "
                "'SMTP 550 no such user b@example.in', :t, :t), "
                "('k3', 'sms', 'order_shipped', 'order_shipped', '+919876543210', '{}', 'pending', NULL, :t, :t)"
            ),
            {"t": now},
        )
        conn.execute(
            text(
                "INSERT INTO subscription_outcomes (subscription_id, delivery_date, run_date, outcome, "
                "run_id) VALUES (:s, :d, :d, 'out_of_stock', 'r1')"
            ),
            {"s": sub, "d": day},
        )
        conn.execute(
            text(
                "INSERT INTO payments (razorpay_payment_id, event_id, subscription_id, delivery_date, amount_paise, "
                "currency, status, reason) VALUES ('pay_HELD', 'evt_h', :s, current_date, 129900, 'INR', 'held', "
                "'could not make the order: needs 1, 0 in stock')"
            ),
            {"s": sub},
        )
        conn.execute(
            text(
                "INSERT INTO webhook_events (event_id, event_type, status, reason, payment_id, amount_paise, "
                "expected_paise) VALUES ('evt_r', 'subscription.charged', 'rejected', 'amount 1 paise, expected "
                "129900 paise', 'pay_R', 1, 129900)"
            )
        )


def test_ops_report_summarises_runs_and_tables_publishes_markdown_and_emails_it(pg, smtp, reports_dir):
    """Per-flow runs, retries and a failure, messages, dead letters and outcomes reach the artifact and the email."""
    _seed_tables(pg)
    _probe_ok()
    with pytest.raises(RuntimeError, match="boom"):
        _probe_fails()
    stats = ops_report(days=1, email_to="ops-lead@indostar.example")
    assert stats["runs"] >= 2 and stats["retries"] >= 1 and stats["dead_letters"] == 1
    assert Path(stats["chart"]).read_bytes().startswith(b"\x89PNG")
    assert Path(stats["chart"]).parent == reports_dir.resolve()
    with get_client(sync_client=True) as client:
        [artifact] = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["ops-report"])),
            sort=ArtifactSort.CREATED_DESC,
            limit=1,
        )
    md = artifact.data
    assert artifact.type == "markdown"
    probe_row = next(line for line in md.splitlines() if line.startswith("| report-probe-ok |"))
    assert probe_row.split("|")[-2].strip() == "1"  # one task retry
    assert "| report-probe-fails |" in md
    assert "| email | 0 | 0 | 1 | 0 | 1 | 2 |" in md
    assert "b@example.in" not in md and "b***@example.in" in md
    assert "data:image/png;base64," in md
    held = next(line for line in md.splitlines() if line.startswith("| pay_HELD |"))
    assert "₹1,299.00" in held and "held" in held and "0 in stock" in held
    refused = next(line for line in md.splitlines() if line.startswith("| evt_r |"))
    assert "rejected" in refused and "₹0.01" in refused and "₹1,299.00" in refused
    assert stats["payments_to_settle"] == 1 and stats["refused_events"] == 1
    [mail] = smtp.messages
    assert mail.rcpt_tos == ["ops-lead@indostar.example"]
    assert [p.get_content_type() for p in mail.message.walk()][-1] == "image/png"
    assert "## Flow runs" in mail.message.get_body(("plain",)).get_content()


def test_ops_report_rejects_bad_input_before_doing_anything(pg, smtp, reports_dir):
    """Zero days or a malformed address fail at once: no artifact file written, no email sent."""
    with pytest.raises(InvalidInputError, match="days must be between 1 and 366, got 0"):
        ops_report(days=0)
    with pytest.raises(InvalidInputError, match="not a valid email address"):
        ops_report(days=7, email_to="not-an-address")
    assert not reports_dir.exists() and smtp.messages == []
