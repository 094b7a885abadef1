"""Schedules and retention that owners change, and that stay changed (`indostar-jobs schedule ...`).

Prefect re-applies prefect.yaml on every `prefect deploy --all` and every `serve` start: a
schedule written there gets its cron back, and a deployment's default parameters are
overwritten. So neither is written there:

- A job's time and whether it runs are its deployment's schedule in Prefect, slug ``cron``.
  prefect.yaml says ``schedules: null`` (Prefect then leaves existing schedules alone) and
  keeps the job's first cron under ``default_schedule``, which ``ensure_default_schedules``
  creates where a deployment has no schedule of that slug yet: on a new server, after
  `prefect deploy --all`, at every `serve` start. Once there, only the owner changes it, in
  the UI or here; nothing of ours writes it again.
- Retention (``days_old``, ``days``, ``inactive_days``, ``batch_size``) lives in a Prefect
  Variable per job (lib.retention names it), read by the flow at run time; the deployments
  carry no such parameters.

Every change is checked before anything is written (a bad cron, a retention under its floor,
an unknown job) and refused in one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from lib import retention
from lib.errors import InvalidInputError

SLUG = "cron"


@dataclass(frozen=True)
class Job:
    """A deployment an owner can schedule: ``flow/deployment`` and its first schedule (None: unscheduled)."""

    flow: str
    deployment: str
    cron: str | None
    timezone: str = "UTC"

    @property
    def full_name(self) -> str:
        return f"{self.flow}/{self.deployment}"


def jobs() -> dict[str, Job]:
    """Every deployment of prefect.yaml with a ``default_schedule``, plus the cleanup jobs deployed without one."""
    from deployments.specs import deployment_specs, load_flow

    out: dict[str, Job] = {}
    for spec in deployment_specs():
        default = spec.get("default_schedule")
        flow_name = load_flow(spec["entrypoint"]).name
        if default or flow_name in retention.JOBS:
            cron = default.get("cron") if default else None
            tz = default.get("timezone", "UTC") if default else "UTC"
            out[flow_name] = Job(flow_name, spec["name"], cron, tz)
    return out


def job(name: str) -> Job:
    """A job by flow name (``cleanup-expired-carts``) or deployment name (``cleanup-expired-carts/daily``)."""
    known = jobs()
    found = known.get(name.split("/", 1)[0])
    if found is None or ("/" in name and name != found.full_name):
        raise InvalidInputError(f"unknown job {name!r}; jobs: {', '.join(sorted(known))}")
    return found


def cron_schedule(cron: str, timezone: str = "UTC") -> Any:
    """Prefect's CronSchedule for ``cron``; InvalidInputError in one line if Prefect would refuse it."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        reason = "; ".join(str(e.get("msg", "")).removeprefix("Value error, ") for e in exc.errors())
        raise InvalidInputError(f"not a valid cron expression {cron!r}: {reason}") from None


def _deployment(client: Any, j: Job) -> Any:
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(j.full_name)
    except ObjectNotFound:
        raise InvalidInputError(
            f"deployment {j.full_name} is not registered with this Prefect server; run `indostar-jobs serve` "
            "or `prefect deploy --all` first"
        ) from None


def _ours(deployment: Any) -> Any | None:
    return next((s for s in deployment.schedules or [] if s.slug == SLUG), None)


def _add_schedule(client: Any, deployment_id: Any, schedule: Any) -> None:
    from prefect.client.schemas.actions import DeploymentScheduleCreate

    client.create_deployment_schedules(
        deployment_id, [DeploymentScheduleCreate(schedule=schedule, active=True, slug=SLUG)]
    )


def ensure_default_schedules(client: Any | None = None) -> list[str]:
    """Create each registered job's default schedule where it has none of slug ``cron``; the names created."""
    from prefect.exceptions import ObjectNotFound

    created = []
    with _client(client) as c:
        for j in jobs().values():
            if j.cron is None:
                continue
            try:
                dep = c.read_deployment_by_name(j.full_name)
            except ObjectNotFound:
                continue
            if _ours(dep) is None:
                _add_schedule(c, dep.id, cron_schedule(j.cron, j.timezone))
                created.append(j.full_name)
    return created


@contextmanager
def _client(given: Any | None) -> Iterator[Any]:
    """The caller's sync client, or a new one closed afterwards."""
    if given is not None:
        yield given
        return
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        yield client


def set_cron(name: str, cron: str, client: Any | None = None) -> str:
    """Give a job this cron (creating its schedule if it had none); returns what it says."""
    j = job(name)
    schedule = cron_schedule(cron, j.timezone)
    with _client(client) as c:
        dep = _deployment(c, j)
        ours = _ours(dep)
        if ours is None:
            _add_schedule(c, dep.id, schedule)
        else:
            c.update_deployment_schedule(dep.id, ours.id, schedule=schedule)
    return f"{j.full_name}: cron {cron} ({j.timezone})"


def set_active(name: str, active: bool, client: Any | None = None) -> str:
    """Pause (False) or resume (True) a job's schedule; resuming also resumes a deployment paused in the UI."""
    j = job(name)
    with _client(client) as c:
        dep = _deployment(c, j)
        ours = _ours(dep)
        if ours is None:
            raise InvalidInputError(f"{j.full_name} has no schedule; give it one with `schedule set {j.flow} --cron`")
        c.update_deployment_schedule(dep.id, ours.id, active=active)
        if active and dep.paused:
            c.resume_deployment(dep.id)
    return f"{j.full_name}: {'resumed' if active else 'paused'}"


def set_retention(name: str, days: int | None, batch_size: int | None) -> str:
    """Store a job's retention (checked against its floors first; nothing is written if refused)."""
    from prefect.variables import Variable

    from flows.common import stored_retention

    j = job(name)
    spec = retention.job(j.flow)
    given = {spec.days.name: days, spec.batch_size.name: batch_size}
    changes = retention.check(j.flow, {k: v for k, v in given.items() if v is not None}, f"retention of {j.flow}")
    if not changes:
        raise InvalidInputError("nothing to change: pass --days and/or --batch-size")
    current = retention.check(j.flow, stored_retention(j.flow), spec.source)
    Variable.set(spec.variable, {**current, **changes}, overwrite=True)
    return f"{j.full_name}: " + ", ".join(f"{k} {v}" for k, v in {**current, **changes}.items())


def describe(client: Any | None = None) -> list[dict[str, Any]]:
    """One row per job: its cron, whether it runs, and its retention (for `schedule show`)."""
    from prefect.exceptions import ObjectNotFound

    rows = []
    with _client(client) as c:
        for j in jobs().values():
            row: dict[str, Any] = {"job": j.full_name, "cron": "-", "timezone": j.timezone, "state": "not deployed"}
            try:
                dep = c.read_deployment_by_name(j.full_name)
            except ObjectNotFound:
                rows.append(row)
                continue
            ours = _ours(dep)
            if ours is not None:
                row["cron"] = getattr(ours.schedule, "cron", str(ours.schedule))
                row["state"] = "paused" if (dep.paused or not ours.active) else "active"
            else:
                row["state"] = "unscheduled"
            if j.flow in retention.JOBS:
                from flows.common import owner_retention

                values = owner_retention(j.flow)
                row["retention"] = ", ".join(f"{k} {v}" for k, v in values.items())
            rows.append(row)
    return rows
