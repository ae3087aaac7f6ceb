#!/usr/bin/env bash
# Build the broker's image and run it with a real container engine (docker or podman): wait for
# its health check, publish and receive a message through it with the broker's own client from
# this machine, check that it runs as a non-root user, and stop it gracefully (exit code 0).
#
#   deploy/container-test.sh
#
# Environment:
#   CONTAINER_ENGINE  docker or podman (default: the first of docker, podman that answers `info`)
#   BASE_IMAGE        the image both stages build on (default python:3.12-slim; where images
#                     cannot be pulled, deploy/debian-base.sh builds a local one)
#   BUILD_CA_BUNDLE   a PEM file pip trusts during the build (a TLS-intercepting proxy's CA)
#   IMAGE             the tag to build (default localhost/broker:test)
#   PYTHON            a Python with the broker installed, for the client (default: .venv/bin/python, else python3)
#   PODMAN_RUNTIME    an OCI runtime for podman (e.g. runc) instead of the one containers.conf names
#
# Exit codes: 0 passed, 1 failed, 3 no working container engine (nothing was built).
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=deploy/engine.sh
. deploy/engine.sh
find_engine container-test

image="${IMAGE:-localhost/broker:test}"
base="${BASE_IMAGE:-python:3.12-slim}"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
name="broker-container-test-$$"
run_flags=(--ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
build_flags=(--build-arg "BASE_IMAGE=$base")
if [ "$engine" = podman ]; then
    # podman's default OCI image format has no HEALTHCHECK
    build_flags+=(--format docker)
    if [ -n "${PODMAN_RUNTIME:-}" ]; then
        build_flags+=(--runtime "$PODMAN_RUNTIME"); run_flags+=(--runtime "$PODMAN_RUNTIME")
    fi
fi
if [ -n "${BUILD_CA_BUNDLE:-}" ]; then
    build_flags+=(--secret "id=ca-bundle,src=$BUILD_CA_BUNDLE")
fi

fail() { echo "container-test: FAILED: $*" >&2; "$engine" logs "$name" 2>&1 | tail -20 >&2 || true; exit 1; }
cleanup() { "$engine" rm -f "$name" >/dev/null 2>&1 || true; }
trap cleanup EXIT

echo "container-test: $("$engine" --version)"
echo "container-test: building $image on $base"
"$engine" build "${build_flags[@]}" -t "$image" . >/tmp/"$name"-build.log 2>&1 || { tail -30 /tmp/"$name"-build.log >&2; fail "the build failed (log: /tmp/$name-build.log)"; }
rm -f /tmp/"$name"-build.log
echo "container-test: image size $("$engine" image inspect "$image" --format '{{.Size}}') bytes"

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$engine" run -d "${run_flags[@]}" --name "$name" -p "127.0.0.1:$port:7341" "$image" >/dev/null || fail "the container did not start"

healthy=""
for _ in $(seq 60); do
    if [ "$engine" = podman ]; then
        # podman runs health checks from systemd timers; without systemd, run the check itself
        if "$engine" healthcheck run "$name" >/dev/null 2>&1; then healthy=yes; break; fi
    elif [ "$("$engine" inspect "$name" --format '{{.State.Health.Status}}')" = healthy ]; then
        healthy=yes; break
    fi
    sleep 1
done
[ -n "$healthy" ] || fail "the health check did not pass within 60 s"
echo "container-test: health check passed"

uid=$("$engine" exec "$name" id -u)
[ "$uid" != 0 ] || fail "the broker runs as root"
echo "container-test: runs as uid $uid"

"$python" - "$port" <<'PY' || fail "no message went through the container"
import asyncio, sys
from broker.client import Client

async def main(url):
    async with Client(url) as subscriber, Client(url) as publisher:
        sub = await subscriber.subscribe("container.test")
        ack = await publisher.publish_acked("container.test", b"hello")
        message = await asyncio.wait_for(anext(aiter(sub)), 10)
        assert (message.seq, message.data) == (ack.seq, b"hello"), message
        print(f"container-test: published and received seq {ack.seq} through the container")

asyncio.run(main(f"ws://127.0.0.1:{sys.argv[1]}/"))
PY

"$engine" stop --time 15 "$name" >/dev/null
code=$("$engine" inspect "$name" --format '{{.State.ExitCode}}')
[ "$code" = 0 ] || fail "the broker exited with $code after SIGTERM"
"$engine" logs "$name" 2>&1 | grep -q "event=stopped" || fail "no graceful stop in the log"
echo "container-test: stopped gracefully (exit 0)"
echo "container-test: passed with $engine"
