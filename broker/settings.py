"""Where settings come from: a config file's tables, BROKER_* environment variables and
command-line flags, merged over the defaults and validated once (`load`), with the source of
each value (`load_with_sources`, for `broker check-config`); the tables and the flags' help
made from each setting's one description (its field's metadata in broker.config); the error
texts that name a bad value's variable, flag or file key."""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import typing
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from .config import ENV_PREFIX, FIELDS, TABLE_KEY, Config
from .errors import ConfigError

# Tables of a config file, each mapping its keys to settings: `[tls] cert_file` is
# `tls_cert_file` (env BROKER_TLS_CERT_FILE, flag --tls-cert-file), the table named by the
# setting's prefix; [limits] holds the settings described with limit(), under their full names.
# Every setting may also stand at the top level under its full name.
TABLES = ("tls", "auth", "limits", "redis", "admin")


def _metadata() -> dict[str, tuple[str, str]]:
    """{setting: (its description, the table limit() put it in or '')}, read from the fields'
    msgspec.Meta."""
    hints = typing.get_type_hints(Config, include_extras=True)
    out = {}
    for name in FIELDS:
        metas = [m for m in getattr(hints[name], "__metadata__", ()) if isinstance(m, msgspec.Meta)]
        text = "".join(m.description or "" for m in metas)
        table = "".join((m.extra or {}).get(TABLE_KEY, "") for m in metas)
        out[name] = (text, table)
    return out


_METADATA = _metadata()
DESCRIPTIONS: dict[str, str] = {name: text for name, (text, _) in _METADATA.items()}
LIMITS: tuple[str, ...] = tuple(name for name, (_, table) in _METADATA.items() if table == "limits")


def _keys_of(table: str) -> dict[str, str]:
    if table == "limits":
        return {name: name for name in LIMITS}
    return {name[len(table) + 1 :]: name for name in FIELDS if name.startswith(table + "_")}


SECTIONS: dict[str, dict[str, str]] = {table: _keys_of(table) for table in TABLES}


def table_of(name: str) -> str:
    """The config file table setting `name` may stand in besides the top level ('' when none)."""
    return next((table for table, names in SECTIONS.items() if name in names.values()), "")


# The flags' help: the description, after the table the setting may stand in.
HELP: dict[str, str] = {name: (f"[{table_of(name)}] " if table_of(name) else "") + DESCRIPTIONS[name] for name in FIELDS}


