"""The load generator's core: echo clients that verify every byte they get back.

Standard library (``ssl``, ``select.epoll``, ``socket``) plus tls13.py's use
of ``cryptography`` (a tlsuv dependency), so the smoke test imports it
without the bench extra.  One process drives all of a
measurement's connections from one level-triggered epoll loop over
non-blocking sockets (``ssl.SSLSocket`` for TLS): the load generator has one
core to itself, and on one core more processes would only add context
switches.  Its own CPU time is reported next to the server's, so a run where
the client, not the server, was the limit shows it.

Verification:

* ping-pong: each message is one of a rotating set of random payloads (a
  prime number of them, so neighbouring messages always differ); the echo
  must be exactly that payload -- no byte more (an extra byte would start
  the next message's echo), none less, none changed.
* streaming: the bytes sent are an endless repetition of a random pattern
  whose length is not a multiple of the write size, and every byte received
  is compared with the pattern at its stream offset.
* every connection must start with the greeting ``OK\\r\\n``, and a TLS one
  must negotiate the expected cipher without resuming a session.

A mismatch raises :class:`VerificationError`; a connection that fails or
closes early raises :class:`BenchError`.  Either ends the measurement.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import random
import resource
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from cryptography.exceptions import InvalidTag

from . import tls13

GREETING: Final = b"OK\r\n"
EXPECTED_CIPHER: Final = "TLS_AES_128_GCM_SHA256"

EPOLLIN: Final = select.EPOLLIN
EPOLLOUT: Final = select.EPOLLOUT
# Errors and hang-ups are handled by the read path: recv() reports them.
_READ_EVENTS: Final = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP
_WRITE_EVENTS: Final = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP

# SSLWantReadError is an OSError but not a BlockingIOError; plain sockets raise the latter.
_WOULD_BLOCK_READ: Final = (ssl.SSLWantReadError, BlockingIOError)
_WOULD_BLOCK_WRITE: Final = (ssl.SSLWantWriteError, BlockingIOError)

# RST on close: a closed client port is reusable at once instead of sitting in
# TIME_WAIT, which thousands of handshakes per second would exhaust.
_LINGER_RST: Final = struct.pack("ii", 1, 0)

_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")

PAYLOAD_VARIANTS: Final = 31  # prime: message i and i+1 never share a payload
STREAM_PATTERN: Final = (1 << 20) + 4093  # not a multiple of any write size
STREAM_READ: Final = 256 * 1024
STREAM_WINDOW: Final = 512 * 1024  # bytes in flight per connection, never more


class BenchError(Exception):
    """A measurement could not be completed."""


class VerificationError(BenchError):
    """The server sent something other than the greeting and the echo."""


@dataclass(frozen=True)
class Target:
    """Where the server is and how to speak to it."""

    host: str
    port: int
    tls: bool = True
    cafile: str | None = None  # verify the server against this; None: do not verify
    server_hostname: str = "localhost"
    expect_cipher: str | None = EXPECTED_CIPHER
    server_pid: int | None = None  # for CPU accounting; None: not measured
    server_core: int | None = None  # the CPU the server is pinned to, to see who else used it
    pinned_cert: str | None = None  # PEM file: the tls13 client insists on exactly this certificate


@dataclass
class Result:
    """One measurement.  Counts and times cover the measurement window only."""

    kind: str
    connections: int
    elapsed: float  # seconds of the window
    count: int = 0  # messages echoed, or handshakes completed
    nbytes: int = 0  # payload bytes echoed and verified
    server_cpu: float | None = None  # seconds of server CPU (user + system) in the window
    server_user: float | None = None  # the user-space part of it (see proc_cpu_times)
    client_cpu: float = 0.0  # seconds of this process's CPU in the window
    p50_us: float | None = None
    p99_us: float | None = None
    verified_bytes: int = 0  # everything verified, warm-up included
    tls_version: str | None = None
    cipher: str | None = None
    session_ticket: bool | None = None  # did the server issue a TLS session ticket
    # CPU seconds other processes took on the server's and on our core during
    # the window: how disturbed this measurement was on a shared machine.
    others_server_core: float | None = None
    others_client_core: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


# -- /proc ------------------------------------------------------------------


def proc_cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU time of process ``pid`` (all its threads), in seconds.

    The kernel keeps their sum exact (the scheduler's runtime) and splits it
    in the proportion its timer ticks found the process in user space or in
    the kernel: over a window of seconds the split is good to a few percent.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    # The command name is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK  # utime, stime: fields 14 and 15


def proc_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")


def cpu_busy_seconds(cpus: tuple[int, ...]) -> dict[int, float]:
    """Per CPU: time spent running tasks (user, nice, system) or stolen by the hypervisor.

    Interrupt and softirq time are left out: on loopback much of it is the
    benchmark's own packets.
    """
    wanted = {f"cpu{c}".encode(): c for c in cpus}
    out: dict[int, float] = {}
    with open("/proc/stat", "rb") as f:
        for line in f:
            fields = line.split()
            if fields and fields[0] in wanted:
                user, nice, system, steal = (int(fields[i]) for i in (1, 2, 3, 8))
                out[wanted[fields[0]]] = (user + nice + system + steal) / _CLK_TCK
    return out


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# -- TLS ------------------------------------------------------------------


def client_context(target: Target) -> ssl.SSLContext | None:
    """The client side: TLS 1.3 only, no resumption (no session is ever offered back).

    Which TLS 1.3 cipher suites are offered cannot be set through Python's
    ``ssl``; the benchmark runs its clients with an OPENSSL_CONF that offers
    only TLS_AES_128_GCM_SHA256, and ``expect_cipher`` checks it worked.
    """
    if not target.tls:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if target.cafile is not None:
        ctx.load_verify_locations(target.cafile)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


# -- the event loop ---------------------------------------------------------


class _Handler(Protocol):
    def on_event(self, events: int) -> None: ...


class Reactor:
    """A minimal level-triggered epoll loop: fd -> handler, nothing else per event."""

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._handlers: dict[int, _Handler] = {}
        self._masks: dict[int, int] = {}

    def watch(self, fd: int, handler: _Handler, mask: int) -> None:
        """Register ``fd`` or change its handler and events; a no-op when nothing changes."""
        old = self._masks.get(fd)
        self._handlers[fd] = handler
        if old is None:
            self._ep.register(fd, mask)
        elif old != mask:
            self._ep.modify(fd, mask)
        self._masks[fd] = mask

    def forget(self, fd: int) -> None:
        if self._masks.pop(fd, None) is not None:
            self._ep.unregister(fd)
            del self._handlers[fd]

    def run(self, until: float, done: Callable[[], bool] | None = None) -> None:
        """Dispatch events until the monotonic clock reaches ``until`` or ``done()``."""
        poll = self._ep.poll
        handlers = self._handlers
        clock = time.monotonic
        while True:
            now = clock()
            if now >= until or (done is not None and done()):
                return
            for fd, events in poll(min(until - now, 0.05)):
                handler = handlers.get(fd)
                if handler is not None:
                    handler.on_event(events)

    def close(self) -> None:
        self._ep.close()


def _close_rst(sock: socket.socket) -> None:
    # The raw socket got SO_LINGER {1, 0} before any TLS wrapping, so this is an RST.
    with contextlib.suppress(OSError):
        sock.close()


# -- connecting ---------------------------------------------------------------

_CONNECTING, _HANDSHAKING, _GREETING, _RAW_TLS = range(4)

# How a Dial speaks TLS: Python's ssl (an SSLSocket, for connections that then
# carry data), the lean handshake-only client of tls13.py, or nothing (plain TCP).
ClientTLS = ssl.SSLContext | tls13.ClientConfig | None


class Dial:
    """One connection being set up: TCP connect, TLS handshake, the greeting.

    ``on_ready(dial)`` runs once the greeting is verified; the socket is then
    still registered with the reactor, and the callback takes it over.
    """

    __slots__ = ("_ctx", "_got", "_hs", "_on_ready", "_reactor", "_state", "_target", "fd", "session_ticket",
                 "sock")

    def __init__(self, reactor: Reactor, target: Target, ctx: ClientTLS,
                 on_ready: Callable[[Dial], None]) -> None:
        raw = socket.socket(socket.AF_INET6 if ":" in target.host else socket.AF_INET, socket.SOCK_STREAM)
        raw.setblocking(False)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = raw.connect_ex((target.host, target.port))
        if err not in (0, errno.EINPROGRESS):
            raw.close()
            raise BenchError(f"connect to {target.host}:{target.port}: {os.strerror(err)}")
        self.sock: socket.socket = raw
        self.fd = raw.fileno()
        self._reactor = reactor
        self._target = target
        self._ctx = ctx
        self._on_ready = on_ready
        self._state = _CONNECTING
        self._got = b""
        self._hs: tls13.ClientHandshake | None = None
        self.session_ticket: bool | None = None
        reactor.watch(self.fd, self, _WRITE_EVENTS)

    def on_event(self, events: int) -> None:
        if self._state == _CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise BenchError(f"connect to {self._target.host}:{self._target.port}: {os.strerror(err)}")
            if self._ctx is None:
                self._state = _GREETING
            elif isinstance(self._ctx, tls13.ClientConfig):
                self._hs = tls13.ClientHandshake(self._ctx)
                self._send_all(self._hs.start())
                self._state = _RAW_TLS
                self._reactor.watch(self.fd, self, _READ_EVENTS)
                return
            else:
                self.sock = self._ctx.wrap_socket(
                    self.sock, server_hostname=self._target.server_hostname, do_handshake_on_connect=False)
                self._state = _HANDSHAKING
        if self._state == _RAW_TLS:
            self._raw_tls()
            return
        if self._state == _HANDSHAKING:
            assert isinstance(self.sock, ssl.SSLSocket)
            try:
                self.sock.do_handshake()
            except ssl.SSLWantReadError:
                self._reactor.watch(self.fd, self, _READ_EVENTS)
                return
            except ssl.SSLWantWriteError:
                self._reactor.watch(self.fd, self, _WRITE_EVENTS)
                return
            except (ssl.SSLError, OSError) as exc:
                raise BenchError(f"TLS handshake failed: {exc}") from exc
            check_tls(self.sock, self._target)
            self._state = _GREETING
        while len(self._got) < len(GREETING):
            try:
                chunk = self.sock.recv(len(GREETING) - len(self._got))
            except _WOULD_BLOCK_READ:
                self._reactor.watch(self.fd, self, _READ_EVENTS)
                return
            except OSError as exc:
                raise BenchError(f"reading the greeting: {exc}") from exc
            if not chunk:
                raise BenchError(f"server closed the connection after {self._got!r} of the greeting")
            self._got += chunk
        if self._got != GREETING:
            raise VerificationError(f"greeting {self._got!r}, expected {GREETING!r}")
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            raise VerificationError("bytes after the greeting that nobody sent")
        self._on_ready(self)

    def _raw_tls(self) -> None:
        hs = self._hs
        assert hs is not None
        while len(hs.plaintext) < len(GREETING):
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                raise BenchError(f"TLS handshake failed: {exc}") from exc
            if not data:
                raise BenchError(f"server closed the connection during the handshake ({hs.state})")
            try:
                reply = hs.receive(data)
            except (tls13.TLS13Error, InvalidTag) as exc:
                raise VerificationError(f"TLS handshake: {exc!r}") from exc
            if reply:
                self._send_all(reply)
        if bytes(hs.plaintext) != GREETING:
            raise VerificationError(f"greeting {bytes(hs.plaintext)!r}, expected {GREETING!r}")
        self.session_ticket = hs.session_ticket
        self._on_ready(self)

    def _send_all(self, data: bytes) -> None:
        # A few hundred bytes into a fresh socket's empty send buffer: all or an error.
        try:
            sent = self.sock.send(data)
        except OSError as exc:
            raise BenchError(f"send failed during the handshake: {exc}") from exc
        if sent != len(data):
            raise BenchError(f"only {sent} of {len(data)} handshake bytes were sent")


def check_tls(sock: ssl.SSLSocket, target: Target) -> None:
    """A full handshake (no resumption) on the expected cipher."""
    if sock.session_reused:
        raise VerificationError("the TLS session was resumed; every handshake must be a full one")
    if target.expect_cipher is not None:
        cipher = sock.cipher()
        if cipher is None or cipher[0] != target.expect_cipher:
            raise VerificationError(f"negotiated {cipher}, expected {target.expect_cipher}")


def client_tls(target: Target, engine: str) -> ClientTLS:
    """``ssl``: Python's ssl module; ``tls13``: the handshake-only client of tls13.py."""
    if not target.tls:
        return None
    if engine == "ssl":
        return client_context(target)
    if engine == "tls13":
        der = None
        if target.pinned_cert is not None:
            with open(target.pinned_cert) as f:
                der = ssl.PEM_cert_to_DER_cert(f.read())
        return tls13.ClientConfig(target.server_hostname, der)
    raise ValueError(f"unknown TLS engine {engine!r}")


