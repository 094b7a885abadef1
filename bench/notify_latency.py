"""Benchmark: a message the backend sends while a customer waits, from the call to the SMTP server.

    python -m bench.notify_latency --calls 50

Two paths, measured side by side in one run, calls alternating, one order at a time:

- background: ``deployments.tasks.send_order_confirmation_task.delay(order_id)`` (a Prefect
  background task) to a warm ``indostar-jobs task-worker``;
- deployment: ``deployments.client.send_order_confirmation(order_id)`` (run_deployment with
  timeout=0) to ``indostar-jobs serve``, which starts a process per flow run.

Latency is from the backend's call to the confirmation email being accepted by the SMTP
server (the time is taken by the SMTP handler itself). Each call's order has its own
customer and address; the next call waits until the previous run has finished.

Everything is its own: a ``prefect server start`` subprocess on a free port (temporary
PREFECT_HOME, SQLite), ``serve`` and ``task-worker`` subprocesses, a recording aiosmtpd
in this process on a free loopback port, database indostar_bench_latency (made by the
migrations, dropped at the end), Redis keys under ``indostar-bench-latency:`` (deleted),
SMS_PROVIDER=log. The serve process polls for scheduled runs every
PREFECT_RUNNER_POLL_FREQUENCY seconds (--poll, default 1). A table on stderr, one JSON
object on stdout (seconds). Subprocesses are stopped by process group at the end.
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
import time
from pathlib import Path
from typing import Any

from bench._common import database_url, percentile, seed_orders, wait_for
from deployments.dev.processes import Proc

BENCH_DB = "indostar_bench_latency"
REDIS_PREFIX = "indostar-bench-latency:"
DEPLOYMENT = "send-order-confirmation/default"
TARGET = {"p50_s": 0.3, "p95_s": 0.6}


def _smtp_server(port: int):
    """A DevSMTPServer whose handler also notes when (perf_counter) each recipient's message arrived."""
    from deployments.dev.smtp_sink import DevSMTPServer, RecordingHandler

    class Timed(RecordingHandler):
        def __init__(self) -> None:
            super().__init__()
            self.arrived: dict[str, float] = {}

        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            now = time.perf_counter()
            reply = await super().handle_DATA(server, session, envelope)
            with self.lock:
                for rcpt in envelope.rcpt_tos:
                    self.arrived.setdefault(rcpt.lower(), now)
            return reply

    return DevSMTPServer("127.0.0.1", port, Timed())


