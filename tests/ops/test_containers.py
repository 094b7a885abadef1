"""The container files say what the topology code says: compose.yaml runs what `up --production` starts.

No Docker engine runs on these machines, so the images are not built here: the Dockerfile is
linted by hadolint in `make lint`, and these tests hold compose.yaml (and Prometheus's
configuration) to devtools/topology.py, the code `python -m devtools up --production` runs.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from devtools import compose
from devtools.topology import TopologyConfig, processes

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_files_are_what_the_topology_code_writes():
    """Regenerate with `python -m devtools.compose` after changing the topology."""
    for path, build in compose.FILES.items():
        assert path.read_text() == compose.render(build()), f"{path.name} is stale: python -m devtools.compose"


def test_compose_runs_each_process_of_up_production_with_its_command_and_environment(tmp_path):
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    local = TopologyConfig(
        prefect_database_url="postgresql+asyncpg://postgres@127.0.0.1:5432/indostar_prefect",
        redis_host="127.0.0.1",
        redis_port=6379,
        redis_db=1,
        rundir=tmp_path,
        prometheus_port=9090,
    )
    started = processes(local)
    assert {p.name for p in started} <= set(services)
    assert set(services) - {p.name for p in started} == {"postgres", "redis", "migrate", "prometheus"}
    for proc in started:
        service = services[proc.name]
        # The same command; only the listening address differs (all interfaces inside a container).
        assert [a.replace("0.0.0.0", "127.0.0.1") for a in service["command"]] == list(proc.argv), proc.name  # noqa: S104
        expected = (local.server_env if proc.side == "server" else local.client_env)({})
        assert set(service["environment"]) == set(expected) | set(compose.SHOP_ENV), proc.name
        assert service["restart"] == ("no" if proc.once else "unless-stopped")


def test_no_secret_or_machine_path_is_written_into_the_files():
    for path in (ROOT / "compose.yaml", ROOT / "Dockerfile", ROOT / "deploy" / "prometheus" / "prometheus.yml"):
        text = path.read_text()
        assert str(ROOT) not in text and "/root/" not in text and "/tmp/" not in text, path  # noqa: S108
        for name in ("TOKEN_SECRET", "SMTP_PASSWORD", "SMS_API_KEY", "RAZORPAY_WEBHOOK_SECRET", "SENTRY_DSN"):
            assert name not in text, (path, name)
    docker = (ROOT / "Dockerfile").read_text()
    users = [line.split()[1] for line in docker.splitlines() if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert docker.count("FROM ") >= 2 and "uv sync --frozen" in docker


def test_prometheus_in_compose_scrapes_services_that_exist_and_loads_the_alert_rules():
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]]
    assert targets and all(t.split(":")[0] in services for t in targets)
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
