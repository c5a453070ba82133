"""Peers that vanish and links that crawl: keepalive, the send timeout, flow control on a slow link.

Two kinds of test.  On loopback, what loopback can show: the socket options
every connection gets, and the send timeout against a live peer that reads
nothing (the kernel never gives up on a peer that answers, so only tlsuv's
own timer can end it).  On a network of the test's own (tests/netns.py: a
namespace joined by a veth pair), what loopback cannot: a peer whose link
goes down, so that it vanishes with no FIN and no reset, and a link shaped to
a few Mbit/s.  Detection times are printed (``pytest -s``), never asserted.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import netns
import pytest
import pyuv
from conftest import Certs, Recorder, ServerThread, recv_exactly
from helpers import GREETING
from netns import VethLink
from peers import Interactive

import tlsuv
import tlsuv.client
from tlsuv._sockopt import KEEPALIVE_PROBES
from tlsuv.client_cli import EXIT_CONNECT
from tlsuv.connection import Phase
from tlsuv.echo import EchoHandler

MIB = 1 << 20


class Timed(Recorder):
    """A Recorder that notes when ``closed`` came (loop thread, monotonic clock)."""

    def __init__(self, greeting: bytes | None = GREETING) -> None:
        super().__init__(greeting=greeting)
        self.closed_at: float | None = None

    def closed(self, conn: tlsuv.Connection, reason: BaseException | None) -> None:
        self.closed_at = time.monotonic()
        super().closed(conn, reason)


class Hoarder(Timed):
    """Writes ``size`` bytes as soon as the handshake is done, ignoring pause_writing."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def handshake_complete(self, conn: tlsuv.Connection) -> None:
        super().handshake_complete(conn)
        chunk = os.urandom(65536)
        for _ in range(self.size // len(chunk)):
            conn.write(chunk)


def only(st: ServerThread) -> tuple[tlsuv.Connection, Timed]:
    (conn,) = st.connections
    (h,) = st.handlers
    assert isinstance(h, Timed)
    return conn, h


def sockopts(fd: int) -> dict[str, int]:
    """The dead-peer options of a socket, read through a duplicate of its descriptor."""
    s = socket.socket(fileno=os.dup(fd))
    try:
        tcp = socket.IPPROTO_TCP
        return {
            "keepalive": s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            "idle": s.getsockopt(tcp, socket.TCP_KEEPIDLE),
            "interval": s.getsockopt(tcp, socket.TCP_KEEPINTVL),
            "probes": s.getsockopt(tcp, socket.TCP_KEEPCNT),
            "user_timeout_ms": s.getsockopt(tcp, socket.TCP_USER_TIMEOUT),
            "nodelay": s.getsockopt(tcp, socket.TCP_NODELAY),
        }
    finally:
        s.close()


def kernel_sockets(port: int) -> list[str]:
    """The kernel's TCP sockets on local ``port`` other than the listener (/proc/net/tcp)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        if int(local.rsplit(":", 1)[1], 16) == port and state != "0A":  # 0A: LISTEN
            found.append(line.strip())
    return found


def server_fd(st: ServerThread) -> int:
    conn = st.connections[0]
    fd: int = st.call(conn._tcp.fileno)
    return fd


# -- the socket options (loopback) ---------------------------------------------------------


@pytest.mark.parametrize(("options", "expected"), [
    # The defaults: probes from 30 s of silence, every 10 s, 9 of them; the kernel gives up
    # on unacknowledged data after 60 s.
    (tlsuv.ConnectionOptions(),
     {"keepalive": 1, "idle": 30, "interval": 10, "probes": KEEPALIVE_PROBES, "user_timeout_ms": 60000,
      "nodelay": 1}),
    (tlsuv.ConnectionOptions(keepalive=7, send_timeout=2.5),
     {"keepalive": 1, "idle": 7, "interval": 2, "probes": KEEPALIVE_PROBES, "user_timeout_ms": 2500,
      "nodelay": 1}),
], ids=["defaults", "custom"])
def test_accepted_connections_get_keepalive_and_user_timeout(
        certs: Certs, options: tlsuv.ConnectionOptions, expected: dict[str, int]) -> None:
    with ServerThread(certs.server_context(), options=options) as st, st.connect(certs) as s:
        assert recv_exactly(s, 4) == GREETING
        assert sockopts(server_fd(st)) == expected
        assert st.server._inherits is True  # from the listener: no system call per connection


def test_set_per_connection_where_the_listener_passes_nothing_on(certs: Certs) -> None:
    """tlsuv sets the options once on the listener (Linux copies them at accept); if an
    accepted socket comes without them, every connection gets them itself."""
    with ServerThread(certs.server_context()) as st:
        (handle,) = st.server._listeners
        listener = socket.socket(fileno=os.dup(handle.fileno()))
        try:
            assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)  # as if not inherited
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        finally:
            listener.close()
        for _ in range(2):
            with st.connect(certs) as s:
                assert recv_exactly(s, 4) == GREETING
                got = sockopts(st.call(st.connections[-1]._tcp.fileno))
                assert got["keepalive"] == 1 and got["nodelay"] == 1
        assert st.server._inherits is False


def test_nodelay_alone_not_inherited_is_set_per_connection(certs: Certs) -> None:
    """With keepalive and the send timeout off, TCP_NODELAY still reaches every connection."""
    options = tlsuv.ConnectionOptions(keepalive=None, send_timeout=None)
    with ServerThread(certs.server_context(), options=options) as st:
        (handle,) = st.server._listeners
        listener = socket.socket(fileno=os.dup(handle.fileno()))
        try:
            listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # as if not inherited
        finally:
            listener.close()
        with st.connect(certs) as s:
            assert recv_exactly(s, 4) == GREETING
            assert sockopts(server_fd(st))["nodelay"] == 1
        assert st.server._inherits is False


def test_off_leaves_the_kernel_defaults(certs: Certs) -> None:
    options = tlsuv.ConnectionOptions(keepalive=None, send_timeout=None)
    with ServerThread(certs.server_context(), options=options) as st, st.connect(certs) as s:
        assert recv_exactly(s, 4) == GREETING
        got = sockopts(server_fd(st))
    assert got["keepalive"] == 0 and got["user_timeout_ms"] == 0
    assert got["nodelay"] == 1  # not a dead-peer option: always on


def test_outgoing_connections_get_them_too(certs: Certs) -> None:
    options = tlsuv.ConnectionOptions(keepalive=4, send_timeout=9)
    with ServerThread(certs.server_context()) as st:
        seen = Timed(greeting=None)
        conn = st.call(lambda: tlsuv.client.connect(st.loop, "127.0.0.1", st.port, lambda c: seen,
                                                    cafile=certs.ca_file, options=options))
        st.wait_for(lambda: conn.handshake_completed)
        got = sockopts(st.call(conn._tcp.fileno))
        st.call(conn.close)
        st.wait_for(lambda: seen.closed_count == 1)
    assert got == {"keepalive": 1, "idle": 4, "interval": 1, "probes": KEEPALIVE_PROBES,
                   "user_timeout_ms": 9000, "nodelay": 1}


@pytest.mark.parametrize("kwargs", [
    {"keepalive": 0}, {"keepalive": 32768}, {"keepalive": 1.5}, {"keepalive": True},
    {"send_timeout": 0}, {"send_timeout": -1.0},
])
def test_bad_options_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        # Deliberately wrong values and types: the options' own checks are under test.
        tlsuv.ConnectionOptions(**kwargs)  # type: ignore[arg-type]


# -- the send timeout against a live peer (loopback) -----------------------------------------


def small_window_client(st: ServerThread, certs: Certs) -> ssl.SSLSocket:
    """A TLS client with a small receive buffer, so the server's data backs up into libuv's queue."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    raw.settimeout(10)
    raw.connect((st.host, st.port))
    return certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost")


def test_send_timeout_ends_a_peer_that_reads_nothing(certs: Certs) -> None:
    options = tlsuv.ConnectionOptions(send_timeout=0.5)
    with ServerThread(certs.server_context(), factory=lambda c: Hoarder(16 * MIB), options=options) as st:
        s = small_window_client(st, certs)
        assert recv_exactly(s, 4) == GREETING
        _, h = only(st)
        st.wait_for(lambda: h.closed_count > 0)
        # Reset, not FIN: the kernel dropped what it held at once instead of keeping an
        # orphan socket that waits for this client to read megabytes.
        assert kernel_sockets(st.port) == []
        s.close()
        assert st.call(lambda: dict(st.server.timeouts)) == {"send": 1}
    assert h.closed_count == 1
    assert isinstance(h.reason, tlsuv.TimeoutError) and h.reason.phase == "send", h.reason
    assert h.reason.__cause__ is None  # tlsuv's own timer, not the kernel's
    assert "queued for the peer" in str(h.reason)


def test_send_timeout_spares_a_slow_reader_that_keeps_reading(certs: Certs) -> None:
    """The deadline is for no progress, not for the whole transfer: 6 MiB read slowly for
    longer than the send timeout must all arrive.  (At most 16 KiB a read, one TLS record,
    and 10 ms between reads: at least 3.8 s, twice the send timeout.)"""
    size = 6 * MIB
    options = tlsuv.ConnectionOptions(send_timeout=2.0)
    with ServerThread(certs.server_context(), factory=lambda c: Hoarder(size), options=options) as st:
        s = small_window_client(st, certs)
        assert recv_exactly(s, 4) == GREETING
        conn, h = only(st)
        # Megabytes wait in libuv's queue: the send deadline is running.
        st.wait_for(lambda: conn.buffered > MIB)
        assert st.call(lambda: conn._send_timer is not None)
        got = 0
        started = time.monotonic()
        while got < size:
            chunk = s.recv(65536)
            assert chunk, f"closed after {got} bytes: {h.reason!r}"
            got += len(chunk)
            time.sleep(0.01)
        took = time.monotonic() - started
        st.wait_for(lambda: conn.buffered == 0)
        # Drained: the timer is gone again, and the connection is still open.
        assert st.call(lambda: conn._send_timer is None and not conn.closed)
        s.close()
        st.wait_for(lambda: h.closed_count > 0)
    print(f"\n6 MiB read in {took:.1f} s with a 2 s send timeout")
    assert not isinstance(h.reason, tlsuv.TimeoutError), h.reason


def test_the_common_path_makes_no_send_timer(certs: Certs) -> None:
    with ServerThread(certs.server_context()) as st, st.connect(certs) as s:
        assert recv_exactly(s, 4) == GREETING
        for i in range(20):
            s.sendall(b"ping %d" % i)
            assert recv_exactly(s, len(b"ping %d" % i)) == b"ping %d" % i
        conn = st.connections[0]
        assert st.call(lambda: conn._send_timer is None)


# -- a network of our own --------------------------------------------------------------------


@pytest.fixture
def veth() -> Iterator[VethLink]:
    with netns.veth_link() as link:
        yield link


def client_in_namespace(veth: VethLink, st: ServerThread, certs: Certs, *args: str) -> Interactive:
    return Interactive(veth.client_argv("--ca", str(certs.ca_file), veth.host_addr, str(st.port), *args))


def wait_for_socket(veth: VethLink, ok: Callable[[str], bool], timeout: float = 10.0) -> str:
    """Poll ``ss`` until the one server-side socket to the peer satisfies ``ok``; return its line."""
    deadline = time.monotonic() + timeout
    while True:
        lines = veth.server_sockets()
        if len(lines) == 1 and ok(lines[0]):
            return lines[0]
        assert time.monotonic() < deadline, f"server sockets: {lines}"
        time.sleep(0.05)


def vanish_and_wait(veth: VethLink, st: ServerThread, h: Timed, timeout: float) -> float:
    """Take the peer's link down; wait for ``closed``; return how long that took."""
    gone_at = time.monotonic()
    veth.vanish()
    st.wait_for(lambda: h.closed_count > 0, timeout=timeout)
    assert h.closed_at is not None
    return h.closed_at - gone_at


def assert_freed(veth: VethLink, st: ServerThread) -> None:
    assert not st.call(lambda: set(st.server.connections))
    assert veth.server_sockets() == [], "the server still holds a socket to the vanished peer"


def vanished_idle_peer(certs: Certs, veth: VethLink, options: tlsuv.ConnectionOptions,
                       timeout: float) -> tuple[float, Timed, dict[str, int]]:
    with ServerThread(certs.server_context(), factory=lambda c: Timed(), options=options,
                      host=veth.host_addr) as st, \
            client_in_namespace(veth, st, certs, "idle") as peer:
        peer.read_until(b"ready\n", timeout=20)
        conn, h = only(st)
        st.wait_for(lambda: conn.phase is Phase.OPEN and conn.buffered == 0)
        # Everything acknowledged (the session tickets too): the kernel is keeping alive, not
        # retransmitting, and ``ss`` shows the keepalive timer tlsuv turned on.
        line = wait_for_socket(veth, lambda line: "ESTAB" in line and "timer:(keepalive" in line)
        assert " 0 " in line.split(veth.host_addr)[0], line  # nothing in the send queue
        took = vanish_and_wait(veth, st, h, timeout)
        assert_freed(veth, st)
        timeouts = st.call(lambda: dict(st.server.timeouts))
    return took, h, timeouts


def assert_keepalive_timeout(h: Timed) -> None:
    assert h.closed_count == 1
    reason = h.reason
    assert isinstance(reason, tlsuv.TimeoutError) and reason.phase == "keepalive", repr(reason)
    cause = reason.__cause__
    assert isinstance(cause, tlsuv.TransportError) and cause.errno == pyuv.errno.UV_ETIMEDOUT, cause


def test_vanished_idle_peer_is_found_by_keepalive(certs: Certs, veth: VethLink) -> None:
    # 1 s of silence, then a probe a second; Linux gives up once the peer has been
    # silent for TCP_USER_TIMEOUT (the send timeout) with a probe unanswered: ~3 s.
    options = tlsuv.ConnectionOptions(keepalive=1, send_timeout=3)
    took, h, timeouts = vanished_idle_peer(certs, veth, options, timeout=30)
    print(f"\nvanished idle peer (keepalive 1 s, send timeout 3 s) found after {took:.1f} s: {h.reason}")
    assert_keepalive_timeout(h)
    assert timeouts == {"keepalive": 1}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("send_timeout", [60.0, None], ids=["defaults", "no-send-timeout"])
def test_vanished_idle_peer_with_default_keepalive(certs: Certs, veth: VethLink,
                                                   send_timeout: float | None) -> None:
    # Defaults: found after ~60 s (the send timeout, three probes unanswered); without a
    # send timeout after 30 s + 9 probes x 10 s = ~120 s.
    options = tlsuv.ConnectionOptions(send_timeout=send_timeout)
    took, h, timeouts = vanished_idle_peer(certs, veth, options, timeout=240)
    print(f"\nvanished idle peer (default keepalive, send timeout {send_timeout}) found after "
          f"{took:.1f} s: {h.reason}")
    assert_keepalive_timeout(h)
    assert timeouts == {"keepalive": 1}


def test_vanished_downloader_is_freed_by_the_send_timeout(certs: Certs, veth: VethLink) -> None:
    """A slow download whose reader disappears: megabytes stay queued, and nothing moves."""
    options = tlsuv.ConnectionOptions(send_timeout=2)
    with ServerThread(certs.server_context(), factory=lambda c: Hoarder(16 * MIB), options=options,
                      host=veth.host_addr) as st, \
            client_in_namespace(veth, st, certs, "trickle") as peer:
        peer.read_until(b"ready\n", timeout=20)
        conn, h = only(st)
        st.wait_for(lambda: conn.buffered > 4 * MIB and conn.bytes_out > 16 * MIB)
        queued = st.call(lambda: conn.buffered)
        took = vanish_and_wait(veth, st, h, timeout=30)
        assert_freed(veth, st)
        timeouts = st.call(lambda: dict(st.server.timeouts))
    by = "tlsuv's timer" if h.reason is not None and h.reason.__cause__ is None else "TCP_USER_TIMEOUT"
    print(f"\nvanished downloader with {queued / MIB:.1f} MiB queued freed after {took:.1f} s "
          f"(send timeout 2 s, by {by}): {h.reason}")
    assert h.closed_count == 1
    assert isinstance(h.reason, tlsuv.TimeoutError) and h.reason.phase == "send", repr(h.reason)
    assert timeouts == {"send": 1}


def test_data_only_the_kernel_holds_hits_tcp_user_timeout(certs: Certs, veth: VethLink) -> None:
    """Written after the peer vanished, small enough for the kernel to take it all: libuv's
    queue stays empty, so only TCP_USER_TIMEOUT can notice -- and it reads as the send timeout."""
    options = tlsuv.ConnectionOptions(keepalive=None, send_timeout=2)
    with ServerThread(certs.server_context(), factory=lambda c: Timed(), options=options,
                      host=veth.host_addr) as st, \
            client_in_namespace(veth, st, certs, "idle") as peer:
        peer.read_until(b"ready\n", timeout=20)
        conn, h = only(st)
        st.wait_for(lambda: conn.phase is Phase.OPEN and conn.buffered == 0)
        veth.vanish()
        written_at = time.monotonic()
        st.call(lambda: conn.write(b"x" * 8192))  # well within any initial send buffer
        st.wait_for(lambda: conn.buffered == 0)  # all of it in the kernel
        assert st.call(lambda: conn._send_timer is None)
        st.wait_for(lambda: h.closed_count > 0, timeout=30)
        assert h.closed_at is not None
        took = h.closed_at - written_at
        assert_freed(veth, st)
    print(f"\nunacknowledged data in the kernel given up after {took:.1f} s (send timeout 2 s): {h.reason}")
    reason = h.reason
    assert isinstance(reason, tlsuv.TimeoutError) and reason.phase == "send", repr(reason)
    cause = reason.__cause__
    assert isinstance(cause, tlsuv.TransportError) and cause.errno == pyuv.errno.UV_ETIMEDOUT, cause


class WatchedEcho(EchoHandler):
    """The echo server's handler, noting the most it ever had queued for the peer."""

    __slots__ = ("max_buffered", "pauses", "reason")

    def __init__(self) -> None:
        self.max_buffered = 0
        self.pauses = 0
        self.reason: BaseException | None = None

    def read(self, conn: tlsuv.Connection, data: bytes) -> None:
        conn.write(data)
        self.max_buffered = max(self.max_buffered, conn.buffered)

    def pause_writing(self, conn: tlsuv.Connection) -> None:
        self.pauses += 1
        super().pause_writing(conn)

    def closed(self, conn: tlsuv.Connection, reason: BaseException | None) -> None:
        self.reason = reason


def test_slow_link_echo_is_exact_and_memory_stays_bounded(certs: Certs, veth: VethLink) -> None:
    """The server sends to the peer at 4 Mbit/s while the peer sends as fast as it can."""
    size = 2 * MIB
    veth.limit("4mbit")
    options = tlsuv.ConnectionOptions()
    with ServerThread(certs.server_context(), factory=lambda c: WatchedEcho(), options=options,
                      host=veth.host_addr) as st, \
            client_in_namespace(veth, st, certs, "echo", str(size)) as peer:
        out = peer.read_match(rb"(ok|mismatch)[^\n]*\n", timeout=90).group(0).decode()
        assert peer.wait(10) == 0, out
        (h,) = st.handlers
        assert isinstance(h, WatchedEcho)
        st.wait_for(lambda: not st.server.connections)
    print(f"\n{size / MIB:.0f} MiB echoed over 4 Mbit/s: {out.strip()}; most queued "
          f"{h.max_buffered / 1024:.0f} KiB, writer paused {h.pauses} times")
    assert out.startswith(f"ok {size} ")
    assert h.pauses > 0, "the link never pushed back: the test did not test flow control"
    # At most the high-water mark plus what one read brought in before the pause took effect:
    # libuv reads 64 KiB at most, and may complete a TLS record (16 KiB) begun by the read
    # before; a few hundred bytes of record overhead on top.
    assert h.max_buffered <= options.high_water + 65536 + 16384 + 1024, h.max_buffered
    assert not isinstance(h.reason, tlsuv.TimeoutError), h.reason


def test_outgoing_connection_finds_a_vanished_server(certs: Certs, veth: VethLink) -> None:
    options = tlsuv.ConnectionOptions(keepalive=1, send_timeout=3)
    argv = veth.client_argv("--cert", str(certs.cert_file), "--key", str(certs.key_file),
                            veth.peer_addr, "0", "serve")
    loop = pyuv.Loop()
    with Interactive(argv) as server:
        port = int(server.read_match(rb"port (\d+)\n", timeout=20).group(1))
        seen = Timed(greeting=None)
        conn = tlsuv.client.connect(loop, veth.peer_addr, port, lambda c: seen, cafile=certs.ca_file,
                                    server_hostname="localhost", options=options)
        run_until(loop, lambda: len(seen.data) >= len(GREETING), 20)
        gone_at = time.monotonic()
        veth.vanish()
        run_until(loop, lambda: seen.closed_count > 0, 30)
        loop.run()  # the rest of the handles close
    assert seen.closed_at is not None and conn.closed
    print(f"\nvanished server found by the client after {seen.closed_at - gone_at:.1f} s: {seen.reason}")
    assert_keepalive_timeout(seen)


def test_client_cli_exits_3_when_the_server_vanishes(certs: Certs, veth: VethLink) -> None:
    argv = veth.client_argv("--cert", str(certs.cert_file), "--key", str(certs.key_file),
                            veth.peer_addr, "0", "serve")
    with Interactive(argv) as server:
        port = int(server.read_match(rb"port (\d+)\n", timeout=20).group(1))
        with Interactive([sys.executable, "-m", "tlsuv.client", "--cafile", str(certs.ca_file),
                          "--servername", "localhost", "--keepalive", "1", "--send-timeout", "3",
                          f"{veth.peer_addr}:{port}"]) as cli:
            cli.read_until(GREETING, timeout=20)
            veth.vanish()
            assert cli.wait(30) == EXIT_CONNECT, bytes(cli.err)
            err = bytes(cli.err).decode()
    assert err.count("\n") == 1 and "keepalive timeout" in err, err


def run_until(loop: pyuv.Loop, done: Callable[[], bool], timeout: float) -> None:
    """Run ``loop`` until ``done()``; a ticking timer keeps each pass short enough to check."""
    tick = pyuv.Timer(loop)
    tick.start(lambda t: None, 0.1, 0.1)
    tick.ref = False
    try:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, "condition not reached in time"
            loop.run(pyuv.UV_RUN_ONCE)
    finally:
        tick.close()

