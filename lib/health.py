"""What the shop database says about the jobs' health: the counts behind the metrics exporter's series.

One connection, a few aggregate queries, each on an index or a small table except the
delivery log's count by channel and status (a scan of the log's retained rows, which the
exporter's cache keeps to one every METRICS_CACHE_SECONDS).
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Connection

from lib.db import advisory_locks
from lib.outbox import HOLDER_NAMESPACE


@dataclass(frozen=True)
class ShopHealth:
    notifications: dict[tuple[str, str], int]  # (channel, status): rows
    waiting: dict[str, int]  # background task name: queued or waiting to retry
    task_workers: int  # live task workers (their advisory locks)
    subscriptions_due: int
    payments_held: int

    @property
    def dead_letters(self) -> int:
        return sum(n for (_, status), n in self.notifications.items() if status == "dead")


def read(conn: Connection) -> ShopHealth:
    notes = conn.execute(text("SELECT channel, status, count(*) FROM notifications GROUP BY channel, status")).all()
    waiting = conn.execute(
        text("SELECT name, count(*) FROM background_tasks WHERE status IN ('queued', 'retry') GROUP BY name")
    ).all()
    due = conn.execute(
        text("SELECT count(*) FROM subscriptions WHERE status = 'active' AND next_delivery_date <= current_date")
    ).scalar_one()
    held = conn.execute(text("SELECT count(*) FROM payments WHERE status = 'held'")).scalar_one()
    workers = conn.execute(
        text(f"SELECT count(*) FROM pg_locks l WHERE {advisory_locks(HOLDER_NAMESPACE)}")
    ).scalar_one()
    return ShopHealth({(c, s): n for c, s, n in notes}, {name: n for name, n in waiting}, workers, due, held)
