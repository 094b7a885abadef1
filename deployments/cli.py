"""The `indostar-jobs` command: migrate, seed, serve, up (what `make up` runs), automations, setup-pool.

Errors we expect (bad settings, a service down) print one clear line and exit 2,
without a traceback. Prefect is imported only by the commands that need it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence

from lib.config import ConfigError, get_settings, redacted_url
from lib.db import ServiceUnavailableError
from lib.errors import JobError

log = logging.getLogger("indostar_jobs")

DEFAULT_API = "http://127.0.0.1:4200/api"


def cmd_migrate(args: argparse.Namespace) -> int:
    from lib import db

    url = get_settings().database_url
    if args.revision.startswith("-") or args.downgrade:
        db.downgrade(url, args.revision)
    else:
        db.migrate(url, args.revision)
    print(f"database {redacted_url(url)} at revision {args.revision}")
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    from rich.progress import Progress

    from deployments.dev import seed
    from lib import db

    counts = seed.SeedCounts(
        customers=args.customers,
        products=args.products,
        subscriptions=args.subscriptions,
        carts=args.carts,
        tokens=args.tokens,
        audit_logs=args.audit_logs,
        sessions=args.sessions,
    )
    steps = ["customers", "products", "subscriptions", "carts", "audit_logs", "sessions", "tokens"]
    started = time.perf_counter()
    with Progress(transient=False) as bar:
        task = bar.add_task("seeding", total=len(steps))

        def tick(name: str, n: int) -> None:
            bar.update(task, advance=1, description=f"{name}: {n:,}")

        with db.get_engine().begin() as conn:
            out = seed.seed(conn, counts, args.today or dt.date.today(), args.rng_seed, tick, _token_sink())
    print(", ".join(f"{k} {v:,}" for k, v in out.items()) + f" in {time.perf_counter() - started:.1f} s")
    return 0


def _token_sink():
    from deployments.dev.tokens import seed_demo_tokens

    return seed_demo_tokens


def cmd_serve(args: argparse.Namespace) -> int:
    from deployments.serve import serve_all

    # Runs send heartbeats, so a killed server process is noticed (see deployments/automations.py).
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")

    serve_all(pause_on_shutdown=args.pause_on_shutdown)
    return 0


def api_healthy(api_url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as r:  # noqa: S310
            return r.status == 200
    except OSError:
        return False


def start_prefect_server(api_url: str, wait: float = 90.0) -> subprocess.Popen | None:
    """Start `prefect server start` on 127.0.0.1:4200 unless a server already answers there."""
    if api_healthy(api_url):
        print(f"Prefect API already answering at {api_url}")
        return None
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    os.makedirs(".run", exist_ok=True)
    logfile = open(".run/prefect-server.log", "ab")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", "4200"],
        env=env,
        stdout=logfile,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if api_healthy(api_url):
            print(f"Prefect server started (pid {proc.pid}); log in .run/prefect-server.log")
            return proc
        if proc.poll() is not None:
            raise ServiceUnavailableError("Prefect server exited at start; see .run/prefect-server.log")
        time.sleep(0.5)
    proc.terminate()
    raise ServiceUnavailableError(f"Prefect server did not answer at {api_url} within {wait:.0f} s")


def check_redis() -> None:
    import redis

    url = get_settings().redis_url
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:
        raise ServiceUnavailableError(
            f"Redis is not reachable at {redacted_url(url)} (REDIS_URL): {exc}; start it with "
            '`redis-server --daemonize yes --bind 127.0.0.1 --save ""` or set REDIS_URL'
        ) from None


TRY_COMMANDS = """
Try, from another terminal in this directory:
  export PREFECT_API_URL={api}
  .venv/bin/prefect deployment run process-due-subscriptions/daily
  .venv/bin/prefect deployment run cleanup-expired-carts/daily
  .venv/bin/prefect deployment run send-email/default -p to=you@example.in -p subject=Hi -p body=Hello
  .venv/bin/prefect deployment ls
