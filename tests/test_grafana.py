"""deploy/grafana: the dashboard compose.yaml provisions into Grafana is valid JSON of a
Grafana dashboard, every metric its panels query is one the broker exports (asked of a real
broker with Redis, and of the supervisor of workers for its own), each query is valid PromQL
(promtool, where installed), and its provisioning names the data source it uses.
deploy/compose-test.sh loads it into a real Grafana where an engine exists."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from broker.cluster import group_admin
from conftest import ROOT, free_port, run, serving

GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "broker.json"
KEY = "grafana-test-key"
# the dashboard's variables, as a query of Prometheus itself needs them
VARIABLES = {"$instance": ".*", "$__rate_interval": "1m"}


def queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_the_dashboard_is_a_grafana_dashboard_on_the_provisioned_data_source():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "broker" and dashboard["title"] == "Broker" and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    source = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    for panel in panels:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        assert panel["targets"] and all(t["expr"] and t["refId"] for t in panel["targets"]), panel["title"]
    (variable,) = dashboard["templating"]["list"]
    assert variable["name"] == "instance" and "broker_info" in variable["definition"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "broker.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    assert source["url"] == "http://prometheus:9090"


def exported_samples(redis_url: str, redis_prefix: str) -> set[str]:
    """The names of the samples a broker with the Redis backplane exports, and those of the
    supervisor of workers (broker_worker_up, broker_worker_starts_total)."""

    async def main():
        port = free_port()
        async with serving(admin_port=port, admin_api_key=KEY, redis_url=redis_url, redis_prefix=redis_prefix):
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {KEY}"}) as response:
                    text = await response.text()
        return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}

    names = run(main())
    own = group_admin.supervisor_families([group_admin.WorkerState(0, True, 1)], {0})
    return names | {sample.name for family in own for sample in family.samples}


def test_every_metric_the_dashboard_queries_is_exported(redis_url, redis_prefix):
    exported = exported_samples(redis_url, redis_prefix)
    assert {"broker_worker_up", "broker_worker_starts_total", "broker_backplane_connected"} <= exported
    used = {name for expr in queries() for name in re.findall(r"\b((?:broker|process)_[a-z0-9_]+)", expr)}
    assert used and used <= exported, sorted(used - exported)


def test_every_query_of_the_dashboard_is_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (apt-get install prometheus provides it)")
    rules = []
    for n, expr in enumerate(queries()):
        for variable, value in VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:panel_{n}", "expr": expr})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
