#!/usr/bin/env bash
# Build local Redis and Prometheus images from Debian's packages, for running compose.yaml on a
# machine that cannot pull redis and prom/prometheus (the Debian base comes from
# deploy/debian-base.sh). Debian bookworm packages Redis 7.0 and Prometheus 2.42.
#
#   deploy/local-images.sh
#   BROKER_IMAGE=localhost/broker:latest BASE_IMAGE=localhost/debian-python:bookworm \
#     REDIS_IMAGE=localhost/redis:local PROMETHEUS_IMAGE=localhost/prometheus:local \
#     podman-compose up -d --build
#
# Environment: BASE_IMAGE (default localhost/debian-python:bookworm), REDIS_IMAGE and
# PROMETHEUS_IMAGE (the tags to build, default localhost/redis:local and
# localhost/prometheus:local), CONTAINER_ENGINE (default: the first of docker, podman that
# answers `info`).
set -euo pipefail
base="${BASE_IMAGE:-localhost/debian-python:bookworm}"
redis="${REDIS_IMAGE:-localhost/redis:local}"
prometheus="${PROMETHEUS_IMAGE:-localhost/prometheus:local}"
# shellcheck source=deploy/engine.sh
. "${BASH_SOURCE[0]%/*}/engine.sh"
find_engine local-images
flags=(--build-arg "BASE_IMAGE=$base")
if [ "$engine" = podman ]; then flags+=(--format docker); fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

# Redis as its own user, data in /data (the compose file's volume), redis-cli for the health check
mkdir "$dir/redis"
cat > "$dir/redis/Dockerfile" <<'EOF'
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* && install -d -o redis -g redis /data
USER redis
WORKDIR /data
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
EOF
"$engine" build "${flags[@]}" -t "$redis" "$dir/redis"

# Prometheus as its own user, storage in /prometheus (the compose file's volume)
mkdir "$dir/prometheus"
cat > "$dir/prometheus/Dockerfile" <<'EOF'
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends prometheus \
    && rm -rf /var/lib/apt/lists/* && install -d -o prometheus -g prometheus /prometheus
USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
EOF
"$engine" build "${flags[@]}" -t "$prometheus" "$dir/prometheus"
echo "local-images: built $redis and $prometheus on $base with $engine"
