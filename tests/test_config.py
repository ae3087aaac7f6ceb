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
