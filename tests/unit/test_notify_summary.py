"""The run summary: messages by template, channel and status (pure pandas)."""

from lib.notify.log import counts_by_status, summary_frame
from lib.stats import to_artifact_rows


def test_summary_groups_by_template_channel_status():
    """Rows collapse to one count per (template, channel, status), plain sends labelled."""
    rows = [
        {"template": "order_confirmation", "channel": "email", "status": "sent"},
        {"template": "order_confirmation", "channel": "email", "status": "sent"},
        {"template": "order_confirmation", "channel": "sms", "status": "dead"},
        {"template": None, "channel": "email", "status": "sent"},
    ]
    out = to_artifact_rows(summary_frame(rows))
    assert {"template": "order_confirmation", "channel": "email", "status": "sent", "messages": 2} in out
    assert {"template": "(plain)", "channel": "email", "status": "sent", "messages": 1} in out
    assert len(out) == 3


def test_empty_summary_has_the_columns():
    """A run with no messages still publishes a table with the expected columns."""
    assert list(summary_frame([]).columns) == ["template", "channel", "status", "messages"]


def test_counts_cover_every_status():
    """The flow's return value always has each status, zero when absent."""
    assert counts_by_status([{"status": "sent"}]) == {"pending": 0, "sent": 1, "failed": 0, "dead": 0}


def test_lib_notify_never_imports_prefect():
    """lib/ stays importable without Prefect: the notify package pulls in none of it."""
    import subprocess
    import sys

    code = (
        "import sys, lib.notify.delivery, lib.notify.messages, lib.notify.templates; "
        "sys.exit(any(m == 'prefect' or m.startswith('prefect.') for m in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
