"""Prometheus metrics: the exporter (`indostar-jobs metrics --port 9464`) and the task worker's own counters.

What a Celery shop read from Flower and celery-exporter, for Prometheus to scrape:

- from the Prefect API: finished flow runs by flow and state, their run times, Late runs per
  work queue, whether each queue of pool ``indostar`` is polled, and each deployment's last
  success. Flow runs are counted as the exporter sees them finish (from an hour before it
  started, METRICS_LOOKBACK_SECONDS), so ``indostar_flow_runs_total`` is a counter in
  Prometheus's sense: it starts again when the exporter does, and rate() handles that.
- from the shop's database: the delivery log by channel and status, dead letters,
  background tasks waiting, live task workers (their advisory locks), subscriptions due,
  payments held.
- from each task worker (`task-worker --metrics-port N`, lib/worker_metrics.py): its
  background tasks by name and outcome, with their run times.

The exporter reads its sources when scraped, at most once every METRICS_CACHE_SECONDS, so
two Prometheus servers or a dashboard refresh cost one read. A source that fails is shown as
``indostar_metrics_source_up{source} 0`` with the rest still served; the error is logged.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from lib.config import get_settings
from lib.errors import ServiceUnavailableError

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
POOL = "indostar"
BACKGROUND_QUEUE = "background-tasks"
PAGE = 200

# ---- the exporter --------------------------------------------------------------------------------------


class _Cached:
    """Families read at most once every ``ttl`` seconds; the previous read is served meanwhile."""

    def __init__(self, ttl: float):
        self.ttl, self.lock, self.at, self.families = ttl, threading.Lock(), 0.0, list[Metric]()

    def get(self, read: Any) -> list[Metric]:
        with self.lock:
            if time.monotonic() - self.at >= self.ttl:
                self.families = list(read())
                self.at = time.monotonic()
            return self.families


class FlowRunTally:
    """Finished flow runs seen so far, by flow and state, with their run times (the counter behind the families)."""

    def __init__(self, since: dt.datetime):
        self.watermark = since
        self.seen: dict[Any, dt.datetime] = {}
        self.counts: Counter[tuple[str, str]] = Counter()
        self.buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(DURATION_BUCKETS))
        self.sums: Counter[str] = Counter()

    def add(self, run_id: Any, flow: str, state: str, ended: dt.datetime, seconds: float) -> None:
        if run_id in self.seen:
            return
        self.seen[run_id] = ended
        self.counts[(flow, state)] += 1
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.buckets[flow][i] += 1
        self.sums[flow] += seconds

    def advance(self, newest: dt.datetime, overlap: dt.timedelta) -> None:
        """Move the watermark; forget ids that ended before it (a re-read of the overlap skips the rest)."""
        self.watermark = max(self.watermark, newest - overlap)
        self.seen = {k: v for k, v in self.seen.items() if v >= self.watermark}

    def families(self) -> Iterator[Metric]:
        runs = CounterMetricFamily(
            "indostar_flow_runs", "Finished flow runs by flow and state", labels=["flow", "state"]
        )
        # Every state of a flow from its first run on, at 0 until it happens: increase() ignores a series'
        # first sample, so a FAILED series born at 1 would hide the first failure from the alert.
        for flow in sorted({f for f, _ in self.counts}):
            for state in TERMINAL:
                runs.add_metric([flow, state], self.counts.get((flow, state), 0))
        yield runs
        hist = HistogramMetricFamily(
            "indostar_flow_run_duration_seconds", "Run time of finished flow runs", labels=["flow"]
        )
        for flow, counts in sorted(self.buckets.items()):
            bounds = [
                ("+Inf" if b == float("inf") else str(b), c) for b, c in zip(DURATION_BUCKETS, counts, strict=True)
            ]
            hist.add_metric([flow], bounds, self.sums[flow])
        yield hist


class PrefectSource:
    """Series read from the Prefect API."""

    def __init__(self, lookback: float):
        self.tally = FlowRunTally(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=lookback))
        self.flow_names: dict[Any, str] = {}

    def read(self, online: GaugeMetricFamily) -> list[Metric]:
        """The API's families (``online`` gets the pool queues); raises if the API cannot be read."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            # Without it Prefect's client would start a temporary server of its own on each scrape.
            raise ServiceUnavailableError("PREFECT_API_URL is not set")
        with get_client(sync_client=True) as client:
            self._count_finished(client)
            late = self._late(client)
            self._queues(client, online)
            last = self._last_success(client)
        return [*self.tally.families(), late, last]

    def _flow_name(self, client: Any, flow_id: Any) -> str:
        if flow_id not in self.flow_names:
            self.flow_names[flow_id] = client.read_flow(flow_id).name
        return self.flow_names[flow_id]

    def _count_finished(self, client: Any) -> None:
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterEndTime,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.sorting import FlowRunSort

        overlap = dt.timedelta(seconds=60)  # runs whose end time is written late (clock skew, slow commits)
        start = self.tally.watermark
        newest = start
        flt = FlowRunFilter(
            end_time=FlowRunFilterEndTime(after_=start),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(TERMINAL))),
        )
        offset = 0
        while True:
            page = client.read_flow_runs(flow_run_filter=flt, sort=FlowRunSort.END_TIME_DESC, limit=PAGE, offset=offset)
            for run in page:
                if run.end_time is None or run.state_type is None:
                    continue
                seconds = run.total_run_time.total_seconds() if run.total_run_time else 0.0
                flow = self._flow_name(client, run.flow_id)
                self.tally.add(run.id, flow, run.state_type.value, run.end_time, seconds)
                newest = max(newest, run.end_time)
            if len(page) < PAGE:
                break
            offset += PAGE
        self.tally.advance(newest, overlap)

    def _late(self, client: Any) -> Metric:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName

        late: Counter[str] = Counter()
        flt = FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Late"])))
        offset = 0
        while True:
            page = client.read_flow_runs(flow_run_filter=flt, limit=PAGE, offset=offset)
            for run in page:
                late[run.work_queue_name or "none"] += 1
            if len(page) < PAGE:
                break
            offset += PAGE
        for queue in self._queue_names(client):
            late.setdefault(queue, 0)
        g = GaugeMetricFamily("indostar_late_flow_runs", "Flow runs in state Late", labels=["work_queue"])
        for queue, n in sorted(late.items()):
            g.add_metric([queue], n)
        return g

    def _queue_names(self, client: Any) -> list[str]:
        return [q.name for q in self._pool_queues(client)]

    def _pool_queues(self, client: Any) -> list[Any]:
        from prefect.exceptions import ObjectNotFound

        try:
            return list(client.read_work_queues(work_pool_name=POOL))
        except ObjectNotFound:  # served deployments (`make up`): no pool
            return []

    def _queues(self, client: Any, online: GaugeMetricFamily) -> None:
        for queue in self._pool_queues(client):
            status = getattr(queue.status, "value", queue.status)
            online.add_metric([queue.name], 1 if status == "READY" else 0)

    def _last_success(self, client: Any) -> Metric:
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.sorting import FlowRunSort

        g = GaugeMetricFamily(
            "indostar_last_success_timestamp_seconds",
            "End time of the last Completed flow run of each deployment (unix seconds)",
            labels=["deployment"],
        )
        done = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["COMPLETED"])))
        for dep in client.read_deployments():
            runs = client.read_flow_runs(
                flow_run_filter=done,
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                sort=FlowRunSort.END_TIME_DESC,
                limit=1,
            )
            if runs and runs[0].end_time:
                g.add_metric([f"{self._flow_name(client, dep.flow_id)}/{dep.name}"], runs[0].end_time.timestamp())
        return g


