# shellcheck shell=bash
# Sourced by the deploy scripts. `find_engine NAME` sets `engine` to the first of
# $CONTAINER_ENGINE (default: docker podman) that answers `info` (a docker command whose daemon
# is not running does not count), or exits 3 saying, as NAME, that nothing was built.
find_engine() {
    local who="$1" candidate unusable=""
    engine=""
    for candidate in ${CONTAINER_ENGINE:-docker podman}; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        if "$candidate" info >/dev/null 2>&1; then
            # shellcheck disable=SC2034  # read by the script that sources this file
            engine="$candidate"
            return 0
        fi
        unusable="$unusable $candidate"
    done
    if [ -n "$unusable" ]; then
        echo "$who: no container engine answers (found but not working:$unusable); nothing was built" >&2
    else
        echo "$who: no container engine (docker or podman) found; nothing was built" >&2
    fi
    exit 3
}
