"""The run summary: messages by kind, channel and status (plain Python, no pandas on the notification path)."""

from lib.notify.delivery_log import counts_by_status, summary_table


def test_summary_groups_by_kind_channel_status_in_lifecycle_order():
    """Rows collapse to one count per (kind, channel, status); statuses sort pending, sending, sent, failed, dead."""
    rows = [
        {"kind": "order_confirmation", "channel": "email", "status": "sent"},
        {"kind": "order_confirmation", "channel": "email", "status": "sent"},
        {"kind": "order_confirmation", "channel": "email", "status": "dead"},
        {"kind": "order_confirmation", "channel": "email", "status": "pending"},
        {"kind": "email", "channel": "email", "status": "sent"},
    ]
    out = summary_table(rows)
    assert out == [
        {"kind": "email", "channel": "email", "status": "sent", "messages": 1},
        {"kind": "order_confirmation", "channel": "email", "status": "pending", "messages": 1},
        {"kind": "order_confirmation", "channel": "email", "status": "sent", "messages": 2},
        {"kind": "order_confirmation", "channel": "email", "status": "dead", "messages": 1},
    ]


def test_empty_summary_is_empty():
    """A run with no messages has no rows (the artifact says so in words)."""
    assert summary_table([]) == []


def test_counts_cover_every_status():
    """The flow's return value always has each status, zero when absent."""
    assert counts_by_status([{"status": "sent"}]) == {"pending": 0, "sending": 0, "sent": 1, "failed": 0, "dead": 0}


def test_lib_notify_never_imports_prefect_or_pandas():
    """lib/notify stays importable without Prefect, and a notification run does not pay for loading pandas."""
    import subprocess
    import sys

    code = (
        "import sys, lib.notify.delivery, lib.notify.requests, lib.notify.templates, lib.notify.render, "
        "lib.markdown, flows.providers; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('pandas', 'matplotlib') or m == 'prefect'); "
        "sys.exit(str(bad[:5]) if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
