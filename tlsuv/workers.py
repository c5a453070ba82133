"""Every core of a machine: N worker processes on one port, supervised by their parent.

Why this module exists
======================

One pyuv loop runs on one core.  To use them all, tlsuv runs N *workers*,
each a whole server (its own loop, its own listening socket), and lets the
kernel spread connections: every worker opens its own socket with
``SO_REUSEPORT`` on the same address and hands it to pyuv with
:meth:`Server.listen_socket <tlsuv.Server.listen_socket>`.  Linux then
balances new connections over the listening sockets by a hash of their
addresses, with no accept lock and no shared state between workers.

The parent (:class:`Supervisor`) serves nothing.  It binds the address first
(so a bad address or a port in use fails at once, in one process, and port 0
becomes one real port that every worker then joins), forks the workers,
restarts any that dies (with a log line and an exponential back-off), turns
SIGTERM/SIGINT into a graceful drain of every worker and a second signal into
an abort, and adds up the workers' counters for ``--stats-interval``.

Fork, not spawn
===============

Workers are forked.  The parent has done the expensive and stateful work
once -- loaded or generated the certificate (a self-signed one must be the
*same* in every worker, and its fingerprint was printed once), built the
``SSL.Context`` -- and a fork hands all of it to the child as it is.  Spawn
would have to rebuild it from pickled parts, but an ``SSL.Context`` cannot be
pickled and the handler factory would have to be an importable top-level
name instead of any callable (a closure, a lambda).  A restart also costs a
millisecond instead of a fresh interpreter.  The price is the usual fork
discipline, below.

The traps, and how each is handled
==================================

* **Fork only a quiet process.**  A child inherits every fd and lock of the
  parent but only the forking thread.  The parent therefore never creates a
  pyuv loop (libuv's process-wide signal pipe would then be shared by every
  worker) and starts no thread; it waits with ``selectors`` and Python
  signal handlers.  The children close what they inherited and do not need,
  and leave with ``os._exit`` so no parent code (atexit, a test runner) runs
  twice.  Call :func:`run` before creating any loop or thread.

* **Ctrl-C reaches every process.**  A terminal sends SIGINT to the whole
  foreground process group; if workers acted on it and on the parent's
  drain order they would see "two signals" and abort.  Workers ignore
  SIGINT: the parent decides.  Orders travel over a per-worker
  ``SOCK_SEQPACKET`` socket pair (``drain``/``abort``) rather than as signals,
  so a SIGTERM that an init system sends to every process at once (systemd's
  default ``KillMode=control-group``) is one drain, not a drain and an abort.
  A worker that gets SIGTERM directly drains too.

* **An orphan must not keep the port.**  If the parent dies (even by
  SIGKILL) its end of the socket pair closes; workers see end-of-file and
  drain, so nothing keeps serving without a supervisor.

* **A crash loop must not spin.**  A worker that dies is restarted after
  :data:`RESTART_DELAY_MIN`, doubling for every quick death in a row up to
  :data:`RESTART_DELAY_MAX`; one that ran :data:`STABLE_AFTER` seconds starts
  the count afresh.

* **A killed worker loses its accept queue.**  Connections the kernel had
  queued on its socket but it had not accepted are reset: Linux does not
  move them to the other sockets unless ``net.ipv4.tcp_migrate_req`` is 1
  (5.14+).  Established connections of that worker die with it.  New
  connections go to the others at once.

* **Only Linux balances.**  ``SO_REUSEPORT`` exists on the BSDs and macOS
  but does not spread connections there; this module needs Linux.

* **Counters outlive workers.**  A worker's last report is folded into the
  parent's totals when it exits, so accepted/failed/bytes in the stats line
  never go backwards after a restart.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Final, NoReturn

import pyuv

from . import _cli
from ._uv import format_address
from .server import DEFAULT_BACKLOG, Server, ServerError

if TYPE_CHECKING:
    from types import FrameType

log = logging.getLogger("tlsuv.workers")

# A typo guard, not a tuning limit: each worker is a whole process with its
# own loop and memory, and more than a thousand of them on one machine is a
# slip of the keyboard, not a plan.
MAX_WORKERS: Final = 1024

# The first restart comes quickly (a tenth of a second of lost capacity for a
# one-off crash); each quick death in a row doubles it up to half a minute,
# so a worker that cannot start costs a log line every 30 s, not a CPU.
RESTART_DELAY_MIN: Final = 0.1
RESTART_DELAY_MAX: Final = 30.0
# A worker that lived this long was not crash-looping: its back-off resets.
STABLE_AFTER: Final = 10.0

# After the grace period a worker aborts what is left, which takes one loop
# iteration.  Still running this much later, it is stuck (a handler in an
# endless loop) and only SIGKILL ends it.
KILL_MARGIN: Final = 5.0
# After the second signal workers abort at once; the same reasoning, shorter.
ABORT_MARGIN: Final = 2.0

# Workers report at least this often, so the parent's stats line is at most
# a second stale whatever the interval; a report is ~150 bytes.
STATS_PUSH_MAX: Final = 1.0

# Orders and reports are tiny JSON objects; SOCK_SEQPACKET keeps each one a
# message, so a reader never sees half of one.
MESSAGE_MAX: Final = 4096

# The parent wakes at least this often even with nothing scheduled: a cheap
# safety net should a wake-up ever be lost.
TICK: Final = 1.0

# What a worker that crashed outside the server returns (BSD's EX_SOFTWARE).
EXIT_CRASH: Final = 70

_worker_number: int | None = None


def worker_number() -> int | None:
    """This process's worker number (1..N, kept across restarts), or None outside a worker."""
    return _worker_number


