"""Selects the hot-path implementation: the compiled `_fastpath` when it is built, otherwise the
pure-Python `_fastpath_py`. Set BROKER_PURE_PYTHON=1 to force the pure one.

`IMPLEMENTATION` is "cython" or "python"."""

from __future__ import annotations

import os

if os.environ.get("BROKER_PURE_PYTHON", "").strip().lower() in ("1", "true", "yes", "on"):
    from . import _fastpath_py as _impl

    IMPLEMENTATION = "python"
else:
    try:
        from . import _fastpath as _impl  # type: ignore[no-redef]

        IMPLEMENTATION = "cython"
    except ImportError:
        from . import _fastpath_py as _impl  # type: ignore[no-redef]

        IMPLEMENTATION = "python"

frame_header = _impl.frame_header
encode_frame = _impl.encode_frame
batch_prefix = _impl.batch_prefix
encode_batch = _impl.encode_batch
Outbox = _impl.Outbox
fan_out = _impl.fan_out
TopicState = _impl.TopicState
stamp = _impl.stamp
fast_publish = _impl.fast_publish

__all__ = [
    "IMPLEMENTATION",
    "Outbox",
    "batch_prefix",
    "encode_batch",
    "encode_frame",
    "fan_out",
    "fast_publish",
    "frame_header",
    "stamp",
    "TopicState",
]
