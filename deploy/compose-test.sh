#!/usr/bin/env bash
# Run compose.yaml with a real engine: build the broker's image, start the three nodes, Redis and
# Prometheus, wait until each node is ready (its compose health check), publish on broker-1 and
# receive the message on all three nodes with the same sequence number, check that broker-1's
# cluster view (/api/nodes) shows the three nodes, that Grafana loaded the broker's dashboard
# and each of its queries runs on Prometheus, that Prometheus
# scrapes the three nodes and loaded the alert rules, stop the stack (each node must exit 0 on
# SIGTERM) and remove it with its volumes. Uses host ports 7341, 7441, 7541, 7342, 7442, 7542,
# 9090 and 3000.
#
#   deploy/compose-test.sh
#
# Environment:
#   COMPOSE           the compose command (default: `docker compose` where docker works, else
#                     `podman compose` where it works, else podman-compose)
#   CONTAINER_ENGINE  docker or podman, for the build (default: the compose command's engine)
#   BROKER_IMAGE      the broker image to build and run (default localhost/broker:compose-test)
#   BASE_IMAGE, BUILD_CA_BUNDLE, PYTHON: as for deploy/container-test.sh
#   REDIS_IMAGE, PROMETHEUS_IMAGE, GRAFANA_IMAGE: other images for compose.yaml (deploy/local-images.sh builds
#                     local ones where images cannot be pulled)
#
# Exit codes: 0 passed, 1 failed, 3 no working container engine or compose command (nothing ran).
set -euo pipefail
cd "$(dirname "$0")/.."

works() { "$@" >/dev/null 2>&1; }
compose=()
if [ -n "${COMPOSE:-}" ]; then
    read -r -a compose <<<"$COMPOSE"
elif command -v docker >/dev/null 2>&1 && works docker info && works docker compose version; then
    compose=(docker compose)
elif command -v podman >/dev/null 2>&1 && works podman info; then
    if works podman compose version; then
        compose=(podman compose)
    elif command -v podman-compose >/dev/null 2>&1; then
        compose=(podman-compose)
    fi
fi
if [ "${#compose[@]}" = 0 ]; then
    echo "compose-test: no container engine with a compose command (docker compose, podman compose or podman-compose) found; nothing was run" >&2
    exit 3
fi
engine="${CONTAINER_ENGINE:-}"
if [ -z "$engine" ]; then
    case "${compose[0]}" in docker) engine=docker ;; *) engine=podman ;; esac
fi
works "$engine" info || { echo "compose-test: $engine does not answer; nothing was run" >&2; exit 3; }

python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
project="broker-compose-test"
export BROKER_IMAGE="${BROKER_IMAGE:-localhost/broker:compose-test}"
export BASE_IMAGE="${BASE_IMAGE:-python:3.12-slim}"
export COMPOSE_PROJECT_NAME="$project"
log=$(mktemp /tmp/compose-test.XXXXXX)
ran=""

