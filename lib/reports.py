"""The weekly operations report: summaries of runs, messages and outcomes, as DataFrames.

Pure functions turn plain rows into DataFrames (runs per flow with success rate,
p50/p95 duration and retries; messages by channel and status; dead letters; nightly
outcomes per day); a few queries read our own tables (they take a session and never
commit); ``render_markdown`` and ``render_chart`` turn the frames into the artifact's
text and a PNG. Nothing here knows about Prefect: the flow fetches the run rows
from the API and passes them in as dicts.
"""

from __future__ import annotations

import datetime as dt
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.message import Message
from typing import Any

import pandas as pd
from sqlalchemy import text
from sqlalchemy.orm import Session

from lib.errors import InvalidInputError
from lib.models import NOTIFICATION_STATUSES

# Prefect state types that end a run, and which of them count as a success.
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
RUN_COLUMNS = [
    "flow",
    "runs",
    "completed",
    "failed",
    "crashed",
    "cancelled",
    "in_progress",
    "success_rate",
    "p50_s",
    "p95_s",
    "retries",
]
MAX_ERROR_CHARS = 160


@dataclass(frozen=True)
class RunRow:
    """One flow run, as the report needs it (built by the flow from the Prefect API)."""

    flow: str
    state_type: str  # COMPLETED, FAILED, CRASHED, CANCELLED, RUNNING, SCHEDULED, ...
    duration_s: float | None
    retries: int = 0


def validate_days(days: int) -> int:
    if days < 1 or days > 366:
        raise InvalidInputError(f"days must be between 1 and 366, got {days}")
    return days


def run_summary(rows: Iterable[RunRow]) -> pd.DataFrame:
    """Per flow: runs, counts per end state, success rate among finished runs, p50/p95 duration, retries."""
    frame = pd.DataFrame([r.__dict__ for r in rows], columns=["flow", "state_type", "duration_s", "retries"])
    if frame.empty:
        return pd.DataFrame(columns=RUN_COLUMNS)
    frame["duration_s"] = pd.to_numeric(frame["duration_s"], errors="coerce")
    out = []
    for flow, g in frame.groupby("flow", sort=True):
        states = g["state_type"].value_counts()
        finished = int(sum(states.get(s, 0) for s in TERMINAL))
        # Durations of runs that ran to an end; a cancelled or crashed run's time says little.
        ran = g.loc[g["state_type"].isin(("COMPLETED", "FAILED")), "duration_s"].dropna()
        out.append(
            {
                "flow": flow,
                "runs": len(g),
                "completed": int(states.get("COMPLETED", 0)),
                "failed": int(states.get("FAILED", 0)),
                "crashed": int(states.get("CRASHED", 0)),
                "cancelled": int(states.get("CANCELLED", 0)),
                "in_progress": len(g) - finished,
                "success_rate": round(states.get("COMPLETED", 0) / finished, 3) if finished else math.nan,
                "p50_s": round(float(ran.quantile(0.5)), 2) if len(ran) else math.nan,
                "p95_s": round(float(ran.quantile(0.95)), 2) if len(ran) else math.nan,
                "retries": int(g["retries"].sum()),
            }
        )
    return pd.DataFrame(out, columns=RUN_COLUMNS)


def messages_summary(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Messages per channel (rows) and status (columns), with a total column; rows are {channel, status, n}."""
    frame = pd.DataFrame(list(rows), columns=["channel", "status", "n"])
    statuses = list(NOTIFICATION_STATUSES)
    if frame.empty:
        return pd.DataFrame(columns=["channel", *statuses, "total"])
    table = frame.pivot_table(index="channel", columns="status", values="n", aggfunc="sum", fill_value=0)
    table = table.reindex(columns=statuses + [c for c in table.columns if c not in statuses], fill_value=0)
    table["total"] = table.sum(axis=1)
    return table.astype(int).reset_index().rename_axis(columns=None)


def dead_letter_summary(rows: Iterable[dict[str, Any]], top: int = 10) -> pd.DataFrame:
    """The commonest dead-letter errors: {channel, template, last_error, n, latest} rows, errors scrubbed."""
    from lib.notify.address import scrub

    frame = pd.DataFrame(list(rows), columns=["channel", "template", "last_error", "n", "latest"])
    if frame.empty:
        return frame
    frame["last_error"] = (
        frame["last_error"]
        .fillna("(no error recorded)")
        .map(lambda e: scrub(str(e).splitlines()[0] if str(e) else "")[:MAX_ERROR_CHARS])
    )
    frame = frame.groupby(["channel", "template", "last_error"], dropna=False, as_index=False).agg(
        n=("n", "sum"), latest=("latest", "max")
    )
    return frame.sort_values(["n", "latest"], ascending=[False, False]).head(top).reset_index(drop=True)


def outcomes_per_day(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Nightly outcomes per run date (rows) and outcome (columns); rows are {run_date, outcome, n}."""
    outcomes = ["created", "out_of_stock", "inactive", "failed"]
    frame = pd.DataFrame(list(rows), columns=["run_date", "outcome", "n"])
    if frame.empty:
        return pd.DataFrame(columns=["run_date", *outcomes])
    table = frame.pivot_table(index="run_date", columns="outcome", values="n", aggfunc="sum", fill_value=0)
    table = table.reindex(columns=outcomes, fill_value=0).astype(int).sort_index()
    return table.reset_index().rename_axis(columns=None)


# ---- queries over our tables (the caller owns the transaction) ----------------------------


_NOTIFICATIONS_SINCE = (
    "SELECT channel, status, count(*) AS n FROM notifications WHERE created_at >= :since "
    "GROUP BY channel, status ORDER BY channel, status"
)
_DEAD_LETTERS_SINCE = (
    "SELECT channel, coalesce(template, '-') AS template, last_error, count(*) AS n, "
    "max(updated_at) AS latest FROM notifications WHERE status = 'dead' AND updated_at >= :since "
    "GROUP BY channel, template, last_error"
)
_OUTCOMES_SINCE = (
    "SELECT run_date, outcome, count(DISTINCT subscription_id) AS n FROM subscription_outcomes "
    "WHERE run_date >= :since GROUP BY run_date, outcome ORDER BY run_date, outcome"
)


def _since_rows(session: Session, sql: str, since: dt.date) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in session.execute(text(sql), {"since": since})]