def open_connections(target: Target, n: int, *, concurrency: int = 16, timeout: float = 120.0,
                     reactor: Reactor | None = None, engine: str = "ssl") -> list[socket.socket]:
    """Open ``n`` connections, at most ``concurrency`` being set up at once.

    Each has finished its handshake and its greeting was verified.  The
    sockets are left unregistered from ``reactor``.  With ``engine="tls13"``
    they are raw sockets whose TLS session nobody can use: fine for idle
    connections, not for data.
    """
    own = reactor is None
    r = reactor or Reactor()
    ctx = client_tls(target, engine)
    ready: list[socket.socket] = []
    started = 0

    def on_ready(d: Dial) -> None:
        nonlocal started
        r.forget(d.fd)
        ready.append(d.sock)
        if started < n:
            started += 1
            Dial(r, target, ctx, on_ready)

    try:
        for _ in range(min(n, concurrency)):
            started += 1
            Dial(r, target, ctx, on_ready)
        r.run(time.monotonic() + timeout, lambda: len(ready) >= n)
        if len(ready) < n:
            raise BenchError(f"only {len(ready)} of {n} connections were set up in {timeout:.0f} s")
    except BaseException:
        for s in ready:
            _close_rst(s)
        raise
    finally:
        if own:
            r.close()
    return ready


