"""Connection lifecycle over real loopback sockets: closing, timeouts, flow control, limits.

Each test drives one behaviour with a client whose every step is explicit
(tests/clients.py: RawTLSClient), and checks what the handler was told.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import ssl
import struct
import time
import weakref
from collections.abc import Callable

import pytest
from clients import RawTLSClient
from conftest import Certs, Recorder, ServerThread, recv_exactly, server_thread
from helpers import GREETING, wait_until
from OpenSSL import SSL

import tlsuv


def recorder_thread(
    certs: Certs,
    factory: Callable[[tlsuv.Connection], tlsuv.Handler] | None = None,
    options: tlsuv.ConnectionOptions | None = None,
) -> ServerThread:
    return ServerThread(
        certs.server_context(),
        factory=factory or (lambda c: Recorder(echo=True, greeting=GREETING)),
        options=options or tlsuv.ConnectionOptions(),
    )


def only_handler(st: ServerThread) -> Recorder:
    (h,) = st.handlers
    assert isinstance(h, Recorder)
    return h


def wait_closed(st: ServerThread, h: Recorder) -> None:
    st.wait_for(lambda: h.closed_count > 0)


# -- closing ----------------------------------------------------------------


class WriteThenClose(Recorder):
    """Writes a large body and closes at once: a graceful close must still deliver it all."""

    body = os.urandom(3 * 1024 * 1024)

    def established(self, conn: tlsuv.Connection) -> None:
        super().established(conn)
        # Written before the handshake: these are deferred writes, then close().
        conn.write(b"head:")
        conn.write(self.body)
        conn.close()
        conn.close()  # idempotent
        with pytest.raises(tlsuv.ConnectionClosedError):
            conn.write(b"after close")
        self.events.append("write-after-close refused")


def test_graceful_close_delivers_everything_then_close_notify(certs: Certs) -> None:
    with recorder_thread(certs, factory=lambda c: WriteThenClose()) as st:
        client = RawTLSClient(st.port, certs.client_pyopenssl_context())
        client.handshake()
        data = client.read_to_end()
        assert data == b"head:" + WriteThenClose.body
        assert client.got_close_notify, "close_notify must follow the data"
        client.send_close_notify()
        client.close_tcp()
        h = only_handler(st)
        wait_closed(st, h)
    assert h.reason is None
    assert "write-after-close refused" in h.events
    assert h.closed_count == 1


def test_abort_is_immediate_and_idempotent(certs: Certs) -> None:
    class Aborter(Recorder):
        def read(self, conn: tlsuv.Connection, data: bytes) -> None:
            conn.write(os.urandom(5_000_000))
            conn.abort()
            conn.abort()
            conn.close()  # no effect after abort
            with pytest.raises(tlsuv.ConnectionClosedError):
                conn.write(b"x")

    with recorder_thread(certs, factory=lambda c: Aborter(greeting=GREETING)) as st:
        client = RawTLSClient(st.port, certs.client_pyopenssl_context())
        client.handshake()
        client.recv_until(4)
        client.send(b"go")
        client.read_to_end()
        assert not client.got_close_notify, "abort sends no close_notify"
        assert len(client.received) < 4 + 5_000_000, "abort must drop what was not sent"
        h = only_handler(st)
        wait_closed(st, h)
    assert isinstance(h.reason, tlsuv.ConnectionClosedError)
    assert h.closed_count == 1


def test_peer_close_notify_delivers_data_then_clean_close(certs: Certs) -> None:
    with recorder_thread(certs, factory=lambda c: Recorder(greeting=GREETING)) as st:
        client = RawTLSClient(st.port, certs.client_pyopenssl_context())
        client.handshake()
        client.send(b"last words " * 1000)
        client.send_close_notify()
        client.read_to_end()
        assert client.got_close_notify, "the server answers close_notify with its own"
        h = only_handler(st)
        wait_closed(st, h)
    assert bytes(h.data) == b"last words " * 1000
    assert h.reason is None


def test_eof_without_close_notify_is_truncation(certs: Certs) -> None:
    with recorder_thread(certs, factory=lambda c: Recorder(greeting=GREETING)) as st:
        client = RawTLSClient(st.port, certs.client_pyopenssl_context())
        client.handshake()
        client.send(b"partial")
        client.recv_until(4)
        client.close_tcp()
        h = only_handler(st)
        wait_closed(st, h)
    assert bytes(h.data) == b"partial", "data before the EOF is still delivered"
    assert isinstance(h.reason, tlsuv.TruncationError)


def test_close_timeout_when_peer_never_answers(certs: Certs) -> None:
    class CloseAfterGreeting(Recorder):
        def handshake_complete(self, conn: tlsuv.Connection) -> None:
            conn.close()

    options = tlsuv.ConnectionOptions(close_timeout=0.3)
    def factory(conn: tlsuv.Connection) -> tlsuv.Handler:
        return CloseAfterGreeting(greeting=GREETING)

    with recorder_thread(certs, factory=factory, options=options) as st:
        client = RawTLSClient(st.port, certs.client_pyopenssl_context())
        client.handshake()
        # The client keeps its socket open and never sends close_notify back.
        h = only_handler(st)
        wait_closed(st, h)
        assert client.read_to_end() == GREETING
        assert client.got_close_notify
        client.close_tcp()
    assert h.reason is None, "all was delivered; a silent peer is normal for TLS 1.3"


def test_close_timeout_with_undelivered_data_is_an_error(certs: Certs) -> None:
    class FloodThenClose(Recorder):
        def handshake_complete(self, conn: tlsuv.Connection) -> None:
            conn.write(os.urandom(8 * 1024 * 1024))
            conn.close()

    options = tlsuv.ConnectionOptions(close_timeout=0.5)
    with recorder_thread(certs, factory=lambda c: FloodThenClose(), options=options) as st:
        client = RawTLSClient(st.port, certs.client_pyopenssl_context())
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.handshake()
        h = only_handler(st)
        wait_closed(st, h)  # the client never reads the 8 MiB
        client.close_tcp()
    assert isinstance(h.reason, tlsuv.TimeoutError) and h.reason.phase == "close"


def test_application_data_during_our_shutdown_is_drained(certs: Certs) -> None:
    class CloseOnFirstRead(Recorder):
        def read(self, conn: tlsuv.Connection, data: bytes) -> None:
            super().read(conn, data)
            conn.close()

    with recorder_thread(certs, factory=lambda c: CloseOnFirstRead(greeting=GREETING)) as st:
        client = RawTLSClient(st.port, certs.client_pyopenssl_context())
        client.handshake()
        client.send(b"first")
        # Keep talking after the server closed: it must drain this, not fail.
        for _ in range(20):
            client.send(b"more " * 1000)
        client.read_to_end()
        assert client.got_close_notify
        client.send_close_notify()
        h = only_handler(st)
        wait_closed(st, h)
        client.close_tcp()
    assert h.reason is None
    assert bytes(h.data).startswith(b"first")


def test_fatal_tls_error_sends_the_alert(certs: Certs, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tlsuv"), recorder_thread(certs) as st:
        s = socket.create_connection(("127.0.0.1", st.port), timeout=10)
        peer = f"127.0.0.1:{s.getsockname()[1]}"
        body = b"\x01\x00\x00\x04" + b"\xff" * 4  # a ClientHello that is too short to parse
        s.sendall(b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body)
        reply = b""
        while chunk := s.recv(100):
            reply += chunk
        s.close()
        h = only_handler(st)
        wait_closed(st, h)
    assert reply[:1] == b"\x15", f"expected an alert record, got {reply!r}"
    assert reply[5:7] == b"\x02\x32", "fatal decode_error"
    assert isinstance(h.reason, tlsuv.HandshakeError)
    assert h.reason.alert == "decode_error"
    assert any(r.levelno == logging.INFO and peer in r.getMessage() and "decode_error" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


# -- timeouts ---------------------------------------------------------------


def test_silent_peer_hits_the_handshake_timeout(certs: Certs) -> None:
    options = tlsuv.ConnectionOptions(handshake_timeout=0.3)
    with recorder_thread(certs, options=options) as st:
        s = socket.create_connection(("127.0.0.1", st.port), timeout=10)
        assert s.recv(100) == b"", "the server should drop a silent peer"
        s.close()
        h = only_handler(st)
        wait_closed(st, h)
    assert isinstance(h.reason, tlsuv.TimeoutError) and h.reason.phase == "handshake"


def test_peer_stalling_mid_handshake_hits_the_timeout(certs: Certs) -> None:
    options = tlsuv.ConnectionOptions(handshake_timeout=0.3)
    with recorder_thread(certs, options=options) as st:
        client = RawTLSClient(st.port, certs.client_pyopenssl_context())
        try:
            client.ssl.do_handshake()
        except SSL.WantReadError:
            client._flush()  # the ClientHello goes out; then nothing more
        # Read the server's flight as raw bytes, never answering it, until EOF.
        while client.sock.recv(65536):
            pass
        h = only_handler(st)
        wait_closed(st, h)
    assert isinstance(h.reason, tlsuv.TimeoutError) and h.reason.phase == "handshake"


def test_handshake_timer_is_cancelled_once_established(certs: Certs) -> None:
    timeout = 0.2
    options = tlsuv.ConnectionOptions(handshake_timeout=timeout)
    with recorder_thread(certs, options=options) as st, st.connect(certs) as s:
        assert recv_exactly(s, 4) == GREETING
        (conn,) = st.connections
        # Past the moment the handshake timer was due (it started before this marker).
        st.pass_time(timeout)
        assert not st.call(lambda: conn.closing), "the handshake timer fired after the handshake"
        s.sendall(b"alive")
        assert recv_exactly(s, 5) == b"alive"
        assert st.call(lambda: conn._timer) is None, "no timer may outlive its step"


def test_idle_timeout(certs: Certs) -> None:
    options = tlsuv.ConnectionOptions(idle_timeout=0.4)
    with recorder_thread(certs, options=options) as st:
        with st.connect(certs) as busy:
            assert recv_exactly(busy, 4) == GREETING
            for _ in range(8):  # 0.8 s of traffic in 0.1 s steps: never idle for 0.4 s
                busy.sendall(b"x")
                assert recv_exactly(busy, 1) == b"x"
                time.sleep(0.1)  # must stay: the idle timer measures time, so time must pass
            (h,) = st.handlers
            assert isinstance(h, Recorder)
            assert h.closed_count == 0, "traffic must keep the connection alive"
            wait_closed(st, h)  # now silent: it must go
        assert isinstance(h.reason, tlsuv.TimeoutError) and h.reason.phase == "idle"


# -- flow control -------------------------------------------------------------


def test_pause_and_resume_writing_around_the_water_marks(certs: Certs) -> None:
    class Producer(Recorder):
        sent = 0
        max_buffered = 0

        def handshake_complete(self, conn: tlsuv.Connection) -> None:
            self.max_buffered = 0
            self.produce(conn)

        def produce(self, conn: tlsuv.Connection) -> None:
            while not conn.writing_paused and self.sent < 6 * 1024 * 1024:
                conn.write(b"z" * 16384)
                self.sent += 16384
                self.max_buffered = max(self.max_buffered, conn.buffered)
            if self.sent >= 6 * 1024 * 1024:
                conn.close()

        def resume_writing(self, conn: tlsuv.Connection) -> None:
            super().resume_writing(conn)
            self.produce(conn)

    handlers: list[Producer] = []

    def factory(conn: tlsuv.Connection) -> tlsuv.Handler:
        p = Producer()
        handlers.append(p)
        return p

    options = tlsuv.ConnectionOptions(high_water=64 * 1024, low_water=16 * 1024)
    with recorder_thread(certs, factory=factory, options=options) as st:
        client = RawTLSClient(st.port, certs.client_pyopenssl_context())
        client.handshake()
        (p,) = handlers
        # The server fills the pipe while we do not read, until it is told to pause.
        st.wait_for(lambda: "pause_writing" in p.events, what="the producer's pause_writing")
        data = client.read_to_end()
        client.close_tcp()
        wait_closed(st, p)
    assert data == b"z" * (6 * 1024 * 1024)
    assert p.events.count("pause_writing") >= 1
    assert p.events.count("pause_writing") == p.events.count("resume_writing")
    # A writer that stops at pause_writing never has much more than the high-water mark queued.
    assert p.max_buffered <= 64 * 1024 + 16384


def test_echo_stops_reading_a_peer_that_does_not_read(certs: Certs) -> None:
    with server_thread(certs.server_context()) as st:
        raw = socket.create_connection(("127.0.0.1", st.port))
        s = certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost")
        assert recv_exactly(s, 4) == GREETING
        (conn,) = st.connections
        s.setblocking(False)
        chunk = os.urandom(65536)
        sent = 0
        limit = 40 * 1024 * 1024  # far more than the kernel buffers and the high-water mark

        def stuck() -> bool:
            """Push what the kernel takes; True once it took nothing since the last poll and the
            server is paused (a server still reading would have made room by then)."""
            nonlocal sent
            before = sent
            with contextlib.suppress(BlockingIOError, ssl.SSLWantWriteError):
                while sent < limit:
                    sent += s.send(chunk)
            return sent == before and bool(st.call(lambda: conn.writing_paused))

        wait_until(stuck, timeout=20, interval=0.05,
                   what="the server to stop reading a peer that does not read")
        # What we pushed is bounded by the kernel buffers on both sides plus the
        # server's high-water mark, not by time.
        assert sent < limit, f"server kept reading: {sent} bytes accepted"
        assert st.call(lambda: conn.buffered) <= 64 * 1024 + 4 * 16384
        assert st.call(lambda: conn.writing_paused)
        s.setblocking(True)
        s.settimeout(20)
        echoed = recv_exactly(s, sent)
        assert echoed == (chunk * (sent // len(chunk) + 1))[:sent]
        s.close()


# -- limits -----------------------------------------------------------------


def test_max_connections_refuses_then_resumes(certs: Certs) -> None:
    with server_thread(certs.server_context(), max_connections=2) as st:
        a = st.connect(certs)
        b = st.connect(certs)
        assert recv_exactly(a, 4) == GREETING and recv_exactly(b, 4) == GREETING
        with pytest.raises((ConnectionError, OSError)):
            st.connect(certs)  # the third is closed at once, before any handshake
        assert st.server.refused == 1
        a.close()
        st.wait_for(lambda: len(st.server.connections) == 1)
        with st.connect(certs) as c:
            assert recv_exactly(c, 4) == GREETING
        b.close()


def test_data_read_while_paused_reaches_the_handler_before_close(certs: Certs) -> None:
    """Plaintext decrypted after the handler paused is held, and still delivered at close_notify.

    Consecutive records of one read reach the handler as one chunk, so a
    pause inside ``read`` holds nothing.  What is held is what comes with the
    handshake's last flight when the handler pauses in ``handshake_complete``.
    """

    class Pauser(Recorder):
        def handshake_complete(self, conn: tlsuv.Connection) -> None:
            super().handshake_complete(conn)
            conn.pause_reading()  # the data in this same TCP read is already decrypted: it is held

    with recorder_thread(certs, factory=lambda c: Pauser()) as st:
        client = RawTLSClient(st.port, certs.client_pyopenssl_context())
        while True:  # the handshake, with the client's last flight left unsent
            try:
                client.ssl.do_handshake()
                break
            except SSL.WantReadError:
                client.pump()
        # Finished, three records and close_notify in one TCP segment: one libuv read.
        for part in (b"one ", b"two ", b"three"):
            client.ssl.send(part)
        client.ssl.shutdown()
        client.send_raw(client.ssl.bio_read(65536))
        client.read_to_end()
        h = only_handler(st)
        wait_closed(st, h)
    assert bytes(h.data) == b"one two three"
    assert h.reason is None


# -- memory -------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["close_notify", "reset"])
def test_a_closed_connection_is_freed_without_the_cycle_collector(certs: Certs, ending: str) -> None:
    """Nothing of a finished connection may wait for the cyclic GC: at thousands of
    handshakes per second, collecting them costs more CPU than the handshake's Python."""
    refs: list[weakref.ref[object]] = []

    def factory(conn: tlsuv.Connection) -> tlsuv.Handler:
        refs.extend((weakref.ref(conn), weakref.ref(conn.ssl)))
        return tlsuv.echo.EchoHandler()

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with server_thread(certs.server_context()) as st:
            st.factory = factory
            with st.connect(certs) as s:
                assert recv_exactly(s, 4) == GREETING
                if ending == "close_notify":
                    s.unwrap()
                else:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            st.connections.clear()
            st.handlers.clear()
            st.wait_for(lambda: not st.server.connections)
            st.call(lambda: None)  # one more loop pass: the close callbacks have returned
            assert len(refs) == 2
            leaked = [r() for r in refs if r() is not None]
            assert not leaked, f"freed only by the cyclic GC: {leaked}"
    finally:
        if was_enabled:
            gc.enable()


