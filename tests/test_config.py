"""Settings: defaults < file < environment < flags, validated once with named errors."""

import re

import msgspec
import pytest

from broker.check import shown
from broker.config import DEFAULT_PORT, FIELDS, Config
from broker.errors import ConfigError
from broker.settings import DESCRIPTIONS, HELP, LIMITS, SECTIONS, load, table_of
from conftest import ROOT


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


@pytest.mark.parametrize(
    "name, value, accepted",
    [
        ("slow_consumer_policy", "foo", "disconnect, drop, conflate"),
        ("log_level", "loud", "debug, info, warning, error"),
        ("log_format", "xml", "text, json"),
        ("shutdown_close_code", "1000", "1001, 1012"),
    ],
)
def test_a_value_outside_a_fixed_set_is_refused_listing_the_accepted_ones(name, value, accepted):
    with pytest.raises(ConfigError, match=re.escape(f"{name}: Invalid enum value") + ".*" + re.escape(f"accepted: {accepted}")):
        load({name: value}, environ={})


@pytest.mark.parametrize(
    "env, named",
    [
        ({"BROKER_PORT": "abc"}, "BROKER_PORT"),
        ({"BROKER_PING_TIMEOUT_S": "100"}, "ping_timeout_s given as BROKER_PING_TIMEOUT_S"),
        ({"BROKER_MAX_PAYLOAD_BYTES": "2000000"}, "max_payload_bytes given as BROKER_MAX_PAYLOAD_BYTES"),
        (
            {"BROKER_ADMIN_API_KEY": "k", "BROKER_ADMIN_API_KEY_FILE": "/etc/hostname"},
            "admin_api_key_file given as BROKER_ADMIN_API_KEY_FILE",
        ),
        ({"BROKER_CONFIG": "/nonexistent/broker.toml"}, "(given as BROKER_CONFIG)"),
    ],
)
def test_a_bad_environment_value_names_its_variable(env, named):
    with pytest.raises(ConfigError) as info:
        load({}, environ=env)
    assert named in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting"):
        load({}, environ={}, config_file=write(tmp_path, "prot = 1\n"))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load({}, environ={}, config_file=write(tmp_path, "port = \n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load({}, environ={}, config_file=str(tmp_path / "missing.toml"))


def test_sections_of_a_config_file_name_their_settings(tmp_path):
    path = tmp_path / "broker.toml"
    path.write_text(
        'port = 9000\n[tls]\ncert_file = "c.pem"\n[auth]\njwt_secret = "s"\nleeway_s = 5\n[limits]\nmax_connections = 7\nmax_frame_bytes = 2000000\n'
    )
    config = load({}, environ={}, config_file=str(path))
    assert (config.port, config.tls_cert_file, config.auth_jwt_secret, config.auth_leeway_s) == (9000, "c.pem", "s", 5.0)
    assert (config.max_connections, config.max_frame_bytes) == (7, 2000000)
    # the environment and flags win over the file, under the settings' full names
    config = load({"max_connections": "9"}, environ={"BROKER_TLS_CERT_FILE": "e.pem", "BROKER_MAX_CONNECTIONS": "8"}, config_file=str(path))
    assert (config.tls_cert_file, config.max_connections) == ("e.pem", 9)
    path.write_text("[auth]\nnot_a_setting = 1\n[limits]\ntls_cert_file = 'x'\n")
    with pytest.raises(ConfigError) as caught:
        load({}, environ={}, config_file=str(path))
    assert "unknown setting auth.not_a_setting: [auth] has no not_a_setting" in str(caught.value)
    assert (
        "unknown setting limits.tls_cert_file: [limits] has no tls_cert_file (tls_cert_file goes at the top level (or in [broker]), or in [tls] as cert_file)"
        in str(caught.value)
    )


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

    from conftest import read_until, serve, stop_process

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


# Every layout of a config file gives the same settings: full names at the top level or in a
# [broker] table, short names in the tables, or any mix of them.
EVERY_TABLE = {
    "port": 9001,
    "tls_cert_file": "c.pem",
    "auth_jwt_secret": "s3cret",
    "max_connections": 7,
    "redis_url": "redis://127.0.0.1:6390",
    "admin_port": 9002,
}
LAYOUTS = {
    "flat": 'port = 9001\ntls_cert_file = "c.pem"\nauth_jwt_secret = "s3cret"\nmax_connections = 7\n'
    'redis_url = "redis://127.0.0.1:6390"\nadmin_port = 9002\n',
    "tables": 'port = 9001\n[tls]\ncert_file = "c.pem"\n[auth]\njwt_secret = "s3cret"\n[limits]\nmax_connections = 7\n'
    '[redis]\nurl = "redis://127.0.0.1:6390"\n[admin]\nport = 9002\n',
    "[broker] beside the tables": '[broker]\nport = 9001\n[tls]\ncert_file = "c.pem"\n[auth]\njwt_secret = "s3cret"\n'
    '[limits]\nmax_connections = 7\n[redis]\nurl = "redis://127.0.0.1:6390"\n[admin]\nport = 9002\n',
    "[broker] with full names": '[broker]\nport = 9001\ntls_cert_file = "c.pem"\nauth_jwt_secret = "s3cret"\n'
    'max_connections = 7\nredis_url = "redis://127.0.0.1:6390"\nadmin_port = 9002\n',
    "tables inside [broker]": '[broker]\nport = 9001\n[broker.tls]\ncert_file = "c.pem"\n[broker.auth]\njwt_secret = "s3cret"\n'
    '[broker.limits]\nmax_connections = 7\n[broker.redis]\nurl = "redis://127.0.0.1:6390"\n[broker.admin]\nport = 9002\n',
    "dotted keys": 'port = 9001\ntls.cert_file = "c.pem"\nauth.jwt_secret = "s3cret"\nlimits.max_connections = 7\n'
    'redis.url = "redis://127.0.0.1:6390"\nbroker.admin.port = 9002\n',
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_of_a_file_applies_every_key(tmp_path, layout):
    config = load({}, environ={}, config_file=write(tmp_path, LAYOUTS[layout]))
    assert {name: getattr(config, name) for name in EVERY_TABLE} == EVERY_TABLE


@pytest.mark.parametrize(
    "text,problem",
    [
        ("[oops]\nport = 1\n", "unknown table [oops] (the tables are [broker], [tls], [auth], [limits], [redis], [admin])"),
        ("[broker.oops]\nport = 1\n", "unknown table [broker.oops]"),
        ("[broker.broker]\nport = 1\n", "unknown table [broker.broker]"),
        ("[tls.auth]\njwt_secret = 'x'\n", "unknown table [tls.auth]: [tls] holds settings, not tables"),
        ("prot = 1\n", "unknown setting prot (did you mean port?)"),
        ("[broker]\nprot = 1\n", "unknown setting broker.prot (did you mean port?)"),
        (
            "jwt_secret = 'x'\n",
            "unknown setting jwt_secret (auth_jwt_secret goes at the top level (or in [broker]), or in [auth] as jwt_secret)",
        ),
        (
            "[auth]\nauth_jwt_secret = 'x'\n",
            "unknown setting auth.auth_jwt_secret: [auth] has no auth_jwt_secret (auth_jwt_secret goes at the top level (or in [broker]), or in [auth] as jwt_secret)",
        ),
        (
            "[redis]\nport = 1\n",
            "unknown setting redis.port: [redis] has no port (port goes at the top level (or in [broker]); admin_port goes at the top level (or in [broker]), or in [admin] as port)",
        ),
        (
            "[limits]\nslow_consumer_timeout_s = 1\n",
            "unknown setting limits.slow_consumer_timeout_s: [limits] has no slow_consumer_timeout_s (slow_consumer_timeout_s goes at the top level (or in [broker]))",
        ),
        ("[broker.auth]\nport = 1\n", "unknown setting broker.auth.port: [broker.auth] has no port"),
        ("broker = 1\n", "broker must be a table ([broker]) of settings, not a value"),
        ("auth = 'on'\n", "auth must be a table ([auth]) of auth settings, not a value"),
        ("[[auth]]\njwt_secret = 'x'\n", "auth must be a table ([auth]) of auth settings, not a value"),
        ("port = 1\n[broker]\nport = 2\n", "port is given twice, as port and as broker.port: give it once"),
        (
            "auth_jwt_secret = 'a'\n[auth]\njwt_secret = 'b'\n",
            "auth_jwt_secret is given twice, as auth_jwt_secret and as auth.jwt_secret: give it once",
        ),
        (
            "[auth]\njwt_secret = 'a'\n[broker.auth]\njwt_secret = 'b'\n",
            "auth_jwt_secret is given twice, as auth.jwt_secret and as broker.auth.jwt_secret: give it once",
        ),
        (
            "[broker]\nadmin_port = 1\n[admin]\nport = 2\n",
            "admin_port is given twice, as broker.admin_port and as admin.port: give it once",
        ),
    ],
)
def test_a_key_a_file_cannot_apply_is_refused_naming_its_table_and_key(tmp_path, text, problem):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load({}, environ={}, config_file=path)
    assert str(caught.value).startswith(f"config file {path}: "), caught.value
    assert problem in str(caught.value)


def test_every_problem_of_a_file_is_named_at_once(tmp_path):
    path = write(tmp_path, "prot = 1\n[broker]\nport = 2\n[auth]\nsecret = 'x'\n[extra]\na = 1\n")
    with pytest.raises(ConfigError) as caught:
        load({}, environ={}, config_file=path)
    text = str(caught.value)
    for name in ("unknown setting prot", "unknown setting auth.secret", "unknown table [extra]"):
        assert name in text, text


def test_a_bad_value_from_a_file_names_where_it_was_given(tmp_path):
    path = write(tmp_path, "[broker]\nport = 1\n[auth]\nleeway_s = 'soon'\n")
    with pytest.raises(ConfigError, match=rf"auth_leeway_s: Expected `float`, got `str` \(given as auth.leeway_s in {path}\)"):
        load({}, environ={}, config_file=path)
    with pytest.raises(ConfigError, match=r"port: .* \(given as BROKER_PORT\)"):
        load({}, environ={"BROKER_PORT": "x"}, config_file=path)
    with pytest.raises(ConfigError, match=r"port: .* \(given as --port\)"):
        load({"port": "x"}, environ={}, config_file=path)


def test_the_tables_of_a_config_file_are_documented_as_they_are():
    text = (ROOT / "docs" / "operations.md").read_text()
    rows = dict(re.findall(r"^\| `\[([a-z]+)\]` \| (.+?) \|", text, re.M))
    documented = {table: re.findall(r"`([a-z_]+)`", keys) for table, keys in rows.items()}
    assert documented == {table: list(names) for table, names in SECTIONS.items()}


def test_every_setting_is_described_once_and_its_help_and_table_come_from_that():
    for name in FIELDS:
        assert DESCRIPTIONS[name] and DESCRIPTIONS[name] == DESCRIPTIONS[name].strip(), name
        table = table_of(name)
        assert HELP[name] == (f"[{table}] " if table else "") + DESCRIPTIONS[name]
    assert LIMITS == tuple(SECTIONS["limits"]) and "max_connections" in LIMITS and "max_frame_bytes" in LIMITS
    assert table_of("tls_cert_file") == "tls" and table_of("port") == ""
    # msgspec's own schema carries the same description
    assert msgspec.json.schema(Config)["$defs"]["Config"]["properties"]["max_topics"]["description"] == DESCRIPTIONS["max_topics"]


def settings_rows() -> list[str]:
    """docs/operations.md's Settings table, as the settings' descriptions make it."""
    defaults = Config()
    rows = []
    for name in FIELDS:
        table = table_of(name)
        rows.append(f"| `{name}` | `{shown(name, getattr(defaults, name))}` | {f'`[{table}]`' if table else ''} | {DESCRIPTIONS[name]} |")
    return rows


def test_the_docs_settings_table_is_every_setting_with_its_description():
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("\n### Settings\n", 1)[1].split("\n## ", 1)[0]
    documented = [line for line in section.splitlines() if line.startswith("| `")]
    assert documented == settings_rows(), "\n".join(settings_rows())
