#!/usr/bin/env bash
# Build a local Debian base image with python3 and its venv module, for machines that cannot
# pull images (the Dockerfile's default base is python:3.12-slim). Needs root, debootstrap and
# docker or podman.
#
#   deploy/debian-base.sh [TAG]          (default TAG: localhost/debian-python:bookworm)
#   BASE_IMAGE=localhost/debian-python:bookworm deploy/container-test.sh
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), SUITE (default bookworm),
# CONTAINER_ENGINE (default: the first of docker, podman that answers `info`).
set -euo pipefail
tag="${1:-localhost/debian-python:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite="${SUITE:-bookworm}"
# shellcheck source=deploy/engine.sh
. "${BASH_SOURCE[0]%/*}/engine.sh"
find_engine debian-base
command -v debootstrap >/dev/null 2>&1 || { echo "debian-base: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
root=$(mktemp -d /var/tmp/debian-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "$suite" "$root/rootfs" "$mirror"
rm -rf "$root"/rootfs/var/lib/apt/lists/* "$root"/rootfs/var/cache/apt/*.bin
tar -C "$root/rootfs" -c . | "$engine" import --change 'CMD ["/bin/bash"]' - "$tag"
echo "debian-base: built $tag with $engine"
