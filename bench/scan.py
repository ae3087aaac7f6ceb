"""Builds and loads the compiled frame scanner (bench/_scan.pyx) on first import."""

import pyximport

pyximport.install(language_level=3, inplace=False)

from ._scan import BROKER, FRAMES, NATS, Scanner  # noqa: E402

__all__ = ["BROKER", "FRAMES", "NATS", "Scanner"]