def describe(socks: list[socket.socket]) -> tuple[str | None, str | None, bool | None]:
    """(TLS version, cipher, session ticket issued) of the first connection."""
    if not socks or not isinstance(socks[0], ssl.SSLSocket):
        return None, None, None
    s = socks[0]
    cipher = s.cipher()
    session = s.session
    return s.version(), cipher[0] if cipher else None, session.has_ticket if session else None


# -- measurement windows ------------------------------------------------------


@dataclass
class _Counters:
    count: int = 0
    nbytes: int = 0
    verified: int = 0
    measuring: bool = False
    latencies: array.array[int] = field(default_factory=lambda: array.array("q"))


def _measure(reactor: Reactor, counters: _Counters, target: Target, result: Result, *,
             warmup: float, duration: float, done: Callable[[], bool] | None) -> None:
    """Warm up, then count over ``duration`` seconds (or until ``done()``)."""
    start = time.monotonic()
    reactor.run(start + warmup, done)
    pid = target.server_pid
    mine = os.sched_getaffinity(0)
    cores = tuple(c for c in (target.server_core, *mine) if c is not None) if len(mine) == 1 else ()
    c0, b0 = counters.count, counters.nbytes
    busy0 = cpu_busy_seconds(cores)
    usr0, sys0 = proc_cpu_times(pid) if pid is not None else (0.0, 0.0)
    cli0 = time.process_time()
    t0 = time.monotonic()
    counters.measuring = True
    reactor.run(t0 + duration, done)
    counters.measuring = False
    t1 = time.monotonic()
    result.client_cpu = time.process_time() - cli0
    if pid is not None:
        usr1, sys1 = proc_cpu_times(pid)
        result.server_user = usr1 - usr0
        result.server_cpu = result.server_user + sys1 - sys0
    if cores:
        busy1 = cpu_busy_seconds(cores)
        used = {c: busy1[c] - busy0[c] for c in cores}
        if target.server_core is not None and result.server_cpu is not None:
            result.others_server_core = max(0.0, used[target.server_core] - result.server_cpu)
        (client_core,) = mine
        if client_core != target.server_core:
            result.others_client_core = max(0.0, used[client_core] - result.client_cpu)
    result.elapsed = t1 - t0
    result.count = counters.count - c0
    result.nbytes = counters.nbytes - b0
    result.verified_bytes = counters.verified
    lat = counters.latencies
    if lat:
        ordered = sorted(lat)
        result.p50_us = _percentile(ordered, 50) / 1000
        result.p99_us = _percentile(ordered, 99) / 1000


