"""The Prometheus alert rules (deploy/prometheus/alerts.yml) are valid and each is unit-tested with promtool.

`promtool` comes with Debian's `prometheus` package; CI installs it (.ci/run sets
INDOSTAR_REQUIRE_PROMETHEUS=1, so a missing promtool fails there instead of skipping).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.servers import prometheus_binary

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERTS = {
    "NightlyRunNotCompleted",
    "DeadLettersRising",
    "PaymentsHeld",
    "LateFlowRuns",
    "NoTaskWorkerOnline",
    "FlowFailureRatioHigh",
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([prometheus_binary("promtool"), *args], cwd=RULES, capture_output=True, text=True, timeout=60)


def test_the_rules_parse():
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_behaves_as_its_unit_tests_say():
    done = promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_exists_and_has_a_firing_and_a_quiet_case():
    rules = yaml.safe_load((RULES / "alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names == ALERTS
    cases = yaml.safe_load((RULES / "alerts_test.yml").read_text())["tests"]
    checks = [c for t in cases for c in t["alert_rule_test"]]
    for name in ALERTS:
        mine = [c for c in checks if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name} is never shown firing"
        assert any(not c["exp_alerts"] for c in mine), f"{name} is never shown quiet"
