"""Bad peers: each gets a clear reason, and the server keeps serving everyone else.

Every case runs against a live server; after each one a fresh client must
still get a byte-exact echo, and the server must be back to no connections,
no timers and only its own handles.
"""

from __future__ import annotations

import contextlib
import os
import queue
import random
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest
from clients import RawTLSClient
from conftest import Certs, Recorder, ServerThread, recv_exactly
from helpers import GREETING
from OpenSSL import SSL

import tlsuv

Case = Callable[[int, Certs], None]


def drain_until_eof(s: socket.socket) -> bytes:
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass  # the server closing on unread data of ours resets; that is an ending too
    return got


def send_and_half_close(s: socket.socket, data: bytes) -> None:
    # The server may give up on us before we finish (it saw enough to know
    # this is not TLS): a reset or ENOTCONN here is that, and fine.
    with contextlib.suppress(OSError):
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)


def rst(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def client_hello(certs: Certs) -> bytes:
    conn = SSL.Connection(certs.client_pyopenssl_context(), None)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65536)


def plain_http(port: int, certs: Certs) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        drain_until_eof(s)


def garbage(size: int) -> Case:
    def case(port: int, certs: Certs) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            send_and_half_close(s, random.Random(size).randbytes(size))
            drain_until_eof(s)
    case.__name__ = f"garbage_{size}"
    return case


