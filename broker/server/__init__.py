"""The WebSocket server shell: the broker's own RFC 6455 server side on uvloop, around the sans-I/O core."""

from .app import Server, run

__all__ = ["Server", "run"]