def read_shop(online: GaugeMetricFamily) -> list[Metric]:
    """The shop database's families (``online`` gets the live task workers); raises if it cannot be read."""
    from lib import db, health

    with db.get_engine().connect() as conn:
        h = health.read(conn)
    online.add_metric([BACKGROUND_QUEUE], h.task_workers)
    notes = GaugeMetricFamily(
        "indostar_notifications", "Delivery-log rows by channel and status", labels=["channel", "status"]
    )
    for (channel, status), n in sorted(h.notifications.items()):
        notes.add_metric([channel, status], n)
    waiting = GaugeMetricFamily(
        "indostar_background_runs_waiting", "Background tasks queued or waiting to retry", labels=["task"]
    )
    for name, n in sorted(h.waiting.items()):
        waiting.add_metric([name], n)
    return [
        notes,
        GaugeMetricFamily("indostar_dead_letters", "Messages given up on (status dead)", value=h.dead_letters),
        waiting,
        GaugeMetricFamily(
            "indostar_subscriptions_due", "Active subscriptions due today or earlier", value=h.subscriptions_due
        ),
        GaugeMetricFamily("indostar_payments_held", "Payments held for an operator", value=h.payments_held),
    ]


class Exporter(Collector):
    """Both sources, read together at most once every ``ttl`` seconds; a source that fails is shown down."""

    def __init__(self, ttl: float, lookback: float):
        self.cache = _Cached(ttl)
        self.prefect = PrefectSource(lookback)

    def collect(self) -> Iterable[Metric]:
        return self.cache.get(self.read)

    def read(self) -> Iterator[Metric]:
        online = GaugeMetricFamily(
            "indostar_workers_online",
            "Pool queues: 1 while a worker polls the queue; background-tasks: live task workers",
            labels=["work_queue"],
        )
        up = GaugeMetricFamily(
            "indostar_metrics_source_up", "1 when the last read of a source worked", labels=["source"]
        )
        for source, read in (("prefect", self.prefect.read), ("shop_database", read_shop)):
            try:
                yield from read(online)
                up.add_metric([source], 1)
            except Exception as exc:  # noqa: BLE001 - any failure of a source: shown down, the rest still served
                log.warning("metrics: %s could not be read: %s", source, exc)
                up.add_metric([source], 0)
                if source == "prefect":
                    yield from self.prefect.tally.families()
        yield online
        yield up


def exporter_registry(ttl: float | None = None, lookback: float | None = None) -> CollectorRegistry:
    """A registry with the exporter's collector (settings METRICS_CACHE_SECONDS, METRICS_LOOKBACK_SECONDS)."""
    s = get_settings()
    registry = CollectorRegistry()
    registry.register(
        Exporter(
            s.metrics_cache_seconds if ttl is None else ttl,
            s.metrics_lookback_seconds if lookback is None else lookback,
        )
    )
    return registry


def serve_exporter(port: int, host: str = "127.0.0.1") -> None:
    """`indostar-jobs metrics`: answer /metrics on ``host:port`` until interrupted."""
    start_http_server(port, addr=host, registry=exporter_registry())
    while True:
        time.sleep(3600)
