"""The production topology on one machine: what `python -m devtools up --production` starts.

Every part is its own OS process talking over TCP, as across machines:

- the Prefect API + UI (`prefect server start --no-services`) on PostgreSQL, in a
  database of its own (`indostar_prefect`, never the shop's);
- the server's background services (`prefect server services start`): event
  persister, task-run recorder, triggers, scheduler, late runs, ...;
- Redis between them through prefect-redis: messaging and its cache, causal
  ordering, concurrency leases, the worker cleanup queue and Docket, all in one
  Redis database index of their own (their keys carry no configurable prefix);
- work pool `indostar` with its queues (`indostar-jobs setup-pool`), every
  deployment of prefect.yaml (`indostar-jobs deploy`), the automations;
- one `indostar-jobs task-worker` for the background tasks (messages sent with `.delay()`),
- one process worker per queue, three on `subscriptions` with one flow run each,
  so a nightly run with worker_runs=2 holds one worker while its two lane runs
  go to the two others and claim side by side.

Workers get only PREFECT_API_URL and the shop's settings: none of the server's.
The end-to-end test (tests/e2e/test_production_topology.py) starts the same
`Topology` with its own port, Prefect database and Redis database.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url

from deployments.prefect_db import configured_url
from devtools.processes import ROOT, Proc
from lib.db import ServiceUnavailableError
from lib.errors import JobError

DEFAULT_PORT = 4200
DEFAULT_REDIS_DB = 1
DEFAULT_METRICS_PORT = 9464
DEFAULT_TASK_METRICS_PORT = 9465
# queue: workers. A nightly run with worker_runs=N needs N + 1 subscriptions workers.
WORKERS = {"critical": 1, "notifications": 1, "subscriptions": 3, "default": 1}
# One flow run at a time per subscriptions worker: otherwise whichever worker polls first
# takes every lane run of the night and the others stay idle.
WORKER_LIMITS = {"subscriptions": 1}
REDIS_OWNER_KEY = "indostar:prefect-topology"
REDIS_MODULES = {
    "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
    "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
    "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
    # Not in Prefect's self-hosting guide, but the services process enqueues the cleanup
    # messages workers receive through the API: in memory, they never leave the services process.
    "PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE": "prefect_redis.cleanup_queue",
}
# Any consumer of the events stream (the API's own event distributor included) trims it past
# consumer groups idle longer than this (prefect_redis default: 5 minutes): a services process
# down that long would never record the task runs of its outage. A day of events in Redis instead.
TRIM_IDLE_THRESHOLD_SECONDS = 24 * 3600
# Settings only the server processes need; stripped from what workers and the CLI get.
SERVER_ONLY_PREFIXES = ("PREFECT_API_DATABASE_", "PREFECT_MESSAGING_", "PREFECT_REDIS_", "PREFECT_SERVER_")


class TopologyError(JobError):
    """A step of the topology failed; the message names the step and its log."""


@dataclass(frozen=True)
class Process:
    """One process of the topology: what `up --production` starts and compose.yaml runs (one list, `processes`)."""

    name: str
    argv: tuple[str, ...]  # "python" stands for this interpreter (the image's, in a container)
    side: str  # "server": the server's environment; "client": a worker machine's
    once: bool = False  # a step that runs to completion (exit 0) before what needs it

    @property
    def is_worker(self) -> bool:
        return self.name.startswith(("worker-", "task-worker-")) or self.name == "metrics"


def _py(*args: str) -> tuple[str, ...]:
    return ("python", "-m", *args)


def processes(config: TopologyConfig) -> list[Process]:
    """Every process of the topology, in start order (Prometheus apart: ``prometheus_config``)."""
    out = [
        Process("prefect-database", _py("deployments.cli", "prefect-database"), "server", once=True),
        Process(
            "prefect-api",
            _py("prefect", "server", "start", "--host", config.host, "--port", str(config.port), "--no-services"),
            "server",
        ),
        Process("prefect-services", _py("prefect", "server", "services", "start"), "server"),
        Process("setup-pool", _py("deployments.cli", "setup-pool"), "client", once=True),
    ]
    for queue, count in config.workers.items():
        for i in range(1, count + 1):
            name = f"{queue}-{i}"
            args = _py("prefect", "worker", "start", "--pool", "indostar", "--work-queue", queue, "--name", name)
            if queue in WORKER_LIMITS:
                args += ("--limit", str(WORKER_LIMITS[queue]))
            out.append(Process(f"worker-{queue}-{i}", args, "client"))
    for i in range(1, config.task_workers + 1):
        args = _py("deployments.cli", "task-worker")
        if config.task_metrics_port:
            args += ("--metrics-port", str(config.task_metrics_port + i - 1), "--metrics-host", config.metrics_host)
        out.append(Process(f"task-worker-{i}", args, "client"))
    if config.metrics_port:
        metrics = _py("deployments.cli", "metrics", "--port", str(config.metrics_port), "--host", config.metrics_host)
        out.append(Process("metrics", metrics, "client"))
    out.append(Process("deploy", _py("deployments.cli", "deploy"), "client", once=True))
    out.append(Process("automations", _py("deployments.cli", "automations"), "client", once=True))
    return out


def scrape_targets(config: TopologyConfig, host_of: Mapping[str, str] | None = None) -> dict[str, list[str]]:
    """Prometheus job: targets, from ``processes`` (``host_of``: a process's address other than metrics_host)."""
    targets: dict[str, list[str]] = {}
    for proc in processes(config):
        if "--metrics-port" in proc.argv or proc.name == "metrics":
            flag = "--metrics-port" if "--metrics-port" in proc.argv else "--port"
            port = proc.argv[proc.argv.index(flag) + 1]
            host = (host_of or {}).get(proc.name, config.metrics_host)
            targets.setdefault("exporter" if proc.name == "metrics" else "task-worker", []).append(f"{host}:{port}")
    return targets


def prometheus_config(targets: Mapping[str, list[str]], rules: str) -> dict:
    """Prometheus's configuration: scrape every 15 s, evaluate deploy/prometheus/alerts.yml (at ``rules``)."""
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": [rules],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": t}]} for job, t in targets.items()],
    }