def _percentile(ordered: list[int], pct: float) -> float:
    """Nearest-rank percentile of a sorted list."""
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil without floats' rounding
    return float(ordered[int(rank) - 1])


def _mismatch(got: bytes | bytearray, expected: bytes | bytearray | memoryview, where: str) -> str:
    exp = bytes(expected)
    for i, (a, b) in enumerate(zip(got, exp, strict=False)):
        if a != b:
            return f"{where}: byte {i} is {a:#04x}, expected {b:#04x}"
    return f"{where}: {len(got)} bytes, expected {len(exp)}"


# -- ping-pong ----------------------------------------------------------------


class _PingPong:
    """One connection sending a message, waiting for its whole echo, and repeating."""

    __slots__ = ("_buf", "_counters", "_got", "_i", "_msg", "_off", "_payloads", "_reactor", "_size",
                 "_sslobj", "_t0", "_view", "fd", "sock")

    def __init__(self, reactor: Reactor, sock: socket.socket, payloads: list[bytes],
                 counters: _Counters, start: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self._reactor = reactor
        self._payloads = payloads
        self._counters = counters
        self._size = len(payloads[0])
        self._buf = bytearray(self._size)
        self._view = memoryview(self._buf)
        self._sslobj = _sslobj(sock)
        self._i = start
        self._msg = payloads[0]
        self._got = 0
        self._off = 0
        self._t0 = 0

    def start(self) -> None:
        self._next()

    def _next(self) -> None:
        self._i += 1
        self._msg = self._payloads[self._i % PAYLOAD_VARIANTS]
        self._got = 0
        self._off = 0
        self._t0 = time.perf_counter_ns()
        self._send()

    def _send(self) -> None:
        msg = self._msg
        data = msg if self._off == 0 else memoryview(msg)[self._off:]
        try:
            sent = self._sslobj.write(data) if self._sslobj is not None else self.sock.send(data)
        except _WOULD_BLOCK_WRITE:
            self._reactor.watch(self.fd, self, _READ_EVENTS | EPOLLOUT)
            return
        except OSError as exc:
            raise BenchError(f"send failed: {exc}") from exc
        self._off += sent
        # The echo may start arriving while the rest is still queued: read either way.
        self._reactor.watch(self.fd, self, _READ_EVENTS if self._off == self._size
                            else _READ_EVENTS | EPOLLOUT)

    def on_event(self, events: int) -> None:
        if self._off < self._size and events & _WRITE_EVENTS:
            self._send()
        if not events & _READ_EVENTS:
            return
        size = self._size
        got = self._got
        sock = self.sock
        sslobj = self._sslobj
        view = self._view
        while got < size:
            try:
                if sslobj is not None:
                    n = sslobj.read(size - got, view[got:])
                else:
                    n = sock.recv_into(view[got:], size - got)
            except _WOULD_BLOCK_READ:
                self._got = got
                return
            except OSError as exc:
                raise BenchError(f"recv failed after {got} of {size} bytes: {exc}") from exc
            if n == 0:
                raise BenchError(f"server closed the connection after {got} of {size} echoed bytes")
            got += n
        if self._buf != self._msg:
            raise VerificationError(_mismatch(self._buf, self._msg, f"message {self._i}"))
        c = self._counters
        c.count += 1
        c.nbytes += size
        c.verified += size
        if c.measuring:
            c.latencies.append(time.perf_counter_ns() - self._t0)
        self._next()


def _sslobj(sock: socket.socket) -> Any:
    """The C object behind an SSLSocket, or None for a plain socket.

    Calling its ``read`` and ``write`` directly skips ``ssl.SSLSocket``'s
    Python wrappers: a few µs per message, a large share of what the load
    generator may spend per message before it, not the server, sets the pace.
    """
    if isinstance(sock, ssl.SSLSocket):
        return vars(sock)["_sslobj"]
    return None


def make_payloads(size: int, seed: int = 1) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(size) for _ in range(PAYLOAD_VARIANTS)]