def load(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Config:
    """Merge every source and validate once. `flags` holds only the flags actually given."""
    return load_with_sources(flags, environ, config_file)[0]


def load_with_sources(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> tuple[Config, dict[str, str]]:
    """What `load` returns, and where each setting that was given came from (`--port`,
    `BROKER_PORT`, `port in FILE`); settings not in it have their default."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}  # setting -> where its value came from, for error messages
    path = config_file
    if not path and environ.get(ENV_PREFIX + "CONFIG"):
        path = environ[ENV_PREFIX + "CONFIG"]
        try:
            settings, places = read_file(path)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (given as {ENV_PREFIX}CONFIG)") from exc.__cause__
    elif path:
        settings, places = read_file(path)
    if path:
        merged.update(settings)
        origin.update({name: f"{place} in {path}" for name, place in places.items()})
    for name in FIELDS:
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            merged[name] = value
            origin[name] = ENV_PREFIX + name.upper()
    if flags:
        for name, value in flags.items():
            if name in FIELDS:
                merged[name] = value
                origin[name] = "--" + name.replace("_", "-")
    try:
        return msgspec.convert(merged, Config, strict=False), origin
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid setting: {_describe(exc, origin)}") from exc


def with_sources(text: str, origin: Mapping[str, str]) -> str:
    """An error's text with where each setting it names came from, `(NAME given as SOURCE)`,
    for the settings that were given (a default needs no pointer); as it is when it already
    says where its setting came from."""
    if "(given as " in text:
        return text
    named = [name for name in FIELDS if name in origin and re.search(rf"(?<![\w-]){name}(?![\w-])", text)]
    if not named:
        return text
    return text + " (" + "; ".join(f"{name} given as {origin[name]}" for name in named) + ")"


def read_file(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings of a TOML config file, and where in the file each was given (its dotted
    key, e.g. `auth.jwt_secret`). Every key is applied or refused: an unknown key or table, a
    key in a table it does not belong to, or one setting given twice raises a ConfigError
    naming each of them."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    reader = _FileReader()
    reader.level("", data, broker_table=True)
    if reader.problems:
        raise ConfigError(f"config file {path}: " + "; ".join(reader.problems))
    return reader.settings, reader.places


class _FileReader:
    """The layouts of a config file, read at once. At the top level and in a `[broker]` table:
    settings under their full names, and the tables of SECTIONS under their short names
    (`[auth]`, or `[broker.auth]`)."""

    def __init__(self) -> None:
        self.settings: dict[str, Any] = {}
        self.places: dict[str, str] = {}
        self.problems: list[str] = []

    def level(self, prefix: str, items: dict[str, Any], broker_table: bool) -> None:
        for key, value in items.items():
            place = prefix + key
            if key in SECTIONS:
                if isinstance(value, dict):
                    self.table(place, SECTIONS[key], value)
                else:
                    self.problems.append(f"{place} must be a table ([{place}]) of {key} settings, not a value")
            elif key == "broker" and broker_table:
                if isinstance(value, dict):
                    self.level("broker.", value, broker_table=False)
                else:
                    self.problems.append("broker must be a table ([broker]) of settings, not a value")
            elif key in FIELDS:
                self.put(key, value, place)
            elif isinstance(value, dict):
                self.problems.append(f"unknown table [{place}] (the tables are {', '.join(_TABLE_NAMES)})")
            else:
                self.problems.append(f"unknown setting {place}{_hint(key)}")

    def table(self, place: str, names: dict[str, str], items: dict[str, Any]) -> None:
        for key, value in items.items():
            if key in names:
                self.put(names[key], value, f"{place}.{key}")
            elif isinstance(value, dict):
                self.problems.append(f"unknown table [{place}.{key}]: [{place}] holds settings, not tables")
            else:
                self.problems.append(f"unknown setting {place}.{key}: [{place}] has no {key}{_hint(key)}")

    def put(self, name: str, value: Any, place: str) -> None:
        if name in self.places:
            self.problems.append(f"{name} is given twice, as {self.places[name]} and as {place}: give it once")
            return
        self.settings[name] = value
        self.places[name] = place


_TABLE_NAMES = tuple(f"[{name}]" for name in ("broker", *SECTIONS))


def _places_of(name: str) -> str:
    """Where setting `name` may stand in a config file."""
    tables = [f"in [{table}] as {key}" for table, names in SECTIONS.items() for key, full in names.items() if full == name]
    return ", or ".join([f"{name} goes at the top level (or in [broker])", *tables])


def _hint(key: str) -> str:
    """What a key that is not a setting where it stands may have meant."""
    meant = [key] if key in FIELDS else []
    meant += sorted({full for names in SECTIONS.values() for short, full in names.items() if short == key} - {key})
    if meant:
        return f" ({'; '.join(_places_of(name) for name in meant)})"
    close = difflib.get_close_matches(key, FIELDS, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def accepted_values(name: str) -> tuple | None:
    """The values setting `name` may take when they are a fixed set (a Literal), else None."""
    hint = typing.get_type_hints(Config).get(name)
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return None


def _describe(exc: msgspec.ValidationError, origin: Mapping[str, str]) -> str:
    text = str(exc)
    # msgspec says "Expected `int`, got `str` - at `$.port`": lead with the setting's name.
    if " - at `$." in text:
        message, _, where = text.rpartition(" - at `$.")
        name = where.rstrip("`")
        values = accepted_values(name)
        if values is not None:  # "Invalid enum value 'foo'": say which ones are valid
            message += "; accepted: " + ", ".join(str(v) for v in values)
        given = f" (given as {origin[name]})" if name in origin else ""
        return f"{name}: {message}{given}"
    # a rule between settings (Config.__post_init__): point at each setting it names
    return with_sources(text, origin)
