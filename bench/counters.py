"""Delivered-message totals shared between processes without messages: one float64 slot per
subscriber process in a small file under /dev/shm, written by its owner after each receive
(a Bun fleet through Bun.mmap, a Python subscriber through mmap) and summed by the publisher."""

from __future__ import annotations

import mmap
import os
import tempfile


class Counters:
    def __init__(self, path: str, slots: int) -> None:
        self.path = path
        self.slots = slots
        with open(path, "r+b") as fh:
            self._map = mmap.mmap(fh.fileno(), slots * 8)
        self.view = memoryview(self._map).cast("d")

    @classmethod
    def create(cls, slots: int) -> Counters:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
        fd, path = tempfile.mkstemp(prefix="bench-counters-", dir=folder)
        os.write(fd, bytes(slots * 8))
        os.close(fd)
        return cls(path, slots)

    def total(self) -> float:
        return sum(self.view)

    def unlink(self) -> None:
        """Remove the file; mappings made before stay valid (call it once every process has one)."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self, remove: bool = False) -> None:
        self.view.release()
        self._map.close()
        if remove:
            self.unlink()
