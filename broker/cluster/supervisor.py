"""`broker serve --workers N`: a supervisor process and N worker processes sharing the port.

The supervisor serves nothing itself. It starts each worker as

    python -m broker serve <the flags it was given, without --workers and --reuse-port>

with these in the worker's environment:

    BROKER_WORKERS=1        the worker is a plain single server (env wins over the file)
    BROKER_REUSE_PORT=true  it listens with SO_REUSEPORT, so the N workers share the port
    BROKER_WORKER_INDEX=i   0 ... N-1: its place; every log line of the worker carries worker=i

`--config FILE` (or BROKER_CONFIG) reaches the workers as it is. The workers are joined
through redis_url, which is why workers > 1 needs it.

The supervisor restarts a worker that exits while the supervisor is not shutting down, after
a backoff: 0.5 s, doubled for each exit in a row up to 10 s, back to 0.5 s once the worker
ran for 30 s. A worker that exits with code 2 (a configuration error) within 5 s of its start
would only fail again: the supervisor stops the others and exits 2. SIGHUP is passed on to
every worker (each reloads). SIGTERM or SIGINT sends SIGTERM to every worker, waits up to
shutdown_timeout_s + 5 s, SIGKILLs the ones still running and exits 0, or 1 if a worker had
to be killed or exited with an error. On Linux a worker gets SIGTERM when its supervisor dies,
so workers never outlive it.

A plain blocking loop: it sleeps in select() on the signals' wakeup pipe (SIGCHLD wakes it
when a worker exits) until the next restart is due.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..config import Config
from ..errors import ConfigError
from ..server import logs

WORKER_INDEX_ENV = "BROKER_WORKER_INDEX"
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
STABLE_S = 30.0  # a worker that ran this long is restarted after FIRST_BACKOFF_S again
START_WINDOW_S = 5.0  # exit code 2 this soon after a start is a configuration error: stop
KILL_GRACE_S = 5.0  # waited after shutdown_timeout_s before SIGKILL
EXIT_CONFIG = 2
# Exit statuses of a worker that stopped as asked: it finished its graceful shutdown (0), or
# the signal ended it before it installed its handlers (still starting: -SIGTERM, or SIGINT
# from a terminal, which the command line turns into 130).
STOPPED = frozenset({0, -signal.SIGTERM, -signal.SIGINT, 130})
# Flags not passed on: the environment sets them for the workers (a flag would win over it).
NOT_PASSED_ON = ("workers", "reuse_port")


def check(config: Config) -> None:
    """What workers > 1 needs beyond Config's own validation (which requires redis_url)."""
    if config.workers > 1 and config.port == 0:
        raise ConfigError(
            "invalid setting: port: 0 (a free port) cannot be used with workers > 1: each worker process "
            "would pick a port of its own; give a fixed port"
        )


def worker_command(flags: Mapping[str, Any], config_file: str | None) -> list[str]:
    """The command line of a worker: the supervisor's `serve` flags without --workers and
    --reuse-port, each as --name=value (values starting with '-' stay values)."""
    command = [sys.executable, "-m", "broker", "serve"]
    if config_file:
        command.append(f"--config={config_file}")
    for name, value in flags.items():
        if name not in NOT_PASSED_ON:
            command.append(f"--{name.replace('_', '-')}={value}")
    return command


def worker_environ(index: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    env.update({"BROKER_WORKERS": "1", "BROKER_REUSE_PORT": "true", WORKER_INDEX_ENV: str(index)})
    return env


def label_logs(index: str) -> None:
    """Add worker=INDEX to every log line of this process (a worker started by a supervisor)."""
    value: object = int(index) if index.isdigit() else index

    class _Label(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.fields = {"worker": value, **getattr(record, "fields", {})}
            return True

    logs.log.addFilter(_Label())


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec function that has the kernel send SIGTERM to the child when the supervisor
    dies (Linux prctl PR_SET_PDEATHSIG), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def set_it() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM))

    return set_it


def _describe(code: int) -> dict[str, object]:
    if code < 0:
        try:
            return {"code": code, "signal": signal.Signals(-code).name}
        except ValueError:
            return {"code": code}
    return {"code": code}