# -- counters ----------------------------------------------------------------


@dataclass
class Counters:
    """What the stats line reports; summed over workers by the parent."""

    open: int = 0
    accepted: int = 0
    refused: int = 0
    handshakes_failed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    @classmethod
    def of(cls, server: Server) -> Counters:
        live = list(server.connections)
        return cls(
            open=len(live),
            accepted=server.accepted,
            refused=server.refused,
            handshakes_failed=server.handshakes_failed,
            bytes_in=server.ended_bytes_in + sum(c.bytes_in for c in live),
            bytes_out=server.ended_bytes_out + sum(c.bytes_out for c in live),
        )

    @classmethod
    def from_message(cls, message: dict[str, object]) -> Counters:
        values = {f.name: message.get(f.name, 0) for f in fields(cls)}
        return cls(**{k: int(v) if isinstance(v, int) else 0 for k, v in values.items()})

    def to_message(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __add__(self, other: Counters) -> Counters:
        return Counters(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def line(self, workers: int) -> str:
        return (f"stats: workers={workers} open={self.open} accepted={self.accepted} "
                f"refused={self.refused} handshakes_failed={self.handshakes_failed} "
                f"bytes_in={self.bytes_in} bytes_out={self.bytes_out}")


def log_stats_every(loop: pyuv.Loop, server: Server, interval: float | None) -> pyuv.Timer | None:
    """One process, one server: log its stats line every ``interval`` seconds.

    The timer is unreferenced, so it never keeps ``loop.run()`` from returning
    once the server has closed.
    """
    if interval is None:
        return None
    timer = pyuv.Timer(loop)
    timer.start(lambda t: log.info("%s", Counters.of(server).line(1)), interval, interval)
    timer.ref = False
    return timer


# -- the parent ---------------------------------------------------------------


@dataclass(eq=False)
class _Worker:
    number: int
    pid: int = 0
    channel: socket.socket | None = None
    started: float = 0.0
    quick_deaths: int = 0
    restart_at: float | None = None
    counters: Counters = field(default_factory=Counters)
    status: int | None = None  # exit status once reaped during the drain
    listened: bool = False  # has listened at least once (for the "ready" announcement)


class Supervisor:
    """Run ``setup(loop) -> Server`` in ``workers`` processes on one address.

    ``setup`` is called in each worker (after the fork) with the worker's new
    loop and returns a :class:`~tlsuv.Server` that is not listening yet; the
    worker makes its ``SO_REUSEPORT`` socket and listens.  :meth:`bind` claims
    the address (call it to learn the port before :meth:`run`);
    :meth:`run` supervises until every worker has drained and returns the
    exit status: 0 when all of them finished their drain, 1 otherwise.
    """

    def __init__(
        self,
        setup: Callable[[pyuv.Loop], Server],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        workers: int = 2,
        grace: float | None = 5.0,
        stats_interval: float | None = None,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        if not 1 <= workers <= MAX_WORKERS:
            raise ValueError(f"workers must be 1-{MAX_WORKERS}")
        if stats_interval is not None and not stats_interval > 0:
            raise ValueError("stats_interval must be positive or None")
        self.setup = setup
        self.host = host
        self.port = port
        self.grace = grace
        self.stats_interval = stats_interval
        self.backlog = backlog
        self.workers = [_Worker(n) for n in range(1, workers + 1)]
        self.address: tuple[str, int] | None = None
        self._family = socket.AF_INET
        self._reservation: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wakeup: tuple[int, int] | None = None
        self._signals: list[int] = []
        self._saved_handlers: dict[int, object] = {}
        self._draining = False
        self._kill_at: float | None = None
        self._killed = False
        self._retired = Counters()
        self._next_stats: float | None = None
        self._on_ready: Callable[[], None] | None = None

    # -- set-up --------------------------------------------------------------

    def bind(self) -> tuple[str, int]:
        """Claim the address (bound, never listening) and return it; port 0 becomes a real port.

        Every worker binds the same port with SO_REUSEPORT; a bound socket
        that does not listen receives no connections, so this one only holds
        the port and reports errors early.
        """
        if self.address is not None:
            return self.address
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            raise ServerError(f"cannot listen on {self.host!r}: not a numeric IP address") from None
        self._family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        sock = _reuseport_socket(self._family)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise ServerError(f"cannot listen on {format_address((self.host, self.port))}: "
                              f"{exc.strerror or exc}") from exc
        self._reservation = sock
        name = sock.getsockname()
        self.address = (str(name[0]), int(name[1]))
        return self.address

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Fork the workers and supervise them until they have drained; return the exit status.

        ``on_ready`` runs once every worker has listened: before that,
        connections to the claimed port are refused.
        """
        self.bind()
        self._on_ready = on_ready
        assert self.address is not None
        log.info("starting %d workers on %s", len(self.workers), format_address(self.address))
        self._selector = selectors.DefaultSelector()
        self._install_signals()
        try:
            for w in self.workers:
                self._spawn(w)
            if self.stats_interval is not None:
                self._next_stats = time.monotonic() + self.stats_interval
            return self._supervise()
        finally:
            self._restore_signals()
            for w in self.workers:
                self._close_channel(w)
            self._selector.close()
            if self._reservation is not None:
                self._reservation.close()

    def _install_signals(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wakeup = (r, w)
        assert self._selector is not None
        self._selector.register(r, selectors.EVENT_READ, None)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            self._saved_handlers[signum] = signal.signal(signum, self._on_signal)
        # The handlers only record; the wake-up fd makes select() return.
        signal.set_wakeup_fd(w, warn_on_full_buffer=False)

    def _restore_signals(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum, handler in self._saved_handlers.items():
            # signal.signal() may have returned None (a handler set from C);
            # typeshed will not take that back, the runtime does.
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._saved_handlers.clear()
        if self._wakeup is not None:
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGCHLD:
            self._signals.append(signum)

    # -- the loop ------------------------------------------------------------

    def _supervise(self) -> int:
        assert self._selector is not None
        while True:
            self._handle_signals()
            self._reap()
            alive = [w for w in self.workers if w.pid]
            if self._draining and not alive:
                break
            now = time.monotonic()
            if not self._draining:
                for w in self.workers:
                    if not w.pid and w.restart_at is not None and now >= w.restart_at:
                        self._spawn(w)
            if self._kill_at is not None and now >= self._kill_at:
                self._kill_stragglers()
            if self._next_stats is not None and now >= self._next_stats:
                log.info("%s", self._totals().line(len(self.workers)))
                assert self.stats_interval is not None
                self._next_stats = max(self._next_stats + self.stats_interval, now)
            for key, _ in self._selector.select(self._timeout()):
                if key.data is None:
                    _drain_fd(key.fd)
                else:
                    self._read_messages(key.data)
        # None: the worker was down (waiting for its restart) when the drain began.
        failed = [w for w in self.workers if w.status not in (None, 0)]
        if self.stats_interval is not None:
            log.info("%s", self._totals().line(len(self.workers)))
        if failed or self._killed:
            log.warning("all workers stopped; %d did not drain cleanly", len(failed))
            return 1
        log.info("all workers drained")
        return 0

    def _timeout(self) -> float:
        now = time.monotonic()
        deadlines = [w.restart_at for w in self.workers
                     if not w.pid and w.restart_at is not None and not self._draining]
        deadlines += [t for t in (self._kill_at, self._next_stats) if t is not None]
        if not deadlines:
            return TICK
        return max(0.0, min(min(deadlines) - now, TICK))

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            name = signal.Signals(signum).name
            if not self._draining:
                self._draining = True
                alive = [w for w in self.workers if w.pid]
                log.info("%s: draining %d worker(s), grace %s", name, len(alive),
                         "unlimited" if self.grace is None else f"{self.grace:.1f}s")
                for w in alive:
                    self._send(w, {"order": "drain"})
                if self.grace is not None:
                    self._kill_at = time.monotonic() + self.grace + KILL_MARGIN
            else:
                log.info("%s again: aborting all connections", name)
                for w in self.workers:
                    if w.pid:
                        self._send(w, {"order": "abort"})
                deadline = time.monotonic() + ABORT_MARGIN
                self._kill_at = deadline if self._kill_at is None else min(self._kill_at, deadline)

    def _kill_stragglers(self) -> None:
        self._kill_at = None
        for w in self.workers:
            if w.pid:
                log.error("worker %d (pid %d) is still running after the grace period: killing it",
                          w.number, w.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
                self._killed = True

    def _reap(self) -> None:
        for w in self.workers:
            if not w.pid:
                continue
            # One pid at a time, never -1: other children of this process
            # (a library user's subprocesses) are not ours to reap.
            try:
                pid, status = os.waitpid(w.pid, os.WNOHANG)
            except ChildProcessError:  # pragma: no cover - reaped by someone else
                pid, status = w.pid, 0
            if pid == 0:
                continue
            self._read_messages(w)  # its last report may still be in the channel
            self._retired = self._retired + Counters(**{
                **w.counters.to_message(), "open": 0})
            w.counters = Counters()
            self._close_channel(w)
            w.pid = 0
            code = os.waitstatus_to_exitcode(status)
            how = f"exited with status {code}" if code >= 0 else \
                f"was killed by {signal.Signals(-code).name}"
            if self._draining:
                w.status = code
                if code == 0:
                    log.info("worker %d (pid %d) drained and exited", w.number, pid)
                else:
                    log.warning("worker %d (pid %d) %s while draining", w.number, pid, how)
                continue
            lived = time.monotonic() - w.started
            if lived >= STABLE_AFTER:
                w.quick_deaths = 0
            delay = self._schedule_restart(w)
            log.warning("worker %d (pid %d) %s after %.1fs; restarting in %.1fs",
                        w.number, pid, how, lived, delay)

    def _schedule_restart(self, w: _Worker) -> float:
        delay: float = min(RESTART_DELAY_MIN * 2.0 ** w.quick_deaths, RESTART_DELAY_MAX)
        w.quick_deaths += 1
        w.restart_at = time.monotonic() + delay
        return delay

    def _totals(self) -> Counters:
        total = self._retired
        for w in self.workers:
            total = total + w.counters
        return total

    # -- talking to workers ----------------------------------------------------

    def _send(self, w: _Worker, message: dict[str, object]) -> None:
        if w.channel is None:
            return
        with contextlib.suppress(OSError):  # it just died: the reaper will see it
            w.channel.send(json.dumps(message).encode())

    def _read_messages(self, w: _Worker) -> None:
        channel = w.channel
        while channel is not None:
            try:
                data = channel.recv(MESSAGE_MAX)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                # The worker closed its end (it is exiting): stop watching;
                # the reaper collects it.
                self._close_channel(w)
                return
            try:
                message = json.loads(data)
            except ValueError:
                log.warning("worker %d sent an unreadable report", w.number)
                continue
            if not isinstance(message, dict):
                continue
            if message.get("event") == "listening":
                log.info("worker %d listening (pid %d)", w.number, w.pid)
                w.listened = True
                if self._on_ready is not None and all(x.listened for x in self.workers):
                    on_ready, self._on_ready = self._on_ready, None
                    on_ready()
            w.counters = Counters.from_message(message)

    def _close_channel(self, w: _Worker) -> None:
        if w.channel is None:
            return
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(w.channel)
        w.channel.close()
        w.channel = None

    # -- starting a worker -------------------------------------------------------

    def _spawn(self, w: _Worker) -> None:
        assert self._selector is not None and self.address is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Output buffered now would be written twice, once by each process.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: try again later
            ours.close()
            theirs.close()
            delay = self._schedule_restart(w)
            log.error("cannot start worker %d: %s; retrying in %.1fs", w.number, exc, delay)
            return
        if pid == 0:  # the child: never returns
            ours.close()
            self._become_worker(w, theirs)
        theirs.close()
        ours.setblocking(False)
        w.pid, w.channel, w.started, w.restart_at = pid, ours, time.monotonic(), None
        w.counters = Counters()
        self._selector.register(ours, selectors.EVENT_READ, w)
        log.debug("worker %d forked (pid %d)", w.number, pid)

    def _become_worker(self, w: _Worker, channel: socket.socket) -> NoReturn:
        code = EXIT_CRASH
        try:
            # Shed the parent: its signal handling, its wake-up pipe, the
            # other workers' channels, the port reservation, the selector.
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides (module docstring)
            for signum in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            if self._wakeup is not None:
                for fd in self._wakeup:
                    os.close(fd)
            for other in self.workers:
                if other.channel is not None:
                    other.channel.close()
            if self._reservation is not None:
                self._reservation.close()
            if self._selector is not None:
                self._selector.close()
            global _worker_number  # noqa: PLW0603 -- set once, right after the fork
            _worker_number = w.number
            _tag_logs(w.number)
            assert self.address is not None
            code = _Child(self, channel, self.address).run()
        except BaseException:
            log.critical("worker %d crashed", w.number, exc_info=True)
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)


# -- a worker ----------------------------------------------------------------------


class _Child:
    """One worker: its loop, its server, its channel to the parent."""

    def __init__(self, sup: Supervisor, channel: socket.socket, address: tuple[str, int]) -> None:
        self.sup = sup
        self.channel = channel
        self.address = address
        self.loop = pyuv.Loop()
        self.server: Server | None = None
        self.handles: list[pyuv.Handle] = []
        self.draining = False

    def run(self) -> int:
        loop = self.loop
        self.server = server = self.sup.setup(loop)
        sock = _reuseport_socket(self.sup._family)
        try:
            sock.bind(self.address)
        except OSError:
            sock.close()
            raise
        server.listen_socket(sock, self.sup.backlog)
        self.channel.setblocking(False)
        poll = pyuv.Poll(loop, self.channel.fileno())
        poll.start(pyuv.UV_READABLE, self._on_channel)
        term = pyuv.Signal(loop)
        term.start(self._on_sigterm, signal.SIGTERM)
        self.handles = [poll, term]
        if self.sup.stats_interval is not None:
            period = min(self.sup.stats_interval, STATS_PUSH_MAX)
            timer = pyuv.Timer(loop)
            timer.start(lambda t: self._report(), period, period)
            self.handles.append(timer)
        self._report("listening")
        loop.run()
        self._report("exiting")
        self.channel.close()
        return 0

    def _report(self, event: str = "stats") -> None:
        assert self.server is not None
        message = {"event": event, **Counters.of(self.server).to_message()}
        # Never block the loop on the parent: a report is a snapshot and the
        # next one replaces it, so a full buffer just drops this one.
        with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionError):
            self.channel.send(json.dumps(message).encode())

    def _on_channel(self, handle: pyuv.Poll, events: int, error: int | None) -> None:
        while True:
            try:
                data = self.channel.recv(MESSAGE_MAX)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                log.warning("the supervisor is gone: draining")
                handle.stop()
                self._drain()
                return
            try:
                order = json.loads(data).get("order")
            except (ValueError, AttributeError):
                continue
            if order == "drain":
                self._drain()
            elif order == "abort":
                self._abort()

    def _on_sigterm(self, handle: pyuv.Signal, signum: int) -> None:
        self._drain()  # idempotent: the parent's order may come too

    def _drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        assert self.server is not None
        log.info("draining %d connection(s)", len(self.server.connections))
        self.server.close(self.sup.grace, self._closed)

    def _abort(self) -> None:
        self._drain()  # so the close callback is set and the loop can end
        assert self.server is not None
        log.info("aborting %d connection(s)", len(self.server.connections))
        self.server.abort()

    def _closed(self) -> None:
        for h in self.handles:
            if not h.closed:
                h.close()


def _reuseport_socket(family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return sock


def _drain_fd(fd: int) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while os.read(fd, 512):
            pass



class _WorkerTag(logging.Filter):
    """Prefix a worker's log lines with its number, so interleaved output stays readable."""

    def __init__(self, number: int) -> None:
        super().__init__()
        self.prefix = f"worker {number}: "

    def filter(self, record: logging.LogRecord) -> bool:
        # The same record passes every handler's filter: tag it once.
        if not getattr(record, "tlsuv_worker_tagged", False):
            record.msg = self.prefix + str(record.msg)
            record.tlsuv_worker_tagged = True
        return True


def _tag_logs(number: int) -> None:
    tag = _WorkerTag(number)
    for handler in logging.getLogger().handlers:
        handler.addFilter(tag)


# -- the library call and the command line -------------------------------------------


def run(
    setup: Callable[[pyuv.Loop], Server],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    workers: int = 2,
    grace: float | None = 5.0,
    stats_interval: float | None = None,
    on_listening: Callable[[str, int], None] | None = None,
) -> int:
    """Serve with ``workers`` processes until SIGTERM/SIGINT; return the exit status.

    ``setup(loop)`` builds each worker's (not yet listening) server.
    ``on_listening(host, port)`` runs in the parent once every worker is
    listening.  Raises :class:`~tlsuv.ServerError` if the address cannot be
    bound (before any worker starts).
    """
    sup = Supervisor(setup, host=host, port=port, workers=workers, grace=grace,
                     stats_interval=stats_interval)
    host, port = sup.bind()
    return sup.run(None if on_listening is None else lambda: on_listening(host, port))


def worker_count(text: str) -> int:
    """``--workers``: ``auto`` (the CPUs this process may run on) or 1..MAX_WORKERS."""
    if text == "auto":
        return available_cpus()
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number or 'auto': {text!r}") from None
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be 1-{MAX_WORKERS} or 'auto': {text!r}")
    return value


def available_cpus() -> int:
    # sched_getaffinity honours cpusets (containers, taskset); os.cpu_count()
    # reports the whole machine and would overcommit a container.
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The scale-out flags of ``python -m tlsuv.echo``."""
    g = parser.add_argument_group("scaling out")
    g.add_argument("--workers", type=worker_count, default=1, metavar="N|auto",
                   help="serve from N processes sharing the port with SO_REUSEPORT, supervised "
                        "(auto: one per CPU; default 1, in this process)")
    g.add_argument("--stats-interval", type=_cli.positive_float, default=None, metavar="SECONDS",
                   help="log open connections, accepted and failed handshakes, bytes in and out "
                        "every SECONDS (summed over workers)")


def run_cli(
    args: argparse.Namespace,
    setup: Callable[[pyuv.Loop], Server],
    announce: Callable[[str, int], None],
    prog: str = "python -m tlsuv.echo",
) -> int:
    """``--workers N`` for a command-line tool: bind, supervise, announce once all listen."""
    sup = Supervisor(setup, host=args.host, port=args.port, workers=args.workers, grace=args.grace,
                     stats_interval=args.stats_interval)
    try:
        host, port = sup.bind()
    except ServerError as exc:
        _cli.fail(f"{prog}: error: {exc}")
    return sup.run(lambda: announce(host, port))


__all__ = [
    "Counters",
    "Supervisor",
    "add_arguments",
    "available_cpus",
    "log_stats_every",
    "run",
    "run_cli",
    "worker_count",
    "worker_number",
]
