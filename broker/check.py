"""`broker check-config [FILE]`: the effective configuration `broker serve` would run with.

Every setting, one line each, in TOML form with where its value came from (`default`, a flag,
an environment variable, or the key in the file), secrets masked; then the checks `serve` makes
before it listens: the values (types, ranges, rules between settings), the secret files, the
token keys and the TLS certificate. Nothing listens and nothing connects (Redis is not asked).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .config import FIELDS, SECRETS, Config, read_secret
from .errors import ConfigError
from .settings import load_with_sources, with_sources

MASK = "***"  # as the start line shows a Redis URL's password


def shown(name: str, value: Any) -> str:
    """A setting's value as the report shows it: TOML, a secret masked (the value of a secret
    setting; the password of a Redis URL), never the secret itself."""
    if name in SECRETS and value:
        return json.dumps(MASK)
    if name == "redis_url" and value:
        from .cluster.streams import without_password

        value = without_password(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def report(config: Config, sources: Mapping[str, str]) -> list[str]:
    """One line per setting: `name = value  # source`, the columns aligned."""
    cells = [(f"{name} = {shown(name, getattr(config, name))}", sources.get(name, "default")) for name in FIELDS]
    width = max(len(left) for left, _ in cells)
    return [f"{left.ljust(width)}  # {source}" for left, source in cells]


def check(config: Config) -> list[str]:
    """What `serve` checks before it listens, beyond the values themselves: the secret files
    are readable and not empty, the token keys load, the TLS certificate and key load, a group
    of workers can share the port. Returns what was checked; raises ConfigError naming the
    setting that fails."""
    from .auth import Authenticator
    from .cluster.supervisor import check as check_workers

    done = []
    for name in (*SECRETS, "redis_password"):
        if read_secret(config, name) and getattr(config, name + "_file"):
            done.append(f"{name}_file: readable, not empty")
    keys = Authenticator(config).key_settings()
    done.append(f"authentication: {'on, keys from ' + ', '.join(keys) if keys else 'off (anyone may connect, subscribe and publish)'}")
    if config.tls_cert_file:
        from .server import tls

        _, certificate = tls.server_context(config)
        done.append(f"tls: {certificate.cert_file} loads (sha256 {certificate.sha256})")
    check_workers(config)
    return done


def run(config_file: str | None, environ: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """(exit code, report, error): 0 and the report when `serve` would start with these
    settings, 2 and the error (naming the setting and where it came from) when it would not."""
    try:
        config, sources = load_with_sources({}, environ, config_file)
    except ConfigError as exc:
        return 2, "", str(exc)
    lines = report(config, sources)
    try:
        checked = check(config)
    except ConfigError as exc:
        return 2, "\n".join(lines), with_sources(str(exc), sources)
    lines += ["", *(f"# checked {item}" for item in checked), "# the configuration is valid"]
    return 0, "\n".join(lines), ""
