"""Benchmark: the instant path, ``send_email_task.delay(...)`` to the SMTP server's 250, one by one and in a burst.

    python -m bench.notify_latency [--calls 30] [--burst 500] [--threads 8] [--workers 1]

The backend is this process, calling ``indostar_client.tasks`` as the shop does; ``.delay`` records
a row of the outbox (lib.outbox) and warm ``indostar-jobs task-worker`` subprocesses send it.
Scenarios, measured in one run on the same machine:

- ``sequential``: ``--calls`` back-to-back ``.delay`` calls, each made the moment the previous
  email was accepted; per call, trigger to SMTP accept (the SMTP handler takes the time).
  Targets: p50 <= 0.10 s, p95 <= 0.20 s.
- ``sequential_without_api``: the same with the worker unable to reach the Prefect API (its
  PREFECT_API_URL a closed port: batches run without a Prefect task run), the reference for
  what a batch's task run costs: ``task_run_overhead_ratio_p50`` is with / without.
- ``burst``: ``--burst`` calls from ``--threads`` threads, distinct recipients. ``delay_call``
  (each ``.delay`` call's duration; target: none over 0.5 s), ``submit_s`` (first call to last
  return), ``throughput_msgs_per_s`` (first call to last SMTP accept; target >= 40),
  ``exactly_once`` (every recipient received one message), ``get_lag`` (when each ``.get()``
  returned after its email was accepted, counted from when it was called if later; target
  every one within 1 s).
- ``breakdown_s``: medians of where the sequential time goes, from the rows' own timestamps on
  the database clock: ``queued`` (row inserted to its messages recorded by a batch: wake-up,
  claim, the batch's task run starting, the request built), ``send`` (recorded to marked
  sent: the SMTP conversation), ``settle`` (sent to the row done), and ``delay_call``/
  ``get_lag`` from this process.
- ``celery_reference``: not measured (Celery is not a dependency of this project); the issue's
  figures for the old system are quoted in the README beside these.

Everything is its own: a ``prefect server start`` subprocess on a free port whose state is in a
PostgreSQL database of its own (``indostar_bench_latency_prefect``, migrated, dropped), the shop
database ``indostar_bench_latency`` (migrations, dropped), Redis keys under
``indostar-bench-latency:`` (deleted), a recording aiosmtpd in this process, SMS_PROVIDER=log.
A table on stderr, one JSON object on stdout (seconds unless named otherwise).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench._common import database_url, percentile, wait_for

if TYPE_CHECKING:  # devtools is development tooling: imported where used, never when bench loads
    from devtools.processes import Proc

BENCH_DB = "indostar_bench_latency"
REDIS_PREFIX = "indostar-bench-latency:"
TARGET = {
    "sequential_p50_s": 0.10,
    "sequential_p95_s": 0.20,
    "delay_call_max_s": 0.5,
    "throughput_msgs_per_s": 40,
    "get_lag_max_s": 1.0,
}


def _smtp_server(port: int):
    """A DevSMTPServer whose handler also notes when (perf_counter) each recipient's message arrived."""
    from devtools.smtp_sink import DevSMTPServer, RecordingHandler

    class Timed(RecordingHandler):
        def __init__(self) -> None:
            super().__init__()
            self.arrived: dict[str, float] = {}
            self.count: dict[str, int] = {}

        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            now = time.perf_counter()
            reply = await super().handle_DATA(server, session, envelope)
            with self.lock:
                for rcpt in envelope.rcpt_tos:
                    self.arrived.setdefault(rcpt.lower(), now)
                    self.count[rcpt.lower()] = self.count.get(rcpt.lower(), 0) + 1
            return reply

    return DevSMTPServer("127.0.0.1", port, Timed())


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_s": percentile(values, 50),
        "p95_s": percentile(values, 95),
        "max_s": max(values),
        "mean_s": statistics.fmean(values),
    }


def _start_worker(name: str, env: dict[str, str], workdir: Path) -> Proc:
    from devtools.processes import Proc

    proc = Proc(name, [sys.executable, "-m", "deployments.cli", "task-worker"], env, workdir)
    wait_for(f"{name} listening", lambda: "listening" in proc.log.read_text(errors="replace"), 120, proc)
    return proc


