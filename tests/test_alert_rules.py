"""deploy/alerts.yml: the example alerting rules name only metrics the broker exports, promtool
accepts them, and every rule is tested on synthetic series by promtool's rule unit tests
(deploy/alerts-test.yml). promtool comes with Debian's `prometheus` package; where it is
missing the promtool tests skip, saying so."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from conftest import ROOT

RULES = ROOT / "deploy" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "alerts-test.yml"
NO_PROMTOOL = "promtool is not installed (apt-get install prometheus provides it)"


def rule_names() -> list[str]:
    return [rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_the_rules_name_only_documented_metrics():
    documented = set(re.findall(r"^\| `((?:broker|process)_[a-z_]+)`", (ROOT / "docs" / "operations.md").read_text(), re.M))
    used = set(re.findall(r"\b((?:broker|process)_[a-z_]+)", RULES.read_text()))
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used} - {"process_cpu_seconds"}
    documented = {re.sub(r"_total$", "", name) for name in documented}
    assert families and families <= documented, sorted(families - documented)


def test_every_rule_has_a_unit_test_where_it_fires_and_one_where_it_does_not():
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fires, quiet = set(), set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else quiet).add(check["alertname"])
    names = rule_names()
    assert len(names) == len(set(names))
    assert set(names) == fires, sorted(set(names) ^ fires)
    assert set(names) == quiet, sorted(set(names) ^ quiet)


def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(NO_PROMTOOL)
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_names())} rules found" in result.stdout


def test_promtool_unit_tests_of_every_rule_pass():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(NO_PROMTOOL)
    result = subprocess.run([promtool, "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, timeout=60, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