class Worker:
    """One of the N places: the process in it now, and its restart backoff."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: Any = None  # subprocess.Popen while running
        self.started = 0.0
        self.starts = 0
        self.backoff = FIRST_BACKOFF_S
        self.restart_at: float | None = None  # when it is to be started again


class Supervisor:
    def __init__(
        self,
        config: Config,
        command: list[str],
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check(config)
        self.config = config
        self.command = command
        self.environ = os.environ if environ is None else environ
        self.clock = clock
        self.workers = [Worker(i) for i in range(config.workers)]
        self.stopping = False
        self.kill_now = False  # a second SIGTERM/SIGINT: do not wait for the workers
        self.exit_code = 0
        self._signals: list[int] = []
        self._wakeup: tuple[int, int] | None = None
        self._previous: dict[int, Any] = {}
        self._previous_wakeup = -1
        self._preexec = _parent_death_signal()

    # running

    def run(self) -> int:
        self._install()
        try:
            cfg = self.config
            logs.event(logging.INFO, "supervisor_start", pid=os.getpid(), workers=cfg.workers, host=cfg.host, port=cfg.port)
            for worker in self.workers:
                self._spawn(worker)
            while not self.stopping:
                self._wait(self._next_timeout())
                self._handle_signals()
                self._reap()
                if not self.stopping:
                    self._restart_due()
            return self._shut_down()
        finally:
            self._uninstall()

    def _spawn(self, worker: Worker) -> None:
        worker.restart_at = None
        worker.starts += 1
        worker.started = self.clock()
        try:
            worker.proc = subprocess.Popen(
                self.command,
                env=worker_environ(worker.index, self.environ),
                preexec_fn=self._spawn_child_setup,  # noqa: PLW1509 (the supervisor runs no threads)
                close_fds=True,
            )
        except OSError as exc:
            worker.proc = None
            delay = self._schedule_restart(worker, 0.0)
            logs.event(logging.ERROR, "worker_start_failed", index=worker.index, error=str(exc), restart_in_s=delay)
            return
        logs.event(logging.INFO, "worker_start", index=worker.index, pid=worker.proc.pid, start=worker.starts)

    def _spawn_child_setup(self) -> None:
        """In the worker, between fork and exec: SIGHUP ignored until the server installs its
        handler (a reload forwarded while it starts must not end it), SIGTERM if the
        supervisor dies."""
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if self._preexec is not None:
            self._preexec()

    def _schedule_restart(self, worker: Worker, ran: float) -> float:
        """Have `worker`, which ran for `ran` seconds, started again after its backoff; returns
        the backoff."""
        if ran >= STABLE_S:
            worker.backoff = FIRST_BACKOFF_S
        delay = worker.backoff
        worker.restart_at = self.clock() + delay
        worker.backoff = min(delay * 2, MAX_BACKOFF_S)
        return delay

    def _next_timeout(self) -> float:
        """Seconds until the next restart is due (1 s at most: SIGCHLD is what wakes the loop,
        the bound only guards against a wakeup lost)."""
        now = self.clock()
        due = [w.restart_at - now for w in self.workers if w.restart_at is not None]
        return max(0.0, min(due + [1.0]))

    def _restart_due(self) -> None:
        now = self.clock()
        for worker in self.workers:
            if worker.proc is None and worker.restart_at is not None and worker.restart_at <= now:
                self._spawn(worker)

    def _reap(self) -> None:
        """Notice the workers that exited; schedule their restart (or, for a configuration
        error at start, the end of everything)."""
        now = self.clock()
        for worker in self.workers:
            proc = worker.proc
            if proc is None or proc.poll() is None:
                continue
            worker.proc = None
            code = proc.returncode
            ran = now - worker.started
            fields = {"index": worker.index, "pid": proc.pid, **_describe(code), "ran_s": round(ran, 3)}
            if self.stopping:
                clean = code in STOPPED
                if not clean:
                    self.exit_code = max(self.exit_code, 1)
                logs.event(logging.INFO if clean else logging.WARNING, "worker_exit", **fields)
            elif code == EXIT_CONFIG and ran < START_WINDOW_S:
                logs.event(logging.ERROR, "worker_exit", **fields, reason="configuration error at start: stopping")
                self.exit_code = EXIT_CONFIG
                self.stopping = True
            else:
                delay = self._schedule_restart(worker, ran)
                logs.event(logging.WARNING, "worker_exit", **fields, restart_in_s=delay)

    # shutting down

    def _shut_down(self) -> int:
        live = [w for w in self.workers if w.proc is not None]
        for worker in self.workers:
            worker.restart_at = None
        logs.event(logging.INFO, "supervisor_stopping", workers=len(live), exit_code=self.exit_code)
        for worker in live:
            self._signal(worker, signal.SIGTERM)
        deadline = self.clock() + self.config.shutdown_timeout_s + KILL_GRACE_S
        while not self.kill_now and any(w.proc is not None for w in self.workers):
            left = deadline - self.clock()
            if left <= 0:
                break
            self._wait(min(left, 1.0))
            self._handle_signals()
            self._reap()
        for worker in self.workers:
            proc = worker.proc
            if proc is None:
                continue
            logs.event(logging.WARNING, "worker_kill", index=worker.index, pid=proc.pid, reason="did not stop in time")
            proc.kill()
            proc.wait()
            worker.proc = None
            self.exit_code = max(self.exit_code, 1)
        logs.event(logging.INFO, "supervisor_stopped", exit_code=self.exit_code)
        return self.exit_code

    def _signal(self, worker: Worker, signum: int) -> None:
        try:
            worker.proc.send_signal(signum)
        except ProcessLookupError:  # exited, not reaped yet
            pass

    # signals

    def _install(self) -> None:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self._wakeup = (read, write)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            self._previous[signum] = signal.signal(signum, self._on_signal)
        self._previous_wakeup = signal.set_wakeup_fd(write, warn_on_full_buffer=False)

    def _uninstall(self) -> None:
        signal.set_wakeup_fd(self._previous_wakeup)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._wakeup is not None:
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

    def _on_signal(self, signum: int, frame: object) -> None:
        if signum != signal.SIGCHLD:
            self._signals.append(signum)

    def _wait(self, timeout: float) -> None:
        """Sleep until a signal comes or `timeout` seconds pass."""
        read = self._wakeup[0]
        ready, _, _ = select.select([read], [], [], timeout)
        if ready:
            try:
                while os.read(read, 4096):
                    pass
            except BlockingIOError:
                pass

    def _handle_signals(self) -> None:
        signals, self._signals = self._signals, []
        for signum in signals:
            if signum == signal.SIGHUP:
                live = [w for w in self.workers if w.proc is not None]
                logs.event(logging.INFO, "supervisor_reload", workers=len(live))
                for worker in live:
                    self._signal(worker, signal.SIGHUP)
            elif self.stopping:
                self.kill_now = True  # asked again: stop waiting
            else:
                logs.event(logging.INFO, "supervisor_signal", signal=signal.Signals(signum).name)
                self.stopping = True


def serve(config: Config, flags: Mapping[str, Any], config_file: str | None) -> int:
    """Run the supervisor of `broker serve` with workers > 1; returns the exit code."""
    return Supervisor(config, worker_command(flags, config_file)).run()
