"""broker: a binary publish/subscribe broker for WebSocket clients."""

__version__ = "0.1.0"