def notification_rows(session: Session, since: dt.datetime) -> list[dict[str, Any]]:
    """Messages created since ``since``, counted by channel and status."""
    return _since_rows(session, _NOTIFICATIONS_SINCE, since)


def dead_letter_rows(session: Session, since: dt.datetime) -> list[dict[str, Any]]:
    """Dead letters touched since ``since``, grouped by channel, template and error."""
    return _since_rows(session, _DEAD_LETTERS_SINCE, since)


def outcome_rows(session: Session, since: dt.date) -> list[dict[str, Any]]:
    """Subscriptions decided per run date and outcome since ``since`` (twin runs counted once)."""
    return _since_rows(session, _OUTCOMES_SINCE, since)


# ---- rendering -------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, (pd.Timestamp, dt.datetime)):
        return value.strftime("%Y-%m-%d %H:%M")
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame, empty: str = "_nothing in this period_") -> str:
    """A GitHub-flavoured markdown table (no tabulate needed); numbers right-aligned."""
    if frame.empty:
        return empty
    cols = [str(c) for c in frame.columns]
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in frame.columns]
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


PAYMENT_COLUMNS = ["razorpay_payment_id", "subscription_id", "delivery_date", "amount", "status", "reason"]
EVENT_COLUMNS = ["event_id", "event_type", "status", "payment_id", "amount", "expected", "reason"]


def _rupees(paise: Any) -> str:
    from lib.notify.templates import format_inr

    return "-" if paise is None or (isinstance(paise, float) and math.isnan(paise)) else format_inr(int(paise))


