"""The Python client of the broker (asyncio, picows): the public API, re-exported.

    async with Client("ws://127.0.0.1:7341/") as client:
        sub = await client.subscribe("md.>")
        client.publish("md.AAPL", b"189.5")            # fire-and-forget, batched per tick
        ack = await client.publish_acked("md.AAPL", b"189.6")
        async for message in sub:
            print(message.topic, message.seq, message.data)

The package's map: `protocol` is the sans-I/O core (request ids, the topic table, dispatch,
positions and `since`, the offline queue, frames out), `index` its subscription index,
`subscription` what the application receives (Subscription, Message, Gap), `connection` the
asyncio shell (picows, reconnection, token refresh, heartbeat) and `client` the public
`Client` on it.

The names are imported when first used, so that `import broker.client.protocol` (which the
package's import runs first) loads no asyncio and no picows.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..errors import BrokerError, ConnectionClosed, RequestError, SubscriptionEnded, SubscriptionOverflow
    from ..messages import Request
    from .client import Client
    from .protocol import PublishAck
    from .subscription import Gap, Message, Subscription

# name -> the module that defines it
_HOMES = {
    "Client": ".client",
    "Gap": ".subscription",
    "Message": ".subscription",
    "PublishAck": ".protocol",
    "Request": "..messages",
    "Subscription": ".subscription",
    "RequestError": "..errors",
    "ConnectionClosed": "..errors",
    "SubscriptionOverflow": "..errors",
    "SubscriptionEnded": "..errors",
    "BrokerError": "..errors",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