def sequential(tag: str, calls: int, smtp: Any, procs: list[Proc]) -> dict[str, Any]:
    """Back-to-back calls: each right after the previous email was accepted."""
    from indostar_client import tasks

    latency, call, lag, ids = [], [], [], []
    for i in range(calls + 1):  # the first is a warm-up (the worker's first batch opens its clients)
        to = f"{tag}{i}@example.in"
        t0 = time.perf_counter()
        handle = tasks.send_email_task.delay(to_email=to, subject="Your code", body="Sequential")
        returned = time.perf_counter()
        wait_for(f"email to {to}", lambda to=to: to in smtp.handler.arrived, 60, *procs, interval=0.001)
        arrived = smtp.handler.arrived[to]
        handle.get(timeout=60, interval=0.005)
        if i:
            latency.append(arrived - t0)
            call.append(returned - t0)
            lag.append(max(time.perf_counter() - arrived, 0.0))
            ids.append(handle.id)
    return {"latency": _stats(latency), "delay_call": _stats(call), "get_lag": _stats(lag), "ids": ids}


def burst(n: int, threads: int, smtp: Any, procs: list[Proc]) -> dict[str, Any]:
    """``n`` calls from ``threads`` threads; then every handle's .get(), timed against its email's arrival."""
    from indostar_client import tasks

    calls: list[float] = []
    handles: list[tuple[str, Any]] = []
    lock = threading.Lock()
    first = time.perf_counter()

    def submit(k: int) -> None:
        mine = []
        for i in range(k, n, threads):
            to = f"burst{i}@example.in"
            t0 = time.perf_counter()
            h = tasks.send_email_task.delay(to_email=to, subject="Burst", body="Burst")
            mine.append((time.perf_counter() - t0, to, h))
        with lock:
            calls.extend(c for c, _, _ in mine)
            handles.extend((to, h) for _, to, h in mine)

    pool = [threading.Thread(target=submit, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    submitted = time.perf_counter() - first
    lags: list[float] = []

    def collect(part: list[tuple[str, Any]]) -> None:
        for to, h in part:
            called = time.perf_counter()
            h.get(timeout=300, interval=0.01)
            done = time.perf_counter()
            arrived = smtp.handler.arrived.get(to, done)
            with lock:
                lags.append(max(done - max(arrived, called), 0.0))

    getters = [threading.Thread(target=collect, args=(handles[k::threads],)) for k in range(threads)]
    for t in getters:
        t.start()
    for t in getters:
        t.join()
    recipients = [to for to, _ in handles]
    wait_for("every burst email", lambda: all(r in smtp.handler.arrived for r in recipients), 300, *procs)
    last = max(smtp.handler.arrived[r] for r in recipients)
    once = sum(1 for r in recipients if smtp.handler.count.get(r) == 1)
    return {
        "calls": n,
        "threads": threads,
        "delay_call": _stats(calls),
        "submit_s": submitted,
        "end_to_end_s": last - first,
        "throughput_msgs_per_s": n / (last - first),
        "exactly_once": once == n,
        "received_once": once,
        "get_lag": _stats(lags),
    }


def breakdown(ids: list[str]) -> dict[str, float]:
    """Medians of the sequential calls' phases, from the rows' timestamps (database clock)."""
    from sqlalchemy import text

    from lib import db

    with db.get_engine().connect() as c:
        rows = c.execute(
            text(
                """SELECT EXTRACT(EPOCH FROM n.created_at - t.created_at), EXTRACT(EPOCH FROM n.sent_at - n.created_at),
                          EXTRACT(EPOCH FROM t.finished_at - n.sent_at)
                     FROM background_tasks t JOIN notifications n ON n.idempotency_key = 'task-' || t.id::text
                    WHERE t.id = ANY(CAST(:ids AS uuid[]))"""
            ),
            {"ids": ids},
        ).all()
    return {
        name: statistics.median(float(r[i]) for r in rows)
        for i, name in enumerate(("queued_to_recorded_s", "recorded_to_sent_s", "sent_to_done_s"))
    }


def _drop_redis_keys(url: str) -> None:
    import redis

    with contextlib.suppress(redis.exceptions.RedisError):
        r = redis.Redis.from_url(url, socket_connect_timeout=2)
        keys = list(r.scan_iter(match=f"{REDIS_PREFIX}*", count=1000))
        if keys:
            r.delete(*keys)


def _interrupt(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so the finally block stops the subprocesses."""
    raise KeyboardInterrupt


@dataclass(frozen=True)
class Setup:
    """Ports, databases and the scratch folder of one run; every subprocess and this process share them."""

    workdir: Path
    smtp_port: int
    api_port: int
    api_url: str
    db_url: str
    prefect_url: str
    redis_url: str


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30, help="sequential calls (default 30)")
    parser.add_argument("--burst", type=int, default=500, help="calls in the burst (default 500)")
    parser.add_argument("--threads", type=int, default=8, help="threads making the burst (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="task-worker processes (default 1)")
    args = parser.parse_args(argv)
    if min(args.calls, args.burst, args.threads, args.workers) < 1:
        parser.error("--calls, --burst, --threads and --workers must be >= 1")
    return args


def _setup() -> Setup:
    """Free ports, a scratch folder, the names of this run's databases; this process takes the workers' settings."""
    from deployments import prefect_db
    from devtools.smtp_sink import free_port
    from lib import db
    from lib.config import get_settings

    workdir = Path(tempfile.mkdtemp(prefix="indostar-bench-latency-"))
    smtp_port, api_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}/api"
    get_settings.cache_clear()
    base = get_settings()
    db_url = database_url(base.database_url, BENCH_DB)
    prefect_url = prefect_db.prefect_database_url(base.database_url, f"{BENCH_DB}_prefect")
    env = {
        "INDOSTAR_ENV": "dev",
        "DATABASE_URL": db_url,
        "REDIS_KEY_PREFIX": REDIS_PREFIX,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "SMTP_SECURITY": "none",
        "SMS_PROVIDER": "log",
        "PREFECT_HOME": str(workdir / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    os.environ.update(env)  # this process is the backend: the same settings
    get_settings.cache_clear()
    db.reset_engine()
    return Setup(workdir, smtp_port, api_port, api_url, db_url, prefect_url, base.redis_url)


def _create_databases(setup: Setup) -> None:
    from deployments import prefect_db
    from lib import db

    db.drop_database(setup.db_url)
    db.migrate(setup.db_url)
    prefect_db.drop_prefect_database(setup.prefect_url)
    prefect_db.migrate_prefect_database(setup.prefect_url)


def _start_server(setup: Setup) -> Proc:
    from deployments import prefect_db
    from devtools.processes import Proc

    return Proc(
        "server",
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(setup.api_port)],
        {**os.environ, **prefect_db.server_env(setup.prefect_url)},
        setup.workdir,
    )


def _scenarios(args: argparse.Namespace, setup: Setup, smtp: Any, procs: list[Proc]) -> dict[str, Any]:
    """Every scenario in turn; subprocesses it starts join ``procs``, so the caller stops them whatever happens."""
    from deployments.prefect_api import api_healthy
    from devtools.smtp_sink import free_port

    server = _start_server(setup)
    procs.append(server)
    server_s = wait_for("Prefect server health", lambda: api_healthy(setup.api_url), 120, server)

    # Without the API first: the reference for what a batch's Prefect task run costs.
    closed = f"http://127.0.0.1:{free_port()}/api"
    alone = _start_worker("task-worker-no-api", {**os.environ, "PREFECT_API_URL": closed}, setup.workdir)
    without_api = sequential("alone", args.calls, smtp, [alone])
    alone.stop()

    workers = [_start_worker(f"task-worker-{i}", {**os.environ}, setup.workdir) for i in range(1, args.workers + 1)]
    procs += workers
    seq = sequential("seq", args.calls, smtp, procs)
    phases = breakdown(seq.pop("ids")) | {
        "delay_call_s": seq["delay_call"]["p50_s"],
        "get_lag_s": seq["get_lag"]["p50_s"],
    }
    without_api.pop("ids")
    bur = burst(args.burst, args.threads, smtp, procs)
    return _results(args, seq, without_api, phases, bur, server_s)


def _results(
    args: argparse.Namespace,
    seq: dict[str, Any],
    without_api: dict[str, Any],
    phases: dict[str, float],
    bur: dict[str, Any],
    server_s: float,
) -> dict[str, Any]:
    return {
        "benchmark": "send_email_task.delay(...) -> email accepted by the SMTP server",
        "prefect_server": "prefect server start, state in PostgreSQL (what `make up` runs)",
        "task_workers": args.workers,
        "sequential": seq,
        "sequential_without_api": without_api,
        "task_run_overhead_ratio_p50": seq["latency"]["p50_s"] / without_api["latency"]["p50_s"],
        "breakdown_s": phases,
        "burst": bur,
        "celery_reference": "not measured: Celery is not a dependency (see README for the old system's figures)",
        "target": TARGET,
        "target_met": {
            "sequential_p50": seq["latency"]["p50_s"] <= TARGET["sequential_p50_s"],
            "sequential_p95": seq["latency"]["p95_s"] <= TARGET["sequential_p95_s"],
            "delay_call_max": bur["delay_call"]["max_s"] <= TARGET["delay_call_max_s"],
            "throughput": bur["throughput_msgs_per_s"] >= TARGET["throughput_msgs_per_s"],
            "get_lag_max": bur["get_lag"]["max_s"] <= TARGET["get_lag_max_s"],
            "exactly_once": bur["exactly_once"],
        },
        "prefect_server_start_s": server_s,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def _tear_down(setup: Setup, smtp: Any, procs: list[Proc], failed: bool) -> None:
    """Stop what runs, drop what was created; after a failure, show and keep the subprocesses' logs."""
    from deployments import prefect_db
    from lib import db

    if failed:
        for p in procs:
            print(f"--- {p.name} log (last lines) ---\n{p.tail()}", file=sys.stderr)
    for p in reversed(procs):
        p.stop()
    smtp.stop()
    db.reset_engine()
    with contextlib.suppress(Exception):
        db.drop_database(setup.db_url)
        prefect_db.drop_prefect_database(setup.prefect_url)
    _drop_redis_keys(setup.redis_url)
    if not failed:
        import shutil

        shutil.rmtree(setup.workdir, ignore_errors=True)
    else:
        print(f"logs kept in {setup.workdir}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.WARNING)

    setup = _setup()
    procs: list[Proc] = []
    smtp = _smtp_server(setup.smtp_port)
    results: dict[str, Any] = {}
    failed = True
    try:
        _create_databases(setup)
        smtp.start()
        results = _scenarios(args, setup, smtp, procs)
        failed = False
    finally:
        _tear_down(setup, smtp, procs, failed)
    _print(results)
    return 0


def _print(r: dict[str, Any]) -> None:
    out = sys.stderr
    print(f"\n{r['benchmark']} ({r['task_workers']} task worker(s), {r['cpus']} CPUs)", file=out)
    print(f"{'scenario':<28} {'p50 s':>8} {'p95 s':>8} {'max s':>8}", file=out)
    rows = [
        ("sequential: trigger -> 250", r["sequential"]["latency"]),
        ("  without the API (ref.)", r["sequential_without_api"]["latency"]),
        ("sequential: .delay call", r["sequential"]["delay_call"]),
        ("burst: .delay call", r["burst"]["delay_call"]),
        ("burst: .get() after 250", r["burst"]["get_lag"]),
    ]
    for name, x in rows:
        print(f"{name:<28} {x['p50_s']:>8.3f} {x['p95_s']:>8.3f} {x['max_s']:>8.3f}", file=out)
    b = r["burst"]
    print(
        f"burst: {b['calls']} calls from {b['threads']} threads submitted in {b['submit_s']:.2f} s, delivered at "
        f"{b['throughput_msgs_per_s']:.1f} msgs/s, exactly once: {b['exactly_once']}",
        file=out,
    )
    print(f"task run overhead (p50 with / without the API): x{r['task_run_overhead_ratio_p50']:.2f}", file=out)
    print("breakdown (medians): " + ", ".join(f"{k} {v:.3f}" for k, v in r["breakdown_s"].items()), file=out)
    print(f"targets met: {r['target_met']}", file=out)
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
