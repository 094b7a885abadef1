"""End to end: a real Prefect server, the deployments served or deployed to a work pool, real flow runs.

Marked ``e2e``; `make test` runs them (a couple of minutes on two cores).
"""

from __future__ import annotations

import datetime as dt

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from sqlalchemy import text

from tests.builders import count_rows, make_cart, make_product, make_subscription, today
from tests.e2e.conftest import prefect_cli, run_id_from, wait_for_deployment, wait_for_run

pytestmark = pytest.mark.e2e

RUN_DATE = today()
NIGHTLY = "process-due-subscriptions/daily"


def _seed_night(pg, due: int, not_due: int = 2) -> list[int]:
    product = make_product(pg, stock=max(1000, due))  # enough for every due subscription
    ids = [make_subscription(pg, product_id=product, due=RUN_DATE - dt.timedelta(days=i % 2)) for i in range(due)]
    for _ in range(not_due):
        make_subscription(pg, product_id=product, due=RUN_DATE + dt.timedelta(days=3))
    return ids


def _subscriptions_worker(spawn, name: str, *extra: str):
    """A process worker of the pool's subscriptions queue, as an operator starts one."""
    return spawn(
        name, "-m", "prefect", "worker", "start", "--pool", "indostar", "--work-queue", "subscriptions", *extra
    )


def _orders_per_subscription(pg) -> dict[int, int]:
    with pg.connect() as conn:
        rows = conn.execute(text("SELECT subscription_id, count(*) FROM orders GROUP BY subscription_id")).all()
    return dict(rows)


def _latest_artifact(key: str):
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), sort=ArtifactSort.CREATED_DESC, limit=1
        )
    assert found, f"no artifact {key}"
    return found[0]


def test_served_deployments_run_the_nightly_batch_and_the_cart_cleanup(pg, smtp, api, prefect_server, spawn):
    """`indostar-jobs serve` + `prefect deployment run`: orders made once, stale carts gone, artifact published."""
    subs = _seed_night(pg, due=6)
    with pg.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO carts (created_at, updated_at) SELECT now() - interval '40 days', "
                "now() - interval '40 days' FROM generate_series(1, 5)"
            )
        )
    fresh_cart = make_cart(pg, age_days=3, items=1)
    serve = spawn("serve", "-m", "deployments.cli", "serve")
    wait_for_deployment("cleanup-expired-carts/daily", proc=serve)
    nightly = run_id_from(
        prefect_cli(prefect_server, "deployment", "run", NIGHTLY, "-p", f"run_date={RUN_DATE.isoformat()}")
    )
    carts = run_id_from(prefect_cli(prefect_server, "deployment", "run", "cleanup-expired-carts/daily"))
    assert wait_for_run(nightly, proc=serve).state_type.value == "COMPLETED", serve.tail()
    assert wait_for_run(carts, proc=serve).state_type.value == "COMPLETED", serve.tail()

    assert _orders_per_subscription(pg) == dict.fromkeys(subs, 1)
    with pg.connect() as conn:
        assert conn.execute(text("SELECT array_agg(id) FROM carts")).scalar_one() == [fresh_cart]
    assert count_rows(pg, "cart_items") == 1
    artifact = _latest_artifact("process-due-subscriptions")
    assert artifact.flow_run_id == nightly and artifact.type == "markdown"
    assert f"created {len(subs)} orders" in artifact.data
    assert len(smtp.messages) == len(subs)  # one order confirmation each, through the served notifications flow


def test_deploy_all_then_a_worker_on_the_subscriptions_queue_runs_the_nightly_batch(
    pg, smtp, api, prefect_server, spawn
):
    """setup-pool, `prefect deploy --all`, then `prefect worker start --run-once` on `subscriptions` completes it."""
    subs = _seed_night(pg, due=4)
    spawn("setup", "-m", "deployments.cli", "setup-pool").popen.wait(timeout=60)
    prefect_cli(prefect_server, "deploy", "--all", timeout=240)
    deployment = wait_for_deployment(NIGHTLY)
    assert (deployment.work_pool_name, deployment.work_queue_name) == ("indostar", "subscriptions")
    with get_client(sync_client=True) as client:
        queue = client.read_work_queue_by_name("subscriptions", work_pool_name="indostar")
        assert (queue.priority, queue.concurrency_limit) == (3, 4)
    run_id = run_id_from(
        prefect_cli(
            prefect_server,
            "deployment",
            "run",
            NIGHTLY,
            "-p",
            f"run_date={RUN_DATE.isoformat()}",
            "-p",
            "send_confirmations=false",
        )
    )
    worker = _subscriptions_worker(spawn, "worker", "--run-once")
    run = wait_for_run(run_id, timeout=120, proc=worker)
    assert run.state_type.value == "COMPLETED", worker.tail()
    assert _orders_per_subscription(pg) == dict.fromkeys(subs, 1)


