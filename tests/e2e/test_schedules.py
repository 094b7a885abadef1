"""Schedules owners change stay changed: across `serve` and `make up` restarts, `prefect deploy --all` and a release.

A Prefect server of this module's own; the changes are made the two ways an owner makes them
(`indostar-jobs schedule ...`, and the API calls the UI makes), then every path that
registers the deployments again is taken, and the server is asked what it has.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from deployments import schedules
from deployments.serve import register_all
from tests.e2e.conftest import ROOT, prefect_cli

pytestmark = pytest.mark.e2e


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deployments.cli", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def state(client) -> dict[str, tuple[str, bool, bool]]:
    """job: (cron of its owner schedule, schedule active, deployment paused), as the server has them."""
    out = {}
    for job in schedules.jobs().values():
        dep = client.read_deployment_by_name(job.full_name)
        ours = [s for s in dep.schedules if s.slug == schedules.SLUG]
        assert len(dep.schedules) == len(ours) <= 1, dep.schedules  # never a second, re-created schedule
        out[job.flow] = (ours[0].schedule.cron, ours[0].active, dep.paused) if ours else ("-", False, dep.paused)
    return out


def test_owner_changes_survive_restarts_deploys_and_a_release(api, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.schedules import CronSchedule

    from deployments.setup_pool import setup_pool

    env = {**prefect_server, "INDOSTAR_ENV": "dev"}
    register_all()  # `indostar-jobs serve` / `make up` on a new server
    with get_client(sync_client=True) as client:
        fresh = state(client)
        assert fresh["cleanup-expired-carts"] == ("0 2 * * *", True, False)
        assert fresh["process-due-subscriptions"] == ("0 0 * * *", True, False)
        assert fresh["cleanup-old-audit-logs"] == ("-", False, False)  # deployed, not scheduled

        # The owner, with the CLI:
        for args in (
            ("schedule", "set", "cleanup-expired-carts", "--cron", "15 1 * * *"),
            ("schedule", "pause", "cleanup-expired-tokens"),
            ("schedule", "set", "cleanup-old-audit-logs/default", "--cron", "0 4 * * 0"),
        ):
            done = cli(env, *args)
            assert done.returncode == 0, done.stderr
        # ... and in the UI (the calls its schedule form and its pause toggle make):
        dlog = client.read_deployment_by_name("cleanup-delivery-log/daily")
        client.update_deployment_schedule(dlog.id, dlog.schedules[0].id, schedule=CronSchedule(cron="45 2 * * *"))
        client.pause_deployment(client.read_deployment_by_name("ops-report/weekly").id)

        changed = state(client)
        assert changed["cleanup-expired-carts"] == ("15 1 * * *", True, False)
        assert changed["cleanup-expired-tokens"] == ("0 3 * * *", False, False)
        assert changed["cleanup-old-audit-logs"] == ("0 4 * * 0", True, False)
        assert changed["cleanup-delivery-log"] == ("45 2 * * *", True, False)
        assert changed["ops-report"] == ("30 3 * * 1", True, True)

        register_all()  # a `serve` restart, a `make up` restart
        assert state(client) == changed

        setup_pool()
        done = cli(env, "deploy")  # a release: new code, `indostar-jobs deploy` (prefect deploy --all and more)
        assert done.returncode == 0 and "paused again: ops-report/weekly" in done.stdout, done.stdout + done.stderr
        assert state(client) == changed

        # A bare `prefect deploy --all` keeps the schedules (cron and pause); Prefect itself sends paused=False
        # for the deployment, so the UI's deployment-level pause is lost there (README: use the schedule's).
        prefect_cli(env, "deploy", "--all")
        done = cli(env, "schedule", "ensure")
        assert done.returncode == 0 and "every job has its schedule" in done.stdout, done.stdout + done.stderr
        assert state(client) == changed | {"ops-report": ("30 3 * * 1", True, False)}

        shown = cli(env, "schedule", "show").stdout
        assert "cleanup-expired-carts/daily" in shown and "15 1 * * *" in shown and "days_old 30" in shown


def test_a_bad_cron_or_a_retention_under_its_floor_is_refused_in_one_line_and_nothing_changes(api, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.variables import Variable

    env = {**prefect_server, "INDOSTAR_ENV": "dev"}
    register_all()
    with get_client(sync_client=True) as client:
        before = state(client)
    Variable.unset("retention_cleanup_expired_carts")
    cases = [
        (("schedule", "set", "cleanup-expired-carts", "--cron", "61 2 * * *"), "not a valid cron expression '61 2"),
        (("schedule", "set", "no-such-job", "--cron", "0 2 * * *"), "unknown job 'no-such-job'"),
        (("schedule", "retention", "cleanup-expired-carts", "--days", "3"), "days_old 3 is under the floor of 7 days"),
        (("schedule", "retention", "cleanup-old-audit-logs", "--days", "29"), "days 29 is under the floor of 30 days"),
        (("schedule", "pause", "cleanup-abandoned-sessions"), "has no schedule"),
    ]
    for args, message in cases:
        done = cli(env, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, done.stderr)
    with get_client(sync_client=True) as client:
        assert state(client) == before
    assert Variable.get("retention_cleanup_expired_carts", default=None) is None

    done = cli(env, "schedule", "retention", "cleanup-expired-carts", "--days", "10")
    assert done.returncode == 0, done.stderr
    assert Variable.get("retention_cleanup_expired_carts") == {"days_old": 10}
    register_all()  # a restart leaves the variable alone
    assert Variable.get("retention_cleanup_expired_carts") == {"days_old": 10}
    Variable.unset("retention_cleanup_expired_carts")


def test_serve_pause_on_shutdown_is_undone_at_the_next_start_but_an_owners_pause_is_kept(api, prefect_server, spawn):
    """`serve --pause-on-shutdown` pauses every deployment as it stops; the next start resumes those it paused
    and only those."""
    from prefect.client.orchestration import get_client
    from prefect.variables import Variable

    from deployments.serve import PAUSED_BY_SERVE

    register_all()
    with get_client(sync_client=True) as client:
        client.pause_deployment(client.read_deployment_by_name("ops-report/weekly").id)  # the owner's
        serve = spawn(
            "serve", "-m", "deployments.cli", "serve", "--pause-on-shutdown", extra_env={"INDOSTAR_ENV": "dev"}
        )
        deadline = time.monotonic() + 90
        while "being served" not in serve.tail(200):
            assert serve.popen.poll() is None and time.monotonic() < deadline, serve.tail()
            time.sleep(0.5)
        serve.stop(signal.SIGINT)  # Ctrl-C
        paused = {j.full_name: client.read_deployment_by_name(j.full_name).paused for j in schedules.jobs().values()}
        assert all(paused.values()), paused  # paused on the way out
        assert "ops-report/weekly" not in Variable.get(PAUSED_BY_SERVE)
        assert "cleanup-expired-carts/daily" in Variable.get(PAUSED_BY_SERVE)

        register_all()  # the next `serve` or `make up`
        after = {j.full_name: client.read_deployment_by_name(j.full_name).paused for j in schedules.jobs().values()}
        assert after == {name: name == "ops-report/weekly" for name in after}
        assert Variable.get(PAUSED_BY_SERVE, default=None) is None
        client.resume_deployment(client.read_deployment_by_name("ops-report/weekly").id)
