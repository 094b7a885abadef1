"""A real Prefect server (and the processes that run flows) as subprocesses, for end-to-end tests.

The server keeps its state in a PostgreSQL database of its own (a copy of one migrated
once per session), gets its own PREFECT_HOME in a temporary directory and a free port;
subprocesses get the test session's DATABASE_URL, REDIS_*, SMTP_* (set by the pg, redis
and smtp fixtures) plus PREFECT_API_URL. Everything started here is killed
by process group at the end, quietly.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import pytest

from deployments.prefect_api import api_healthy
from devtools.processes import Proc
from devtools.smtp_sink import free_port
from tests.e2e import task_workers

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "e2e-webhook-secret"  # what the task workers sign their webhooks with
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def e2e_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


def server_env(e2e_dir: Path, port: int, database_url: str) -> dict[str, str]:
    """The environment of a Prefect server on ``port`` (its state in ``database_url``, PostgreSQL) and of
    the processes that talk to it."""
    from deployments import prefect_db

    api_url = f"http://127.0.0.1:{port}/api"
    return {
        **os.environ,
        **prefect_db.server_env(database_url),
        "PREFECT_HOME": str(e2e_dir / "prefect-home"),
        "PREFECT_API_URL": api_url,
        "PREFECT_UI_URL": f"http://127.0.0.1:{port}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
        "REPORTS_DIR": str(e2e_dir / "reports"),
        "PYTHONUNBUFFERED": "1",
    }


def start_server(env: dict[str, str], e2e_dir: Path, name: str = "server") -> Proc:
    """`prefect server start` with ``env``, answering before this returns (the test fails if it does not)."""
    api_url = env["PREFECT_API_URL"]
    port = api_url.rsplit(":", 1)[1].split("/")[0]
    server = Proc(
        name,
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port],
        env,
        e2e_dir,
    )
    deadline = time.monotonic() + 90
    while not api_healthy(api_url):
        if server.popen.poll() is not None or time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"Prefect server did not start at {api_url}:\n{server.tail()}")
        time.sleep(0.3)
    return server


@pytest.fixture(scope="module")
def prefect_server(e2e_dir, prefect_database, redis_session, smtp_server, request) -> Iterator[dict[str, str]]:
    """A `prefect server start` subprocess on a PostgreSQL database of its own; yields the environment for
    processes that talk to it."""
    env = server_env(e2e_dir, free_port(), prefect_database(request.module.__name__.rsplit(".", 1)[-1][5:]))
    server = start_server(env, e2e_dir)
    try:
        yield env
    finally:
        server.stop()


@pytest.fixture
def api(prefect_server):
    """The test process's own Prefect client settings pointed at the subprocess server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        yield prefect_server["PREFECT_API_URL"]


@pytest.fixture
def spawn(prefect_server, e2e_dir):
    """Start long-running processes (serve, workers); all are stopped when the test ends."""
    started: list[Proc] = []

    def start(name: str, *args: str, extra_env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, [sys.executable, *args], {**prefect_server, **(extra_env or {})}, e2e_dir)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


def prefect_cli(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    """Run a `prefect` command against the test server; fail the test with its output if it fails."""
    done = subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{out[-3000:]}"
    return out


def run_id_from(output: str) -> UUID:
    """The flow run id `prefect deployment run` prints."""
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert match, output
    return UUID(match.group(1))


def wait_for_run(run_id: UUID, timeout: float = 90, states: set[str] = TERMINAL, proc: Proc | None = None):
    """Poll the API until the run reaches one of ``states``; returns the run."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state_type and run.state_type.value in states:
                return run
            if time.monotonic() > deadline:
                log = proc.tail() if proc else ""
                pytest.fail(f"run {run_id} still {run.state_name} after {timeout:.0f} s\n{log}")
            time.sleep(0.5)


def wait_for_deployment(name: str, timeout: float = 60, proc: Proc | None = None):
    """Poll until ``flow/deployment`` exists (serve registers deployments at start)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            with contextlib.suppress(ObjectNotFound):
                return client.read_deployment_by_name(name)
            if proc is not None and proc.popen.poll() is not None:
                pytest.fail(f"{proc.name} exited {proc.popen.returncode}:\n{proc.tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"deployment {name} not registered after {timeout:.0f} s\n{proc.tail() if proc else ''}")
            time.sleep(0.5)


# ---- task workers (tests/e2e/task_workers.py has what reads their logs) ----------------------------------


@pytest.fixture
def worker_env(sms_gateway):
    """Settings every task worker of these tests gets: webhooks to the loopback gateway."""
    return {
        "TASK_WEBHOOK_URL": f"{sms_gateway_url()}/hooks/indostar",
        "TASK_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }


def sms_gateway_url() -> str:
    from lib.config import get_settings

    return get_settings().sms_base_url


@pytest.fixture
def start_worker(spawn, worker_env):
    """Start `indostar-jobs task-worker` processes, each listening before this returns; stopped at the end."""

    def start(name: str = "task-worker", *args: str, **extra: str):
        env = worker_env | {"TASK_POLL_SECONDS": "0.5"} | extra
        proc = spawn(name, "-m", "deployments.cli", "task-worker", *args, extra_env=env)
        task_workers.wait_listening(proc)
        return proc

    return start
