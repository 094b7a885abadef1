"""The Prometheus alert rules (deploy/prometheus/alerts.yml) are valid and each is unit-tested with promtool.

`promtool` comes with Debian's `prometheus` package. Without it these tests skip, except where
INDOSTAR_REQUIRE_PROMETHEUS=1 (set by .ci/run) makes them fail, so CI cannot pass without running them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.servers import prometheus_binary

ROOT = Path(__file__).resolve().parents[2]
ALERTS_FILE = "deploy/prometheus/alerts.yml"
TESTS_FILE = "deploy/prometheus/alerts_test.yml"
# The alerts operators were promised (README: "Metrics and alerts"); more may be added, none dropped.
ALERTS = {
    "NightlyRunNotCompleted",
    "DeadLettersRising",
    "PaymentsHeld",
    "LateFlowRuns",
    "NoTaskWorkerOnline",
    "FlowFailureRatioHigh",
}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([prometheus_binary("promtool"), *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_rules_parse():
    done = promtool("check", "rules", ALERTS_FILE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_behaves_as_its_unit_tests_say():
    done = promtool("test", "rules", TESTS_FILE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_exists_and_has_a_firing_and_a_quiet_case():
    groups = yaml.safe_load((ROOT / ALERTS_FILE).read_text())["groups"]
    names = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    assert not ALERTS - names, f"missing from {ALERTS_FILE}: {sorted(ALERTS - names)}"
    cases = yaml.safe_load((ROOT / TESTS_FILE).read_text())["tests"]
    checks = [check for case in cases for check in case["alert_rule_test"]]
    # Over every alert of the file, not only ALERTS: a new alert without unit tests fails here.
    for name in sorted(names):
        mine = [check for check in checks if check["alertname"] == name]
        assert any(check.get("exp_alerts") for check in mine), f"{name} is never shown firing in {TESTS_FILE}"
        assert any(not check.get("exp_alerts") for check in mine), f"{name} is never shown quiet in {TESTS_FILE}"
