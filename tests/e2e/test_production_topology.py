"""End to end on the production topology: API and services apart on PostgreSQL + Redis, pool workers.

The module starts the same `Topology` as `python -m devtools up --production` once, with
its own port, Prefect database and Redis database index; runs one night whose lanes
two subscriptions workers share, and one order confirmation through the
notifications worker; and checks through the Prefect API that every flow and task
run was recorded (none dropped on the way through Redis and the services process).
Everything it starts is stopped, and its databases are dropped, at the end.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit
from uuid import UUID

import pytest
from sqlalchemy import text

from deployments.prefect_db import drop_prefect_database, prefect_database_url
from devtools.smtp_sink import free_port
from devtools.topology import Topology, TopologyConfig, claim_free_redis_db, release_redis_db
from lib import db
from lib.config import get_settings
from tests.builders import make_customer, make_order, make_product, make_subscription, today
from tests.conftest import APP_TABLES
from tests.e2e.conftest import prefect_cli, run_id_from, wait_for_run

pytestmark = pytest.mark.e2e
log = logging.getLogger(__name__)

RUN_DATE = today()
LANES, WORKER_RUNS, BATCH_SIZE = 4, 2, 50
PRODUCTS, PER_PRODUCT = 8, 60
SHORT_STOCK = 50  # the last product has stock for 50 of its 60 subscriptions
NIGHTLY = "process-due-subscriptions/daily"
SUBMITTED = re.compile(r"^prefect\.flow-run\.(.+)$")


@pytest.fixture(scope="module")
def topology(migrated_database, redis_session, smtp_server, tmp_path_factory) -> Iterator[Topology]:
    """The production topology with a free port, its own Prefect database and Redis database index."""
    run = uuid.uuid4().hex[:8]
    s = get_settings()
    redis = urlsplit(s.redis_url)
    host, port, owner = redis.hostname or "127.0.0.1", redis.port or 6379, f"indostar-e2e-{run}"
    config = TopologyConfig(
        prefect_database_url=prefect_database_url(s.database_url, f"indostar_prefect_test_{run}"),
        redis_host=host,
        redis_port=port,
        redis_db=claim_free_redis_db(host, port, owner),
        rundir=tmp_path_factory.mktemp("topology"),
        port=free_port(),
        metrics_port=free_port(),  # the exporter, as `up --production` starts it (Prometheus: tests/e2e/test_metrics)
        # The queues this test uses; critical and default workers would only poll (CPU on a shared machine).
        workers={"notifications": 1, "subscriptions": 3},
        task_workers=0,  # background tasks have their own e2e tests
        # No cron run can start in the middle of the test, and no ~500 future runs are created.
        extra_server_env={"PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"},
        # Faster polling only shortens the test; INFO keeps the workers' lines in the run logs.
        extra_client_env={"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_LOGGING_LEVEL": "INFO"},
    )
    topology = Topology(config, say=log.warning)
    started = time.monotonic()
    try:
        topology.start()
        log.warning("topology up in %.0f s", time.monotonic() - started)
        yield topology
    finally:
        topology.stop()
        drop_prefect_database(config.prefect_database_url)
        release_redis_db(host, port, config.redis_db, owner)


@pytest.fixture(scope="module")
def client_env(topology) -> dict[str, str]:
    """What an operator's shell on another machine would have: the API address and the shop's settings."""
    return topology.config.client_env(os.environ)


@pytest.fixture(scope="module")
def api(topology):
    """This process's Prefect client pointed at the topology's API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: topology.config.api_url}):
        yield topology.config.api_url


@dataclass
class Night:
    parent: object  # the nightly flow run (prefect FlowRun)
    children: list  # its subflow runs: the lane runs
    created: list[int]  # subscriptions that got an order
    short: list[int]  # subscriptions left out of stock
    emails: int  # messages the SMTP sink received during the night


