"""The ops report's pure summaries and rendering: rows in, DataFrames and markdown out."""

from __future__ import annotations

import datetime as dt
import math

import pandas as pd
import pytest

from lib import reports
from lib.errors import InvalidInputError
from lib.reports import RunRow


def test_run_summary_counts_states_and_rates_success_among_finished_runs():
    """Success rate is completed / finished runs; a run still going counts as a run but not in the rate."""
    rows = [
        RunRow("nightly", "COMPLETED", 10.0),
        RunRow("nightly", "COMPLETED", 20.0, retries=2),
        RunRow("nightly", "FAILED", 30.0, retries=1),
        RunRow("nightly", "CRASHED", None),
        RunRow("nightly", "RUNNING", None),
        RunRow("carts", "COMPLETED", 5.0),
    ]
    frame = reports.run_summary(rows).set_index("flow")
    nightly = frame.loc["nightly"]
    assert (nightly["runs"], nightly["completed"], nightly["failed"], nightly["crashed"]) == (5, 2, 1, 1)
    assert nightly["in_progress"] == 1 and nightly["retries"] == 3
    assert nightly["success_rate"] == pytest.approx(0.5)
    assert frame.loc["carts", "success_rate"] == 1.0
    assert list(frame.index) == ["carts", "nightly"]


def test_run_summary_percentiles_use_completed_and_failed_durations_only():
    """p50 and p95 come from runs that ran to an end; crashed runs' partial durations are left out."""
    rows = [RunRow("f", "COMPLETED", float(s)) for s in range(1, 101)] + [RunRow("f", "CRASHED", 10_000.0)]
    row = reports.run_summary(rows).iloc[0]
    assert row["p50_s"] == pytest.approx(50.5)
    assert row["p95_s"] == pytest.approx(95.05)


def test_run_summary_of_nothing_is_an_empty_frame_with_the_columns():
    """An idle week still renders: empty frame, known columns, a headline of zeros."""
    frame = reports.run_summary([])
    assert frame.empty and list(frame.columns) == reports.RUN_COLUMNS
    assert math.isnan(reports.run_summary([RunRow("f", "SCHEDULED", None)]).iloc[0]["success_rate"])


def test_messages_summary_pivots_channel_by_status_with_a_total():
    """Each channel is one row with a count per status, zeros filled, and a total."""
    frame = reports.messages_summary(
        [
            {"channel": "email", "status": "sent", "n": 7},
            {"channel": "email", "status": "dead", "n": 1},
            {"channel": "sms", "status": "pending", "n": 2},
        ]
    ).set_index("channel")
    assert frame.loc["email"].to_dict() == {"pending": 0, "sending": 0, "sent": 7, "failed": 0, "dead": 1, "total": 8}
    assert frame.loc["sms", "total"] == 2


def test_dead_letters_are_grouped_by_error_and_scrub_addresses():
    """The commonest error comes first, and no full email address reaches the report."""
    t = dt.datetime(2026, 11, 20, tzinfo=dt.UTC)
    frame = reports.dead_letter_summary(
        [
            {
                "channel": "email",
                "template": "order_confirmation",
                "last_error": "SMTP 550 no such user priya@example.in",
                "n": 3,
                "latest": t,
            },
            {"channel": "sms", "template": "-", "last_error": "HTTP 400 bad number", "n": 1, "latest": t},
        ]
    )
    assert frame.iloc[0]["n"] == 3
    assert "priya@example.in" not in frame.to_string() and "p***@example.in" in frame.iloc[0]["last_error"]


def test_outcomes_per_day_has_one_row_per_run_date_and_every_outcome_column():
    """Outcomes pivot to one row per night with all four outcome columns, oldest first."""
    frame = reports.outcomes_per_day(
        [
            {"run_date": dt.date(2026, 11, 2), "outcome": "created", "n": 5},
            {"run_date": dt.date(2026, 11, 1), "outcome": "out_of_stock", "n": 1},
        ]
    )
    assert list(frame.columns) == ["run_date", "created", "out_of_stock", "inactive", "failed"]
    assert frame["run_date"].tolist() == [dt.date(2026, 11, 1), dt.date(2026, 11, 2)]
    assert frame["created"].tolist() == [0, 5]


def test_markdown_table_renders_numbers_right_aligned_and_escapes_pipes():
    """Tables render without tabulate: a header, an alignment row, NaN as '-', pipes escaped."""
    frame = pd.DataFrame({"flow": ["a|b"], "rate": [math.nan], "runs": [3]})
    lines = reports.markdown_table(frame).splitlines()
    assert lines[0] == "| flow | rate | runs |"
    assert lines[1] == "|---|---:|---:|"
    assert lines[2] == "| a\\|b | - | 3 |"
    assert reports.markdown_table(frame.iloc[0:0]) == "_nothing in this period_"


def _report() -> reports.Report:
    since, until = dt.datetime(2026, 11, 1, tzinfo=dt.UTC), dt.datetime(2026, 11, 8, tzinfo=dt.UTC)
    return reports.Report(
        since,
        until,
        reports.run_summary(
            [
                RunRow("process-due-subscriptions", "COMPLETED", 12.0),
                RunRow("process-due-subscriptions", "FAILED", 3.0, retries=1),
            ]
        ),
        reports.messages_summary([{"channel": "email", "status": "sent", "n": 4}]),
        reports.dead_letter_summary([]),
        reports.outcomes_per_day([{"run_date": dt.date(2026, 11, 2), "outcome": "created", "n": 9}]),
    )


def test_render_markdown_has_the_headline_every_table_and_the_chart_link():
    """The artifact text carries the headline numbers, four sections and the chart link."""
    text = reports.render_markdown(_report(), chart_link="reports/x.png")
    assert "2 flow runs of 1 flows, success rate 50.0%, 1 task retries" in text
    for section in ("## Flow runs", "## Messages by channel", "## Dead letters", "## Subscription outcomes"):
        assert section in text
    assert "[reports/x.png](reports/x.png)" in text
    assert reports.Report.headline(_report())["orders_created"] == 9


def test_render_chart_is_a_png_even_for_an_empty_week():
    """The chart renders headless (Agg) with data and without."""
    assert reports.render_chart(_report()).startswith(b"\x89PNG")
    empty = reports.Report(
        dt.datetime(2026, 1, 1),
        dt.datetime(2026, 1, 8),
        reports.run_summary([]),
        reports.messages_summary([]),
        reports.dead_letter_summary([]),
        reports.outcomes_per_day([]),
    )
    assert empty.headline()["success_rate"] is None
    assert reports.render_chart(empty).startswith(b"\x89PNG")


@pytest.mark.parametrize("days", [0, -1, 367])
def test_days_out_of_range_are_rejected(days):
    """A report window of zero, negative or more than a year of days is bad input."""
    with pytest.raises(InvalidInputError, match=f"days must be between 1 and 366, got {days}"):
        reports.validate_days(days)


def test_report_email_attaches_the_chart_and_keeps_the_markdown_as_text():
    """The emailed report is multipart: the markdown as text, the PNG as an attachment."""
    msg = reports.report_email(
        "Ops <ops@indostar.example>", "lead@indostar.example", "Weekly", "# hi", b"\x89PNG..", "chart.png"
    )
    parts = [p.get_content_type() for p in msg.walk()]
    assert parts == ["multipart/mixed", "text/plain", "image/png"]
    assert msg["To"] == "lead@indostar.example" and msg["Subject"] == "Weekly"