def payments_to_settle(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Held payments and payments still waiting for a past cycle: someone must ship or refund each."""
    frame = pd.DataFrame(list(rows), columns=[*PAYMENT_COLUMNS[:3], "amount_paise", "status", "reason"])
    frame["amount"] = frame["amount_paise"].map(_rupees)
    frame["reason"] = frame["reason"].fillna("cycle passed without an order").map(lambda r: str(r)[:MAX_ERROR_CHARS])
    return frame[PAYMENT_COLUMNS]


def refused_events_summary(rows: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Webhook events rejected (refused on their merits) or failed (retried on redelivery), newest first."""
    frame = pd.DataFrame(
        list(rows),
        columns=["event_id", "event_type", "status", "payment_id", "amount_paise", "expected_paise", "reason"],
    )
    frame["amount"] = frame["amount_paise"].map(_rupees)
    frame["expected"] = frame["expected_paise"].map(_rupees)
    frame["reason"] = frame["reason"].fillna("").map(lambda r: str(r)[:MAX_ERROR_CHARS])
    return frame[EVENT_COLUMNS]


@dataclass
class Report:
    since: dt.datetime
    until: dt.datetime
    runs: pd.DataFrame
    messages: pd.DataFrame
    dead_letters: pd.DataFrame
    outcomes: pd.DataFrame
    payments: pd.DataFrame | None = None
    refused_events: pd.DataFrame | None = None

    def headline(self) -> dict[str, Any]:
        """The numbers the flow returns."""
        finished = (
            int(self.runs[["completed", "failed", "crashed", "cancelled"]].to_numpy().sum())
            if not self.runs.empty
            else 0
        )
        completed = int(self.runs["completed"].sum()) if not self.runs.empty else 0
        return {
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "flows": len(self.runs),
            "runs": int(self.runs["runs"].sum()) if not self.runs.empty else 0,
            "success_rate": round(completed / finished, 3) if finished else None,
            "retries": int(self.runs["retries"].sum()) if not self.runs.empty else 0,
            "messages": int(self.messages["total"].sum()) if not self.messages.empty else 0,
            "dead_letters": int(self.dead_letters["n"].sum()) if not self.dead_letters.empty else 0,
            "orders_created": int(self.outcomes["created"].sum()) if not self.outcomes.empty else 0,
            "payments_to_settle": 0 if self.payments is None else len(self.payments),
            "refused_events": 0 if self.refused_events is None else len(self.refused_events),
        }


def render_markdown(report: Report, chart_link: str | None = None, chart_inline: str | None = None) -> str:
    """The whole report as markdown: headline, four tables, the chart (link and optional inline image)."""
    h = report.headline()
    rate = "-" if h["success_rate"] is None else f"{h['success_rate']:.1%}"
    parts = [
        f"# Operations report {report.since:%Y-%m-%d} to {report.until:%Y-%m-%d}",
        f"{h['runs']} flow runs of {h['flows']} flows, success rate {rate}, {h['retries']} task retries; "
        f"{h['messages']} messages, {h['dead_letters']} dead letters; {h['orders_created']} orders created; "
        f"{h['payments_to_settle']} payments to settle, {h['refused_events']} refused payment events.",
        "## Flow runs",
        "Success rate = completed / finished runs; durations (seconds) of completed and failed runs.",
        markdown_table(report.runs),
        "## Messages by channel and status",
        markdown_table(report.messages),
        "## Dead letters (commonest errors)",
        markdown_table(report.dead_letters),
        "## Subscription outcomes per run date",
        markdown_table(report.outcomes),
        "## Payments to ship or refund",
        "Captured charges no order took (held), and charges whose cycle passed without an order.",
        markdown_table(report.payments if report.payments is not None else pd.DataFrame(), "_none_"),
        "## Refused Razorpay events",
        markdown_table(report.refused_events if report.refused_events is not None else pd.DataFrame(), "_none_"),
    ]
    if chart_link or chart_inline:
        parts.append("## Chart")
        if chart_inline:
            parts.append(f"![runs and outcomes]({chart_inline})")
        if chart_link:
            parts.append(f"PNG: [{chart_link}]({chart_link})")
    return "\n\n".join(parts) + "\n"


def render_chart(report: Report, dpi: int = 90) -> bytes:
    """A PNG: runs per flow by end state (left), orders created / out of stock per day (right)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a worker
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=dpi, layout="constrained")
    left, right = fig.subplots(1, 2)
    _stacked_bars(
        left,
        report.runs,
        "flow",
        ["completed", "failed", "crashed", "cancelled", "in_progress"],
        ["#2e7d32", "#c62828", "#6a1b9a", "#9e9e9e", "#1565c0"],
        horizontal=True,
    )
    left.set_title("Flow runs by end state")
    _stacked_bars(
        right,
        report.outcomes,
        "run_date",
        ["created", "out_of_stock", "inactive", "failed"],
        ["#2e7d32", "#ef6c00", "#9e9e9e", "#c62828"],
        horizontal=False,
    )
    right.set_title("Subscription outcomes per run date")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _stacked_bars(
    ax: Any, frame: pd.DataFrame, label: str, columns: Sequence[str], colors: Sequence[str], *, horizontal: bool
) -> None:
    if frame.empty:
        ax.text(0.5, 0.5, "no data in this period", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    labels = [_cell(v) for v in frame[label]]
    base = [0] * len(frame)
    for col, color in zip(columns, colors, strict=True):
        values = [int(v) for v in frame[col]] if col in frame else [0] * len(frame)
        if not any(values):
            continue
        if horizontal:
            ax.barh(labels, values, left=base, color=color, label=col)
        else:
            ax.bar(labels, values, bottom=base, color=color, label=col)
        base = [b + v for b, v in zip(base, values, strict=True)]
    if not horizontal:
        ax.tick_params(axis="x", labelrotation=45)
    ax.legend(fontsize="small")


def report_email(sender: str, to: str, subject: str, markdown: str, png: bytes | None, png_name: str) -> Message:
    """A MIME message: the markdown as the plain-text body, the chart as a PNG attachment."""
    from email.mime.image import MIMEImage
    from email.mime.multipart import MIMEMultipart

    from lib.notify.email_channel import build_message

    body = build_message(sender, to, subject, markdown)
    if png is None:
        return body
    msg = MIMEMultipart("mixed")
    for header in ("From", "To", "Subject", "Date", "Message-ID"):
        msg[header] = body[header]
        del body[header]
    msg.attach(body)
    image = MIMEImage(png, "png")
    image.add_header("Content-Disposition", "attachment", filename=png_name)
    msg.attach(image)
    return msg
