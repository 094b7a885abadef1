"""Serve every deployment of prefect.yaml from one process (the single-machine default).

Same names, parameters, tags and concurrency limits as `prefect deploy --all`, read from
the same file, so the two never drift. Schedules are the owners' (deployments/schedules.py):
registering leaves a deployment's schedules as they are, and a job that has none yet gets
its ``default_schedule``. They stay active when the process stops unless asked otherwise
(Prefect pauses them by default).
"""

from __future__ import annotations

from typing import Any

from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from deployments.specs import deployment_specs, load_flow
from flows.prefect_compat import set_paused


def runner_deployment(spec: dict[str, Any]) -> Any:
    flow = load_flow(spec["entrypoint"])
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
        schedules=None,  # Prefect then leaves the owner's schedules as they are
        concurrency_limit=concurrency,
        parameters=spec.get("parameters") or {},
        tags=spec.get("tags") or [],
        description=spec.get("description") or flow.description,
    )


def all_deployments() -> list[Any]:
    return [runner_deployment(spec) for spec in deployment_specs()]


def register_all() -> list[Any]:
    """Register every deployment with the API, then give each job without a schedule its default one."""
    from prefect.client.orchestration import get_client

    from deployments.schedules import ensure_default_schedules

    deployments = all_deployments()
    # Paused by the owner stays paused; paused by our own `serve --pause-on-shutdown` is resumed.
    paused = paused_deployments() - _take_paused_by_serve()
    for deployment in deployments:
        # Prefect sends paused=False with every registration: a deployment paused in the UI stays paused.
        set_paused(deployment, deployment.full_name in paused)
        deployment.apply()
    with get_client(sync_client=True) as client:
        ensure_default_schedules(client)
    return deployments


def paused_deployments() -> set[str]:
    """``flow/deployment`` of every deployment paused on the server (the UI's pause toggle)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        flows = {f.id: f.name for f in client.read_flows()}
        return {f"{flows.get(d.flow_id)}/{d.name}" for d in client.read_deployments() if d.paused}


def repause(names: set[str]) -> list[str]:
    """Pause again those of ``names`` a `prefect deploy` unpaused (it sends paused=False); the names paused."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    done = []
    with get_client(sync_client=True) as client:
        for name in sorted(names):
            try:
                dep = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if not dep.paused:
                client.pause_deployment(dep.id)
                done.append(name)
    return done


PAUSED_BY_SERVE = "indostar_paused_by_serve"  # Prefect Variable: what `serve --pause-on-shutdown` paused


def _take_paused_by_serve() -> set[str]:
    from prefect.variables import Variable

    names: list[str] = Variable.get(PAUSED_BY_SERVE, default=[]) or []
    if names:
        Variable.unset(PAUSED_BY_SERVE)
    return set(names)


def serve_all(pause_on_shutdown: bool = False, limit: int | None = None) -> None:
    """Serve every deployment until interrupted (Ctrl-C, SIGTERM).

    With ``pause_on_shutdown`` every deployment not already paused is paused as the process stops
    (done here: Prefect 3.9's own flag did not pause on Ctrl-C in our tests), and noted, so the next
    start resumes those and only those; an owner's pause is kept."""
    deployments = register_all()
    try:
        serve(*deployments, pause_on_shutdown=False, limit=limit)
    finally:
        if pause_on_shutdown:
            _pause_for_shutdown({d.full_name for d in deployments})


def _pause_for_shutdown(names: set[str]) -> None:
    from prefect.client.orchestration import get_client
    from prefect.variables import Variable

    ours = sorted(names - paused_deployments())
    with get_client(sync_client=True) as client:
        for name in ours:
            client.pause_deployment(client.read_deployment_by_name(name).id)
    Variable.set(PAUSED_BY_SERVE, ours, overwrite=True)
