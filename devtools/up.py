"""`make up`: the shop on this machine, ready to click through.

``prepare_shop`` is the start-up sequence both modes share (migrate, Redis reachable, demo data
in an empty database, the dev SMTP sink on a free local port); ``run_dev`` then starts a Prefect
server on PostgreSQL (unless one answers), a task worker and `serve`; ``--production`` runs the
production topology instead (devtools.topology).
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from deployments.prefect_api import DEFAULT_API, api_healthy, wait_for_api
from lib.config import get_settings, redacted_url
from lib.errors import ServiceUnavailableError

TRY_COMMANDS = """
Try, from another terminal in this directory:
  export PREFECT_API_URL={api}
  .venv/bin/prefect deployment run process-due-subscriptions/daily
  .venv/bin/prefect deployment run cleanup-expired-carts/daily
  .venv/bin/prefect deployment run send-email/default -p to=you@example.in -p subject=Hi -p body=Hello
  .venv/bin/prefect deployment ls
  .venv/bin/python -c 'from indostar_client.tasks import send_email_task as t; \\
    print(t.delay(to_email="you@example.in", subject="Hi", body="Hello").get(timeout=10))'
"""


def prepare_shop() -> Any:
    """Migrate the shop's database, check Redis, seed an empty database, start the dev SMTP sink if
    SMTP_HOST is local and nothing listens there; returns the sink (or None) for the caller to stop."""
    from deployments.cli import check_redis
    from devtools import seed
    from devtools.smtp_sink import DevSMTPServer, port_open
    from devtools.tokens import seed_demo_tokens
    from lib import db

    s = get_settings()
    check_redis()
    db.migrate(s.database_url)
    with db.get_engine().begin() as conn:
        if seed.is_empty(conn):
            print("empty database: seeding demo data")
            seed.seed(conn, seed.SeedCounts(), dt.date.today(), token_sink=seed_demo_tokens)
    if s.smtp_host in ("127.0.0.1", "localhost") and not port_open(s.smtp_host, s.smtp_port):
        print(f"dev SMTP sink listening on {s.smtp_host}:{s.smtp_port} (messages are logged, not delivered)")
        return DevSMTPServer(s.smtp_host, s.smtp_port).start()
    return None


def start_prefect_server(api_url: str, database: str = "postgresql", wait: float = 120.0) -> subprocess.Popen | None:
    """Start `prefect server start` on 127.0.0.1:4200 unless a server already answers there.

    Its state goes to PostgreSQL (``indostar_prefect`` beside DATABASE_URL, or
    PREFECT_API_DATABASE_CONNECTION_URL), created if missing and migrated as the server starts;
    ``database="sqlite"`` keeps Prefect's own SQLite file under PREFECT_HOME instead.
    """
    if api_healthy(api_url):
        print(f"Prefect API already answering at {api_url}")
        return None
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    if database == "sqlite":
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
        print("Prefect server on SQLite (asked for): expect 503 'database is locked' under background work")
    else:
        from deployments import prefect_db

        url = prefect_db.configured_url(get_settings().database_url)
        created = prefect_db.ensure_prefect_database(url)
        env |= prefect_db.server_env(url, migrated=False)
        print(f"Prefect server on PostgreSQL: {redacted_url(url)}{' (created)' if created else ''}")
    os.makedirs(".run", exist_ok=True)
    logfile = open(".run/prefect-server.log", "ab")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", "4200"],
        env=env,
        stdout=logfile,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def alive() -> None:
        if proc.poll() is not None:
            raise ServiceUnavailableError("Prefect server exited at start; see .run/prefect-server.log")

    try:
        wait_for_api(api_url, wait, alive, ".run/prefect-server.log")
    except ServiceUnavailableError:
        proc.terminate()
        raise
    print(f"Prefect server started (pid {proc.pid}); log in .run/prefect-server.log")
    return proc


def start_task_worker() -> Any:
    """`indostar-jobs task-worker` beside `serve`, in its own process; log in .run/task-worker.log."""
    from devtools.processes import Proc

    os.makedirs(".run", exist_ok=True)
    proc = Proc("task-worker", [sys.executable, "-m", "deployments.cli", "task-worker"], dict(os.environ), Path(".run"))
    print(f"task worker started (pid {proc.popen.pid}); log in .run/task-worker.log")
    return proc


def run_dev(prefect_database: str) -> int:
    """The shop, a Prefect server, a task worker and every deployment served from this process, until Ctrl-C."""
    # Before anything imports Prefect: its settings are read from the environment at import.
    api_url = os.environ.setdefault("PREFECT_API_URL", DEFAULT_API)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    from deployments.serve import serve_all

    smtp = prepare_shop()
    server = start_prefect_server(api_url, prefect_database)
    tasks = start_task_worker()
    print(f"\nPrefect UI: {api_url.removesuffix('/api')}\n{TRY_COMMANDS.format(api=api_url)}")
    try:
        serve_all(pause_on_shutdown=False)
    except KeyboardInterrupt:
        pass
    finally:
        tasks.stop()
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
