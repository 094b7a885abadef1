"""The weekly operations report: runs from the Prefect API, messages and outcomes from our tables.

Fetch (one task per source), summarise with lib.reports (pandas, pure), publish one
markdown artifact under the key ``ops-report`` with the tables and a chart (a PNG
written under ``REPORTS_DIR``, linked and shown inline), and optionally email it.
"""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterId,
    FlowRunFilter,
    FlowRunFilterExpectedStartTime,
    TaskRunFilter,
    TaskRunFilterStartTime,
)
from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort
from prefect.runtime import flow_run

from flows.common import flow_options, task_options
from lib import payments, reports
from lib.config import get_settings
from lib.db import session_scope
from lib.notify.address import mask_email, validate_email
from lib.notify.email_channel import SmtpConfig, SmtpSession

PAGE = 200  # the API's default maximum page size
MAX_TASK_RUNS = 50_000  # a week of batched flows is far below this; beyond it retries are undercounted


def _duration(run: Any) -> float | None:
    if run.total_run_time and run.total_run_time.total_seconds() > 0:
        return run.total_run_time.total_seconds()
    if run.start_time and run.end_time:
        return (run.end_time - run.start_time).total_seconds()
    return None


@task(**task_options("fetch-flow-runs"))
def fetch_flow_runs(since: dt.datetime, until: dt.datetime) -> list[reports.RunRow]:
    """Every flow run expected to start in the window, with its flow name, end state, duration and retries."""
    with get_client(sync_client=True) as client:
        # Prefect's filters are annotated with its own DateTime; they take a timezone-aware datetime.
        expected = FlowRunFilterExpectedStartTime(after_=since, before_=until)  # type: ignore[arg-type]
        window = FlowRunFilter(expected_start_time=expected)
        runs = _pages(
            lambda offset: client.read_flow_runs(
                flow_run_filter=window, sort=FlowRunSort.ID_DESC, limit=PAGE, offset=offset
            )
        )
        flow_ids = sorted({r.flow_id for r in runs}, key=str)
        names = (
            {f.id: f.name for f in client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=flow_ids)))}
            if flow_ids
            else {}
        )
        task_retries: dict[UUID, int] = {}
        started = TaskRunFilter(start_time=TaskRunFilterStartTime(after_=since))  # type: ignore[arg-type]
        for tr in _pages(
            lambda offset: client.read_task_runs(
                task_run_filter=started, sort=TaskRunSort.ID_DESC, limit=PAGE, offset=offset
            ),
            MAX_TASK_RUNS,
        ):
            if tr.flow_run_id and tr.run_count > 1:
                task_retries[tr.flow_run_id] = task_retries.get(tr.flow_run_id, 0) + tr.run_count - 1
    return [
        reports.RunRow(
            flow=names.get(r.flow_id, str(r.flow_id)),
            state_type=r.state_type.value if r.state_type else "UNKNOWN",
            duration_s=_duration(r),
            retries=max(r.run_count - 1, 0) + task_retries.get(r.id, 0),
        )
        for r in runs
    ]


def _pages(read: Callable[[int], list[Any]], cap: int | None = None) -> list[Any]:
    out: list[Any] = []
    while page := read(len(out)):
        out.extend(page)
        if len(page) < PAGE or (cap is not None and len(out) >= cap):
            break
    return out


@task(**task_options("fetch-table-rows"))
def fetch_table_rows(since: dt.datetime) -> dict[str, list[dict[str, Any]]]:
    """Messages, dead letters and subscription outcomes since ``since``, in one read-only transaction."""
    with session_scope() as session:
        return {
            "messages": reports.notification_rows(session, since),
            "dead_letters": reports.dead_letter_rows(session, since),
            "outcomes": reports.outcome_rows(session, since.date()),
            "payments": payments.open_payments(session),
            "refused_events": payments.refused_events(session, since),
        }


@task(**task_options("write-report-files", retries=False))
def write_report_files(report: reports.Report, stem: str) -> tuple[str, bytes]:
    """Render the chart PNG and the markdown into REPORTS_DIR; returns the PNG path and bytes."""
    folder = Path(get_settings().reports_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    png = reports.render_chart(report)
    (folder / f"{stem}.png").write_bytes(png)
    (folder / f"{stem}.md").write_text(reports.render_markdown(report, chart_link=f"{stem}.png"))
    return str(folder / f"{stem}.png"), png


@task(**task_options("email-report"))
def email_report(to: str, subject: str, markdown: str, png: bytes, png_name: str) -> str:
    """Send the report over one SMTP session (SMTP_* settings); returns the Message-ID."""
    config = SmtpConfig.from_settings(get_settings())
    with SmtpSession(config) as smtp:
        return smtp.send(reports.report_email(config.sender, to, subject, markdown, png, png_name))


@flow(**flow_options("ops-report", timeout_seconds=600))
def ops_report(days: int = 7, email_to: str | None = None) -> dict[str, Any]:
    """Summarise the past days of runs, messages and outcomes as a markdown artifact, optionally emailed."""
    reports.validate_days(days)
    email_to = validate_email(email_to) if email_to else None
    until = dt.datetime.now(dt.UTC)
    since = until - dt.timedelta(days=days)
    tables = fetch_table_rows(since)
    report = reports.Report(
        since,
        until,
        reports.run_summary(fetch_flow_runs(since, until)),
        reports.messages_summary(tables["messages"]),
        reports.dead_letter_summary(tables["dead_letters"]),
        reports.outcomes_per_day(tables["outcomes"]),
        reports.payments_to_settle(tables["payments"]),
        reports.refused_events_summary(tables["refused_events"]),
    )
    stem = f"ops-report-{until:%Y%m%d-%H%M%S}-{(flow_run.get_id() or 'adhoc')[:8]}"
    png_path, png = write_report_files(report, stem)
    inline = "data:image/png;base64," + base64.b64encode(png).decode()
    create_markdown_artifact(
        key="ops-report",
        markdown=reports.render_markdown(report, png_path, inline),
        description=f"Operations, {days} days to {until:%Y-%m-%d}",
    )
    stats = {**report.headline(), "chart": png_path}
    if email_to:
        subject = f"IndoStar ops report {since:%d %b} to {until:%d %b %Y}"
        stats["emailed"] = email_report(
            email_to, subject, reports.render_markdown(report, png_path), png, Path(png_path).name
        )
        get_run_logger().info("report emailed to %s", mask_email(email_to))
    return stats
