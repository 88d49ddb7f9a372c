"""The supervisor: with `server.workers` > 1, the process `cacheproxy run` becomes, it forks the workers and keeps
them running; it serves no client itself.

Before forking it makes what the workers share: the generation counters and the worker table (anonymous shared
memory, inherited by every fork, restarts included) and the directory of the in-host channel's sockets. It also
binds the listen address with SO_REUSEPORT without listening (so that a port 0 is chosen once for all, and the port
stays ours while a worker restarts); the workers bind it too, and listen.

Why SO_REUSEPORT rather than a parent that accepts and passes sockets: the kernel then spreads connections over the
workers with no hop through another process, and nothing in the supervisor can become a bottleneck or a single
point of failure for clients. The cost: connections waiting in a worker's accept queue when it dies are reset, and
the spread is by hash, not by load.

It waits for signals synchronously (no event loop: a fork from a running loop would copy it): SIGTERM / SIGINT
stop the workers gracefully (each runs the shutdown order of a single proxy) and then itself; SIGHUP is passed to
every worker (each reloads its configuration); a worker that exits while the proxy is not stopping is logged and
started again (after 0.1 s, or, if it died within a second of starting, after a delay that doubles up to 30 s).
If no worker ever became ready and all have failed, the supervisor gives up (exit status 1), as a single process
that cannot bind its port does.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace

from cacheproxy.config import Address, Config
from cacheproxy.workers.control import Field, WorkerTable, new_table
from cacheproxy.workers.generations import DEFAULT_SLOTS, SharedGenerations, new_mapping

log = logging.getLogger("cacheproxy.workers")

_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
_QUICK_DEATH = 1.0  # seconds: a worker that dies sooner after its start is restarted with a growing delay
_RESTART_DELAY = 0.1
_MAX_DELAY = 30.0
_KILL_GRACE = 15.0  # after shutdown.timeout, how long workers get before SIGKILL


def reserve_listen(config: Config) -> tuple[Config, socket.socket]:
    """Bind (not listen) the listen address with SO_REUSEPORT; the config with the port it got (port 0)."""
    listen = config.listen
    family, kind, proto, _, address = socket.getaddrinfo(
        listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    # First without SO_REUSEPORT: a port another process holds, even one of its own SO_REUSEPORT group (another
    # cacheproxy with workers), must refuse the start as it does for a single process, not be silently shared.
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        probe.listen(1)
        address = (address[0], probe.getsockname()[1], *address[2:])
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    port = int(sock.getsockname()[1])
    if port != listen.port:
        config = replace(config, listen=Address(listen.host, port))
    return config, sock


class Supervisor:
    """Forks and watches `count` workers (see the module docstring)."""

    def __init__(self, config: Config, load_config: Callable[[], Config] | None, count: int, directory: str) -> None:
        self.config = config
        self._load_config = load_config
        self.count = count
        self.directory = directory
        self.slots = DEFAULT_SLOTS
        # One column per worker, and one for the supervisor itself (see _reap).
        self.generations = new_mapping(self.slots, count + 1)
        self._own = SharedGenerations(self.generations, slots=self.slots, writers=count + 1, writer=count)
        self.table_buffer = new_table(count)
        self.table = WorkerTable(self.table_buffer, count)
        self.pid = os.getpid()
        self._workers: dict[int, int] = {}  # pid -> worker index
        self._started: dict[int, float] = {}  # worker index -> monotonic start time
        self._delay = dict.fromkeys(range(count), _RESTART_DELAY)
        self._due: dict[int, float] = {}  # worker index -> monotonic time to start it again
        self._stopping = False
        self._ever_ready = False
        self._failures = 0  # workers that died before any worker was ever ready

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        log.info("supervisor (pid %d): starting %d workers on %s", self.pid, self.count, self.config.listen)
        for index in range(self.count):
            self._spawn(index)
        while True:
            timeout = max(0.01, min((due - time.monotonic() for due in self._due.values()), default=1.0))
            info = signal.sigtimedwait(_SIGNALS, timeout)
            if info is not None:
                signo = info.si_signo
                if signo in (signal.SIGTERM, signal.SIGINT):
                    log.info("supervisor: received %s: stopping the workers", signal.Signals(signo).name)
                    return self._shutdown()
                if signo == signal.SIGHUP:
                    log.info("supervisor: received SIGHUP: the workers reload their configuration")
                    self._signal_all(signal.SIGHUP)
                if signo == signal.SIGCHLD and not self._reap():
                    log.error("supervisor: no worker could start; giving up")
                    self._shutdown()
                    return 1
            self._restart_due()

    # -- workers ------------------------------------------------------------------------------------------------

    def _spawn(self, index: int) -> None:
        from cacheproxy.workers.app import WorkerContext, run_worker

        context = WorkerContext(index, self.count, self.directory, self.generations, self.slots,
                                self.table_buffer, self.pid)  # fmt: skip
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.setpgid(0, 0)  # a terminal's Ctrl-C reaches the supervisor only, which stops the workers once
                for signo in _SIGNALS:
                    signal.signal(signo, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.default_int_handler)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
                code = run_worker(self.config, self._load_config, context)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        self._workers[pid] = index
        self._started[index] = time.monotonic()
        self.table.set(index, Field.PID, pid)
        self.table.set(index, Field.STARTED_MS, int(time.time() * 1000))
        self.table.set(index, Field.UPDATED_MS, 0)
        self.table.set(index, Field.CLIENTS, 0)
        log.info("supervisor: worker %d started (pid %d)", index, pid)

    def _reap(self) -> bool:
        """Collect exited workers and schedule their restart. False when no worker ever became ready and they keep
        failing (a port in use...): there is no point in trying on."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            index = self._workers.pop(pid, None)
            if index is None:
                continue
            self._ever_ready = self._ever_ready or self.table.get(index, Field.UPDATED_MS) != 0
            self.table.set(index, Field.CLIENTS, 0)
            if self._stopping:
                continue
            # A worker that died may have had a COMMIT on its way: committed upstream, but its last invalidation
            # (the one after the commit) never made. Entries the others filled since its first one would then
            # outlive the write: invalidate everything, once, to be exact (every worker refills).
            self._own.bump_all()
            if not self._ever_ready:
                self._failures += 1
            lived = time.monotonic() - self._started[index]
            log.error("supervisor: worker %d (pid %d) %s after %.1fs; restarting it", index, pid, _how(status), lived)
            if lived < _QUICK_DEATH:
                delay = self._delay[index]
                self._delay[index] = min(delay * 2, _MAX_DELAY)
            else:
                delay = self._delay[index] = _RESTART_DELAY
            self._due[index] = time.monotonic() + delay
        if not self._ever_ready:
            self._ever_ready = any(self.table.get(i, Field.UPDATED_MS) for i in range(self.count))
        return self._ever_ready or self._failures < 3 * self.count

    def _restart_due(self) -> None:
        now = time.monotonic()
        for index, due in list(self._due.items()):
            if due <= now:
                del self._due[index]
                self.table.add(index, Field.RESTARTS, 1)
                self._spawn(index)

    def _signal_all(self, signo: signal.Signals) -> None:
        for pid in list(self._workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signo)

    def _shutdown(self) -> int:
        """SIGTERM to every worker (each shuts down as a single proxy does); SIGKILL what outlives the timeout."""
        self._stopping = True
        self._due.clear()
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown.timeout + _KILL_GRACE
        while self._workers and time.monotonic() < deadline:
            signal.sigtimedwait({signal.SIGCHLD}, max(0.01, min(1.0, deadline - time.monotonic())))
            self._reap()
        if self._workers:
            log.error(
                "supervisor: %d workers still running after the shutdown timeout: killing them", len(self._workers)
            )
            self._signal_all(signal.SIGKILL)
            while self._workers:
                signal.sigtimedwait({signal.SIGCHLD}, 1.0)
                self._reap()
        log.info("supervisor: all workers stopped")
        return 0


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def run_supervisor(config: Config, load_config: Callable[[], Config] | None, count: int) -> int:
    """`cacheproxy run` with `count` workers; the exit status."""
    try:
        config, reserved = reserve_listen(config)
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    directory = tempfile.mkdtemp(prefix="cacheproxy-workers-")
    try:
        return Supervisor(config, load_config, count, directory).run()
    finally:
        reserved.close()
        shutil.rmtree(directory, ignore_errors=True)
