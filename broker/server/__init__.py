"""The WebSocket server shell: picows + uvloop around the sans-I/O core."""

from .app import Server, run

__all__ = ["Server", "run"]