@pytest.fixture(scope="module")
def night(topology, api, client_env, smtp_server) -> Night:
    """One night on an empty shop: 480 due subscriptions over 8 products, run with worker_runs=2."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    engine = db.get_engine()
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {APP_TABLES} RESTART IDENTITY CASCADE"))
    created, short = [], []
    for p in range(1, PRODUCTS + 1):
        last = p == PRODUCTS
        product = make_product(engine, stock=SHORT_STOCK if last else 1000, price_paise=25_000)
        dues = [RUN_DATE - dt.timedelta(days=i % 3) for i in range(PER_PRODUCT)]
        subs = sorted((due, make_subscription(engine, product_id=product, due=due)) for due in dues)
        make_subscription(engine, product_id=product, due=RUN_DATE + dt.timedelta(days=3))  # not due
        served = SHORT_STOCK if last else PER_PRODUCT  # oldest due first while stock lasts
        created += [sid for _, sid in subs[:served]]
        short += [sid for _, sid in subs[served:]]
    smtp_server.handler.messages.clear()
    params = [
        f"run_date={RUN_DATE}",
        f"max_concurrency={LANES}",
        f"worker_runs={WORKER_RUNS}",
        f"batch_size={BATCH_SIZE}",
    ]
    out = prefect_cli(client_env, "deployment", "run", NIGHTLY, *[a for p in params for a in ("-p", p)])
    parent = wait_for_run(run_id_from(out), timeout=300, proc=topology.workers["subscriptions-1"])
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]))
        )
    return Night(parent, children, created, short, len(smtp_server.messages))


def _flow_names(runs) -> dict[UUID, str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return {r.id: client.read_flow(r.flow_id).name for r in runs}


def _workers_that_submitted(run_ids: list[UUID], timeout: float = 60) -> dict[UUID, str]:
    """The worker the API recorded for each run (its `prefect.worker.submitted-flow-run` event)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    wanted = {f"prefect.flow-run.{i}" for i in run_ids}
    query = EventFilter(
        event=EventNameFilter(name=["prefect.worker.submitted-flow-run"]),
        related=EventRelatedFilter(id=sorted(wanted)),
    )
    deadline = time.monotonic() + timeout  # events reach the database through Redis and the services process
    with get_client(sync_client=True) as client:
        while True:
            found: dict[UUID, str] = {}
            for event in client.read_events(filter=query, limit=50).events:
                for related in event.related:
                    if related.id in wanted and (m := SUBMITTED.match(related.id)):
                        found[UUID(m.group(1))] = event.resource.name or event.resource.id
            if len(found) == len(run_ids) or time.monotonic() > deadline:
                return found
            time.sleep(1)


def test_the_night_is_shared_by_two_lane_runs_on_two_workers_and_orders_are_made_once(topology, night):
    """worker_runs=2: two lane runs on two different subscriptions workers split the lanes; one order each."""
    assert night.parent.state_type.value == "COMPLETED", night.parent.state.message
    names = _flow_names(night.children)
    lanes = sorted((r for r in night.children if names[r.id] == "process-subscription-lanes"), key=lambda r: r.name)
    assert len(lanes) == WORKER_RUNS
    stats = [json.loads(r.state.message) for r in lanes]
    assert all(r.state_type.value == "COMPLETED" for r in lanes)
    assert sorted(s["lanes"] for s in stats) == [[0, 2], [1, 3]]
    assert all(s["batches"] > 0 for s in stats), stats  # every lane run claimed part of the night
    assert len({s["process"] for s in stats}) == WORKER_RUNS

    runs = [night.parent.id, *(r.id for r in lanes)]
    workers = _workers_that_submitted(runs)
    assert set(workers) == set(runs), f"no submission event for {set(runs) - set(workers)}"  # every run's, none missing
    lane_workers = {workers[r.id] for r in lanes}
    assert len(lane_workers) == WORKER_RUNS and lane_workers <= {
        "subscriptions-1",
        "subscriptions-2",
        "subscriptions-3",
    }
    assert workers[night.parent.id] not in lane_workers  # the nightly run waits on a third worker

    with db.get_engine().connect() as conn:
        orders = dict(conn.execute(text("SELECT subscription_id, count(*) FROM orders GROUP BY 1")).all())
        outcomes = dict(
            conn.execute(
                text("SELECT outcome, count(*) FROM subscription_outcomes WHERE run_id = :r GROUP BY 1"),
                {"r": str(night.parent.id)},
            ).all()
        )
    assert orders == dict.fromkeys(night.created, 1)
    assert outcomes == {"created": len(night.created), "out_of_stock": len(night.short)}
    assert night.emails == len(night.created)  # one confirmation email per new order


