#!/usr/bin/env bash
# Make the secrets compose.yaml reads, once: random values in deploy/secrets/, a directory only
# its owner may enter (0700). The files themselves are 0644: compose mounts each into the
# containers as it is, where the broker (uid 10001) and Prometheus (nobody) read them. An
# existing file is kept: run it again safely.
set -euo pipefail
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir"
chmod 700 "$dir"
for name in redis-password admin-key grafana-password; do
  file="$dir/$name"
  if [ -s "$file" ]; then
    echo "make-secrets: $file exists; kept"
    continue
  fi
  (umask 022 && head -c 32 /dev/urandom | base64 | tr -d '/+=\n' > "$file")
  echo "make-secrets: wrote $file"
done
