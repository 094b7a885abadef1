"""Benchmark: latency from a deployments/client.py call to the email at the SMTP server.

    python -m bench.notify_latency --calls 20

What a backend sees when it confirms one order: the time from calling
``deployments.client.send_order_confirmation(order_id)`` (run_deployment with
timeout=0) to the confirmation email arriving at the SMTP server, with the
deployments served as in production (``indostar-jobs serve``). Calls are sequential,
one order at a time, each order's customer with its own address; the arrival time is
taken by the SMTP handler itself, so this process's polling adds nothing.

Everything is its own: a real ``prefect server start`` subprocess on a free port
(temporary PREFECT_HOME, SQLite), ``python -m deployments.cli serve`` as a second
subprocess, a recording aiosmtpd server in this process on a free loopback port,
database indostar_bench_latency (made by the migrations, dropped at the end), Redis
keys under ``indostar-bench-latency:`` (deleted at the end), SMS_PROVIDER=log.

The serve process looks for scheduled runs every PREFECT_RUNNER_POLL_FREQUENCY
seconds (Prefect's default is 10; --poll sets it, default 1), so that interval and the
start of the flow run's own process make up most of the latency. A table on stderr,
one JSON object on stdout (all latencies in seconds). Subprocesses are stopped by
process group at the end, also on error; their logs are shown if something fails.
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

from sqlalchemy.engine import make_url

from deployments.dev.processes import Proc

ROOT = Path(__file__).resolve().parent.parent
BENCH_DB = "indostar_bench_latency"
REDIS_PREFIX = "indostar-bench-latency:"
DEPLOYMENT = "send-order-confirmation/default"


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


def _wait(what: str, ok, timeout: float, *procs: Proc, interval: float = 0.2) -> float:
    """Poll ``ok()`` until true; seconds it took. Fails early if a subprocess died."""
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    while not ok():
        for p in procs:
            p.check_alive()
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name} ---\n{p.tail()}" for p in procs)
            raise TimeoutError(f"{what} not within {timeout:.0f} s\n{tails}")
        time.sleep(interval)
    return time.perf_counter() - started


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


def make_orders(n: int, run: str) -> list[tuple[int, str]]:
    """N orders, each with its own customer and address; (order id, email) pairs."""
    from lib import db
    from tests.builders import make_customer, make_order, make_product

    engine = db.get_engine()
    product = make_product(engine, stock=0)
    out = []
    for i in range(n):
        email = f"latency-{run}-{i}@example.in"
        customer = make_customer(engine, name=f"Latency Customer {i}", email=email, phone=f"+9198{i:08d}")
        out.append((make_order(engine, customer_id=customer, product_id=product), email))
    return out


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100), as numpy's default."""
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _final_state(run_id, timeout: float, serve: Proc) -> str:
    """Wait until the flow run is in a terminal state; its state name."""
    from prefect.client.orchestration import get_client

    state: list[str] = []

    def done() -> bool:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
        state[:] = [run.state_name or "?"]
        return bool(run.state and run.state.is_final())

    _wait(f"flow run {run_id} to finish", done, timeout, serve, interval=0.2)
    return state[0]


def measure(orders: list[tuple[int, str]], smtp, serve: Proc, timeout: float, settle: bool) -> list[dict[str, Any]]:
    """One call at a time; with ``settle`` the next call waits until the previous flow run has finished."""
    from deployments.client import send_order_confirmation

    rows = []
    for order_id, email in orders:
        t0 = time.perf_counter()
        run_id = send_order_confirmation(order_id)
        returned = time.perf_counter()
        _wait(f"email for order {order_id}", lambda e=email: e in smtp.handler.arrived, timeout, serve, interval=0.005)
        arrived = smtp.handler.arrived[email]
        final = _final_state(run_id, timeout, serve) if settle else None
        rows.append(
            {
                "order_id": order_id,
                "flow_run_id": str(run_id),
                "call_s": returned - t0,
                "latency_s": arrived - t0,
                "final_state": final,
            }
        )
        print(
            f"order {order_id}: {arrived - t0:.3f} s (call {returned - t0:.3f} s){f', run {final}' if final else ''}",
            file=sys.stderr,
        )
    return rows


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
    parser.add_argument("--calls", type=int, default=20, help="sequential send_order_confirmation calls")
    parser.add_argument("--poll", type=int, default=1, help="PREFECT_RUNNER_POLL_FREQUENCY of the serve process (s)")
    parser.add_argument(
        "--no-settle",
        action="store_true",
        help="call again as soon as the email arrives, not after the previous flow run has finished",
    )
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
    db_url = make_url(base.database_url).set(database=BENCH_DB).render_as_string(hide_password=False)
    env = {
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
        server_s = _wait("Prefect server health", lambda: api_healthy(api_url), 120, server)
        serve = Proc("serve", [sys.executable, "-m", "deployments.cli", "serve"], {**os.environ}, workdir)
        procs.append(serve)
        serve_s = _wait(f"deployment {DEPLOYMENT} ready", _deployment_ready, 120, serve, server, interval=0.5)
        orders = make_orders(args.calls, f"{os.getpid()}-{int(time.time())}")
        rows = measure(orders, smtp, serve, args.timeout, not args.no_settle)
        lat = [r["latency_s"] for r in rows]
        calls = [r["call_s"] for r in rows]
        results = {
            "benchmark": "client.send_order_confirmation -> email at SMTP server (served deployments)",
            "calls": len(rows),
            "p50_s": percentile(lat, 50),
            "p95_s": percentile(lat, 95),
            "min_s": min(lat),
            "max_s": max(lat),
            "mean_s": statistics.fmean(lat),
            "client_call_p50_s": percentile(calls, 50),
            "client_call_max_s": max(calls),
            "settled_between_calls": not args.no_settle,
            "final_states": sorted({r["final_state"] for r in rows if r["final_state"]}),
            "runner_poll_frequency_s": args.poll,
            "poll_setting": "PREFECT_RUNNER_POLL_FREQUENCY",
            "prefect_server_start_s": server_s,
            "serve_start_s": serve_s,
            "latencies_s": lat,
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
        f"runner poll frequency (PREFECT_RUNNER_POLL_FREQUENCY): {r['runner_poll_frequency_s']} s; "
        f"prefect server up in {r['prefect_server_start_s']:.1f} s, serve ready in {r['serve_start_s']:.1f} s",
        file=sys.stderr,
    )
    print(
        f"{'calls':>6} {'p50 s':>8} {'p95 s':>8} {'min s':>8} {'max s':>8} {'mean s':>8} {'call p50 s':>11}",
        file=sys.stderr,
    )
    print(
        f"{r['calls']:>6} {r['p50_s']:>8.3f} {r['p95_s']:>8.3f} {r['min_s']:>8.3f} {r['max_s']:>8.3f} "
        f"{r['mean_s']:>8.3f} {r['client_call_p50_s']:>11.3f}",
        file=sys.stderr,
    )
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
