"""`broker serve --workers N`: a supervisor process and N worker processes sharing the port.

The supervisor starts each worker as

    python -m broker serve <the flags it was given, without --workers, --reuse-port,
                            --admin-host and --admin-port>

with these in the worker's environment:

    BROKER_WORKERS=1        the worker is a plain single server (env wins over the file)
    BROKER_REUSE_PORT=true  it listens with SO_REUSEPORT, so the N workers share the port
    BROKER_ADMIN_PORT=0     it does not listen on admin_port: the supervisor does
    BROKER_WORKER_INDEX=i   0 ... N-1: its place; every log line of the worker carries worker=i
    BROKER_WORKER_ADMIN_SOCKET=DIR/wi.sock
                            its own admin server listens on this Unix socket, in a directory
                            the supervisor made for them (mode 0700, removed when it ends)

`--config FILE` (or BROKER_CONFIG) reaches the workers as it is. The workers are joined
through redis_url, which is why workers > 1 needs it.

With admin_port set, the supervisor serves it for the whole group (group_admin.py), asking
each worker's socket. Whether or not it is set, the supervisor asks each worker's /healthz a
second after each answer: a worker that leaves a probe unanswered for hang_timeout_s (or
that has not answered within redis_timeout_s + hang_timeout_s of its start) is hung; it is
killed (SIGKILL: a stopped process cannot handle SIGTERM) and started again like a worker
that died.

The supervisor restarts a worker that exits while the supervisor is not shutting down, after
a backoff: 0.5 s, doubled for each exit in a row up to 10 s, back to 0.5 s once the worker
ran for 30 s. A worker that exits with code 2 (a configuration error) within 5 s of its start
would only fail again: the supervisor stops the others and exits 2. SIGHUP is passed on to
every worker (each reloads); so is SIGUSR2 (lame-duck mode: each moves its clients away over
lame_duck_duration_s and exits), and once every worker exited the supervisor exits 0, starting
none again. SIGTERM or SIGINT sends SIGTERM to every worker, waits up to
shutdown_timeout_s + 5 s, SIGKILLs the ones still running and exits 0, or 1 if a worker had
to be killed or exited with an error. A second one is passed on (each worker then aborts its
clients and logs what it loses) and the workers still running a second later are killed. On Linux a worker gets SIGTERM when its supervisor dies,
so workers never outlive it.

One thread, on an asyncio loop: signals (SIGCHLD when a worker exits) wake the main loop,
which reaps, checks the probes' answers and starts the workers whose restart is due. Worker
processes are forked with a preexec function, which is only safe while no other thread runs:
nothing here may start one (group_admin resolves admin_host itself for that reason).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..config import Config
from ..errors import ConfigError
from ..server import logs
from ..server.app import WorkerRole
from .group_admin import GroupAdmin, WorkerLink, WorkerState

WORKER_INDEX_ENV = "BROKER_WORKER_INDEX"
WORKER_ADMIN_SOCKET_ENV = "BROKER_WORKER_ADMIN_SOCKET"
PROBE_INTERVAL_S = 1.0  # between the answer to one health probe of a worker and the next
CHECK_INTERVAL_S = 0.5  # between two looks at the probes' answers (and at restarts due)
MAX_SOCKET_PATH = 103  # bytes of a Unix socket's path (sun_path: 108 on Linux, 104 elsewhere, with its NUL)
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
STABLE_S = 30.0  # a worker that ran this long is restarted after FIRST_BACKOFF_S again
START_WINDOW_S = 5.0  # exit code 2 this soon after a start is a configuration error: stop
KILL_GRACE_S = 5.0  # waited after shutdown_timeout_s before SIGKILL
FORCED_GRACE_S = 1.0  # after a second signal: the workers' time to abort their clients and log it
EXIT_CONFIG = 2
# Exit statuses of a worker that stopped as asked: it finished its graceful shutdown (0), or
# the signal ended it before it installed its handlers (still starting: -SIGTERM, or SIGINT
# from a terminal, which the command line turns into 130).
STOPPED = frozenset({0, -signal.SIGTERM, -signal.SIGINT, 130})
# Flags not passed on: the environment sets them for the workers (a flag would win over it).
NOT_PASSED_ON = ("workers", "reuse_port", "admin_host", "admin_port")


def check(config: Config) -> None:
    """What workers > 1 needs beyond Config's own validation (which requires redis_url)."""
    if config.workers > 1 and config.port == 0:
        raise ConfigError(
            "invalid setting: port: 0 (a free port) cannot be used with workers > 1: each worker process "
            "would pick a port of its own; give a fixed port"
        )


