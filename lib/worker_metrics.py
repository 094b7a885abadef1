"""A task worker's own Prometheus series (`indostar-jobs task-worker --metrics-port N`).

Counted where a batch settles (flows.background), so a row counts once, by the worker that
settled it: ``indostar_task_runs_total{task,state}`` (done, retry, failed) and
``indostar_task_run_duration_seconds{task}`` (claim to settle, a batch's time shared by its
rows). Each worker counts from its start; Prometheus sums the workers.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

TASK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

TASK_RUNS = Counter("indostar_task_runs", "Background task runs that settled, by task and outcome", ["task", "state"])
TASK_DURATION = Histogram(
    "indostar_task_run_duration_seconds",
    "Background task run time, claim to settle (a batch's time shared by its tasks)",
    ["task"],
    buckets=TASK_BUCKETS,
)


def record_task(name: str, state: str, seconds: float) -> None:
    """A background task's run settled: done, retry (it runs again later) or failed."""
    TASK_RUNS.labels(name, state).inc()
    TASK_DURATION.labels(name).observe(max(0.0, seconds))


def serve_worker_metrics(port: int, host: str = "127.0.0.1") -> None:
    """/metrics on ``host:port`` from a thread: our series and the process's (CPU, memory, open files)."""
    start_http_server(port, addr=host)