def _deployment_ready() -> bool:
    """send-order-confirmation/default exists and the serve process has polled for its runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import DeploymentStatus
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name(DEPLOYMENT)
    except ObjectNotFound:
        return False
    return dep.status == DeploymentStatus.READY


def _run_final(run_id: Any) -> bool:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    return bool(run.state and run.state.is_final())


def _one_call(path: str, order_id: int, email: str, smtp: Any, timeout: float, procs: list[Proc]) -> dict[str, Any]:
    """One backend call on ``path``; when its email arrived; waits for the run to finish before returning."""
    from deployments import client, tasks

    t0 = time.perf_counter()
    if path == "background":
        handle = tasks.send_order_confirmation_task.delay(order_id)
    else:
        run_id = client.send_order_confirmation(order_id)
    returned = time.perf_counter()
    wait_for(
        f"{path} email for order {order_id}", lambda: email in smtp.handler.arrived, timeout, *procs, interval=0.002
    )
    arrived = smtp.handler.arrived[email]
    if path == "background":
        handle.get(timeout=timeout)
    else:
        wait_for(f"flow run {run_id}", lambda: _run_final(run_id), timeout, *procs, interval=0.2)
    return {"path": path, "order_id": order_id, "call_s": returned - t0, "latency_s": arrived - t0}


def measure(orders: list[tuple[int, str]], smtp: Any, timeout: float, procs: list[Proc]) -> list[dict[str, Any]]:
    """Alternate the two paths call by call, so load on the machine falls on both alike."""
    rows = []
    for i, (order_id, email) in enumerate(orders):
        path = ("background", "deployment")[i % 2]
        row = _one_call(path, order_id, email, smtp, timeout, procs)
        rows.append(row)
        print(f"{path:<10} order {order_id}: {row['latency_s']:.3f} s (call {row['call_s']:.3f} s)", file=sys.stderr)
    return rows


def summarise(rows: list[dict[str, Any]], path: str) -> dict[str, Any]:
    lat = [r["latency_s"] for r in rows if r["path"] == path]
    calls = [r["call_s"] for r in rows if r["path"] == path]
    return {
        "calls": len(lat),
        "p50_s": percentile(lat, 50),
        "p95_s": percentile(lat, 95),
        "min_s": min(lat),
        "max_s": max(lat),
        "mean_s": statistics.fmean(lat),
        "client_call_p50_s": percentile(calls, 50),
        "latencies_s": lat,
    }


def _drop_redis_keys(url: str) -> int:
    import redis

    with contextlib.suppress(redis.exceptions.RedisError):
        r = redis.Redis.from_url(url, socket_connect_timeout=2)
        keys = list(r.scan_iter(match=f"{REDIS_PREFIX}*", count=1000))
        if keys:
            r.delete(*keys)
        return len(keys)
    return -1


def _interrupt(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so the finally block stops the subprocesses."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50, help="sequential calls per path (both paths, alternating)")
    parser.add_argument("--poll", type=int, default=1, help="PREFECT_RUNNER_POLL_FREQUENCY of the serve process (s)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for one email")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.poll < 1:
        parser.error("--calls and --poll must be >= 1")

    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.WARNING)

    from deployments.dev.smtp_sink import free_port
    from lib import db
    from lib.config import get_settings

    workdir = Path(tempfile.mkdtemp(prefix="indostar-bench-latency-"))
    smtp_port, api_port = free_port(), free_port()
    api_url = f"http://127.0.0.1:{api_port}/api"
    get_settings.cache_clear()
    base = get_settings()
    db_url = database_url(base.database_url, BENCH_DB)
    env = {
        "INDOSTAR_ENV": "dev",
        "DATABASE_URL": db_url,
        "REDIS_KEY_PREFIX": REDIS_PREFIX,
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "SMTP_SECURITY": "none",
        "SMS_PROVIDER": "log",
        "REPORTS_DIR": str(workdir / "reports"),
        "PREFECT_HOME": str(workdir / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_UI_URL": f"http://127.0.0.1:{api_port}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RUNNER_POLL_FREQUENCY": str(args.poll),
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
    }
    # This process's Prefect client reads the same settings (set before prefect is imported).
    os.environ.update(env)
    get_settings.cache_clear()
    db.reset_engine()

    from deployments.cli import api_healthy

    procs: list[Proc] = []
    smtp = _smtp_server(smtp_port)
    results: dict[str, Any] = {}
    failed = True
    try:
        db.drop_database(db_url)
        db.migrate(db_url)
        smtp.start()
        server = Proc(
            "server",
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(api_port)],
            {**os.environ},
            workdir,
        )
        procs.append(server)
        server_s = wait_for("Prefect server health", lambda: api_healthy(api_url), 120, server)
        serve = Proc("serve", [sys.executable, "-m", "deployments.cli", "serve"], {**os.environ}, workdir)
        worker = Proc("task-worker", [sys.executable, "-m", "deployments.cli", "task-worker"], {**os.environ}, workdir)
        procs += [serve, worker]
        serve_s = wait_for(f"deployment {DEPLOYMENT} ready", _deployment_ready, 120, serve, server, interval=0.5)
        orders = seed_orders(db.get_engine(), 2 * args.calls + 2, f"{os.getpid()}-{int(time.time())}")
        # One warm-up call per path (the task worker's first run opens its clients), not counted.
        measure(orders[:2], smtp, args.timeout, procs)
        rows = measure(orders[2:], smtp, args.timeout, procs)
        background, deployment = summarise(rows, "background"), summarise(rows, "deployment")
        results = {
            "benchmark": "backend call -> order confirmation email accepted by the SMTP server",
            "background": background,
            "deployment": deployment,
            "ratio_deployment_over_background_p50": deployment["p50_s"] / background["p50_s"],
            "ratio_deployment_over_background_p95": deployment["p95_s"] / background["p95_s"],
            "target": TARGET,
            "target_met": background["p50_s"] <= TARGET["p50_s"] and background["p95_s"] <= TARGET["p95_s"],
            "runner_poll_frequency_s": args.poll,
            "prefect_server_start_s": server_s,
            "serve_start_s": serve_s,
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        }
        failed = False
    finally:
        if failed:
            for p in procs:
                print(f"--- {p.name} log (last lines) ---\n{p.tail()}", file=sys.stderr)
        for p in reversed(procs):
            p.stop()
        smtp.stop()
        db.reset_engine()
        with contextlib.suppress(Exception):
            db.drop_database(db_url)
        _drop_redis_keys(base.redis_url)
        if not failed:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"logs kept in {workdir}", file=sys.stderr)

    _print(results)
    return 0


def _print(r: dict[str, Any]) -> None:
    print(f"\n{r['benchmark']}", file=sys.stderr)
    print(
        f"serve polls every {r['runner_poll_frequency_s']} s; load average {r['load_average'][0]:.1f}",
        file=sys.stderr,
    )
    print(f"{'path':<12} {'calls':>6} {'p50 s':>8} {'p95 s':>8} {'max s':>8} {'call p50 s':>11}", file=sys.stderr)
    for path in ("background", "deployment"):
        x = r[path]
        print(
            f"{path:<12} {x['calls']:>6} {x['p50_s']:>8.3f} {x['p95_s']:>8.3f} {x['max_s']:>8.3f} "
            f"{x['client_call_p50_s']:>11.3f}",
            file=sys.stderr,
        )
    print(
        f"deployment / background: p50 x{r['ratio_deployment_over_background_p50']:.1f}, "
        f"p95 x{r['ratio_deployment_over_background_p95']:.1f}; target (background p50 <= 0.3 s, p95 <= 0.6 s) "
        f"{'met' if r['target_met'] else 'NOT met'}",
        file=sys.stderr,
    )
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