def truncated_client_hello(port: int, certs: Certs) -> None:
    hello = client_hello(certs)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        send_and_half_close(s, hello[: len(hello) // 2])
        drain_until_eof(s)


def client_hello_then_silence(port: int, certs: Certs) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(client_hello(certs))
        drain_until_eof(s)  # the server answers, then gives up on us (handshake timeout)


def reset_mid_handshake(port: int, certs: Certs) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(client_hello(certs))
    s.recv(100)  # the server is now mid-handshake with us
    rst(s)


def reset_mid_record(port: int, certs: Certs) -> None:
    client = RawTLSClient(port, certs.client_pyopenssl_context())
    client.handshake()
    client.recv_until(4)
    client.ssl.send(b"y" * 10000)
    record = client.ssl.bio_read(65536)
    client.send_raw(record[: len(record) // 2])
    rst(client.sock)


def data_after_close_notify(port: int, certs: Certs) -> None:
    client = RawTLSClient(port, certs.client_pyopenssl_context())
    client.handshake()
    client.send(b"before")
    client.send_close_notify()
    client.ssl.set_shutdown(0)  # let pyOpenSSL encrypt once more, as a broken peer would
    client.ssl.send(b"after close_notify")
    client.send_raw(client.ssl.bio_read(65536))
    drain_until_eof(client.sock)
    client.sock.close()


# A reset can reach the server as ECONNRESET or, when the kernel already
# handed that error to another call on the socket, as a plain EOF: so a reset
# is reported as a transport error, or as what an EOF means at that point.
CASES: list[tuple[Case, type[BaseException] | tuple[type[BaseException], ...] | None]] = [
    (plain_http, tlsuv.HandshakeError),
    (garbage(1), tlsuv.HandshakeError),
    (garbage(100), tlsuv.HandshakeError),
    (garbage(5000), tlsuv.HandshakeError),
    (garbage(100_000), tlsuv.HandshakeError),
    (truncated_client_hello, tlsuv.HandshakeError),
    (client_hello_then_silence, tlsuv.TimeoutError),
    (reset_mid_handshake, (tlsuv.TransportError, tlsuv.HandshakeError)),
    (reset_mid_record, (tlsuv.TransportError, tlsuv.TruncationError)),
    (data_after_close_notify, None),
]

# Short so the silent cases finish fast; the behaviour is the same at 10 s.
OPTIONS = tlsuv.ConnectionOptions(handshake_timeout=0.5, close_timeout=0.5)


def echo_server(certs: Certs, options: tlsuv.ConnectionOptions = OPTIONS) -> ServerThread:
    return ServerThread(certs.server_context(), factory=lambda c: Recorder(echo=True, greeting=GREETING),
                        options=options)


def closed_once(h: tlsuv.Handler) -> bool:
    return isinstance(h, Recorder) and h.closed_count == 1


def fresh_client_echo(st: ServerThread, certs: Certs) -> None:
    with st.connect(certs) as s:
        assert recv_exactly(s, 4) == GREETING
        payload = os.urandom(3000)
        s.sendall(payload)
        assert recv_exactly(s, len(payload)) == payload


def assert_back_to_idle(st: ServerThread) -> None:
    st.wait_for(lambda: not st.server.connections)
    handles = st.open_handles()
    # The listener is the only TCP handle; no timer survives its connection.
    assert handles.get("TCP", 0) == 1, handles
    assert handles.get("Timer", 0) == 0, handles


@pytest.mark.parametrize(("case", "expected"), CASES, ids=[c.__name__ for c, _ in CASES])
def test_bad_peer(
    certs: Certs, case: Case, expected: type[BaseException] | tuple[type[BaseException], ...] | None
) -> None:
    with echo_server(certs) as st:
        case(st.port, certs)
        st.wait_for(lambda: bool(st.handlers) and closed_once(st.handlers[0]))
        bad = st.handlers[0]
        assert isinstance(bad, Recorder)
        if expected is None:
            assert bad.reason is None, bad.reason
        else:
            assert isinstance(bad.reason, expected), repr(bad.reason)
            assert str(bad.reason), "the reason must say what happened"
        if case is data_after_close_notify:
            assert bytes(bad.data) == b"before", "data after close_notify must be ignored"
        fresh_client_echo(st, certs)
        assert_back_to_idle(st)


def test_single_byte_records(certs: Certs) -> None:
    """1 MiB sent as one-byte TLS records: ~22x overhead, every byte must come back in order."""
    payload = random.Random(7).randbytes(1024 * 1024)
    with echo_server(certs) as st:
        client = RawTLSClient(st.port, certs.client_pyopenssl_context(), timeout=60)
        client.handshake()
        assert client.recv_until(4) == GREETING
        # Raw ciphertext is collected on a thread so the server's echo never
        # waits on us (it would pause reading us: backpressure, not a bug);
        # OpenSSL itself is only touched from this thread.
        arrived: queue.Queue[bytes] = queue.Queue()
        stop = threading.Event()

        def collect() -> None:
            while not stop.is_set():
                try:
                    chunk = client.sock.recv(1 << 20)
                except TimeoutError:
                    continue
                arrived.put(chunk)
                if not chunk:
                    return

        client.sock.settimeout(0.2)
        reader = threading.Thread(target=collect, daemon=True)
        reader.start()
        step = 4096
        for i in range(0, len(payload), step):
            for b in range(i, min(i + step, len(payload))):
                client.ssl.send(payload[b : b + 1])  # one record per byte
            client._flush()
        echoed = bytearray()
        deadline = time.monotonic() + 60
        while len(echoed) < len(payload):
            try:
                chunk = arrived.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"echo stalled at {len(echoed)} of {len(payload)} bytes") from None
            assert chunk, f"the server closed after {len(echoed)} of {len(payload)} bytes"
            client.ssl.bio_write(chunk)
            with contextlib.suppress(SSL.WantReadError):
                while True:
                    echoed += client.ssl.recv(65536)
        stop.set()
        reader.join(5)
        assert bytes(echoed) == payload
        client.sock.settimeout(10)
        client.send_close_notify()
        client.close_tcp()
        assert_back_to_idle(st)


def test_thousand_connections_dropped_mid_handshake(certs: Certs) -> None:
    hello = client_hello(certs)
    # The default handshake timeout: on a loaded machine one loop iteration that
    # accepts hundreds of connections can outlast 0.5 s, and this test is about
    # resets, not about timers.
    with echo_server(certs, tlsuv.ConnectionOptions()) as st:
        for _ in range(1000):
            s = socket.create_connection(("127.0.0.1", st.port), timeout=10)
            s.sendall(hello)
            rst(s)
        st.wait_for(lambda: st.server.accepted == 1000 and not st.server.connections, timeout=30)
        fresh_client_echo(st, certs)
        assert_back_to_idle(st)
        reasons = {type(h.reason) for h in st.handlers[:1000] if isinstance(h, Recorder)}
        assert reasons <= {tlsuv.TransportError, tlsuv.HandshakeError}, reasons
        assert all(isinstance(h, Recorder) and h.closed_count == 1 for h in st.handlers)


def test_cycles_leave_nothing_behind(certs: Certs) -> None:
    """Hundreds of mixed bad-peer cycles; then no connection, handle or timer is left.

    scripts/soak.py runs the same for 10,000 cycles and also watches memory.
    """
    quick = [c for c, _ in CASES if c is not client_hello_then_silence]
    rnd = random.Random(42)
    with echo_server(certs) as st:
        for i in range(300):
            rnd.choice(quick)(st.port, certs)
            if i % 50 == 0:
                fresh_client_echo(st, certs)
        st.wait_for(lambda: not st.server.connections, timeout=30)
        fresh_client_echo(st, certs)
        assert_back_to_idle(st)
        assert all(isinstance(h, Recorder) and h.closed_count == 1 for h in st.handlers)