@dataclass
class TopologyConfig:
    """Where each part listens and keeps its state."""

    prefect_database_url: str  # postgresql+asyncpg://...
    redis_host: str
    redis_port: int
    redis_db: int
    rundir: Path  # logs and PREFECT_HOME
    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"
    workers: Mapping[str, int] = field(default_factory=lambda: dict(WORKERS))
    task_workers: int = 1  # `indostar-jobs task-worker` processes: messages a customer waits for (.delay())
    metrics_port: int | None = DEFAULT_METRICS_PORT  # `indostar-jobs metrics`; None: no exporter
    task_metrics_port: int | None = DEFAULT_TASK_METRICS_PORT  # task worker i serves on this + i - 1
    prometheus_port: int | None = None  # a Prometheus scraping them (when installed); None: none
    metrics_host: str = "127.0.0.1"  # where the exporter and the workers' metrics listen
    public_host: str | None = None  # how clients reach the API (default: host)
    workdir: Path = ROOT  # the code's directory, as workers see it
    indostar_env: str = "dev"  # a rehearsal on one machine runs on the dev defaults
    extra_server_env: Mapping[str, str] = field(default_factory=dict)
    extra_client_env: Mapping[str, str] = field(default_factory=dict)

    @property
    def ui_url(self) -> str:
        return f"http://{self.public_host or self.host}:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.ui_url}/api"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.redis_host}:{self.redis_port}/{self.redis_db}"

    def common_env(self, base: Mapping[str, str]) -> dict[str, str]:
        return {
            **base,
            "INDOSTAR_ENV": self.indostar_env,
            "PREFECT_HOME": str(self.rundir / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_URL": self.ui_url,
            "PWD": str(self.workdir),  # prefect.yaml's pull step records {{ $PWD }} as the workers' directory
            "PYTHONUNBUFFERED": "1",
        }

    def server_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """The API's and the services' environment: PostgreSQL, Redis, nothing about workers."""
        return {
            **self.common_env(base),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_API_DATABASE_CONNECTION_URL": self.prefect_database_url,
            "PREFECT_API_DATABASE_MIGRATE_ON_START": "false",  # `prefect server database upgrade` ran first
            **REDIS_MODULES,
            "PREFECT_REDIS_MESSAGING_HOST": self.redis_host,
            "PREFECT_REDIS_MESSAGING_PORT": str(self.redis_port),
            "PREFECT_REDIS_MESSAGING_DB": str(self.redis_db),
            "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_HOST": self.redis_host,
            "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_PORT": str(self.redis_port),
            "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_DB": str(self.redis_db),
            "PREFECT_SERVER_DOCKET_URL": self.redis_url,
            "PREFECT_REDIS_MESSAGING_CONSUMER_TRIM_IDLE_THRESHOLD": str(TRIM_IDLE_THRESHOLD_SECONDS),
            **self.extra_server_env,
        }

    def client_env(self, base: Mapping[str, str]) -> dict[str, str]:
        """What a worker machine (or the CLI) gets: the API address and the shop's settings."""
        env = {k: v for k, v in self.common_env(base).items() if not k.startswith(SERVER_ONLY_PREFIXES)}
        env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
        return {**env, "PREFECT_API_URL": self.api_url, **self.extra_client_env}


def claim_redis_db(host: str, port: int, db: int, owner: str) -> None:
    """Make sure Redis database ``db`` is ours: empty (then marked with ``owner``) or already marked by ``owner``.

    Prefect's Redis keys (streams, consumer groups, leases) have no prefix of their own:
    two Prefect servers on one database index would consume each other's events.
    """
    import redis

    client = redis.Redis(host=host, port=port, db=db, socket_connect_timeout=2, decode_responses=True)
    try:
        marker = cast(str | None, client.get(REDIS_OWNER_KEY))  # decode_responses: str, not bytes
        if marker == owner:
            return
        if marker is None and client.dbsize() == 0 and client.set(REDIS_OWNER_KEY, owner, nx=True):
            return
        raise TopologyError(
            f"Redis database {db} at {host}:{port} is in use by something else "
            f"({client.dbsize()} keys, owner {marker or 'unknown'}); set PREFECT_REDIS_MESSAGING_DB to a free one"
        )
    except redis.exceptions.ConnectionError as exc:
        raise ServiceUnavailableError(f"Redis is not reachable at {host}:{port}: {exc}") from None
    finally:
        client.close()


def claim_free_redis_db(host: str, port: int, owner: str, candidates: range = range(15, 0, -1)) -> int:
    """The first database index in ``candidates`` that is empty, claimed for ``owner``."""
    for db in candidates:
        with contextlib.suppress(TopologyError):
            claim_redis_db(host, port, db, owner)
            return db
    raise TopologyError(f"no free Redis database among {list(candidates)} at {host}:{port}")


def release_redis_db(host: str, port: int, db: int, owner: str) -> None:
    """Empty database ``db`` if ``owner`` still holds it (what a test started is gone with it)."""
    import redis

    client = redis.Redis(host=host, port=port, db=db, socket_connect_timeout=2, decode_responses=True)
    try:
        if client.get(REDIS_OWNER_KEY) == owner:
            client.flushdb()
    finally:
        client.close()


class Topology:
    """Starts the parts in order, and stops every process it started (workers first)."""

    def __init__(self, config: TopologyConfig, base_env: Mapping[str, str] | None = None, say=print):
        self.config = config
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.say = say
        self.procs: list[Proc] = []
        self.workers: dict[str, Proc] = {}
        config.rundir.mkdir(parents=True, exist_ok=True)

    # --- steps ---------------------------------------------------------------------------------

    def process(self, name: str) -> Process:
        return next(p for p in processes(self.config) if p.name == name)

    def migrate_prefect_database(self) -> None:
        """Create the server's database if missing and upgrade it, before any server process starts."""
        self.run_steps(self.process("prefect-database"))
        self.say(f"Prefect database {make_url(self.config.prefect_database_url).database} ready")

    def start_server(self, wait: float = 120) -> None:
        from deployments.prefect_api import wait_for_api

        cfg = self.config
        api = self._start(self.process("prefect-api"))
        self._start(self.process("prefect-services"))
        wait_for_api(cfg.api_url, wait, self.check_alive, str(api.log))
        self.say(f"Prefect API + UI at {cfg.ui_url} (pid {api.popen.pid}); services pid {self.procs[-1].popen.pid}")

    def setup_pool(self) -> None:
        self.run_steps(self.process("setup-pool"))
        self.say("work pool indostar and its queues ready")

    def deploy(self, automations: bool = True) -> None:
        """`indostar-jobs deploy` (prefect deploy --all, then the jobs' default schedules) and the automations,
        side by side (neither needs the other)."""
        steps = [self.process("deploy")]
        if automations:
            steps.append(self.process("automations"))
        self.run_steps(*steps)
        self.say("every deployment of prefect.yaml" + (" and the automations" if automations else "") + " registered")

    def start_workers(self) -> None:
        """Pool workers, task workers and the metrics exporter; Prometheus too when asked for and installed."""
        for proc in processes(self.config):
            if proc.is_worker:
                self.workers[proc.name.removeprefix("worker-")] = self._start(proc)  # by worker name: subscriptions-1
        self.start_prometheus()
        self.say("workers: " + ", ".join(f"{n} (pid {p.popen.pid})" for n, p in self.workers.items()))

    def start_prometheus(self) -> None:
        import shutil

        import yaml

        binary = shutil.which("prometheus")
        if not self.config.prometheus_port or not binary:
            return
        config = self.config.rundir / "prometheus.yml"
        rules = str(ROOT / "deploy" / "prometheus" / "alerts.yml")
        config.write_text(yaml.safe_dump(prometheus_config(scrape_targets(self.config), rules), sort_keys=False))
        args = [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.config.rundir / 'prometheus-data'}",
            f"--web.listen-address={self.config.metrics_host}:{self.config.prometheus_port}",
        ]
        proc = Proc("prometheus", args, self.config.client_env(self.base_env), self.config.rundir)
        self.procs.append(proc)
        self.workers["prometheus"] = proc

    def start(self, automations: bool = True) -> Topology:
        """Every step in order; on a failure, what was started is stopped again."""
        try:
            self.migrate_prefect_database()
            self.start_server()
            self.setup_pool()
            self.start_workers()  # the pool exists: workers may poll while the deployments register
            self.deploy(automations)
            self.check_alive()
        except BaseException:
            self.stop()
            raise
        return self

    # --- processes -----------------------------------------------------------------------------

    def _argv(self, proc: Process) -> list[str]:
        return [sys.executable if a == "python" and i == 0 else a for i, a in enumerate(proc.argv)]

    def _env(self, proc: Process) -> dict[str, str]:
        return (self.config.server_env if proc.side == "server" else self.config.client_env)(self.base_env)

    def _start(self, proc: Process) -> Proc:
        started = Proc(proc.name, self._argv(proc), self._env(proc), self.config.rundir)
        self.procs.append(started)
        return started

    def run_steps(self, *steps: Process, timeout: float = 600) -> None:
        """Run one-off commands (as an operator would) side by side; fail with the failures' logs."""
        running = [(p.name, Proc(p.name, self._argv(p), self._env(p), self.config.rundir)) for p in steps]
        deadline = time.monotonic() + timeout
        failed: list[str] = []
        try:
            for name, proc in running:
                try:
                    code = proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    code = None
                if code != 0:
                    outcome = "timed out" if code is None else f"exited {code}"
                    failed.append(f"{name} {outcome}; see {proc.log}:\n{proc.tail(20)}")
        finally:
            for _, proc in running:
                proc.stop(wait=1)
        if failed:
            raise TopologyError("\n".join(failed))

    def check_alive(self) -> None:
        for proc in self.procs:
            if proc.popen.poll() is not None:
                raise TopologyError(
                    f"{proc.name} exited with {proc.popen.returncode}; see {proc.log}:\n{proc.tail(20)}"
                )

    def stop(self, wait: float = 15.0) -> None:
        """Workers first (their runs report to the API), then the services and the API; each group at once."""
        workers = [p for p in self.procs if p in self.workers.values()]
        servers = [p for p in self.procs if p not in workers]
        for group in (workers, servers):
            with ThreadPoolExecutor(max_workers=max(1, len(group))) as pool:
                list(pool.map(lambda proc: proc.stop(wait=wait), group))
        self.procs.clear()
        self.workers.clear()