def test_every_flow_and_task_run_of_the_night_is_recorded_with_its_artifact(topology, night):
    """Through the API, every flow and task run of the night is recorded (exact counts by kind) with its artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    n, batch = len(night.created), get_settings().notification_batch_size
    pages = math.ceil(n / batch)  # confirmations go a batch (one SMTP session) per page of created orders
    expected = Counter(
        {
            # the nightly run
            "run_deployment.process-subscription-lanes-default": WORKER_RUNS,  # one per lane run it started
            "summarize_run_outcomes": 1,
            "attach_awaiting_payments": 1,
            "list_created_orders": pages + 1,  # until an empty page
            "record_messages": pages,
            "deliver_emails": pages,
            "deliver_sms": pages,
            "report_messages": 1,
            "publish_night_summary": 1 + WORKER_RUNS,  # the night's, and each lane run's own
            # the lane runs
            "process_lane": LANES,
        }
    )
    completed = Counter({(kind, "Completed"): n for kind, n in expected.items()})
    runs = [night.parent, *night.children]
    assert len(runs) == 1 + WORKER_RUNS
    assert all(r.state_type.value == "COMPLETED" for r in runs)
    flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in runs]))
    deadline = time.monotonic() + 60  # task runs and their states are recorded by the services process, from Redis
    with get_client(sync_client=True) as client:
        while True:
            task_runs = client.read_task_runs(flow_run_filter=flow_filter, limit=200)
            recorded = Counter(
                (re.sub(r"-[0-9a-f]{8}$", "", t.task_key).removeprefix("prefect.deployments.flow_runs."), t.state_name)
                for t in task_runs
            )
            if recorded == completed or time.monotonic() > deadline:
                break
            time.sleep(1)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[night.parent.id]))
        )
    assert recorded == completed, f"recorded (kind, state): {sorted(recorded.items())}"
    assert len(task_runs) == sum(expected.values()) == 25
    nightly = [a for a in artifacts if a.key == "process-due-subscriptions"]
    assert len(nightly) == 1 and nightly[0].type == "markdown"
    assert f"created {len(night.created)} orders" in nightly[0].data
    assert f"| out_of_stock | {len(night.short)} | 0 | ₹0.00 |" in nightly[0].data


def test_an_order_confirmation_from_the_backend_is_sent_once_by_the_notifications_worker(topology, api, smtp_server):
    """client.send_order_confirmation is sent once by the notifications worker; the same call again is the same run."""
    from indostar_client import client

    engine = db.get_engine()
    customer = make_customer(engine, email="asha.rao@example.in")
    order = make_order(engine, customer_id=customer, unit_price_paise=49_900)
    before = len(smtp_server.messages)
    run_id = client.send_order_confirmation(order)
    run = wait_for_run(run_id, timeout=180, proc=topology.workers["notifications-1"])
    assert run.state_type.value == "COMPLETED", run.state.message
    assert client.send_order_confirmation(order) == run_id  # idempotency key order-confirmation:<order>
    assert _workers_that_submitted([run_id]) == {run_id: "notifications-1"}
    time.sleep(2)  # a duplicate would have arrived by now
    sent = [m for m in smtp_server.messages[before:] if "asha.rao@example.in" in m.rcpt_tos]
    assert len(sent) == 1 and len(smtp_server.messages) == before + 1


def test_the_topologys_exporter_counts_the_nights_runs(topology, night):
    """`indostar-jobs metrics`, started by the topology, answers /metrics with the night's completed run."""
    import urllib.request

    port = topology.config.metrics_port
    deadline = time.monotonic() + 30
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text_ = r.read().decode()
        line = 'indostar_flow_runs_total{flow="process-due-subscriptions",state="COMPLETED"}'
        if line in text_ or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert f"{line} 1.0" in text_, text_[-3000:]
    assert 'indostar_metrics_source_up{source="prefect"} 1.0' in text_
    last = re.search(
        r'indostar_last_success_timestamp_seconds\{deployment="process-due-subscriptions/daily"\} (\S+)', text_
    )
    assert last, text_[-3000:]
    assert abs(float(last.group(1)) - night.parent.end_time.timestamp()) < 1  # the night's own end