def worker_command(flags: Mapping[str, Any], config_file: str | None) -> list[str]:
    """The command line of a worker: the supervisor's `serve` flags but those of NOT_PASSED_ON,
    each as --name=value (values starting with '-' stay values)."""
    command = [sys.executable, "-m", "broker", "serve"]
    if config_file:
        command.append(f"--config={config_file}")
    for name, value in flags.items():
        if name not in NOT_PASSED_ON:
            command.append(f"--{name.replace('_', '-')}={value}")
    return command


def worker_environ(index: int, admin_socket: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if environ is None else environ)
    env.update(
        {
            "BROKER_WORKERS": "1",
            "BROKER_REUSE_PORT": "true",
            "BROKER_ADMIN_PORT": "0",
            WORKER_INDEX_ENV: str(index),
            WORKER_ADMIN_SOCKET_ENV: admin_socket,
        }
    )
    return env


def role_from_environ(environ: Mapping[str, str]) -> WorkerRole | None:
    """What the supervisor told this process in its environment (None: no supervisor started it)."""
    index = environ.get(WORKER_INDEX_ENV)
    admin_socket = environ.get(WORKER_ADMIN_SOCKET_ENV)
    if not index or not admin_socket:
        return None
    if not index.isdigit():
        raise ConfigError(f"{WORKER_INDEX_ENV} must be a worker index (0, 1, ...), not {index!r}")
    return WorkerRole(int(index), admin_socket)


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
    """One of the N places: the process in it now, its health and its restart backoff."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.admin_socket = ""  # its admin server's Unix socket, and the link to it (place())
        self.link: WorkerLink | None = None
        self.proc: Any = None  # subprocess.Popen while running
        self.started = 0.0
        self.starts = 0
        self.backoff = FIRST_BACKOFF_S
        self.restart_at: float | None = None  # when it is to be started again
        self.answered: float | None = None  # when the process now in it last answered a probe
        self.prober: asyncio.Task | None = None
        self.hung = ""  # why the supervisor killed the process now in it, if it did

    def place(self, directory: str) -> WorkerLink:
        """Give it its admin socket in `directory`; returns the link to it."""
        self.admin_socket = os.path.join(directory, f"w{self.index}.sock")
        self.link = WorkerLink(self.index, self.admin_socket)
        return self.link


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
        self.directory = ""  # of the workers' admin sockets, while it runs
        self.workers = [Worker(i) for i in range(config.workers)]
        self.admin: GroupAdmin | None = None
        self.stopping = False
        self.deadline: float | None = None  # while stopping: when the workers still running are killed
        self.lame_duck = False  # SIGUSR2 was passed on: the workers move their clients away and stop
        self.exit_code = 0
        self._signals: list[int] = []
        self._wake = asyncio.Event()  # a signal came (made anew by each run)
        self._preexec = _parent_death_signal()

    def states(self) -> list[WorkerState]:
        return [WorkerState(w.index, w.proc is not None, w.starts) for w in self.workers]

    # running

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        # The workers' admin sockets, in a directory only this user may open (mkdtemp: 0700).
        try:
            self.directory = tempfile.mkdtemp(prefix="broker-workers-")
        except OSError as exc:
            raise ConfigError(
                f"cannot make the workers' admin socket directory in {tempfile.gettempdir()}: {exc.strerror or exc} (set TMPDIR)"
            ) from exc
        links = [worker.place(self.directory) for worker in self.workers]
        try:
            longest = self.workers[-1].admin_socket
            if len(os.fsencode(longest)) > MAX_SOCKET_PATH:
                raise ConfigError(
                    f"the workers' admin sockets ({longest}) would be longer than a Unix socket's path may be "
                    f"({MAX_SOCKET_PATH} bytes): set TMPDIR to a shorter directory"
                )
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2, signal.SIGCHLD):
                loop.add_signal_handler(signum, self._on_signal, signum)
            cfg = self.config
            if cfg.admin_port:
                self.admin = GroupAdmin(cfg, links, self.states)
                await self.admin.start(cfg.admin_host, cfg.admin_port)  # ListenError: exit 1
            logs.event(
                logging.INFO,
                "supervisor_start",
                pid=os.getpid(),
                workers=cfg.workers,
                host=cfg.host,
                port=cfg.port,
                admin="off" if self.admin is None else self.admin.where,
                hang_timeout_s=cfg.hang_timeout_s,
            )
            for worker in self.workers:
                self._spawn(worker)
            while not self.stopping:
                await self._wait(self._next_timeout())
                self._handle_signals()
                self._reap()
                if self.lame_duck and all(w.proc is None for w in self.workers):
                    self.stopping = True  # every worker finished its lame-duck mode
                if not self.stopping:
                    self._kill_hung()
                    self._restart_due()
            return await self._shut_down()
        finally:
            for worker in self.workers:
                self._stop_probing(worker)
            if self.admin is not None:
                await self.admin.stop()
            for worker in self.workers:
                if worker.link is not None:
                    await worker.link.close()
                    worker.link = None
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2, signal.SIGCHLD):
                loop.remove_signal_handler(signum)
            shutil.rmtree(self.directory, ignore_errors=True)

    def _spawn(self, worker: Worker) -> None:
        worker.restart_at = None
        worker.starts += 1
        worker.started = self.clock()
        worker.answered = None
        worker.hung = ""
        with contextlib.suppress(FileNotFoundError):  # its predecessor's socket
            os.unlink(worker.admin_socket)
        try:
            worker.proc = subprocess.Popen(
                self.command,
                env=worker_environ(worker.index, worker.admin_socket, self.environ),
                preexec_fn=self._spawn_child_setup,  # noqa: PLW1509 (the supervisor runs no threads)
                close_fds=True,
            )
        except OSError as exc:
            worker.proc = None
            delay = self._schedule_restart(worker, 0.0)
            logs.event(logging.ERROR, "worker_start_failed", index=worker.index, error=str(exc), restart_in_s=delay)
            return
        logs.event(logging.INFO, "worker_start", index=worker.index, pid=worker.proc.pid, start=worker.starts)
        worker.prober = asyncio.ensure_future(self._probe(worker))

    def _spawn_child_setup(self) -> None:
        """In the worker, between fork and exec: SIGHUP ignored until the server installs its
        handler (a reload forwarded while it starts must not end it), SIGTERM if the
        supervisor dies."""
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if self._preexec is not None:
            self._preexec()

    # health

    async def _probe(self, worker: Worker) -> None:
        """Ask the worker's /healthz, one probe at a time: PROBE_INTERVAL_S after each answer
        (every 0.1 s until the first, to know soon that it started)."""
        link = worker.link
        if link is None:  # not placed: nothing to ask
            return
        while True:
            answer = await link.request("GET", "/healthz", self.config.hang_timeout_s)
            if answer is not None and answer[0] == 200:
                if worker.answered is None:
                    logs.event(
                        logging.INFO, "worker_up", index=worker.index, pid=worker.proc.pid, took_s=round(self.clock() - worker.started, 3)
                    )
                worker.answered = self.clock()
            await asyncio.sleep(PROBE_INTERVAL_S if worker.answered is not None else 0.1)

    def _stop_probing(self, worker: Worker) -> None:
        if worker.prober is not None:
            worker.prober.cancel()
            worker.prober = None

    def _kill_hung(self) -> None:
        """Kill the workers that stopped answering their probes (a probe goes out
        PROBE_INTERVAL_S after each answer, and has hang_timeout_s to be answered), or never started to."""
        now = self.clock()
        cfg = self.config
        for worker in self.workers:
            if worker.proc is None or worker.hung:
                continue
            if worker.answered is None:
                bound = cfg.redis_timeout_s + cfg.hang_timeout_s
                if now - worker.started <= bound:
                    continue
                worker.hung = f"no answer within {bound:g} s of its start (redis_timeout_s + hang_timeout_s)"
            elif now - worker.answered > PROBE_INTERVAL_S + cfg.hang_timeout_s:  # the next probe went out PROBE_INTERVAL_S after it
                worker.hung = f"a health probe unanswered for {cfg.hang_timeout_s:g} s (hang_timeout_s)"
            else:
                continue
            logs.event(
                logging.ERROR,
                "worker_hung",
                index=worker.index,
                pid=worker.proc.pid,
                reason=worker.hung,
                action="SIGKILL, then started again",
            )
            self._stop_probing(worker)
            with contextlib.suppress(ProcessLookupError):
                worker.proc.kill()

    # restarts

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
        """Seconds until the next restart is due (CHECK_INTERVAL_S at most: the hang checks
        run that often; SIGCHLD is what wakes the loop for an exit)."""
        now = self.clock()
        due = [w.restart_at - now for w in self.workers if w.restart_at is not None]
        return max(0.0, min(due + [CHECK_INTERVAL_S]))

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
            self._stop_probing(worker)
            code = proc.returncode
            ran = now - worker.started
            fields = {
                "index": worker.index,
                "pid": proc.pid,
                **_describe(code),
                "ran_s": round(ran, 3),
                "started": worker.answered is not None,
            }
            if worker.hung:
                fields["reason"] = "hung: " + worker.hung
            if self.stopping:
                clean = code in STOPPED
                if not clean:
                    self.exit_code = max(self.exit_code, 1)
                logs.event(logging.INFO if clean else logging.WARNING, "worker_exit", **fields)
            elif self.lame_duck:  # its lame-duck mode ended: not started again
                clean = code in STOPPED
                if not clean:
                    self.exit_code = max(self.exit_code, 1)
                fields.setdefault("reason", "lame duck")
                logs.event(logging.INFO if clean else logging.WARNING, "worker_exit", **fields)
            elif code == EXIT_CONFIG and ran < START_WINDOW_S:
                fields["reason"] = "configuration error at start: stopping"
                logs.event(logging.ERROR, "worker_exit", **fields)
                self.exit_code = EXIT_CONFIG
                self.stopping = True
            else:
                fields["restart_in_s"] = self._schedule_restart(worker, ran)
                logs.event(logging.WARNING, "worker_exit", **fields)

    # shutting down

    async def _shut_down(self) -> int:
        live = [w for w in self.workers if w.proc is not None]
        for worker in self.workers:
            worker.restart_at = None
            self._stop_probing(worker)
        logs.event(logging.INFO, "supervisor_stopping", workers=len(live), exit_code=self.exit_code)
        for worker in live:
            self._signal(worker, signal.SIGTERM)
        deadline = self.clock() + self.config.shutdown_timeout_s + KILL_GRACE_S
        self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)  # asked twice at once
        while any(w.proc is not None for w in self.workers):
            left = self.deadline - self.clock()
            if left <= 0:
                break
            await self._wait(min(left, 1.0))
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

    def _stop_now(self, signum: int) -> None:
        """Asked again while the workers drain: pass the signal on, so that each stops waiting
        for its clients and logs what it loses (`shutdown_forced`), and kill the workers still
        running FORCED_GRACE_S later."""
        deadline = self.clock() + FORCED_GRACE_S
        if self.deadline is not None and self.deadline <= deadline:
            return  # asked again already
        live = [w for w in self.workers if w.proc is not None]
        logs.event(
            logging.WARNING,
            "supervisor_signal_again",
            signal=signal.Signals(signum).name,
            workers=len(live),
            action=f"the workers stop waiting for their clients; those still running in {FORCED_GRACE_S:g} s are killed",
        )
        self.deadline = deadline
        for worker in live:
            self._signal(worker, signum)

    def _signal(self, worker: Worker, signum: int) -> None:
        try:
            worker.proc.send_signal(signum)
        except ProcessLookupError:  # exited, not reaped yet
            pass

    # signals

    def _on_signal(self, signum: int) -> None:
        if signum != signal.SIGCHLD:
            self._signals.append(signum)
        self._wake.set()

    async def _wait(self, timeout: float) -> None:
        """Sleep until a signal comes or `timeout` seconds pass."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass
        self._wake.clear()

    def _handle_signals(self) -> None:
        signals, self._signals = self._signals, []
        for signum in signals:
            if signum == signal.SIGHUP:
                live = [w for w in self.workers if w.proc is not None]
                logs.event(logging.INFO, "supervisor_reload", workers=len(live))
                for worker in live:
                    self._signal(worker, signal.SIGHUP)
            elif signum == signal.SIGUSR2:
                if not self.stopping and not self.lame_duck:
                    live = [w for w in self.workers if w.proc is not None]
                    logs.event(logging.INFO, "supervisor_lame_duck", workers=len(live))
                    self.lame_duck = True
                    for worker in self.workers:
                        worker.restart_at = None
                    for worker in live:
                        self._signal(worker, signal.SIGUSR2)
            elif self.stopping:
                self._stop_now(signum)
            else:
                logs.event(logging.INFO, "supervisor_signal", signal=signal.Signals(signum).name)
                self.stopping = True


def serve(config: Config, flags: Mapping[str, Any], config_file: str | None) -> int:
    """Run the supervisor of `broker serve` with workers > 1; returns the exit code. A plain
    asyncio loop (no uvloop: its resolver and file operations use threads of libuv)."""
    return asyncio.run(Supervisor(config, worker_command(flags, config_file)).run())