@contextlib.contextmanager
def _interrupt_on_signals() -> Iterator[None]:
    """Ctrl-C and SIGTERM both end the wait, even where a parent shell left SIGINT ignored."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


TRY = """
Prefect UI: {ui}   (log files in {rundir})

Try, from another terminal in this directory:
  export PREFECT_API_URL={api}
  # tonight's run, its lanes shared by two lane runs on two subscriptions workers:
  .venv/bin/prefect deployment run process-due-subscriptions/daily -p worker_runs=2
  .venv/bin/prefect deployment run send-email/default -p to=you@example.in -p subject=Hi -p body=Hello
  .venv/bin/prefect work-queue ls --pool indostar
Then open the nightly run in the UI: its lane runs are subflows, each naming the worker that ran it
in its logs. Ctrl-C stops every process started here.
"""


def config_from_environment(rundir: Path) -> TopologyConfig:
    """Addresses from the shop's settings, overridable with Prefect's own variables."""
    from lib.config import get_settings

    s = get_settings()
    redis = urlsplit(s.redis_url)
    return TopologyConfig(
        prefect_database_url=configured_url(s.database_url),
        redis_host=os.environ.get("PREFECT_REDIS_MESSAGING_HOST") or redis.hostname or "127.0.0.1",
        redis_port=int(os.environ.get("PREFECT_REDIS_MESSAGING_PORT") or redis.port or 6379),
        redis_db=int(os.environ.get("PREFECT_REDIS_MESSAGING_DB") or DEFAULT_REDIS_DB),
        rundir=rundir,
        port=int(os.environ.get("PREFECT_SERVER_API_PORT") or DEFAULT_PORT),
        prometheus_port=int(os.environ.get("PROMETHEUS_PORT") or 9090),
    )


def run_production() -> int:
    """`python -m devtools up --production`: prepare the shop, start the topology, wait for Ctrl-C."""
    from devtools.smtp_sink import port_open
    from devtools.up import prepare_shop

    os.environ["INDOSTAR_ENV"] = "dev"
    config = config_from_environment(ROOT / ".run" / "production")
    if port_open(config.host, config.port):
        raise TopologyError(
            f"port {config.port} is taken (another Prefect server, `make up`?); set PREFECT_SERVER_API_PORT"
        )
    owner = make_url(config.prefect_database_url).render_as_string(hide_password=True)
    claim_redis_db(config.redis_host, config.redis_port, config.redis_db, owner=owner)
    smtp = prepare_shop()
    topology = Topology(config)
    try:
        with _interrupt_on_signals():
            topology.start()
            print(TRY.format(ui=config.ui_url, api=config.api_url, rundir=config.rundir))
            while True:
                topology.check_alive()
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        topology.stop()
        if smtp:
            smtp.stop()
        print("stopped every process `up --production` started")
    return 0
