"""Dead letters on disk: where the router's kept dead letters are written (a JSON line each,
read by `broker dead-letters`), how the file is checked before it is used (it may sit in the
shared temporary directory) and replaced at once; and the part of `Server` that logs new dead
letters and writes the file from its sweep and at shutdown (broker.server.app)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import tempfile

from ..config import Config
from ..router import Router
from . import logs

# Dead letters logged one by one per sweep; the rest are counted in one line.
DEAD_LETTERS_LOGGED = 10


def default_path(port: int, worker: str | None = None) -> str:
    """The default dead-letter file of the broker listening on `port` (of its worker process
    `worker`, with `broker serve --workers`)."""
    suffix = f"-w{worker}" if worker is not None else ""
    return os.path.join(tempfile.gettempdir(), f"broker-dead-letters-{port}{suffix}.jsonl")


def foreign_file(path: str) -> str | None:
    """Why the broker must not use the file at `path` as its own, or None when it may: it
    does not exist, or it is a regular file (not a symbolic link) of the broker's user. The
    default path is in the shared temporary directory, where anyone could have put a file or
    a link there first."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot look at {path}: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != os.geteuid():
        return f"{path} belongs to uid {st.st_uid}, not to this process's user (uid {os.geteuid()})"
    return None


def write_file(path: str, text: str) -> None:
    """Replace the file at `path` with `text` at once (readers see the old or the new one).
    The new file is made with O_EXCL and mode 0600 under a random name beside it, then renamed
    over `path`: a rename replaces a link rather than following it, and in a sticky directory
    such as /tmp it fails on another user's file (the caller checks `foreign_file` first)."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".dead-letters-", dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError:
        logs.log.exception("cannot write the dead-letter file", extra={"fields": {"path": path}})
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# With `broker serve --workers`, worker i numbers its connections from i << CONNECTION_ID_BITS,


class DeadLetters:
    """Dead letters of `Server` (its base class): `write_dead_letters()`, for the sweep and
    shutdown, and `dead_letter_path()`."""

    # what it uses of Server (annotations only: Server.__init__ sets them)
    loop: asyncio.AbstractEventLoop
    config: Config
    router: Router
    port: int | None
    _dead_letters_seen: int
    _dead_letter_refusal: str | None

    def dead_letter_path(self) -> str:
        """Where the kept dead letters are written (`broker dead-letters` reads them)."""
        worker = os.environ.get("BROKER_WORKER_INDEX")  # set by the worker supervisor
        path = self.config.dead_letter_file
        if not path:
            assert self.port is not None  # only written once it listens (by the sweep and stop())
            return default_path(self.port, worker)
        if worker is None:
            return path
        stem, ext = os.path.splitext(path)  # each worker keeps its own file
        return f"{stem}-w{worker}{ext}"

    def write_dead_letters(self) -> None:
        """Log the dead letters that came since the last call (the newest ten of them, then
        how many more) and write the kept ones to the dead-letter file, off the loop."""
        count = self.router.stats.dead_letters
        new = count - self._dead_letters_seen
        if not new:
            return
        self._dead_letters_seen = count
        letters = list(self.router.requests.dead_letters)
        for letter in letters[-min(new, DEAD_LETTERS_LOGGED) :]:
            logs.event(
                logging.WARNING,
                "dead_letter",
                conn=letter.conn,
                peer=letter.peer,
                id=letter.request_id,
                code=letter.code,
                reason=letter.reason,
                head=letter.head,
            )
        if new > DEAD_LETTERS_LOGGED:
            logs.event(logging.WARNING, "dead_letters_not_logged", count=new - DEAD_LETTERS_LOGGED)
        path = self.dead_letter_path()
        refusal = foreign_file(path)
        if refusal is not None:
            if refusal != self._dead_letter_refusal:  # once, not at every sweep
                logs.event(logging.ERROR, "dead_letter_file_refused", path=path, reason=refusal, setting="dead_letter_file")
            self._dead_letter_refusal = refusal
            return
        self._dead_letter_refusal = None
        text = "".join(json.dumps(letter._asdict()) + "\n" for letter in letters)
        self.loop.run_in_executor(None, write_file, path, text)
