"""The `indostar` work pool and its queues, created or updated through the Prefect API.

`indostar-jobs setup-pool` (before `prefect deploy --all`) makes the process-type
pool and its four queues with priorities (critical first) and concurrency limits,
and puts PREFECT_FLOWS_HEARTBEAT_FREQUENCY in the pool's job environment so the
zombie-run automation can see a killed worker. Running it again updates in place.
Then, on each machine: `prefect worker start --pool indostar --work-queue <queue>`.
"""

from __future__ import annotations

from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.exceptions import ObjectNotFound

POOL = "indostar"
# name: (priority, concurrency limit). Lower priority number = served first.
QUEUES: dict[str, tuple[int, int]] = {
    "critical": (1, 10),  # payment failed: never wait behind bulk work
    "notifications": (2, 10),  # providers are rate-limited inside the flows
    "subscriptions": (3, 4),  # the nightly run plus on-demand single subscriptions
    "default": (4, 4),  # cleanup and reports
}
JOB_ENV = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}


def base_job_template() -> dict[str, Any]:
    """The process worker's default job template with our environment as the default `env`."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["env"]["default"] = dict(JOB_ENV)
    return template


def setup_pool() -> dict[str, tuple[int, int]]:
    """Create or update the pool and its queues; returns {queue: (priority, limit)} as set."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(POOL)
            client.update_work_pool(POOL, WorkPoolUpdate(base_job_template=base_job_template()))
        except ObjectNotFound:
            client.create_work_pool(
                WorkPoolCreate(
                    name=POOL,
                    type="process",
                    base_job_template=base_job_template(),
                    description="indostar-jobs: process workers, one per queue",
                )
            )
        for name, (priority, limit) in QUEUES.items():
            try:
                queue = client.read_work_queue_by_name(name, work_pool_name=POOL)
                client.update_work_queue(queue.id, priority=priority, concurrency_limit=limit)
            except ObjectNotFound:
                client.create_work_queue(name, work_pool_name=POOL, priority=priority, concurrency_limit=limit)
    return dict(QUEUES)
