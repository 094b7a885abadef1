"""Project-level guards: every deployment loads, lib/ stays free of Prefect, docs match code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deployments.specs import deployment_specs, load_flow

ROOT = Path(__file__).resolve().parent.parent
SPECS = deployment_specs()


@pytest.mark.parametrize("spec", SPECS, ids=[f"{s['entrypoint']}/{s['name']}" for s in SPECS])
def test_every_entrypoint_loads_as_a_named_flow(spec):
    """Each prefect.yaml entrypoint imports, is a flow, has a docstring and a kebab-case name."""
    from prefect import Flow

    flow = load_flow(spec["entrypoint"])
    assert isinstance(flow, Flow)
    assert flow.name == flow.fn.__name__.replace("_", "-")
    assert flow.description, f"{flow.name} needs a docstring: it is the UI description"


def test_deployment_names_are_unique_and_schedules_are_utc():
    """No two deployments share flow/name; no schedule is written for Prefect to re-apply; every default cron
    runs in UTC with a concurrency limit of 1."""
    seen = set()
    for spec in SPECS:
        key = (spec["entrypoint"], spec["name"])
        assert key not in seen
        seen.add(key)
        # Prefect must leave the owners' schedules alone on every deploy (deployments/schedules.py).
        assert "schedules" not in spec or spec["schedules"] is None, spec["entrypoint"]
        if spec.get("default_schedule"):
            assert spec["default_schedule"]["timezone"] == "UTC"
            assert spec["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}


def test_cron_times_match_the_design():
    """Subscriptions at 00:00, carts at 02:00, tokens at 03:00; audit logs and sessions unscheduled."""
    crons = {
        spec["entrypoint"].split(":")[1]: [spec["default_schedule"]["cron"]] if spec.get("default_schedule") else []
        for spec in SPECS
    }
    assert crons["process_due_subscriptions"] == ["0 0 * * *"]
    assert crons["cleanup_expired_carts"] == ["0 2 * * *"]
    assert crons["cleanup_expired_tokens"] == ["0 3 * * *"]
    assert crons["cleanup_old_audit_logs"] == crons["cleanup_abandoned_sessions"] == []
    assert len(crons["remind_upcoming_deliveries"]) == 1
    assert crons["cleanup_delivery_log"] == ["30 2 * * *"]


def test_lib_never_imports_prefect():
    """Importing every lib module leaves prefect out of sys.modules (lib is the plain domain layer)."""
    modules = sorted(
        ".".join(p.relative_to(ROOT).with_suffix("").parts)
        for p in (ROOT / "lib").rglob("*.py")
        if "migrations" not in p.parts
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "assert not bad, bad[:5]\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_the_dev_commands_import_prefect_only_after_setting_its_environment():
    """`python -m devtools up` sets PREFECT_API_URL in devtools.up.run_dev before its first Prefect import:
    Prefect reads its settings at import, and `serve` in a process that imported it earlier registers the
    deployments with a temporary server of its own. So the dev modules import no Prefect at load."""
    code = (
        "import sys, devtools.cli, devtools.up, devtools.topology\n"
        "bad = sorted(m for m in sys.modules if m == 'prefect' or m.startswith('prefect.'))\n"
        "assert not bad, bad[:5]\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_sql_stays_in_lib():
    """flows/, deployments/ and the backend client build no SQL: no sqlalchemy import, no text(...) statement."""
    import ast

    offenders = []
    for path in [
        *(ROOT / "flows").rglob("*.py"),
        *(ROOT / "deployments").glob("*.py"),
        *(ROOT / "indostar_client").glob("*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
            if module.startswith("sqlalchemy") or any(n.startswith("sqlalchemy") for n in names):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_every_module_has_a_docstring():
    """Each module of every package says what it is for."""
    import ast

    missing = []
    for folder in ("lib", "flows", "deployments", "indostar_client", "devtools", "bench"):
        for path in (ROOT / folder).rglob("*.py"):
            if "versions" in path.parts or path.name == "__init__.py":
                continue
            if not ast.get_docstring(ast.parse(path.read_text())):
                missing.append(str(path.relative_to(ROOT)))
    assert missing == []


def test_no_test_outside_the_pure_unit_tests_reads_a_literal_date():
    """Tests that touch the database, Redis, Prefect or the flows take dates from today (tests.builders.today,
    db_now): a literal date would pass today and fail once the run-date bound or an age leaves it behind.
    Pure unit tests (tests/unit: functions of their arguments) may use fixed dates."""
    import re

    literal = re.compile(r"date(time)?\(\s*\d{4}\s*,|[\"']\d{4}-\d{2}-\d{2}")
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in (ROOT / "tests").rglob("*.py")
        if "unit" not in path.relative_to(ROOT).parts and path.name != "test_project.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if literal.search(line)
    ]
    assert found == []
