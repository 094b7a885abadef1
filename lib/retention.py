"""How long the cleanup jobs keep data: each job's retention settings, their defaults and their floors.

The values an owner sets live outside the deployments (flows.common reads them at run time
from a Prefect Variable per job, deployments.schedules writes them), so a deploy or a
restart never puts the defaults back. This module only knows the rules: which settings a
job has, what they default to, and the floor under which a setting is refused (a typo of
"3" for "30" must not empty the carts table of a week of live carts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lib.errors import InvalidInputError

DEFAULT_BATCH_SIZE = 10_000  # rows per delete transaction: short locks, few round trips
MAX_BATCH_SIZE = 100_000


@dataclass(frozen=True)
class Setting:
    name: str  # the flow's parameter
    default: int
    floor: int
    ceiling: int | None = None
    unit: str = "days"


@dataclass(frozen=True)
class JobRetention:
    flow: str  # the flow's name, e.g. cleanup-expired-carts
    days: Setting
    batch_size: Setting

    @property
    def variable(self) -> str:
        """The Prefect Variable holding the owner's values (names allow lowercase, digits and underscores)."""
        return "retention_" + self.flow.replace("-", "_")

    @property
    def source(self) -> str:
        """How an error names where the owner's values came from."""
        return f"Prefect variable {self.variable}"

    @property
    def settings(self) -> tuple[Setting, Setting]:
        return self.days, self.batch_size


def _batch() -> Setting:
    return Setting("batch_size", DEFAULT_BATCH_SIZE, 1, MAX_BATCH_SIZE, "rows")


JOBS: dict[str, JobRetention] = {
    job.flow: job
    for job in (
        JobRetention("cleanup-expired-carts", Setting("days_old", 30, 7), _batch()),
        JobRetention("cleanup-old-audit-logs", Setting("days", 90, 30), _batch()),
        JobRetention("cleanup-abandoned-sessions", Setting("inactive_days", 30, 1), _batch()),
    )
}


def job(flow: str) -> JobRetention:
    try:
        return JOBS[flow]
    except KeyError:
        raise InvalidInputError(f"{flow} has no retention settings; jobs that have: {', '.join(JOBS)}") from None


def check(flow: str, values: dict[str, Any], source: str) -> dict[str, int]:
    """``values`` checked against the job's rules (unknown names, types, floors); InvalidInputError in one line
    naming ``source`` (where the values came from) and the setting."""
    spec = job(flow)
    known = {s.name: s for s in spec.settings}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InvalidInputError(f"{source}: unknown setting(s) {', '.join(unknown)}; {flow} has {', '.join(known)}")
    out: dict[str, int] = {}
    for name, value in values.items():
        s = known[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInputError(f"{source}: {name} must be a whole number of {s.unit}, got {value!r}")
        if value < s.floor:
            raise InvalidInputError(f"{source}: {name} {value} is under the floor of {s.floor} {s.unit} for {flow}")
        if s.ceiling is not None and value > s.ceiling:
            raise InvalidInputError(f"{source}: {name} {value} is over the ceiling of {s.ceiling} {s.unit}")
        out[name] = value
    return out


def resolve(flow: str, given: dict[str, int | None], stored: dict[str, Any] | None, source: str) -> dict[str, int]:
    """What a run uses: a value passed to the run, else the owner's stored value, else the default.

    The stored values are checked (an owner may have typed them in the UI); a value passed to
    one run by hand is the operator's own call and only has to be positive, as before.
    """
    spec = job(flow)
    owner = check(flow, stored or {}, source)
    return {
        s.name: given[s.name] if given.get(s.name) is not None else owner.get(s.name, s.default)  # type: ignore[misc]
        for s in spec.settings
    }
