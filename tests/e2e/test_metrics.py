"""Metrics end to end: a real Prometheus scrapes `indostar-jobs metrics` and a task worker's --metrics-port.

Debian's `prometheus` (apt-get install prometheus) on loopback, scraping every second; the
test runs flows and background tasks, writes what the database series count, then asks
Prometheus's HTTP API for each series and compares with what the database and the Prefect
API hold. CI installs Prometheus (.ci/run); elsewhere the test is skipped when it is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from devtools.smtp_sink import free_port
from indostar_client import tasks as old
from tests.builders import make_cart, make_customer, make_product, make_subscription, today
from tests.e2e.conftest import ROOT
from tests.servers import prometheus_binary

pytestmark = pytest.mark.e2e


def python(env: dict[str, str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def query(base: str, promql: str) -> list[dict]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as r:  # noqa: S310 - loopback
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def value_of(base: str, promql: str, want: float, timeout: float = 45) -> float:
    """Poll Prometheus until ``promql`` has the value ``want`` (scrapes are every second); fail with what it had."""
    deadline = time.monotonic() + timeout
    seen: list = []
    while time.monotonic() < deadline:
        seen = query(base, promql)
        if seen and float(seen[0]["value"][1]) == want:
            return want
        time.sleep(0.5)
    pytest.fail(f"{promql}: wanted {want}, Prometheus had {seen}")


def test_prometheus_sees_the_series_with_the_values_the_database_and_api_hold(
    pg, smtp, api, prefect_server, spawn, start_worker, e2e_dir
):
    from sqlalchemy import text

    binary = prometheus_binary()
    worker_port, exporter_port, prom_port = free_port(), free_port(), free_port()
    start_worker("worker-metrics", "--metrics-port", str(worker_port))
    spawn(
        "metrics",
        "-m",
        "deployments.cli",
        "metrics",
        "--port",
        str(exporter_port),
        extra_env={"METRICS_CACHE_SECONDS": "0.5"},
    )

    # What the database series count: two subscriptions due, one payment held, one dead letter.
    customer, product = make_customer(pg), make_product(pg)
    for _ in range(2):
        make_subscription(pg, customer_id=customer, product_id=product, due=today())
    with pg.begin() as conn:
        sub = conn.execute(text("SELECT min(id) FROM subscriptions")).scalar()
        conn.execute(
            text(
                "INSERT INTO payments (razorpay_payment_id, event_id, subscription_id, amount_paise, currency, status)"
                " VALUES ('pay_metrics_1', 'evt_metrics_1', :s, 1000, 'INR', 'held')"
            ),
            {"s": sub},
        )
        conn.execute(
            text(
                "INSERT INTO notifications (idempotency_key, channel, kind, recipient, status, payload)"
                " VALUES ('metrics-dead-1', 'email', 'email', 'x@example.in', 'dead', '{}')"
            )
        )
    # Flow runs: two completed, one failed (a retention under its floor, refused in the run). In a process of
    # their own: this process's Prefect events client must stay with the flows' API of the other tests.
    make_cart(pg, age_days=40)
    run = "from flows.cleanup import cleanup_expired_carts as f; print(f(dry_run=True)['removed'])"
    for _ in range(2):
        done = python(prefect_server, run)
        assert done.returncode == 0 and "'empty_carts': 1" in done.stdout, done.stdout + done.stderr
    from prefect.variables import Variable

    Variable.set("retention_cleanup_expired_carts", {"days_old": 2}, overwrite=True)
    done = python(prefect_server, run)
    Variable.unset("retention_cleanup_expired_carts")
    assert done.returncode != 0 and "days_old 2 is under the floor of 7 days" in done.stderr, done.stderr[-2000:]
    # Background tasks: three emails through the worker.
    for i in range(3):
        assert (
            old.send_email_task.delay(to_email=f"m{i}@example.in", subject="s", body="b").get(timeout=30)["sent"] == 1
        )

    config = e2e_dir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{ROOT / 'deploy' / 'prometheus' / 'alerts.yml'}]\n"
        "scrape_configs:\n"
        f"  - job_name: exporter\n    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n"
        f"  - job_name: task-worker\n    static_configs: [{{targets: ['127.0.0.1:{worker_port}']}}]\n"
    )
    prom = spawn(
        "prometheus",
        "-c",
        f"import os, sys; os.execv({binary!r}, sys.argv[1:])",
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={e2e_dir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{prom_port}",
    )
    base = f"http://127.0.0.1:{prom_port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"{base}/-/ready", timeout=2):  # noqa: S310 - loopback
                break
        except OSError:
            assert time.monotonic() < deadline, prom.tail()
            time.sleep(0.5)

    value_of(base, 'indostar_flow_runs_total{flow="cleanup-expired-carts",state="COMPLETED"}', 2)
    value_of(base, 'indostar_flow_runs_total{flow="cleanup-expired-carts",state="FAILED"}', 1)
    value_of(base, 'indostar_flow_run_duration_seconds_count{flow="cleanup-expired-carts"}', 3)
    value_of(base, 'sum(indostar_task_runs_total{task="send-email-task",state="done"})', 3)
    value_of(base, 'indostar_task_run_duration_seconds_count{task="send-email-task"}', 3)
    value_of(base, 'indostar_workers_online{work_queue="background-tasks"}', 1)
    value_of(base, "indostar_subscriptions_due", 2)
    value_of(base, "indostar_payments_held", 1)
    value_of(base, "indostar_dead_letters", 1)
    value_of(base, 'indostar_notifications{channel="email",status="sent"}', 3)
    value_of(base, "sum(indostar_background_runs_waiting) or vector(0)", 0)
    value_of(base, "sum(indostar_late_flow_runs) or vector(0)", 0)
    value_of(base, 'indostar_metrics_source_up{source="prefect"}', 1)
    # indostar_last_success_timestamp_seconds is per deployment: the production topology's test reads it.
    with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as r:  # noqa: S310 - loopback
        rules = {rule["name"] for g in json.load(r)["data"]["groups"] for rule in g["rules"]}
    assert {"NightlyRunNotCompleted", "NoTaskWorkerOnline", "PaymentsHeld"} <= rules
