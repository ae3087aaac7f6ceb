"""Command line: `broker serve`, `pub`, `sub`, `health`, `check-config`, `dead-letters` (also `python -m broker`)."""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import ssl
import sys
import time
import tomllib
import traceback
from collections.abc import Coroutine, Sequence
from typing import Any

from . import __version__
from .config import DEFAULT_PORT, FIELDS, SECRET_FLAGS, Config, url_password
from .errors import BrokerError, ConfigError
from .settings import HELP, load, load_with_sources, with_sources

DEFAULT_URL = f"ws://127.0.0.1:{DEFAULT_PORT}/"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="broker", description="Binary publish/subscribe broker for WebSocket clients.")
    parser.add_argument("--version", action="version", version=f"broker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the broker",
        description="Run the broker. Every setting can also come from BROKER_<NAME> in the environment "
        "or from a TOML file (--config); flags win over the environment, which wins over the file.",
        argument_default=argparse.SUPPRESS,
    )
    serve.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with settings: full names at the top level or in [broker], short names in [tls], [auth], [limits], [redis], [admin] (docs/operations.md)",
    )
    defaults = Config()
    for name in FIELDS:
        default = getattr(defaults, name)
        serve.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            metavar=name.upper(),
            help=f"{HELP[name]} (default {default!r}, env {('BROKER_' + name.upper())})",
        )

    pub = commands.add_parser("pub", help="publish one message (or one per line of stdin)")
    pub.add_argument("topic")
    pub.add_argument("data", nargs="?", help="payload as text; without it, each stdin line is a message")
    pub.add_argument("--url", default=DEFAULT_URL, help=f"broker URL (default {DEFAULT_URL})")
    pub.add_argument("--hex", action="store_true", help="DATA (or each line) is hex, not text")
    pub.add_argument("--cafile", metavar="FILE", help="PEM file of the CA(s) to trust for a wss:// URL (default: the system's)")

    sub = commands.add_parser("sub", help="print messages of a topic or pattern, one per line")
    sub.add_argument("pattern")
    sub.add_argument("--url", default=DEFAULT_URL, help=f"broker URL (default {DEFAULT_URL})")
    sub.add_argument("--json", action="store_true", help="print JSON lines")
    sub.add_argument("--count", type=int, default=0, help="exit after this many messages (default: run until stopped)")
    sub.add_argument("--cafile", metavar="FILE", help="PEM file of the CA(s) to trust for a wss:// URL (default: the system's)")

    health = commands.add_parser(
        "health",
        help="check that a broker answers on its admin port (exit 0 when it does)",
        description="GET the admin server's /healthz (or /readyz with --ready) and exit 0 on 200, 1 otherwise; "
        "for container health checks and scripts. Without --url the admin port comes from the same settings "
        "as `broker serve` (BROKER_ADMIN_PORT, --config).",
    )
    health.add_argument("--url", help="the admin server's base URL, e.g. http://127.0.0.1:7342 (default: from the settings)")
    health.add_argument(
        "--ready", action="store_true", help="check /readyz (listening, and the backplane takes publishes) instead of /healthz"
    )
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    health.add_argument("--config", metavar="FILE", help="TOML file with settings, as for `broker serve`")

    demo = commands.add_parser(
        "demo",
        help="run a broker with a synthetic market-data publisher and a page that shows it",
        description="Start a broker, a publisher of synthetic market data (md.EXCHANGE.SYMBOL, each instrument at its own "
        "tick rate) and a small web page using the TypeScript client (clients/js): ticking prices, the connection's "
        "state, gaps, and a switch that takes the page offline. Nothing is loaded from the internet.",
    )
    demo.add_argument("--host", default="127.0.0.1", help="address of the broker and the page (default 127.0.0.1)")
    demo.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the broker's port (default {DEFAULT_PORT})")
    demo.add_argument("--http-port", type=int, default=8080, help="the page's port (default 8080; 0: any free one)")
    demo.add_argument("--symbols", type=int, default=300, help="instruments published (default 300)")
    demo.add_argument("--client-dir", help="the TypeScript client's folder (default: clients/js of this checkout)")

    check = commands.add_parser(
        "check-config",
        help="print the configuration `broker serve` would run with, and check it (exit 2 when it would not start)",
        description="Print every setting `broker serve` would run with, one line each as TOML, with where its value came "
        "from (default, BROKER_<NAME> in the environment, or the key in FILE) and secrets masked; then check what `serve` "
        "checks before it listens (values, secret files, token keys, TLS certificate). Exit 0 when valid, 2 otherwise.",
    )
    check.add_argument("file", nargs="?", metavar="FILE", help="TOML config file (default: BROKER_CONFIG, or none)")

    dead = commands.add_parser(
        "dead-letters",
        help="print the client messages a local broker could not process",
        description="Print the dead letters a broker on this machine kept (the newest, written at most once a second): "
        "when, from which connection, request id, error code and reason, and the first bytes of the message in hex.",
    )
    dead.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the broker's port, for its default file (default {DEFAULT_PORT})")
    dead.add_argument("--file", help="the broker's dead_letter_file, when it set one")
    dead.add_argument("--json", action="store_true", help="print the JSON lines as they are")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "pub":
            return _run(_pub(args))
        if args.command == "dead-letters":
            return _dead_letters(args)
        if args.command == "health":
            return _health(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "check-config":
            return _check_config(args)
        return _run(_sub(args))
    except ConfigError as exc:
        return _fatal(args, str(exc), 2)
    except BrokerError as exc:
        return _fatal(args, str(exc), 1)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if args.command != "serve" or _log_format(args) != "json":
            raise
        return _fatal(args, f"{type(exc).__name__}: {exc}", 1, traceback.format_exc())


def _fatal(args: argparse.Namespace, text: str, code: int, trace: str = "") -> int:
    """Say why the command stops, on stderr, and return its exit code: `broker: TEXT`, or for
    `serve` with log_format json, one JSON line as the broker's log has them (event `fatal`),
    so that a log pipeline reading JSON sees it."""
    if args.command == "serve" and _log_format(args) == "json":
        line = {"ts": time.time(), "level": "error", "event": "fatal", "error": text, "exit_code": code}
        if trace:
            line["exception"] = trace
        print(json.dumps(line), file=sys.stderr, flush=True)
    else:
        print(f"broker: {text}", file=sys.stderr)
    return code


def _log_format(args: argparse.Namespace) -> str:
    """The log_format `serve` was given (flag, environment, then config file), read without
    validating the rest: the settings may be what failed."""
    flag = getattr(args, "log_format", None)
    if flag:
        return str(flag)
    env = os.environ.get("BROKER_LOG_FORMAT")
    if env:
        return env
    path = getattr(args, "config", None) or os.environ.get("BROKER_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                data = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError):
            return "text"
        table = data.get("broker")
        value = data.get("log_format") or (table.get("log_format") if isinstance(table, dict) else None)
        if isinstance(value, str):
            return value
    return "text"


def _new_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _run(coro: Coroutine[Any, Any, int]) -> int:
    _new_loop_policy()
    return asyncio.run(coro)


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .demo import CLIENT_DIR, run_demo

    if args.symbols < 1:
        raise ConfigError("--symbols: at least 1")
    config = load({"host": args.host, "port": args.port, "log_level": "warning"}, environ={})
    client_dir = Path(args.client_dir) if args.client_dir else CLIENT_DIR

    async def main() -> None:
        import signal

        task = asyncio.ensure_future(run_demo(config, args.host, args.http_port, args.symbols, client_dir))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):  # stop gracefully: clients are told 1001
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass

    _new_loop_policy()
    try:
        asyncio.run(main())
    except OSError as exc:
        raise BrokerError(f"cannot run the demo: {exc}") from exc
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .cluster import supervisor
    from .server import logs, run

    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    config_file = getattr(args, "config", None)
    config, sources = load_with_sources(flags, config_file=config_file)
    try:
        if config.workers > 1:  # a supervisor of worker processes, each a server of its own
            supervisor.check(config)
            logs.setup(config.log_level, config.log_format)
            _warn_secret_flags(flags)
            return supervisor.serve(config, flags, config_file)
        logs.setup(config.log_level, config.log_format)
        _warn_secret_flags(flags)
        index = os.environ.get(supervisor.WORKER_INDEX_ENV)
        if index:  # a worker started by a supervisor
            supervisor.label_logs(index)
        role = supervisor.role_from_environ(os.environ)
        _new_loop_policy()
        asyncio.run(run(config, role))  # a port it cannot listen on raises ListenError (exit 1)
    except ConfigError as exc:  # a file a setting names, a key, a secret: say where it was given
        raise ConfigError(with_sources(str(exc), sources)) from exc
    return 0


def _warn_secret_flags(flags: dict[str, Any]) -> None:
    """A secret given as a flag is in /proc/PID/cmdline, which every user of the machine can
    read: say so, once, at the start (the value is not logged)."""
    import logging

    from .server import logs

    for name in SECRET_FLAGS:
        value = flags.get(name)
        if value and (name != "redis_url" or url_password(str(value))):
            logs.event(
                logging.WARNING,
                "secret_on_command_line",
                setting=name,
                advice=f"every user of this machine can read command lines (ps, /proc/PID/cmdline); use {name.replace('redis_url', 'redis_password')}_file",
            )


def _check_config(args: argparse.Namespace) -> int:
    from . import check

    code, text, error = check.run(args.file)
    if text:
        print(text)
    if error:
        print(f"broker: {error}", file=sys.stderr)
    return code


def _health(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    url = args.url
    if url is None:
        config = load({}, config_file=args.config)
        if not config.admin_port:
            raise ConfigError("admin_port is 0: the admin server is off (set BROKER_ADMIN_PORT, or pass --url)")
        host = config.admin_host if config.admin_host not in ("", "0.0.0.0", "::") else "127.0.0.1"
        url = f"http://{'[' + host + ']' if ':' in host else host}:{config.admin_port}"
    if not url.lower().startswith(("http://", "https://")):
        raise ConfigError(f"--url must start with http:// or https://, not {url!r}")
    if args.timeout <= 0:
        raise ConfigError("--timeout must be more than 0")
    target = url.rstrip("/") + ("/readyz" if args.ready else "/healthz")
    try:
        with urllib.request.urlopen(target, timeout=args.timeout) as response:
            status, body = response.status, response.read(4096)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(4096)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        print(f"broker: {target}: no answer ({reason})", file=sys.stderr)
        return 1
    text = body.decode("utf-8", "replace").strip()
    print(f"{target}: {status} {text}")
    return 0 if status == 200 else 1


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Client options of `pub` and `sub`: with --cafile, the SSL context that trusts it."""
    if args.cafile is None:
        return {}
    if args.url[:6].lower() != "wss://":
        raise ConfigError(f"--cafile is for wss:// URLs, not {args.url}")
    try:
        return {"ssl": ssl.create_default_context(cafile=args.cafile)}
    except ssl.SSLError:
        raise ConfigError(f"--cafile: {args.cafile} holds no PEM CA certificate (-----BEGIN CERTIFICATE-----)") from None
    except OSError as exc:
        raise ConfigError(f"--cafile: cannot read {args.cafile}: {exc.strerror or exc}") from None


async def _pub(args: argparse.Namespace) -> int:
    from .client import Client

    def payload(text: str) -> bytes:
        if args.hex:
            try:
                return bytes.fromhex(text)
            except ValueError as exc:
                raise BrokerError(f"not hex: {text!r}") from exc
        return text.encode()

    async with Client(args.url, **_client_options(args)) as client:
        if args.data is not None:
            ack = await client.publish_acked(args.topic, payload(args.data))
            print(f"{args.topic} seq={ack.seq}")
            return 0
        loop = asyncio.get_running_loop()
        last = None
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            last = await client.publish_acked(args.topic, payload(line.rstrip("\n")))
        if last is not None:
            print(f"{args.topic} seq={last.seq}")
    return 0


def _show(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return data.hex()
    return text if text.isprintable() else data.hex()


async def _sub(args: argparse.Namespace) -> int:
    from .client import Client, Gap
    from .messages import position_json

    seen = 0
    async with Client(args.url, **_client_options(args)) as client:
        sub = await client.subscribe(args.pattern)
        print(f"subscribed to {args.pattern}", file=sys.stderr, flush=True)
        async for message in sub:
            if isinstance(message, Gap):
                print(
                    f"gap {message.topic} epoch={message.epoch} {message.first}-{message.last or 'end'}: {message.reason}",
                    file=sys.stderr,
                    flush=True,
                )
                continue
            if args.json:
                try:
                    text = message.data.decode("utf-8")
                    field = {"text": text}
                except UnicodeDecodeError:
                    field = {"hex": message.data.hex()}
                line = json.dumps({"topic": message.topic, **position_json(message.epoch, message.seq), **field})
            else:
                line = f"{message.topic} {message.seq} {_show(message.data)}"
            print(line, flush=True)
            seen += 1
            if args.count and seen >= args.count:
                break
    return 0


def _dead_letters(args: argparse.Namespace) -> int:
    from .server.deadletters import default_path, foreign_file

    path = args.file or default_path(args.port)
    paths = [path]
    if not os.path.lexists(path):  # with --workers, each worker process keeps its own file
        stem, ext = os.path.splitext(path)
        paths = sorted(glob.glob(f"{glob.escape(stem)}-w*{ext}")) or paths
    lines = []
    for path in paths:
        if not args.file:
            # the default path is in the shared temporary directory: read only a file of
            # this user's, never one another user put there (or a link to somewhere else)
            refusal = foreign_file(path)
            if refusal is not None:
                raise BrokerError(
                    f"not reading {refusal}; the broker writes its own file there (run this as its user, or name the file with --file)"
                )
        try:
            fd = os.open(path, os.O_RDONLY | (0 if args.file else os.O_NOFOLLOW))
            with open(fd, encoding="utf-8") as fh:
                lines += [(path, line) for line in fh.read().splitlines()]
        except FileNotFoundError:
            print(f"no dead letters: {path} does not exist (none kept yet, or another port or file)", file=sys.stderr)
            return 0
        except OSError as exc:
            raise BrokerError(f"cannot read {path}: {exc.strerror or exc}") from exc
    for path, line in lines:
        if args.json:
            print(line)
            continue
        try:
            letter = json.loads(line)
            when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(letter["time"]))
            print(
                f"{when}Z conn={letter['conn']} peer={letter['peer']} id={letter['request_id']} code={letter['code']} {letter['reason']!r} head={letter['head']}"
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise BrokerError(f"{path} is not a dead-letter file: {exc}") from exc
    return 0