fail() {
    echo "compose-test: FAILED: $*" >&2
    if [ -n "$ran" ]; then "${compose[@]}" logs >"$log" 2>&1 || true; tail -40 "$log" >&2; echo "compose-test: logs in $log" >&2; fi
    exit 1
}
cleanup() { if [ -n "$ran" ]; then "${compose[@]}" down -v >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT

"$python" - <<'PY' || fail "a port compose.yaml publishes is taken (stop what listens there)"
import socket
for port in (7341, 7441, 7541, 7342, 7442, 7542, 9090, 3000):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
PY

echo "compose-test: $("$engine" --version); compose: ${compose[*]} ($("${compose[@]}" version 2>/dev/null | head -1))"
build_flags=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
if [ "$engine" = podman ]; then build_flags+=(--format docker); fi
if [ -n "${BUILD_CA_BUNDLE:-}" ]; then build_flags+=(--secret "id=ca-bundle,src=$BUILD_CA_BUNDLE"); fi
echo "compose-test: building $BROKER_IMAGE on $BASE_IMAGE"
"$engine" build "${build_flags[@]}" -t "$BROKER_IMAGE" . >"$log" 2>&1 || { tail -30 "$log" >&2; fail "the build failed (log: $log)"; }

deploy/make-secrets.sh || fail "cannot make the secrets compose.yaml reads"
ran=yes
"${compose[@]}" up -d --no-build >"$log" 2>&1 || { tail -30 "$log" >&2; fail "compose up failed"; }
echo "compose-test: started broker-1, broker-2, broker-3, redis, prometheus, grafana"

# each node's compose health check (broker health --ready: listening, and Redis takes publishes)
for node in broker-1 broker-2 broker-3; do
    ready=""
    for _ in $(seq 90); do
        if works "${compose[@]}" exec -T "$node" broker health --ready; then ready=yes; break; fi
        sleep 1
    done
    [ -n "$ready" ] || fail "$node is not ready within 90 s"
done
echo "compose-test: the three nodes are ready (broker health --ready)"

# Redis: no one without the password; the broker's user only its keys, and no dangerous command
password=$(cat deploy/secrets/redis-password)
refused() { "${compose[@]}" exec -T redis redis-cli --no-auth-warning "$@" 2>&1 | grep -q -e NOAUTH -e NOPERM -e WRONGPASS; }
refused ping || fail "Redis answers a client without a password"
refused --user broker --pass "$password" set other-key 1 || fail "Redis lets the broker's user write outside its prefix"
refused --user broker --pass "$password" flushall || fail "Redis lets the broker's user run FLUSHALL"
echo "compose-test: Redis refuses the default user, and the broker's user outside its keys and FLUSHALL"

"$python" - <<'PY' || fail "a message did not cross the nodes"
import asyncio
from broker.client import Client

async def main():
    urls = ["ws://127.0.0.1:7341/", "ws://127.0.0.1:7441/", "ws://127.0.0.1:7541/"]
    clients = [await Client.connect(url) for url in urls]
    try:
        subs = [await client.subscribe("compose.>") for client in clients]
        ack = await clients[0].publish_acked("compose.test", b"across")
        for url, sub in zip(urls, subs):
            message = await sub.next(timeout=15)
            assert (message.topic, message.epoch, message.seq, message.data) == ("compose.test", ack.epoch, ack.seq, b"across"), (url, message)
        print(f"compose-test: published on broker-1, received on all three nodes as seq {ack.seq}")
    finally:
        for client in clients:
            await client.close()

asyncio.run(main())
PY

# the cluster view: broker-1's admin API lists the three nodes, as they announce themselves in Redis
"${compose[@]}" exec -T broker-1 python - <<'PY' || fail "broker-1's cluster view (/api/nodes) does not show the three nodes"
import json, os, time, urllib.request

request = urllib.request.Request("http://127.0.0.1:7342/api/nodes", headers={"Authorization": "Bearer " + open(os.environ["BROKER_ADMIN_API_KEY_FILE"]).read().strip()})
deadline = time.monotonic() + 30
while True:
    with urllib.request.urlopen(request, timeout=5) as response:
        nodes = sorted(node["node"] for node in json.load(response)["nodes"])
    if nodes == ["broker-1:7341", "broker-2:7341", "broker-3:7341"]:
        break
    if time.monotonic() > deadline:
        raise SystemExit(f"nodes in broker-1's view: {nodes}")
    time.sleep(1)
print(f"compose-test: broker-1's cluster view shows {', '.join(nodes)}")
PY

"$python" - <<'PY' || fail "Prometheus does not scrape the three nodes or lacks the alert rules"
import json, re, time, urllib.request

def get(path):
    with urllib.request.urlopen("http://127.0.0.1:9090" + path, timeout=5) as response:
        return json.load(response)["data"]

deadline = time.monotonic() + 90
while True:
    try:
        targets = get("/api/v1/targets")["activeTargets"]
        up = sorted(t["labels"]["instance"] for t in targets if t["labels"]["job"] == "broker" and t["health"] == "up")
        if len(up) == 3:
            break
    except OSError as exc:
        up = [repr(exc)]
    if time.monotonic() > deadline:
        raise SystemExit(f"broker targets up: {up}")
    time.sleep(2)
rules = [rule["name"] for group in get("/api/v1/rules")["groups"] for rule in group["rules"]]
import yaml  # the test extra brings PyYAML
written = [rule["alert"] for group in yaml.safe_load(open("deploy/alerts.yml"))["groups"] for rule in group["rules"]]
assert "BrokerDown" in rules and sorted(rules) == sorted(written), (rules, written)
print(f"compose-test: Prometheus scrapes {', '.join(up)} (up) with {len(rules)} alert rules")
PY

"$python" - <<'PY' || fail "Grafana did not load the broker's dashboard, or its panels query what Prometheus does not have"
import base64, json, time, urllib.parse, urllib.request

auth = {"Authorization": "Basic " + base64.b64encode(b"admin:" + open("deploy/secrets/grafana-password", "rb").read().strip()).decode()}

def get(url, headers=None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as response:
        return json.load(response)

deadline = time.monotonic() + 90
while True:
    try:
        if get("http://127.0.0.1:3000/api/health").get("database") == "ok":
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        raise SystemExit("Grafana does not answer on 127.0.0.1:3000")
    time.sleep(2)
found = get("http://127.0.0.1:3000/api/search?type=dash-db&query=Broker", auth)
assert any(item["uid"] == "broker" for item in found), found
dashboard = get("http://127.0.0.1:3000/api/dashboards/uid/broker", auth)["dashboard"]
exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
# Grafana reaches Prometheus through its provisioned data source
up = get("http://127.0.0.1:3000/api/datasources/proxy/uid/prometheus/api/v1/query?query=up", auth)
assert up["status"] == "success" and up["data"]["result"], up
empty = []
for expr in exprs:
    query = expr.replace("$instance", ".*").replace("$__rate_interval", "1m")
    answer = get("http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    assert answer["status"] == "success", (expr, answer)
    if not answer["data"]["result"]:
        empty.append(expr)
for metric in ("broker_connections", "broker_messages_published_total", "process_resident_memory_bytes", "broker_backplane_connected"):
    assert not [expr for expr in empty if metric in expr], [expr for expr in empty if metric in expr]
print(f"compose-test: Grafana loaded the Broker dashboard ({len(dashboard['panels'])} panels); its {len(exprs)} queries run on Prometheus")
PY

"${compose[@]}" stop >"$log" 2>&1 || fail "compose stop failed"
for node in broker-1 broker-2 broker-3; do
    id=$("$engine" ps -a -q --filter "label=com.docker.compose.project=$project" --filter "label=com.docker.compose.service=$node")
    [ -n "$id" ] || fail "no container of $node"
    code=$("$engine" inspect "$id" --format '{{.State.ExitCode}}')
    [ "$code" = 0 ] || fail "$node exited with $code after SIGTERM"
done
echo "compose-test: the three nodes stopped gracefully (exit 0)"
"${compose[@]}" down -v >"$log" 2>&1 || fail "compose down failed"
ran=""
rm -f "$log"
echo "compose-test: passed with ${compose[*]}"
