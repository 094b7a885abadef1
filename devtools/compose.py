"""compose.yaml and deploy/prometheus/prometheus.yml, written from the production topology's own code.

`python -m devtools.compose` rewrites both files; tests/ops/test_containers.py fails
when the committed files differ from what this writes, so the containers run exactly the
processes `python -m devtools up --production` starts (devtools.topology.processes), with
the same commands and the same environment, only their addresses changed to the compose
services' names. PostgreSQL, Redis, the shop's migration and Prometheus are added here.
Secrets are not in either file: POSTGRES_PASSWORD and the shop's settings come from `.env`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from devtools.processes import ROOT
from devtools.topology import TopologyConfig, processes, prometheus_config, scrape_targets

IMAGE = "indostar-jobs:latest"
PROMETHEUS_IMAGE = "prom/prometheus:v2.53.0"
POSTGRES_IMAGE = "postgres:15-bookworm"
REDIS_IMAGE = "redis:7-bookworm"
PASSWORD = "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}"  # noqa: S105 - compose fills it in from .env
HEADER = "# Written by `python -m devtools.compose` from devtools/topology.py: do not edit by hand.\n"


def compose_config() -> TopologyConfig:
    """The topology as the containers run it: every address a compose service, production settings."""
    return TopologyConfig(
        prefect_database_url=f"postgresql+asyncpg://postgres:{PASSWORD}@postgres:5432/indostar_prefect",
        redis_host="redis",
        redis_port=6379,
        redis_db=1,
        rundir=Path("/app/.run"),
        host="0.0.0.0",  # noqa: S104 - inside its container, for the other containers
        public_host="prefect-api",
        metrics_host="0.0.0.0",  # noqa: S104 - as above
        workdir=Path("/app"),
        indostar_env="production",
        prometheus_port=9090,
    )


SHOP_ENV = {
    "DATABASE_URL": f"postgresql+psycopg2://postgres:{PASSWORD}@postgres:5432/indostar",
    "REDIS_URL": "redis://redis:6379/0",
}


def _healthy(*names: str) -> dict[str, dict[str, str]]:
    return {n: {"condition": "service_healthy"} for n in names}


def _done(*names: str) -> dict[str, dict[str, str]]:
    return {n: {"condition": "service_completed_successfully"} for n in names}


def _needs(name: str) -> dict[str, dict[str, str]]:
    """What each process waits for, as `up --production` orders them."""
    if name == "prefect-database":
        return _healthy("postgres")
    if name in ("prefect-api", "prefect-services"):
        return _done("prefect-database") | _healthy("redis")
    if name in ("setup-pool", "automations"):
        return _healthy("prefect-api")
    if name == "deploy":
        return _done("setup-pool")
    if name.startswith("worker-"):
        return _done("setup-pool", "migrate")
    return _done("migrate") | _healthy("prefect-api")  # task workers, the exporter


def _app(command: list[str], env: dict[str, str], needs: dict[str, Any], once: bool) -> dict[str, Any]:
    return {
        "image": IMAGE,
        "build": ".",
        "command": command,
        "env_file": [{"path": ".env", "required": False}],
        "environment": env,
        "depends_on": needs,
        "restart": "no" if once else "unless-stopped",
    }


def compose_document() -> dict[str, Any]:
    config = compose_config()
    services: dict[str, Any] = {
        "postgres": {
            "image": POSTGRES_IMAGE,
            "environment": {"POSTGRES_PASSWORD": PASSWORD, "POSTGRES_DB": "indostar"},
            "volumes": ["postgres-data:/var/lib/postgresql/data"],
            "healthcheck": {"test": ["CMD", "pg_isready", "-U", "postgres"], "interval": "5s", "retries": 20},
            "restart": "unless-stopped",
        },
        "redis": {
            "image": REDIS_IMAGE,
            "volumes": ["redis-data:/data"],
            "healthcheck": {"test": ["CMD", "redis-cli", "ping"], "interval": "5s", "retries": 20},
            "restart": "unless-stopped",
        },
        "migrate": _app(
            ["python", "-m", "deployments.cli", "migrate"],
            config.client_env(SHOP_ENV),
            _healthy("postgres"),
            once=True,
        ),
    }
    for proc in processes(config):
        env = (config.server_env if proc.side == "server" else config.client_env)(SHOP_ENV)
        services[proc.name] = _app(list(proc.argv), env, _needs(proc.name), proc.once)
    api = services["prefect-api"]
    api["ports"] = [f"127.0.0.1:{config.port}:{config.port}"]
    probe = f"import urllib.request; urllib.request.urlopen('http://127.0.0.1:{config.port}/api/health', timeout=3)"
    api["healthcheck"] = {"test": ["CMD", "python", "-c", probe], "interval": "5s", "retries": 30}
    services["prometheus"] = {
        "image": PROMETHEUS_IMAGE,
        "command": ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"],
        "volumes": ["./deploy/prometheus:/etc/prometheus:ro", "prometheus-data:/prometheus"],
        "ports": [f"127.0.0.1:{config.prometheus_port}:9090"],
        "depends_on": ["metrics"],
        "restart": "unless-stopped",
    }
    return {
        "name": "indostar-jobs",
        "services": services,
        "volumes": {"postgres-data": {}, "redis-data": {}, "prometheus-data": {}},
    }


def prometheus_document() -> dict[str, Any]:
    """Prometheus in compose: the exporter and each task worker, by service name."""
    config = compose_config()
    hosts = {p.name: p.name for p in processes(config)}
    return prometheus_config(scrape_targets(config, hosts), "/etc/prometheus/alerts.yml")


def render(doc: dict[str, Any]) -> str:
    return HEADER + yaml.safe_dump(doc, sort_keys=False, width=120)


FILES = {
    ROOT / "compose.yaml": compose_document,
    ROOT / "deploy" / "prometheus" / "prometheus.yml": prometheus_document,
}


def main() -> int:
    for path, build in FILES.items():
        path.write_text(render(build()))
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