def test_idle_connections_give_back_their_bios_and_keep_working(certs: Certs) -> None:
    """An idle connection frees its memory BIOs (tlsuv.pending) and gets new ones when it is used."""
    with server_thread(certs.server_context()) as st, st.connect(certs) as s:
        assert recv_exactly(s, 4) == GREETING
        (conn,) = st.connections
        tls = conn.tls
        assert st.call(lambda: tls.wants_compaction), "the handshake asks for a compaction"
        st.wait_for(lambda: not tls.wants_compaction, timeout=5)  # compacted after ~1 s idle
        assert st.call(lambda: tls.detached)
        # A bulk transfer brings them back and grows them; the echo is intact.
        big = os.urandom(3 * 1024 * 1024)
        s.sendall(big[:65536])
        assert recv_exactly(s, 65536) == big[:65536]
        s.sendall(big[65536:])
        assert recv_exactly(s, len(big) - 65536) == big[65536:]
        st.wait_for(lambda: not tls.wants_compaction, timeout=5)
        assert st.call(lambda: tls.detached)
        s.sendall(b"after compaction")
        assert recv_exactly(s, 16) == b"after compaction"
        # Idle again: given back again, and a graceful close still sends close_notify.
        st.wait_for(lambda: not tls.wants_compaction, timeout=5)
        assert st.call(lambda: tls.detached)
        st.call(conn.close)
        assert s.recv(1) == b"", "the client sees close_notify, not a reset"
        st.wait_for(lambda: conn.closed)
