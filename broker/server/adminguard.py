"""Who may ask the admin port (broker.server.admin; the supervisor's, broker.cluster.group_admin,
applies the same rule): health answers anyone; everything else wants a Host naming this server
(DNS rebinding sends another name) and the key; errors are JSON with a reason; what aiohttp
would log about a malformed request is one bounded line of the audit log (RequestLog)."""

from __future__ import annotations

import hmac
import ipaddress
import sys
from collections.abc import Iterable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..config import host_key

# Answered to anyone: they tell whether the process lives and is ready, nothing about traffic.
HEALTH = frozenset({"/healthz", "/readyz"})
# The dashboard's page and script: static, no data in them; a browser loads them without the
# key, which the operator then gives the page (it sends it with its requests for data).
PAGE = frozenset({"/dashboard", "/dashboard/", "/dashboard/dashboard.js"})
# Host names every admin server answers to besides its own: IP addresses are always accepted
# (a page cannot have one as its name and make it resolve elsewhere).
LOOPBACK_NAMES = frozenset({"localhost"})
# Longest part of a refused Host header, or of a malformed request's error, quoted back or logged.
SHOWN = 100


async def guard(request: web.Request, handler, key: bytes, hosts: frozenset[str] | None) -> web.StreamResponse:
    """The rule of every admin server (one process's, a worker's, the supervisor's): health
    answers anyone; everything else wants a Host of this server (`hosts`; None: any) and the
    key (the dashboard's static page and script only the Host). Every error is JSON with a
    reason."""
    path = request.path
    if path not in HEALTH:
        if hosts is not None:
            host = request.headers.get("Host")
            if not host_allowed(host, hosts):
                shown = "no Host header" if host is None else f"Host {host[:SHOWN]!r}"
                return json_error(403, f"{shown} is not a name of this admin server (admin_allowed_hosts)")
        if not key:
            return json_error(
                404, "only /healthz and /readyz answer without admin_api_key: set it to turn on /metrics, the dashboard and the API"
            )
        if path not in PAGE:
            given = request.headers.get("Authorization", "")
            if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), key):
                return json_error(401, "this endpoint wants Authorization: Bearer <admin_api_key>", {"WWW-Authenticate": "Bearer"})
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason)


def json_error(status: int, text: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": text}, status=status, headers=headers)


def allowed_hosts(admin_host: str, names_given: Iterable[str]) -> frozenset[str]:
    """The host names (lower case, no port) the admin server answers to, besides IP addresses:
    localhost, `admin_host` when it is a name, and `admin_allowed_hosts` as the config parsed
    it (Config.admin_host_names; `*` in it: any name)."""
    names = set(LOOPBACK_NAMES)
    names.update(names_given)
    if admin_host:
        names.add(host_key(admin_host))
    return frozenset(names)


def host_allowed(host: str | None, names: frozenset[str]) -> bool:
    """True when a Host header names this server: an IP address (v4, or v6 in brackets), or one
    of `names` (with or without a port, in any case, with or without a final dot)."""
    if host is None:
        return False
    value = host.strip()
    if value.startswith("["):  # [v6]:port
        literal, sep, rest = value[1:].partition("]")
        if not sep or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return False
        return _is_address(literal)
    name, sep, port = value.rpartition(":")
    if not sep:
        name = value
    elif not port.isdigit():
        return False
    name = host_key(name)
    return bool(name) and (_is_address(name) or name in names or "*" in names)


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class RequestLog:
    """The logger aiohttp is given for the admin server. aiohttp logs every request it cannot
    parse or answer with a traceback (a dozen lines); here each is one `admin_request_failed`
    line of the audit log (broker.audit.AuditLog: at most a few lines per address and per
    second, the rest counted), with the address, the status and the first line of the reason.
    aiohttp's debug lines (bytes that are not HTTP at all) are left out."""

    def __init__(self, audit) -> None:
        self.audit = audit

    def exception(self, message: str, *args, exc_info=None, **kwargs) -> None:
        self._line(message, args, exc_info)

    def error(self, message: str, *args, exc_info=None, **kwargs) -> None:
        self._line(message, args, exc_info)

    def warning(self, message: str, *args, exc_info=None, **kwargs) -> None:
        self._line(message, args, exc_info)

    def info(self, message: str, *args, **kwargs) -> None:
        return None

    def debug(self, message: str, *args, **kwargs) -> None:
        return None

    def _line(self, message: str, args: tuple, exc_info) -> None:
        # "Error handling request from %s" names the peer; other messages name none
        peer = str(args[0]) if args and "%s" in message else ""
        exc = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1] if exc_info else None
        if isinstance(exc, HttpProcessingError):  # the request could not be parsed: 400, 413, ...
            status, text = exc.code, exc.message or str(exc)
        elif exc is not None:  # a handler failed: 500
            status, text = 500, f"{type(exc).__name__}: {exc}"
        else:
            status, text = 500, message.replace("%s", "").strip()
        lines = str(text).splitlines()
        reason = (lines[0] if lines else "")[:SHOWN]
        self.audit.record(("admin", peer), "admin_request_failed", {"peer": peer}, peer=peer, status=status, reason=reason)