def test_a_worker_killed_mid_run_is_rescheduled_by_the_automation_and_nothing_is_duplicated(
    pg, smtp, api, prefect_server, spawn
):
    """SIGTERM to a worker mid-run: the run crashes, the automation reschedules it once; killed again it stays
    Crashed and operations are emailed; rescheduled by hand, a new worker finishes it with no order twice."""
    import signal
    import time

    from prefect.states import Crashed, Scheduled

    from deployments.automations import ZOMBIE_AFTER, create_automations
    from lib.config import get_settings

    create_automations()
    subs = _seed_night(pg, due=1500)
    spawn("setup", "-m", "deployments.cli", "setup-pool").popen.wait(timeout=60)  # idempotent, like deploy
    prefect_cli(prefect_server, "deploy", "--all", timeout=240)
    run_id = run_id_from(
        prefect_cli(
            prefect_server,
            "deployment",
            "run",
            NIGHTLY,
            "-p",
            f"run_date={RUN_DATE.isoformat()}",
            "-p",
            "send_confirmations=false",
            "-p",
            "batch_size=2",
            "-p",
            "max_concurrency=1",
        )
    )
    first = _subscriptions_worker(spawn, "worker-1")
    deadline = time.monotonic() + 90
    while count_rows(pg, "orders") < 20:  # mid-run: some batches committed, most still due
        assert time.monotonic() < deadline, first.tail()
        time.sleep(0.2)
    first.stop(signal.SIGTERM)
    done_before = count_rows(pg, "orders")
    assert done_before < len(subs), "the run finished before the worker was stopped; seed more rows"
    # Nobody reports the crash: the zombie automation marks it Crashed after ZOMBIE_AFTER without heartbeats.
    rescheduled = wait_for_run(
        run_id, timeout=ZOMBIE_AFTER.total_seconds() + 60, states={"SCHEDULED", "COMPLETED", "FAILED"}, proc=first
    )
    assert rescheduled.state_type.value == "SCHEDULED" and rescheduled.state_name == "Rescheduled", (
        f"{rescheduled.state_name}: {rescheduled.state.message if rescheduled.state else ''}"
    )
    second = _subscriptions_worker(spawn, "worker-2", "--run-once")
    # The rescheduled run dies mid-run too.
    deadline = time.monotonic() + 120
    while count_rows(pg, "orders") < done_before + 20:
        assert time.monotonic() < deadline, second.tail()
        time.sleep(0.2)
    second.stop(signal.SIGTERM)
    assert count_rows(pg, "orders") < len(subs), "the rescheduled run finished before its worker was stopped"
    # Marked Crashed through the API as the zombie automation does (without force); the heartbeat path to Crashed
    # is the first crash above, and waiting ZOMBIE_AFTER again would show nothing new.
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Crashed(message="No heartbeat: the worker running this flow is gone."))
    # The automations saw this second Crashed event: the crashed-twice alert reaches operations ...
    # (the triggers service acts within seconds; the margin is for a 2-core machine running the whole suite)
    deadline = time.monotonic() + 150
    while not [m for m in smtp.messages if f"run {rescheduled.name} is Crashed" in m.message["Subject"]]:
        assert time.monotonic() < deadline, "no crashed-twice email"
        time.sleep(0.5)
    assert [m.rcpt_tos for m in smtp.messages] == [[get_settings().ops_email]]
    # ... and the reschedule automation does not act again: watched for three times (at least 10 s) as long as it
    # took to act on the first crash.
    with get_client(sync_client=True) as client:
        history = client.read_flow_run_states(run_id)
        first_crash = next(st.timestamp for st in history if st.type.value == "CRASHED")
        first_reschedule = next(st.timestamp for st in history if st.name == "Rescheduled")
        watch_until = time.monotonic() + max(10.0, 3 * (first_reschedule - first_crash).total_seconds())
        while time.monotonic() < watch_until:
            crashed = client.read_flow_run(run_id)
            assert (crashed.state_type.value, crashed.state_name) == ("CRASHED", "Crashed"), crashed.state_name
            time.sleep(0.5)
        # Operations reschedule it by hand; a third worker finishes the night.
        client.set_flow_run_state(run_id, Scheduled(message="rescheduled by hand after the crashed-twice alert"))
    third = _subscriptions_worker(spawn, "worker-3", "--run-once")
    finished = wait_for_run(run_id, timeout=120, proc=third)
    assert finished.state_type.value == "COMPLETED", third.tail()
    assert finished.run_count >= 2
    assert _orders_per_subscription(pg) == dict.fromkeys(subs, 1)