def run_pingpong(target: Target, *, conns: int, size: int, warmup: float, duration: float,
                 max_messages: int | None = None, setup_timeout: float = 120.0) -> Result:
    """``conns`` connections each doing ping-pong with ``size``-byte messages.

    ``max_messages`` ends the run early once that many were verified (in the
    measurement window); the smoke test uses it.
    """
    r = Reactor()
    socks = open_connections(target, conns, timeout=setup_timeout, reactor=r)
    result = Result("pingpong", conns, 0.0)
    result.tls_version, result.cipher, result.session_ticket = describe(socks)
    counters = _Counters()
    payloads = make_payloads(size)
    try:
        for i, s in enumerate(socks):
            # Different starting points: the connections do not send the same bytes in lockstep.
            _PingPong(r, s, payloads, counters, start=i * 7).start()
        done = None if max_messages is None else (lambda: counters.count >= max_messages)
        _measure(r, counters, target, result, warmup=warmup, duration=duration, done=done)
    finally:
        for s in socks:
            _close_rst(s)
        r.close()
    return result


# -- streaming ----------------------------------------------------------------


class _Stream:
    """One connection writing ``chunk``-byte slices of the pattern as fast as the echo allows."""

    __slots__ = ("_chunk", "_counters", "_pat", "_period", "_rbuf", "_reactor", "_received",
                 "_rview", "_sent", "_sslobj", "_want_write", "fd", "sock")

    def __init__(self, reactor: Reactor, sock: socket.socket, pattern: bytes, *, chunk: int,
                 counters: _Counters, offset: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self._reactor = reactor
        self._counters = counters
        self._period = STREAM_PATTERN
        # Twice the pattern, so any slice up to one period long is contiguous.
        self._pat = memoryview(pattern + pattern)
        self._chunk = chunk
        self._rbuf = bytearray(STREAM_READ)
        self._rview = memoryview(self._rbuf)
        # Streams start at different pattern offsets: a server mixing up two
        # connections' data fails verification.
        self._sent = offset
        self._received = offset
        self._sslobj = _sslobj(sock)
        self._want_write = False
        reactor.watch(self.fd, self, _READ_EVENTS)

    def start(self) -> None:
        self._write()

    def _write(self) -> None:
        period = self._period
        while self._sent - self._received < STREAM_WINDOW:
            o = self._sent % period
            data = self._pat[o:o + self._chunk]
            try:
                n = self._sslobj.write(data) if self._sslobj is not None else self.sock.send(data)
            except _WOULD_BLOCK_WRITE:
                self._set_want_write(True)
                return
            except OSError as exc:
                raise BenchError(f"send failed: {exc}") from exc
            self._sent += n
        # Window full: wait for echoes before writing more.
        self._set_want_write(False)

    def _set_want_write(self, want: bool) -> None:
        if want != self._want_write:
            self._want_write = want
            self._reactor.watch(self.fd, self, _READ_EVENTS | EPOLLOUT if want else _READ_EVENTS)

    def on_event(self, events: int) -> None:
        if events & _READ_EVENTS:
            self._read()
        if self._sent - self._received < STREAM_WINDOW:
            self._write()

    def _read(self) -> None:
        sock = self.sock
        rbuf = self._rbuf
        rview = self._rview
        pat = self._pat
        period = self._period
        c = self._counters
        received = self._received
        sslobj = self._sslobj
        size = len(rview)
        try:
            while True:
                try:
                    n = sslobj.read(size, rview) if sslobj is not None else sock.recv_into(rview)
                except _WOULD_BLOCK_READ:
                    return
                except OSError as exc:
                    raise BenchError(f"recv failed after {received} bytes: {exc}") from exc
                if n == 0:
                    raise BenchError(f"server closed the stream after {received} bytes")
                if received + n > self._sent:
                    raise VerificationError(f"more bytes came back ({received + n}) than were sent "
                                            f"({self._sent})")
                o = received % period
                # startswith compares with memcmp and copies nothing (memoryview == goes byte by byte).
                if not rbuf.startswith(pat[o:o + n]):
                    raise VerificationError(_mismatch(rbuf[:n], pat[o:o + n], f"stream offset {received}"))
                received += n
                c.nbytes += n
                c.verified += n
        finally:
            self._received = received


def run_stream(target: Target, *, conns: int, chunk: int, warmup: float, duration: float,
               max_bytes: int | None = None, setup_timeout: float = 120.0) -> Result:
    """``conns`` connections each streaming ``chunk``-byte writes and verifying the echo."""
    if chunk > STREAM_PATTERN:
        raise ValueError("write size larger than the stream pattern")
    r = Reactor()
    socks = open_connections(target, conns, timeout=setup_timeout, reactor=r)
    result = Result("stream", conns, 0.0)
    result.tls_version, result.cipher, result.session_ticket = describe(socks)
    counters = _Counters()
    pattern = random.Random(2).randbytes(STREAM_PATTERN)
    try:
        for i, s in enumerate(socks):
            _Stream(r, s, pattern, chunk=chunk, counters=counters, offset=i * 65537).start()
        done = None if max_bytes is None else (lambda: counters.nbytes >= max_bytes)
        _measure(r, counters, target, result, warmup=warmup, duration=duration, done=done)
    finally:
        for s in socks:
            _close_rst(s)
        r.close()
    result.count = result.nbytes // chunk
    return result


# -- handshakes ---------------------------------------------------------------


def run_handshakes(target: Target, *, concurrency: int, warmup: float, duration: float,
                   max_handshakes: int | None = None, engine: str = "ssl") -> Result:
    """``concurrency`` clients each connecting, handshaking, reading the greeting, closing, again.

    Every handshake is a full one: no session is offered (and with ``ssl``,
    resumption is checked for).  Closing is an RST, so no client port waits in
    TIME_WAIT.  ``engine="tls13"`` uses tls13.py's client, which costs the
    load generator a fraction of what ``ssl`` does.
    """
    r = Reactor()
    ctx = client_tls(target, engine)
    counters = _Counters()
    result = Result("handshake", concurrency, 0.0)
    stopping = False
    live: dict[int, Dial] = {}

    def on_ready(d: Dial) -> None:
        r.forget(d.fd)
        del live[d.fd]
        if result.tls_version is None and target.tls:
            if isinstance(ctx, tls13.ClientConfig):
                result.tls_version, result.cipher, result.session_ticket = (
                    "TLSv1.3", tls13.CIPHER_NAME, d.session_ticket)
                if target.expect_cipher not in (None, tls13.CIPHER_NAME):
                    raise VerificationError(
                        f"negotiated {tls13.CIPHER_NAME}, expected {target.expect_cipher}")
            else:
                result.tls_version, result.cipher, result.session_ticket = describe([d.sock])
        _close_rst(d.sock)
        counters.count += 1
        counters.verified += len(GREETING)
        if not stopping:
            start_one()

    def start_one() -> None:
        d = Dial(r, target, ctx, on_ready)
        live[d.fd] = d

    try:
        for _ in range(concurrency):
            start_one()
        done = None if max_handshakes is None else (lambda: counters.count >= max_handshakes)
        _measure(r, counters, target, result, warmup=warmup, duration=duration, done=done)
    finally:
        stopping = True
        for d in live.values():
            _close_rst(d.sock)
        r.close()
    return result
