"""`broker check-config [FILE]`: the configuration `serve` would run with, each value with its
source, secrets masked; exit 0 when `serve` would start with it, 2 (naming the setting and
where it was given) when it would not."""

from __future__ import annotations

import subprocess

import pytest

from broker.config import FIELDS
from conftest import broker_cli

SECRET = "a-jwt-secret-of-more-than-32-bytes-0123456789"
KEY = "the-admin-key-of-this-test"


def check_config(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = broker_cli("check-config", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=30)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(), err.decode())


def settings_of(report: str) -> dict[str, tuple[str, str]]:
    """{name: (value as printed, source)} of a report's setting lines."""
    out = {}
    for line in report.splitlines():
        if line and not line.startswith("#"):
            left, _, source = line.partition("  # ")
            name, _, value = left.partition(" = ")
            out[name.strip()] = (value.strip(), source.strip())
    return out


def test_every_setting_with_its_source_and_secrets_masked(tmp_path):
    key_file = tmp_path / "admin.key"
    key_file.write_text(KEY + "\n")
    path = tmp_path / "broker.toml"
    path.write_text(
        f'[broker]\nport = 7000\nlog_format = "json"\n[auth]\njwt_secret = "{SECRET}"\n'
        f'[redis]\nurl = "redis://user:hunter2@redis.internal:6379/0"\n[admin]\nport = 7342\napi_key_file = "{key_file}"\n'
    )
    result = check_config(str(path), env={"BROKER_MAX_TOPICS": "5000", "BROKER_WORKERS": "2"})
    assert result.returncode == 0, result.stderr
    shown = settings_of(result.stdout)
    assert set(shown) == set(FIELDS)
    assert shown["port"] == ("7000", f"broker.port in {path}")
    assert shown["auth_jwt_secret"] == ('"***"', f"auth.jwt_secret in {path}")
    assert shown["redis_url"] == ('"redis://***@redis.internal:6379/0"', f"redis.url in {path}")
    assert shown["admin_api_key_file"] == (f'"{key_file}"', f"admin.api_key_file in {path}")
    assert shown["max_topics"] == ("5000", "BROKER_MAX_TOPICS")
    assert shown["workers"] == ("2", "BROKER_WORKERS")
    assert shown["host"] == ('"127.0.0.1"', "default") and shown["reuse_port"] == ("false", "default")
    for secret in (SECRET, KEY, "hunter2"):
        assert secret not in result.stdout + result.stderr
    assert "# checked admin_api_key_file: readable, not empty" in result.stdout
    assert "# checked authentication: on, keys from auth_jwt_secret" in result.stdout
    assert result.stdout.rstrip().endswith("# the configuration is valid")


@pytest.mark.parametrize(
    "text, env, named",
    [
        ("prot = 1\n", {}, "unknown setting prot (did you mean port?)"),
        ('slow_consumer_policy = "fast"\n', {}, "accepted: disconnect, drop, conflate"),
        ("", {"BROKER_PING_TIMEOUT_S": "100"}, "ping_timeout_s given as BROKER_PING_TIMEOUT_S"),
        ('[auth]\njwt_secret_file = "/nonexistent/secret"\n', {}, "auth_jwt_secret_file given as auth.jwt_secret_file in"),
        ('[tls]\ncert_file = "/nonexistent/cert.pem"\n', {}, "tls_cert_file given as tls.cert_file in"),
        (
            '[redis]\nurl = "redis://r:6379"\n',
            {"BROKER_WORKERS": "2", "BROKER_PORT": "0"},
            "port: 0 (a free port) cannot be used with workers > 1",
        ),
    ],
    ids=["unknown-key", "enum", "rule-between-settings", "secret-file", "certificate", "workers"],
)
def test_a_configuration_serve_would_refuse_exits_2_naming_the_setting(tmp_path, text, env, named):
    path = tmp_path / "broker.toml"
    path.write_text(text)
    result = check_config(str(path), env=env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert named in result.stderr and result.stderr.startswith("broker: ")
    assert "# the configuration is valid" not in result.stdout


def test_without_a_file_it_checks_the_environment_and_broker_config(tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text("port = 7100\n")
    result = check_config(env={"BROKER_CONFIG": str(path), "BROKER_ADMIN_API_KEY": KEY})
    assert result.returncode == 0, result.stderr
    shown = settings_of(result.stdout)
    assert shown["port"] == ("7100", f"port in {path}")
    assert shown["admin_api_key"] == ('"***"', "BROKER_ADMIN_API_KEY") and KEY not in result.stdout
