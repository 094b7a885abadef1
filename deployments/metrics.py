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
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lib.config import get_settings
from lib.errors import ServiceUnavailableError

log = logging.getLogger(__name__)

DURATION_BUCKETS = (0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600)
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
    """Finished flow runs seen so far (a counter by flow and state, a run-time histogram by flow) and each
    deployment's last success, fed by the runs that finish."""

    def __init__(self, since: dt.datetime):
        self.watermark = since
        self.seen: dict[Any, dt.datetime] = {}  # run ids read in the overlap, so a re-read does not count twice
        self.runs = Counter(
            "indostar_flow_runs", "Finished flow runs by flow and state", ["flow", "state"], registry=None
        )
        self.durations = Histogram(
            "indostar_flow_run_duration_seconds",
            "Run time of finished flow runs",
            ["flow"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.flows: set[str] = set()
        self.last_success: dict[Any, float] = {}  # deployment id: unix end time of its last Completed run

    def add(self, run: Any, flow: str) -> None:
        if run.id in self.seen:
            return
        self.seen[run.id] = run.end_time
        if flow not in self.flows:
            # Every state at 0 from the flow's first run on: increase() ignores a series' first sample, so a
            # FAILED series born at 1 would hide the first failure from the alert.
            self.flows.add(flow)
            for state in TERMINAL:
                self.runs.labels(flow, state)
        state = run.state_type.value
        self.runs.labels(flow, state).inc()
        self.durations.labels(flow).observe(run.total_run_time.total_seconds() if run.total_run_time else 0.0)
        if state == "COMPLETED" and run.deployment_id:
            self.succeeded(run.deployment_id, run.end_time)

    def succeeded(self, deployment_id: Any, ended: dt.datetime) -> None:
        self.last_success[deployment_id] = max(self.last_success.get(deployment_id, 0.0), ended.timestamp())

    def advance(self, newest: dt.datetime, overlap: dt.timedelta) -> None:
        """Move the watermark; forget ids that ended before it (a re-read of the overlap skips the rest)."""
        self.watermark = max(self.watermark, newest - overlap)
        self.seen = {k: v for k, v in self.seen.items() if v >= self.watermark}

    def families(self) -> list[Metric]:
        return [*self.runs.collect(), *self.durations.collect()]


def _gauge(name: str, help_: str, label: str, values: Mapping[str, float]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help_, labels=[label])
    for key, n in sorted(values.items()):
        g.add_metric([key], n)
    return g


class PrefectSource:
    """Series read from the Prefect API."""

    def __init__(self, lookback: float):
        self.tally = FlowRunTally(dt.datetime.now(dt.UTC) - dt.timedelta(seconds=lookback))
        self.flow_names: dict[Any, str] = {}
        self.deployments_seen: set[Any] = set()

    def read(self, online: GaugeMetricFamily) -> list[Metric]:
        """The API's families (``online`` gets the pool queues); raises if the API cannot be read."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            # Without it Prefect's client would start a temporary server of its own on each scrape.
            raise ServiceUnavailableError("PREFECT_API_URL is not set")
        with get_client(sync_client=True) as client:
            self._count_finished(client)
            queues = self._pool_queues(client)
            for queue in queues:
                status = getattr(queue.status, "value", queue.status)
                online.add_metric([queue.name], 1 if status == "READY" else 0)
            late = self._late(client, [q.name for q in queues])
            last = self._last_success(client)
        return [*self.tally.families(), late, last]

    def _flow_name(self, client: Any, flow_id: Any) -> str:
        if flow_id not in self.flow_names:
            self.flow_names[flow_id] = client.read_flow(flow_id).name
        return self.flow_names[flow_id]

    @staticmethod
    def _runs(client: Any, flt: Any, **options: Any) -> Iterator[Any]:
        """Every flow run matching ``flt``, a page at a time."""
        offset = 0
        while True:
            page = client.read_flow_runs(flow_run_filter=flt, limit=PAGE, offset=offset, **options)
            yield from page
            if len(page) < PAGE:
                return
            offset += PAGE

    def _count_finished(self, client: Any) -> None:
        from prefect.client.schemas.filters import (
            FlowRunFilter,
            FlowRunFilterEndTime,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort

        overlap = dt.timedelta(seconds=60)  # runs whose end time is written late (clock skew, slow commits)
        newest = self.tally.watermark
        flt = FlowRunFilter(
            end_time=FlowRunFilterEndTime(after_=newest),  # type: ignore[arg-type]  # a datetime is what it takes at run time
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(t) for t in TERMINAL])),
        )
        for run in self._runs(client, flt, sort=FlowRunSort.END_TIME_DESC):
            if run.end_time is not None and run.state_type is not None:
                self.tally.add(run, self._flow_name(client, run.flow_id))
                newest = max(newest, run.end_time)
        self.tally.advance(newest, overlap)

    def _late(self, client: Any, queues: list[str]) -> Metric:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateName

        late = dict.fromkeys(queues, 0)
        flt = FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Late"])))
        for run in self._runs(client, flt):
            queue = run.work_queue_name or "none"
            late[queue] = late.get(queue, 0) + 1
        return _gauge("indostar_late_flow_runs", "Flow runs in state Late", "work_queue", late)

    def _pool_queues(self, client: Any) -> list[Any]:
        from prefect.exceptions import ObjectNotFound

        try:
            return list(client.read_work_queues(work_pool_name=POOL))
        except ObjectNotFound:  # served deployments (`make up`): no pool
            return []

    def _last_success(self, client: Any) -> Metric:
        """From the tally, except for a deployment seen for the first time: its last success may be older than
        the look-back, so it is asked for once (a night that ended before the exporter started still counts)."""
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType
        from prefect.client.schemas.sorting import FlowRunSort

        done = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.COMPLETED])))
        last: dict[str, float] = {}
        for dep in client.read_deployments():
            if dep.id not in self.deployments_seen:
                runs = client.read_flow_runs(
                    flow_run_filter=done,
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                    sort=FlowRunSort.END_TIME_DESC,
                    limit=1,
                )
                if runs and runs[0].end_time:
                    self.tally.succeeded(dep.id, runs[0].end_time)
                self.deployments_seen.add(dep.id)
            if dep.id in self.tally.last_success:
                last[f"{self._flow_name(client, dep.flow_id)}/{dep.name}"] = self.tally.last_success[dep.id]
        return _gauge(
            "indostar_last_success_timestamp_seconds",
            "End time of the last Completed flow run of each deployment (unix seconds)",
            "deployment",
            last,
        )


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
    waiting = _gauge(
        "indostar_background_runs_waiting", "Background tasks queued or waiting to retry", "task", h.waiting
    )
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