"""


def cmd_up(args: argparse.Namespace) -> int:
    if args.production:
        from deployments.dev.topology import run_production

        return run_production()
    from deployments.dev import seed
    from deployments.dev.smtp_sink import DevSMTPServer, port_open
    from lib import db

    api_url = os.environ.setdefault("PREFECT_API_URL", DEFAULT_API)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    s = get_settings()
    db.migrate(s.database_url)
    check_redis()
    with db.get_engine().begin() as conn:
        if seed.is_empty(conn):
            print("empty database: seeding demo data")
            seed.seed(conn, seed.SeedCounts(), dt.date.today(), token_sink=_token_sink())
    smtp = None
    if s.smtp_host in ("127.0.0.1", "localhost") and not port_open(s.smtp_host, s.smtp_port):
        smtp = DevSMTPServer(s.smtp_host, s.smtp_port).start()
        print(f"dev SMTP sink listening on {s.smtp_host}:{s.smtp_port} (messages are logged, not delivered)")
    server = start_prefect_server(api_url)
    print(f"\nPrefect UI: {api_url.removesuffix('/api')}\n{TRY_COMMANDS.format(api=api_url)}")
    try:
        from deployments.serve import serve_all

        serve_all(pause_on_shutdown=False)
    except KeyboardInterrupt:
        pass
    finally:
        if smtp:
            smtp.stop()
        if server:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
        print("stopped what `up` started")
    return 0


def cmd_automations(args: argparse.Namespace) -> int:
    from deployments.automations import create_automations

    for name in create_automations():
        print(f"automation ready: {name}")
    return 0


def cmd_setup_pool(args: argparse.Namespace) -> int:
    from deployments.setup_pool import POOL, setup_pool

    for name, (priority, limit) in setup_pool().items():
        print(f"work pool {POOL}: queue {name} priority {priority} concurrency limit {limit}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="indostar-jobs", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("migrate", help="create the database if missing and upgrade it")
    m.add_argument("--revision", default="head")
    m.add_argument("--downgrade", action="store_true", help="downgrade to --revision instead")
    m.set_defaults(func=cmd_migrate)

    s = sub.add_parser("seed", help="insert realistic demo data (COPY)")
    for name, default in (
        ("customers", 1000),
        ("products", 200),
        ("subscriptions", 2000),
        ("carts", 1000),
        ("tokens", 1000),
        ("audit-logs", 2000),
        ("sessions", 1000),
    ):
        s.add_argument(f"--{name}", type=_non_negative, default=default)
    s.add_argument("--today", type=dt.date.fromisoformat, default=None, help="date the data is relative to")
    s.add_argument("--rng-seed", type=int, default=7)
    s.set_defaults(func=cmd_seed)

    v = sub.add_parser("serve", help="serve every deployment of prefect.yaml from this process")
    v.add_argument("--pause-on-shutdown", action="store_true", help="pause the schedules when stopping")
    v.set_defaults(func=cmd_serve)

    u = sub.add_parser("up", help="Prefect server, migrations, demo data, dev SMTP, serve (make up)")
    u.add_argument(
        "--production",
        action="store_true",
        help="the production topology instead: server on PostgreSQL + Redis, services apart, pool workers",
    )
    u.set_defaults(func=cmd_up)

    a = sub.add_parser("automations", help="create or update the alerting automations")
    a.set_defaults(func=cmd_automations)

    w = sub.add_parser("setup-pool", help="create or update work pool indostar and its queues (before deploy)")
    w.set_defaults(func=cmd_setup_pool)
    return p


def _non_negative(value: str) -> int:
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return n


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Per-request and per-SMTP-command chatter would bury the lines an operator needs.
    for noisy in ("alembic.runtime.plugins", "httpx", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ServiceUnavailableError, JobError) as exc:
        print(f"indostar-jobs {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
