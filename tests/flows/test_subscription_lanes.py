"""The nightly run's scale-out pieces under the Prefect harness: lane runs and the summary read back from the database.

The fan-out itself (`worker_runs > 0`, lane runs on workers) needs deployments and
workers: tests/e2e/test_production_topology.py covers it.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from flows.subscriptions import process_due_subscriptions, process_subscription_lanes, summarize_run_outcomes
from lib import subscription_stats as sub_stats
from lib.errors import InvalidInputError
from lib.stats import to_artifact_rows
from tests.builders import make_order, make_product, make_subscription, today

TODAY = today()


@pytest.fixture(autouse=True)
def _today_as_the_test_starts():
    """TODAY again for each test, so a suite that runs across 00:00 UTC does not use yesterday's date."""
    global TODAY
    TODAY = today()


def _rows(pg, sql: str, **params):
    with pg.connect() as c:
        return c.execute(text(sql), params).all()


def _night(pg, products: int = 4, per_product: int = 3) -> list[int]:
    ids = []
    for _ in range(products):
        product = make_product(pg, stock=100, price_paise=10_000)
        ids += [make_subscription(pg, product_id=product, due=TODAY, quantity=2) for _ in range(per_product)]
    return ids


def test_lane_runs_of_one_night_order_everything_once_and_a_repeat_decides_nothing(pg):
    """Two lane runs sharing a night's lanes make one order per due subscription; the same lanes again add none."""
    due = _night(pg)
    first = process_subscription_lanes(run_date=TODAY, lanes=[0, 2], lane_count=4, run_id="night-a", batch_size=2)
    second = process_subscription_lanes(run_date=TODAY, lanes=[1, 3], lane_count=4, run_id="night-a", batch_size=2)
    assert (first["lanes"], second["lanes"]) == ([0, 2], [1, 3])
    assert first["batches"] > 0 and second["batches"] > 0  # products 1..4 put work in every lane
    assert dict(_rows(pg, "SELECT subscription_id, count(*) FROM orders GROUP BY 1")) == dict.fromkeys(due, 1)
    again = process_subscription_lanes(run_date=TODAY, lanes=[0, 1, 2, 3], lane_count=4, run_id="night-a")
    assert again["batches"] == 0  # claims skip what this night's run id already decided
    assert _rows(pg, "SELECT count(*) FROM orders")[0][0] == len(due)


def test_summary_read_from_the_database_matches_what_the_run_returned(pg):
    """The fan-out summary (a run id's outcome rows) equals the in-process one and is publishable as an artifact."""
    _night(pg, products=2, per_product=2)
    short = make_product(pg, stock=1, price_paise=30_000)
    make_subscription(pg, product_id=short, due=TODAY, quantity=1, frequency="weekly")
    make_subscription(pg, product_id=short, due=TODAY, quantity=5)  # out of stock
    existing = make_subscription(pg, due=TODAY)
    make_order(pg, subscription_id=existing, delivery_date=TODAY)  # "order already existed": no units counted
    stats = process_due_subscriptions(run_date=TODAY, batch_size=2, max_concurrency=2, send_confirmations=False)
    (run_id,) = _rows(pg, "SELECT DISTINCT run_id FROM subscription_outcomes")[0]
    groups = summarize_run_outcomes.fn(run_id)
    from_db = sub_stats.headline(groups)
    assert from_db == {k: stats[k] for k in from_db}
    json.dumps(to_artifact_rows(sub_stats.night_tables(groups, [])))  # plain ints, not SQL numerics (Decimal)
    assert (from_db["created"], from_db["out_of_stock"], from_db["units"]) == (6, 1, 9)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"lanes": [], "lane_count": 2}, r"lanes must be distinct numbers in 0\.\.1, got \[\]"),
        ({"lanes": [2], "lane_count": 2}, r"lanes must be distinct numbers in 0\.\.1, got \[2\]"),
        ({"lanes": [0, 0], "lane_count": 2}, r"lanes must be distinct numbers in 0\.\.1, got \[0, 0\]"),
        ({"lanes": [0], "lane_count": 0}, "max_concurrency must be a whole number > 0, got 0"),
        ({"lanes": [0], "lane_count": 2, "run_id": " "}, r"run_id \(the night's run\) must not be empty"),
    ],
)
def test_bad_lane_parameters_fail_before_writing(pg, params, message):
    """Lanes outside 0..lane_count-1, repeated lanes or a blank run id are rejected before any claim."""
    _night(pg, products=1, per_product=1)
    with pytest.raises(InvalidInputError, match=message):
        process_subscription_lanes(run_date=TODAY, **{"run_id": "night-b", **params})
    assert _rows(pg, "SELECT count(*) FROM orders")[0][0] == 0


@pytest.mark.parametrize(
    ("worker_runs", "error", "message"),
    [
        (-1, "ParameterTypeError", "worker_runs: Input should be greater than or equal to 0"),
        (3, "InvalidInputError", r"worker_runs must be between 0 and max_concurrency \(2\), got 3"),
    ],
)
def test_worker_runs_outside_zero_to_lanes_is_rejected(pg, worker_runs, error, message):
    """worker_runs must leave every lane run at least one lane (0 <= worker_runs <= max_concurrency).

    A negative value is refused by the typed parameter before the run starts; more runs than lanes by the flow.
    """
    from prefect.exceptions import ParameterTypeError

    _night(pg, products=1, per_product=1)
    error_type = {"ParameterTypeError": ParameterTypeError, "InvalidInputError": InvalidInputError}[error]
    with pytest.raises(error_type, match=message):
        process_due_subscriptions(run_date=TODAY, max_concurrency=2, worker_runs=worker_runs)
    assert _rows(pg, "SELECT count(*) FROM orders")[0][0] == 0


def test_lane_runs_no_worker_takes_are_cancelled_and_their_lanes_run_in_the_nightly_run(pg, monkeypatch):
    """worker_runs=2 and nobody runs the lane deployment: after the start timeout the night does the lanes itself."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    from flows import subscriptions as flows_subs

    monkeypatch.setattr(flows_subs, "LANE_RUN_START_SECONDS", 0.0)
    monkeypatch.setattr(flows_subs, "LANE_RUN_POLL_SECONDS", 0.2)
    deployment_id = process_subscription_lanes.to_deployment(name="default").apply()
    due = _night(pg, products=2, per_product=3)
    stats = process_due_subscriptions(run_date=TODAY, max_concurrency=2, worker_runs=2, send_confirmations=False)
    assert stats["created"] == len(due)
    assert dict(_rows(pg, "SELECT subscription_id, count(*) FROM orders GROUP BY 1")) == dict.fromkeys(due, 1)

    async def lane_run_states():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]))
            )
            return sorted(r.state_name for r in runs)

    assert asyncio.run(lane_run_states()) == ["Cancelled", "Cancelled"]
