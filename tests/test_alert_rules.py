"""deploy/alerts.yml: the example alerting rules name only metrics the broker exports, and
promtool accepts them (where promtool is installed: Debian's `prometheus` package)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from conftest import ROOT

RULES = ROOT / "deploy" / "alerts.yml"


def test_the_rules_name_only_documented_metrics():
    documented = set(re.findall(r"^\| `(broker_[a-z_]+)`", (ROOT / "docs" / "operations.md").read_text(), re.M))
    used = set(re.findall(r"\b(broker_[a-z_]+)", RULES.read_text()))
    families = {re.sub(r"_(total|bucket|sum|count)$", "", name) for name in used}
    assert families and families <= documented, sorted(families - documented)


def test_promtool_accepts_the_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus provides it)")
    result = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout
