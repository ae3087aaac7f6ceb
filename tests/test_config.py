"""Settings: defaults < file < environment < flags, validated once with named errors."""

import pytest

from broker.config import DEFAULT_PORT, Config, load
from broker.errors import ConfigError


def write(tmp_path, text):
    path = tmp_path / "broker.toml"
    path.write_text(text)
    return str(path)


def test_defaults():
    config = load({}, environ={})
    assert config == Config()
    assert config.port == DEFAULT_PORT and config.host == "127.0.0.1"


def test_precedence(tmp_path):
    path = write(tmp_path, "port = 1001\nhost = '0.0.0.0'\nmax_subscriptions = 5\n")
    env = {"BROKER_PORT": "1002", "BROKER_MAX_SUBSCRIPTIONS": "6"}
    config = load({"port": "1003"}, environ=env, config_file=path)
    assert (config.port, config.max_subscriptions, config.host) == (1003, 6, "0.0.0.0")
    assert load({}, environ=env, config_file=path).port == 1002
    assert load({}, environ={}, config_file=path).port == 1001
    assert load({}, environ={"BROKER_CONFIG": path}).port == 1001


def test_broker_table_in_file(tmp_path):
    assert load({}, environ={}, config_file=write(tmp_path, "[broker]\nport = 9\n")).port == 9


@pytest.mark.parametrize(
    "flags,env,needle",
    [
        ({"port": "x"}, {}, "port"),
        ({}, {"BROKER_PORT": "70000"}, "port"),
        ({"max_pending_bytes": "0"}, {}, "max_pending_bytes"),
        ({"log_level": "loud"}, {}, "log_level"),
        ({"ping_timeout_s": "50"}, {}, "ping_timeout_s"),
        ({"path": "nope"}, {}, "path"),
        ({"max_payload_bytes": str(2 << 20)}, {}, "max_payload_bytes"),
    ],
)
def test_invalid_settings_name_the_setting(flags, env, needle):
    with pytest.raises(ConfigError, match=needle):
        load(flags, environ=env)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting"):
        load({}, environ={}, config_file=write(tmp_path, "prot = 1\n"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load({}, environ={}, config_file=write(tmp_path, "port = \n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load({}, environ={}, config_file=str(tmp_path / "missing.toml"))


def test_sections_of_a_config_file_name_their_settings(tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text('port = 9000\n[tls]\ncert_file = "c.pem"\n[auth]\njwt_secret = "s"\nleeway_s = 5\n[limits]\nmax_connections = 7\nmax_frame_bytes = 2000000\n')
    config = load({}, environ={}, config_file=str(path))
    assert (config.port, config.tls_cert_file, config.auth_jwt_secret, config.auth_leeway_s) == (9000, "c.pem", "s", 5.0)
    assert (config.max_connections, config.max_frame_bytes) == (7, 2000000)
    # the environment and flags win over the file, under the settings' full names
    config = load({"max_connections": "9"}, environ={"BROKER_TLS_CERT_FILE": "e.pem", "BROKER_MAX_CONNECTIONS": "8"}, config_file=str(path))
    assert (config.tls_cert_file, config.max_connections) == ("e.pem", 9)
    path.write_text("[auth]\nnot_a_setting = 1\n[limits]\ntls_cert_file = 'x'\n")
    with pytest.raises(ConfigError, match="auth.not_a_setting, limits.tls_cert_file"):
        load({}, environ={}, config_file=str(path))


# secrets: each may come from a file, so that none needs a flag or an environment variable


def test_every_secret_has_a_file_variant_read_once_with_its_line_break_dropped(tmp_path):
    from broker.config import SECRETS, read_secret

    for name in SECRETS:
        path = tmp_path / name
        path.write_text("a-secret-value-of-some-length-0123456789\n")
        config = load({f"{name}_file": str(path)}, environ={})
        assert read_secret(config, name) == "a-secret-value-of-some-length-0123456789"
        assert read_secret(load({name: "given"}, environ={}), name) == "given"
        with pytest.raises(ConfigError, match=f"set {name} or {name}_file, not both"):
            load({name: "x", f"{name}_file": str(path)}, environ={})
        path.write_text("\n")
        with pytest.raises(ConfigError, match=f"{name}_file: .* is empty"):
            read_secret(config, name)
        with pytest.raises(ConfigError, match=f"{name}_file: cannot read .*missing"):
            read_secret(load({f"{name}_file": str(tmp_path / "missing")}, environ={}), name)
    path = tmp_path / "redis-password"
    path.write_text("pw\r\n")
    config = load({"redis_url": "redis://broker@127.0.0.1:6379", "redis_password_file": str(path)}, environ={})
    assert read_secret(config, "redis_password") == "pw"
    assert read_secret(load({}, environ={}), "redis_password") == ""
    with pytest.raises(ConfigError, match="redis_password_file is set and redis_url holds a password too"):
        load({"redis_url": "redis://broker:other@127.0.0.1:6379", "redis_password_file": str(path)}, environ={})


def test_a_secret_given_as_a_flag_is_warned_about_without_its_value(tmp_path):
    import signal

    from test_shutdown_cli import read_until, serve, stop_process

    secret = "a-secret-value-of-32-bytes-or-more!"
    key_file = tmp_path / "admin-key"
    key_file.write_text("an-admin-key-kept-in-a-file\n")
    proc = serve("--port", "0", "--auth-jwt-secret", secret, "--admin-api-key-file", str(key_file), "--log-level", "info")
    try:
        text = read_until(proc, "event=start ")
        proc.send_signal(signal.SIGTERM)
        text += proc.communicate(timeout=15)[1].decode()
    finally:
        stop_process(proc)
    warnings = [line for line in text.splitlines() if "event=secret_on_command_line" in line]
    assert len(warnings) == 1 and "setting=auth_jwt_secret " in warnings[0] and "use auth_jwt_secret_file" in warnings[0], text
    assert secret not in text and "an-admin-key" not in text
