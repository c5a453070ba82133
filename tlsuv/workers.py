"""Every core of a machine: N worker processes on one port, supervised by their parent.

Why this module exists
======================

One pyuv loop runs on one core.  To use them all, tlsuv runs N *workers*,
each a whole server (its own loop, its own listening socket), and lets the
kernel spread connections: every worker has its own socket, opened with
``SO_REUSEPORT`` on the same address, and hands it to pyuv with
:meth:`Server.listen_socket <tlsuv.Server.listen_socket>`.  Linux then
balances new connections over the listening sockets by a hash of their
addresses, with no accept lock and no shared state between workers.

The parent (:class:`Supervisor`) serves nothing.  It opens the workers'
sockets itself (so a bad address or a port in use fails at once, in one
process, and port 0 becomes one real port that every socket joins), forks
the workers, restarts any
that dies (with a log line and an exponential back-off), turns SIGTERM/SIGINT
into a drain of every worker and a second signal into an abort, turns
SIGUSR2 into an upgrade (:mod:`tlsuv.upgrade`), and adds up the workers'
counters for ``--stats-interval``.

Sockets: held by the parent, inherited or made
==============================================

The parent keeps every socket open for its whole life, and each worker
serves copies of them.  A socket becomes a listening one when its first
worker listens (before that a connection hashed to it would wait for a
worker that may never come: a new tree that fails to start must not strand
connections in the sockets it made), and from then on its queue lives as
long as the parent.  A queue that is never closed never resets a connection
waiting in it, which is what makes two things drop nothing:

* **Upgrades.**  The new process tree inherits the very same sockets
  (named ``tlsuv-reuseport`` in ``LISTEN_FDNAMES``).  For a while an old
  and a new worker accept from the same queue; then the old one drains.
  If the new tree has a different number of workers, the sockets are dealt
  out in turn (a worker may serve two) and missing ones are made.
* **Socket activation.**  Sockets inherited from systemd or ``--listen-fd``
  (any other name) cannot be multiplied -- one queue per address, owned by
  the service manager -- so *every* worker accepts from each of them: the
  pre-fork model, where the worker that wakes first takes the connection.
  It balances less evenly than SO_REUSEPORT's hash, and it survives
  restarts of the whole service, which is its point.

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

* **A killed worker keeps its queue -- for a while.**  Its socket stays
  open in the parent, so connections the kernel hashes to it wait for the
  replacement (0.1 s later) instead of being reset.  A worker that keeps
  dying waits longer and longer (the back-off); once the wait would exceed
  :data:`SOCKET_KEEP_MAX` its socket is closed, so new connections go to
  the other workers at once (what was queued on it is reset, unless
  ``net.ipv4.tcp_migrate_req`` is 1, Linux 5.14+), and it gets a fresh one
  when it starts again.  Established connections of a dead worker die
  with it.

* **Only Linux balances.**  ``SO_REUSEPORT`` exists on the BSDs and macOS
  but does not spread connections there; this module needs Linux.

* **SIGHUP is passed on.**  The parent forwards it to every worker, which
  reloads its certificates (:mod:`tlsuv.reload`); a worker whose server set
  up no reload ignores it rather than die of it.

* **Counters outlive workers.**  A worker's last report is folded into the
  parent's totals when it exits, so accepted/failed/bytes in the stats line
  never go backwards after a restart.  With ``--metrics`` the report also
  carries the worker's :class:`~tlsuv.stats.Snapshot`, summed the same way,
  and the parent serves ``/metrics`` on its selectors loop
  (:class:`~tlsuv.metrics.SelectorEndpoint`): counts are at most
  :data:`STATS_PUSH_MAX` old, and those of a worker killed between two
  reports since its last one are lost with it.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Final, NoReturn

import pyuv

from . import _cli, accesslog, activation, upgrade
from ._uv import format_address
from .server import DEFAULT_BACKLOG, Server, ServerError
from .stats import Snapshot

if TYPE_CHECKING:
    from types import FrameType

    from prometheus_client.metrics_core import Metric

    from .metrics import SelectorEndpoint

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

# Orders and reports are small JSON objects; SOCK_SEQPACKET keeps each one a
# message, so a reader never sees half of one.  A report with a metrics
# snapshot (--metrics) is 1-3 KiB, more with many ciphers or ALPN protocols:
# 64 KiB leaves room, and stays well under the socket's send buffer.
MESSAGE_MAX: Final = 65536

# The parent wakes at least this often even with nothing scheduled: a cheap
# safety net should a wake-up ever be lost.
TICK: Final = 1.0

# What a worker that crashed outside the server returns (BSD's EX_SOFTWARE).
EXIT_CRASH: Final = 70

# A dead worker's socket stays open (connections hashed to it wait) while its
# restart is at most this far off: the first few quick restarts.  Beyond it, a
# crash loop, the socket is closed so the other workers take new connections.
SOCKET_KEEP_MAX: Final = 1.0

# The LISTEN_FDNAMES name of the per-worker SO_REUSEPORT sockets handed over in
# an upgrade: the next tree deals these out over its workers, and shares any
# other inherited socket (systemd's) among all of them.
REUSEPORT_NAME: Final = "tlsuv-reuseport"

_worker_number: int | None = None

# Selector keys of the upgrade's readiness pipe (workers' keys carry the _Worker):
# the old parent reads it, the new one watches its end for the reader's close.
_SUCCESSOR: Final = object()
_PREDECESSOR: Final = object()


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
    snapshot: Snapshot = field(default_factory=Snapshot)  # its last metrics report (--metrics)


class Supervisor:
    """Run ``setup(loop) -> Server`` in ``workers`` processes on one address.

    ``setup`` is called in each worker (after the fork) with the worker's new
    loop and returns a :class:`~tlsuv.Server` that is not listening yet; the
    worker listens on its sockets.  :meth:`bind` opens them (call it to learn
    the port before :meth:`run`); :meth:`run` supervises until every worker
    has drained and returns the exit status: 0 when all of them finished
    their drain, 1 otherwise.

    ``sockets`` (``(socket, name)`` pairs, see
    :func:`tlsuv.activation.inherited_sockets`) replaces ``host``/``port``:
    listening sockets inherited from systemd, ``--listen-fd`` or the
    previous tree of an upgrade.  ``pid_file`` is written once every worker
    listens.  ``upgrade_timeout`` bounds how long SIGUSR2 waits for the new
    tree.
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
        sockets: Sequence[tuple[socket.socket, str]] = (),
        pid_file: str | None = None,
        upgrade_timeout: float = upgrade.READY_TIMEOUT,
        metrics: tuple[str, int] | None = None,
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
        self._addresses: list[tuple[str, int]] = []
        self._family = socket.AF_INET
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
        # --metrics: one endpoint in the parent for the whole server; the
        # workers' snapshots summed, the dead ones' kept (like _retired).
        self.metrics = metrics
        self.metrics_address: tuple[str, int] | None = None
        self._endpoint: SelectorEndpoint | None = None
        self._retired_snapshot = Snapshot()
        self._restarts = 0
        # Listening sockets (module docstring): inherited ones every worker
        # serves, and each worker's own SO_REUSEPORT ones.
        self._inherited = list(sockets)
        self._shared: list[tuple[socket.socket, str]] = []
        self._own: dict[int, list[socket.socket]] = {}
        self._reuseport = False  # workers have sockets of their own (to replace if lost)
        self.pid_file = pid_file
        self.upgrade_timeout = upgrade_timeout
        self._ready_fd: int | None = None  # we are an upgrade's new tree: tell the old one
        self._successor: upgrade.Successor | None = None
        self._failed_successors: list[int] = []  # stopped, to be reaped
        self._handed_over = False
        self._stop_signals = 0

    # -- set-up --------------------------------------------------------------

    def bind(self) -> tuple[str, int]:
        """Open the sockets and return the (first) address; port 0 becomes a real port.

        One bound SO_REUSEPORT socket per worker (it listens once its worker
        does), or the inherited ``sockets``.
        """
        if self.address is not None:
            return self.address
        if self._inherited:
            self._adopt_inherited()
            self._remember_addresses()
            if self.metrics is not None:
                self._bind_metrics(*self.metrics)
            assert self.address is not None
            return self.address
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            raise ServerError(f"cannot listen on {self.host!r}: not a numeric IP address") from None
        self._family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        self._reuseport = True
        try:
            for w in self.workers:
                self._own[w.number] = [self._open_socket()]
            if self.metrics is not None:
                self._bind_metrics(*self.metrics)
        except ServerError:
            self._close_sockets()
            raise
        self._remember_addresses()
        assert self.address is not None
        return self.address

    # -- --metrics ---------------------------------------------------------------

    def _bind_metrics(self, host: str, port: int) -> None:
        from prometheus_client import CollectorRegistry  # noqa: PLC0415 - only with --metrics

        from .metrics import SelectorEndpoint, ServerCollector  # noqa: PLC0415 - only with --metrics

        registry = CollectorRegistry(auto_describe=False)
        registry.register(ServerCollector(self.snapshot, extra=self._worker_families))
        endpoint = SelectorEndpoint(registry, self.ready)
        self.metrics_address = endpoint.bind(host, port)
        self._endpoint = endpoint

    def snapshot(self) -> Snapshot:
        """The whole server's counts: every worker's last report, and those of workers gone."""
        total = self._retired_snapshot
        for w in self.workers:
            total = total + w.snapshot
        return total

    def ready(self) -> bool:
        """Serving and not draining: what ``/-/ready`` reports."""
        return not self._draining and any(w.pid and w.listened for w in self.workers)

    def _worker_families(self) -> list[Metric]:
        # Only with --metrics, like the rest of prometheus_client.
        from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily  # noqa: PLC0415

        return [
            GaugeMetricFamily("tlsuv_workers", "Worker processes configured.", value=len(self.workers)),
            GaugeMetricFamily("tlsuv_workers_running", "Worker processes running now.",
                              value=sum(1 for w in self.workers if w.pid)),
            CounterMetricFamily("tlsuv_worker_restarts", "Workers restarted after dying.",
                                value=self._restarts),
        ]

    def _adopt_inherited(self) -> None:
        mine = [s for s, name in self._inherited if name == REUSEPORT_NAME]
        self._shared = [(s, name) for s, name in self._inherited if name != REUSEPORT_NAME]
        for i, sock in enumerate(mine):  # dealt out in turn: a worker may get two
            self._own.setdefault(self.workers[i % len(self.workers)].number, []).append(sock)
        first = (mine or [s for s, _ in self._shared])[0]
        self._family = socket.AddressFamily(first.family)
        name = first.getsockname()
        self.address = (str(name[0]), int(name[1]))
        if mine:
            self._reuseport = True
            for w in self.workers:  # more workers than before: make the missing sockets
                if not self._own.get(w.number):
                    self._own[w.number] = [self._open_socket()]

    def _open_socket(self) -> socket.socket:
        """A bound SO_REUSEPORT socket on our address (the first one fixes the port)."""
        where = self.address or (self.host, self.port)
        sock = _reuseport_socket(self._family)
        try:
            sock.bind(where)
        except OSError as exc:
            sock.close()
            raise ServerError(f"cannot listen on {format_address(where)}: {exc.strerror or exc}") from exc
        if self.address is None:
            name = sock.getsockname()
            self.address = (str(name[0]), int(name[1]))
        return sock

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every distinct address served, in order (several when systemd passed several sockets)."""
        return list(self._addresses)

    def _remember_addresses(self) -> None:
        # Read while every socket is open: the parent closes its copies when it drains.
        socks = [s for s, _ in self._shared] + [s for own in self._own.values() for s in own]
        for sock in socks:
            name = sock.getsockname()
            addr = (str(name[0]), int(name[1]))
            if addr not in self._addresses:
                self._addresses.append(addr)

    def _sockets_of(self, w: _Worker) -> list[socket.socket]:
        return [s for s, _ in self._shared] + self._own.get(w.number, [])

    def _close_sockets(self) -> None:
        for sock, _ in self._shared:
            sock.close()
        for own in self._own.values():
            for sock in own:
                sock.close()

    def run(self, on_ready: Callable[[], None] | None = None) -> int:
        """Fork the workers and supervise them until they have drained; return the exit status.

        ``on_ready`` runs once every worker has listened: before that,
        connections to the address are refused (except on inherited sockets,
        where they wait in the queue).
        """
        self.bind()
        self._on_ready = on_ready
        self._ready_fd = upgrade.take_ready_fd()
        assert self.address is not None
        log.info("starting %d workers on %s", len(self.workers),
                 ", ".join(format_address(a) for a in self.addresses))
        self._selector = selectors.DefaultSelector()
        if self._endpoint is not None:
            self._endpoint.attach(self._selector)
        if self._ready_fd is not None:
            # A pipe's write end turns readable (an error) when the reader closes it.
            self._selector.register(self._ready_fd, selectors.EVENT_READ, _PREDECESSOR)
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
            if self._successor is not None:
                self._successor.close()
            if self._endpoint is not None:
                self._endpoint.close()
            self._selector.close()
            self._close_sockets()
            if self._ready_fd is not None:
                os.close(self._ready_fd)
            if self.pid_file is not None:
                activation.remove_pid_file(self.pid_file)

    def _install_signals(self) -> None:
        r, w = os.pipe()
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        self._wakeup = (r, w)
        assert self._selector is not None
        self._selector.register(r, selectors.EVENT_READ, None)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGUSR2, signal.SIGHUP,
                       signal.SIGUSR1):
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
            self._watch_successor()
            if self._next_stats is not None and now >= self._next_stats:
                log.info("%s", self._totals().line(len(self.workers)))
                assert self.stats_interval is not None
                self._next_stats = max(self._next_stats + self.stats_interval, now)
            for key, mask in self._selector.select(self._timeout()):
                if key.data is None:
                    _drain_fd(key.fd)
                elif key.data is self._endpoint:
                    self._endpoint.handle(key, mask)
                elif key.data is _SUCCESSOR:
                    self._watch_successor()
                elif key.data is _PREDECESSOR:
                    self._predecessor_gone()
                else:
                    self._read_messages(key.data)
            if self._endpoint is not None:
                self._endpoint.expire(time.monotonic())
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
        if self._successor is not None:
            deadlines.append(self._successor.deadline)
        if not deadlines:
            return TICK
        return max(0.0, min(min(deadlines) - now, TICK))

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:  # reload: each worker re-reads its files (tlsuv.reload)
                self._forward(signum)
                continue
            if signum == signal.SIGUSR2:
                self._start_upgrade()
                continue
            if signum == signal.SIGUSR1:  # logrotate's "reopen your logs": the workers hold them
                for w in self.workers:
                    self._send(w, {"order": "reopen"})
                continue
            # A drain that an upgrade started is not a signal: the first stop
            # signal after it keeps draining, only a second one aborts.
            self._stop_signals += 1
            if self._successor is not None:  # a stop during an upgrade stops both trees
                self._stop_successor(f"{name} during the upgrade")
            if not self._draining:
                self._begin_drain(name)
            elif self._stop_signals == 1:
                log.info("%s: already draining", name)
            else:
                log.info("%s again: aborting all connections", name)
                for w in self.workers:
                    if w.pid:
                        self._send(w, {"order": "abort"})
                deadline = time.monotonic() + ABORT_MARGIN
                self._kill_at = deadline if self._kill_at is None else min(self._kill_at, deadline)

    def _forward(self, signum: int) -> None:
        alive = [w for w in self.workers if w.pid] if not self._draining else []
        log.info("%s: passing it on to %d worker(s)", signal.Signals(signum).name, len(alive))
        for w in alive:
            with contextlib.suppress(ProcessLookupError):  # it just died: the reaper will see it
                os.kill(w.pid, signum)

    def _begin_drain(self, why: str) -> None:
        self._draining = True
        # Our copies of the sockets go now: once the workers have closed
        # theirs, a stopping server refuses new connections at once instead
        # of queueing them for nobody (the old behaviour, and what a balancer
        # needs to fail over).  After an upgrade the new tree holds them.
        self._close_sockets()
        alive = [w for w in self.workers if w.pid]
        log.info("%s: draining %d worker(s), grace %s", why, len(alive),
                 "unlimited" if self.grace is None else f"{self.grace:.1f}s")
        for w in alive:
            self._send(w, {"order": "drain"})
        if self.grace is not None:
            self._kill_at = time.monotonic() + self.grace + KILL_MARGIN

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
            self._retired_snapshot = self._retired_snapshot + w.snapshot.retired()
            w.snapshot = Snapshot()
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
            self._restarts += 1
            log.warning("worker %d (pid %d) %s after %.1fs; restarting in %.1fs",
                        w.number, pid, how, lived, delay)
            if delay > SOCKET_KEEP_MAX and self._own.get(w.number):
                for sock in self._own.pop(w.number):
                    sock.close()
                log.warning("worker %d: closed its listening socket until it is back: new "
                            "connections go to the other workers", w.number)

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

    # -- upgrades (tlsuv.upgrade) ----------------------------------------------

    def _serving(self) -> None:
        """Every worker listens: tell whoever waits for us."""
        if self.pid_file is not None:
            try:
                activation.write_pid_file(self.pid_file)
            except OSError as exc:
                log.error("cannot write the pid file %s: %s", self.pid_file, exc.strerror)
        if self._ready_fd is not None:
            # We are the new tree of an upgrade: the old parent tells the
            # service manager our pid (MAINPID=) once it has heard this.
            self._unwatch_predecessor()
            upgrade.report_ready(self._ready_fd)
            self._ready_fd = None
        else:
            activation.notify("READY=1")

    def _predecessor_gone(self) -> None:
        """Our readiness pipe closed before we served: the old parent gave up on us, or died."""
        self._unwatch_predecessor()
        if self._ready_fd is not None:
            os.close(self._ready_fd)
            self._ready_fd = None
        if not self._draining:
            self._begin_drain("the process that started this upgrade stopped it")

    def _unwatch_predecessor(self) -> None:
        if self._selector is not None and self._ready_fd is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._ready_fd)

    def _start_upgrade(self) -> None:
        if self._draining:
            log.warning("SIGUSR2: not upgrading: this tree is %s",
                        "handing over to a new one" if self._handed_over else "stopping")
            return
        if self._successor is not None:
            log.warning("SIGUSR2: an upgrade is already in progress (new process %d)",
                        self._successor.pid)
            return
        if self._ready_fd is not None:
            log.warning("SIGUSR2: not upgrading: this tree is itself starting as an upgrade")
            return
        handed = list(self._shared) + [(sock, REUSEPORT_NAME) for w in self.workers
                                       for sock in self._own.get(w.number, [])]
        argv = upgrade.command_line()
        log.info("SIGUSR2: starting a new process tree on %d socket(s): %s", len(handed), " ".join(argv))
        try:
            successor = upgrade.spawn(handed, argv, self.upgrade_timeout)
        except OSError as exc:
            log.error("upgrade failed: cannot start the new process: %s; still serving (pid %d)",
                      exc.strerror or exc, os.getpid())
            return
        self._successor = successor
        assert self._selector is not None
        self._selector.register(successor.fd, selectors.EVENT_READ, _SUCCESSOR)
        log.info("upgrade: new parent is pid %d; waiting until all its workers serve", successor.pid)

    def _watch_successor(self) -> None:
        for pid in list(self._failed_successors):
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == 0:
                    continue
            self._failed_successors.remove(pid)
        successor = self._successor
        if successor is None:
            return
        ready = successor.poll() if not successor.hung_up else False
        if ready is False and not successor.hung_up:
            # Usually it is exiting (its descriptors close just before its
            # status can be collected): wait a moment for the real reason.
            successor.hung_up = True
            successor.deadline = min(successor.deadline, time.monotonic() + upgrade.EXIT_WAIT)
            assert self._selector is not None
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(successor.fd)
        try:
            pid, status = os.waitpid(successor.pid, os.WNOHANG)
        except ChildProcessError:  # pragma: no cover - reaped by someone else
            pid, status = successor.pid, 0
        if pid:  # even after "ready": a tree that died cannot take over
            code = os.waitstatus_to_exitcode(status)
            how = f"exited with status {code}" if code >= 0 else f"was killed by {signal.Signals(-code).name}"
            self._upgrade_failed(f"the new process (pid {pid}) {how} before all its workers served",
                                 reaped=True)
        elif ready:
            self._hand_over(successor)
        elif time.monotonic() < successor.deadline:
            return
        elif successor.hung_up:
            self._upgrade_failed(f"the new process (pid {successor.pid}) closed its readiness pipe "
                                 "without reporting ready")
        else:
            self._upgrade_failed(f"the new process (pid {successor.pid}) did not serve within "
                                 f"{self.upgrade_timeout:g}s")

    def _hand_over(self, successor: upgrade.Successor) -> None:
        self._forget_successor()
        self._handed_over = True
        log.info("upgrade: the new tree (pid %d) serves after %.1fs; this one (pid %d) drains",
                 successor.pid, time.monotonic() - successor.started, os.getpid())
        # The manager must follow the new parent before this one exits, or it
        # would take our exit for the service's end (Type=notify).
        activation.notify(f"MAINPID={successor.pid}")
        self._begin_drain("upgrade")

    def _upgrade_failed(self, why: str, reaped: bool = False) -> None:
        successor = self._successor
        assert successor is not None
        self._forget_successor()
        log.error("upgrade failed: %s; still serving with this tree (pid %d)", why, os.getpid())
        if not reaped:
            self._stop(successor.pid)

    def _stop_successor(self, why: str) -> None:
        successor = self._successor
        assert successor is not None
        # Closing the pipe is the order: the new parent drains when it sees
        # it close (_predecessor_gone).  A signal could reach it twice (once
        # from us, once from a terminal or an init system) and mean "abort".
        self._forget_successor()
        self._failed_successors.append(successor.pid)
        log.info("%s: the new process %d stops too", why, successor.pid)

    def _stop(self, pid: int) -> None:
        # SIGTERM: a new parent drains its workers (and kills any that hang)
        # like any tlsuv parent; before it has any, SIGTERM just ends it.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        self._failed_successors.append(pid)

    def _forget_successor(self) -> None:
        successor, self._successor = self._successor, None
        if successor is None:
            return
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(successor.fd)
        successor.close()

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
                    self._serving()
                    on_ready()
            w.counters = Counters.from_message(message)
            snapshot = message.get("snapshot")
            if isinstance(snapshot, dict):
                w.snapshot = Snapshot.from_message(snapshot)

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
        if self._reuseport and not self._own.get(w.number):
            try:  # its socket was closed during a crash loop (_reap): a fresh one
                self._own[w.number] = [self._open_socket()]
            except ServerError as exc:
                delay = self._schedule_restart(w)
                log.error("cannot start worker %d: %s; retrying in %.1fs", w.number, exc, delay)
                return
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
        w.snapshot = Snapshot()
        self._selector.register(ours, selectors.EVENT_READ, w)
        log.debug("worker %d forked (pid %d)", w.number, pid)

    def _become_worker(self, w: _Worker, channel: socket.socket) -> NoReturn:
        code = EXIT_CRASH
        try:
            # Shed the parent: its signal handling, its wake-up pipe, the
            # other workers' channels, the port reservation, the selector.
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides (module docstring)
            # Forwarded by the parent; a worker whose server has no reload handle ignores it.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # upgrades are the parent's too
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the loop's own handler (_Child.run)
            for signum in (signal.SIGTERM, signal.SIGCHLD):
                signal.signal(signum, signal.SIG_DFL)
            if self._wakeup is not None:
                for fd in self._wakeup:
                    os.close(fd)
            for other in self.workers:
                if other.channel is not None:
                    other.channel.close()
            for number, own in self._own.items():  # the other workers' queues are theirs
                if number != w.number:
                    for sock in own:
                        sock.close()
            if self._ready_fd is not None:
                os.close(self._ready_fd)
            if self._successor is not None:
                self._successor.close()
            if self._endpoint is not None:
                self._endpoint.close_after_fork()
            if self._selector is not None:
                self._selector.close()
            global _worker_number  # noqa: PLW0603 -- set once, right after the fork
            _worker_number = w.number
            _tag_logs(w.number)
            code = _Child(self, channel, self._sockets_of(w)).run()
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

    def __init__(self, sup: Supervisor, channel: socket.socket, sockets: list[socket.socket]) -> None:
        self.sup = sup
        self.channel = channel
        self.sockets = sockets
        self.loop = pyuv.Loop()
        self.server: Server | None = None
        self.handles: list[pyuv.Handle] = []
        self.draining = False

    def run(self) -> int:
        loop = self.loop
        self.server = server = self.sup.setup(loop)
        for sock in self.sockets:  # copies of the parent's, which keeps them open
            server.listen_socket(sock, self.sup.backlog)
        self.channel.setblocking(False)
        poll = pyuv.Poll(loop, self.channel.fileno())
        poll.start(pyuv.UV_READABLE, self._on_channel)
        term = pyuv.Signal(loop)
        term.start(self._on_sigterm, signal.SIGTERM)
        reopen = pyuv.Signal(loop)  # SIGUSR1 sent to the worker itself (systemctl kill -s USR1)
        reopen.start(lambda h, signum: accesslog.reopen_all(), signal.SIGUSR1)
        self.handles = [poll, term, reopen]
        if self.sup.stats_interval is not None or self.sup.metrics is not None:
            period = min(self.sup.stats_interval or STATS_PUSH_MAX, STATS_PUSH_MAX)
            timer = pyuv.Timer(loop)
            timer.start(lambda t: self._report(), period, period)
            self.handles.append(timer)
        self._report("listening")
        loop.run()
        if server.access_log is not None:
            server.access_log.close()
            loop.run()  # the access log's handle closes
        self._report("exiting")
        self.channel.close()
        return 0

    def _report(self, event: str = "stats") -> None:
        assert self.server is not None
        message: dict[str, object] = {"event": event, **Counters.of(self.server).to_message()}
        if self.sup.metrics is not None:
            message["snapshot"] = self.server.snapshot().to_message()
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
            elif order == "reopen":
                accesslog.reopen_all()

    def _on_sigterm(self, handle: pyuv.Signal, signum: int) -> None:
        self._drain()  # idempotent: the parent's order may come too

    def _drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        assert self.server is not None
        count = len(self.server.connections)
        self.server.drain(self.sup.grace, self._closed)
        log.info("draining %d connection(s)", count)  # logged once no longer listening

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
    sockets: Sequence[tuple[socket.socket, str]] | None = None,
    pid_file: str | None = None,
    upgrade_timeout: float = upgrade.READY_TIMEOUT,
    metrics: tuple[str, int] | None = None,
) -> int:
    """Serve with ``workers`` processes until SIGTERM/SIGINT; return the exit status.

    ``setup(loop)`` builds each worker's (not yet listening) server.
    ``on_listening(host, port)`` runs in the parent once every worker is
    listening (once per address).  Raises :class:`~tlsuv.ServerError` if the
    address cannot be bound (before any worker starts), and
    :class:`~tlsuv.activation.ActivationError` for unusable inherited sockets.

    ``sockets=None`` serves on the sockets passed with ``LISTEN_FDS`` (by
    systemd, or by the previous tree during an upgrade) when there are any,
    else binds ``host``/``port``; pass a list to choose.  SIGUSR2 upgrades
    (:mod:`tlsuv.upgrade`) by running this program's command line again.
    ``metrics=(host, port)`` serves the whole server's metrics from the
    parent (:mod:`tlsuv.metrics`).
    """
    if sockets is None:
        sockets = activation.inherited_sockets()
    sup = Supervisor(setup, host=host, port=port, workers=workers, grace=grace,
                     stats_interval=stats_interval, sockets=sockets, pid_file=pid_file,
                     upgrade_timeout=upgrade_timeout, metrics=metrics)
    sup.bind()

    def listening() -> None:
        if on_listening is not None:
            for h, p in sup.addresses:
                on_listening(h, p)

    return sup.run(listening)


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
    sockets: Sequence[tuple[socket.socket, str]] = (),
) -> int:
    """``--workers N`` for a command-line tool: bind, supervise, announce once all listen.

    ``sockets``: inherited listening sockets (:func:`tlsuv.activation.inherited_sockets`)
    to serve on instead of ``--host``/``--port``.  ``announce`` runs once per address.
    """
    sup = Supervisor(setup, host=args.host, port=args.port, workers=args.workers, grace=args.grace,
                     stats_interval=args.stats_interval, sockets=sockets,
                     pid_file=getattr(args, "pid_file", None), metrics=getattr(args, "metrics", None))
    try:
        sup.bind()
    except ServerError as exc:
        _cli.fail(f"{prog}: error: {exc}")

    def listening() -> None:
        for host, port in sup.addresses:
            announce(host, port)
        if sup.metrics_address is not None:
            print(f"tlsuv metrics on http://{format_address(sup.metrics_address)}/metrics", flush=True)

    return sup.run(listening)


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
