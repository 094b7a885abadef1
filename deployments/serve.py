"""Serve every deployment of prefect.yaml from one process (the single-machine default).

Same names, schedules, parameters, tags and concurrency limits as `prefect deploy
--all`, read from the same file, so the two never drift. Schedules stay active when
the process stops unless asked otherwise (Prefect pauses them by default).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import yaml
from prefect import Flow, serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = PROJECT_ROOT / "prefect.yaml"


def deployment_specs(path: Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """The deployments section of prefect.yaml (YAML anchors resolved)."""
    return yaml.safe_load(path.read_text())["deployments"]


def load_flow(entrypoint: str) -> Flow:
    """Import ``flows/x.py:func`` as a module attribute (the project root is on sys.path)."""
    file, func = entrypoint.split(":")
    module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
    return getattr(module, func)


def runner_deployment(spec: dict[str, Any]) -> RunnerDeployment:
    flow = load_flow(spec["entrypoint"])
    schedules = [
        Cron(s["cron"], timezone=s.get("timezone", "UTC"), active=s.get("active", True))
        for s in spec.get("schedules") or []
    ]
    limit = spec.get("concurrency_limit")
    concurrency = (
        ConcurrencyLimitConfig(
            limit=limit["limit"],
            collision_strategy=ConcurrencyLimitStrategy(limit.get("collision_strategy", "ENQUEUE")),
        )
        if limit
        else None
    )
    return flow.to_deployment(
        name=spec["name"],
        schedules=schedules or None,
        concurrency_limit=concurrency,
        parameters=spec.get("parameters") or {},
        tags=spec.get("tags") or [],
        description=spec.get("description") or flow.description,
    )


def all_deployments() -> list[RunnerDeployment]:
    return [runner_deployment(spec) for spec in deployment_specs()]


def serve_all(pause_on_shutdown: bool = False, limit: int | None = None) -> None:
    """Serve every deployment until interrupted."""
    serve(*all_deployments(), pause_on_shutdown=pause_on_shutdown, limit=limit)
