"""Probes of the nightly benchmark: wall time, RSS, Python heap and lock waits of one run (Probe), and
where an instrumented flow run spends its time (Split: statement classes, Python, commits, lanes).
"""

from __future__ import annotations

import gc
import os
import re
import threading
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event, text

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Probe:
    """Times a block; samples RSS (always), the Python heap (trace=True) and lock waits (lock_url)."""

    def __init__(self, trace: bool = False, lock_url: str | None = None, every: float = 0.02):
        self.trace, self.lock_url, self.every = trace, lock_url, every
        self.seconds = 0.0
        self.rss_peak_delta = 0
        self.heap_peak: int | None = None
        self.lock_samples = [0, 0]  # backends waiting on a lock, backends active
        self._stop = threading.Event()

    def _sample_rss(self) -> None:
        while not self._stop.wait(self.every):
            self.rss_peak_delta = max(self.rss_peak_delta, _rss() - self._base)

    def _sample_locks(self) -> None:
        from lib import db

        engine = db.build_engine(self.lock_url, 1)
        query = text(
            "SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'), count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND state = 'active' AND pid <> pg_backend_pid() "
            "AND backend_type = 'client backend'"
        )
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                while not self._stop.wait(0.05):
                    waiting, active = conn.execute(query).one()
                    self.lock_samples[0] += waiting
                    self.lock_samples[1] += active
        finally:
            engine.dispose()

    def __enter__(self) -> Probe:
        gc.collect()
        self._base = _rss()
        self._threads = [threading.Thread(target=self._sample_rss, daemon=True)]
        if self.lock_url:
            self._threads.append(threading.Thread(target=self._sample_locks, daemon=True))
        for t in self._threads:
            t.start()
        if self.trace:
            tracemalloc.start()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        if self.trace:
            self.heap_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        self.rss_peak_delta = max(self.rss_peak_delta, _rss() - self._base)
        self._stop.set()
        for t in self._threads:
            t.join()

    @property
    def lock_wait_share(self) -> float | None:
        waiting, active = self.lock_samples
        return round(waiting / active, 3) if active else None


# --- where the flow's time goes ----------------------------------------------------------------

_SQL_HEAD = re.compile(
    r"^\s*(?:(?P<verb>INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(?P<table>\w+)|(?P<word>\w+(?:\s+LOCAL)?))", re.I
)
_PARENS = re.compile(r"\([^()]*\)")
_FROM = re.compile(r"\bFROM\s+(\w+)", re.I)


def statement_class(sql: str) -> str:
    """'insert orders', 'update products', 'select subscriptions', 'savepoint', ... for a statement."""
    m = _SQL_HEAD.match(sql)
    if m is None:
        return "other"
    if m["verb"]:
        return f"{m['verb'].split()[0].lower()} {m['table'].lower()}"
    word = m["word"].lower()
    if word in ("select", "with"):
        outer = sql
        while (inner := _PARENS.sub(" ", outer)) != outer:  # drop subqueries: the outer FROM names the table
            outer = inner
        found = _FROM.search(outer)
        return f"{word} {found[1].lower()}" if found else word
    return word


class Split:
    """Thread-seconds by statement class, Python inside a batch, commit, lane bookkeeping, Prefect.

    Engine events time every statement as the client sees it (parameter adaptation, round
    trip, server work); lib.subscription_lanes' process_batch and run_lane are wrapped to time the
    batch and the lane. With several lanes the figures are thread-seconds, so they add up to
    the lanes' total, not to the wall time.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.lane_walls: list[float] = []
        self._lock = threading.Lock()
        self._local = threading.local()

    def _add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.seconds[key] += seconds
            self.counts[key] += 1

    @contextmanager
    def attached(self, engine: Engine) -> Iterator[Split]:
        from lib import subscription_lanes as sub_lanes

        def before(conn, cursor, statement, parameters, context, executemany) -> None:
            self._local.t = time.perf_counter()

        def after(conn, cursor, statement, parameters, context, executemany) -> None:
            elapsed = time.perf_counter() - self._local.t
            self._add("sql: " + statement_class(statement), elapsed)
            self._local.sql = getattr(self._local, "sql", 0.0) + elapsed

        def process_batch(*args: Any, **kwargs: Any) -> Any:
            self._local.sql, started = 0.0, time.perf_counter()
            try:
                return batch(*args, **kwargs)
            finally:
                self._add("python inside process_batch", time.perf_counter() - started - self._local.sql)
                self._add("process_batch", time.perf_counter() - started)

        def run_lane(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            result = lane(*args, **kwargs)
            elapsed = time.perf_counter() - started
            self._add("lane", elapsed)
            with self._lock:
                self.lane_walls.append(elapsed)
            self._add("batches", sum(result.batch_ms) / 1000)
            with self._lock:
                self.counts["batch"] += result.batches
            return result

        batch, lane = sub_lanes.process_batch, sub_lanes.run_lane
        event.listen(engine, "before_cursor_execute", before)
        event.listen(engine, "after_cursor_execute", after)
        sub_lanes.process_batch, sub_lanes.run_lane = process_batch, run_lane
        try:
            yield self
        finally:
            sub_lanes.process_batch, sub_lanes.run_lane = batch, lane
            event.remove(engine, "before_cursor_execute", before)
            event.remove(engine, "after_cursor_execute", after)

    def report(self, wall: float) -> dict[str, Any]:
        """Thread-seconds per part; ``prefect_and_report_s``: the flow's wall time outside its slowest lane."""
        s, n = self.seconds, self.counts
        sql = {k[5:]: (round(v, 3), n[k]) for k, v in sorted(s.items(), key=lambda kv: -kv[1]) if k.startswith("sql: ")}
        lanes = n["lane"]
        return {
            "flow_wall_s": round(wall, 3),
            "lanes": lanes,
            "batches": n["batch"],
            "lane_thread_s": round(s["lane"], 3),
            "lane_wall_max_s": round(max(self.lane_walls, default=0.0), 3),
            "prefect_and_report_s": round(wall - max(self.lane_walls, default=0.0), 3),
            "parts_thread_s": {
                "sql statements": round(sum(v for v, _ in sql.values()), 3),
                "python inside process_batch": round(s["python inside process_batch"], 3),
                "commit and session": round(s["batches"] - s["process_batch"], 3),
                "lane bookkeeping between batches": round(s["lane"] - s["batches"], 3),
            },
            "sql_thread_s_and_count": sql,
            "statements_per_batch": round(sum(c for _, c in sql.values()) / max(n["batch"], 1), 1),
        }
