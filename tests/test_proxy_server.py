"""A tlsuv server that expects the PROXY protocol, with real sockets and real TLS clients."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import ssl
import struct
import threading

import pytest
from clients import RawTLSClient
from conftest import Certs, ServerThread, recv_exactly, server_thread
from helpers import GREETING
from OpenSSL import SSL

import tlsuv
from tlsuv.echo import EchoHandler
from tlsuv.proxy import V2_SIGNATURE, ProxyOptions, parse_networks

# Documentation addresses (RFC 5737, RFC 3849): obviously not the loopback peer.
CLIENT4 = ("203.0.113.7", 4242)
SERVER4 = ("198.51.100.1", 443)
V1_HEADER = b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 443\r\n"


def v2_tcp6(src: tuple[str, int], dst: tuple[str, int]) -> bytes:
    block = (ipaddress.IPv6Address(src[0]).packed + ipaddress.IPv6Address(dst[0]).packed
             + struct.pack("!HH", src[1], dst[1]))
    return V2_SIGNATURE + b"\x21\x21" + struct.pack("!H", len(block)) + block


V2_LOCAL = V2_SIGNATURE + b"\x20\x00\x00\x00"


class Watcher(EchoHandler):
    """The echo handler, plus what the handler saw and when it closed."""

    __slots__ = ("closed_event", "events", "peer_at_established", "reason")

    def __init__(self) -> None:
        self.events: list[str] = []
        self.peer_at_established: tuple[str, int] | None = None
        self.reason: BaseException | None = None
        self.closed_event = threading.Event()

    def established(self, conn: tlsuv.Connection) -> None:
        self.events.append("established")
        self.peer_at_established = conn.peer
        super().established(conn)

    def closed(self, conn: tlsuv.Connection, reason: BaseException | None) -> None:
        self.events.append("closed")
        self.reason = reason
        self.closed_event.set()


def options(**proxy: object) -> tlsuv.ConnectionOptions:
    # Keyword arguments forwarded as-is; mypy cannot see their types through **.
    return tlsuv.ConnectionOptions(proxy=ProxyOptions(**proxy))  # type: ignore[arg-type]


def wait_closed(handler: tlsuv.Handler, timeout: float = 10.0) -> BaseException | None:
    assert isinstance(handler, Watcher)
    assert handler.closed_event.wait(timeout), "the connection was not closed in time"
    return handler.reason


def only_handler(st: ServerThread, timeout: float = 10.0) -> Watcher:
    st.wait_for(lambda: st.handlers, timeout, what="a connection to reach the server")
    (h,) = st.handlers
    assert isinstance(h, Watcher)
    return h


def test_v1_header_coalesced_with_the_client_hello(certs: Certs) -> None:
    """Header and ClientHello in one segment: the leftover must reach TLS intact."""
    with server_thread(certs.server_context(), factory=lambda c: Watcher(), options=options()) as st:
        client = RawTLSClient(st.port, certs.client_pyopenssl_context())
        try:
            with contextlib.suppress(SSL.WantReadError):
                client.ssl.do_handshake()  # only to make the ClientHello
            hello = client.ssl.bio_read(65536)
            client.send_raw(V1_HEADER + hello)
            client.handshake()
            assert client.recv_until(len(GREETING)) == GREETING
            client.send(b"through the balancer")
            assert client.recv_until(len(GREETING) + 20)[len(GREETING):] == b"through the balancer"
            real = client.sock.getsockname()[:2]
            conn = st.connections[0]
            assert st.call(lambda: conn.peer) == CLIENT4
            assert st.call(lambda: conn.sockname) == SERVER4
            assert st.call(lambda: conn.proxy_peer) == real
            header = st.call(lambda: conn.proxy_header)
            assert header is not None and header.version == 1
            # established waited for the header, so the handler never saw the balancer.
            assert only_handler(st).peer_at_established == CLIENT4
        finally:
            client.close_tcp()


def test_v2_tcp6_header_in_its_own_segment(certs: Certs) -> None:
    src, dst = ("2001:db8::17", 50000), ("2001:db8::443", 8443)
    with server_thread(certs.server_context(), factory=lambda c: Watcher(), options=options()) as st:
        raw = socket.create_connection(("127.0.0.1", st.port), timeout=10)
        raw.sendall(v2_tcp6(src, dst))
        with certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
            assert recv_exactly(s, len(GREETING)) == GREETING
            s.sendall(b"v6")
            assert recv_exactly(s, 2) == b"v6"
            conn = st.connections[0]
            assert st.call(lambda: (conn.peer, conn.sockname)) == (src, dst)
            assert only_handler(st).peer_at_established == src


def test_v2_local_keeps_the_real_endpoints(certs: Certs) -> None:
    with server_thread(certs.server_context(), factory=lambda c: Watcher(), options=options()) as st:
        raw = socket.create_connection(("127.0.0.1", st.port), timeout=10)
        raw.sendall(V2_LOCAL)
        with certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
            assert recv_exactly(s, len(GREETING)) == GREETING
            conn = st.connections[0]
            real = s.getsockname()[:2]
            assert st.call(lambda: (conn.peer, conn.proxy_peer)) == (real, real)
            header = st.call(lambda: conn.proxy_header)
            assert header is not None and header.local


@pytest.mark.parametrize(("first_bytes", "match"), [
    (None, "no PROXY header: the connection starts with b'\\x16"),  # TLS straight away
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "invalid port"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "over the limit"),
    (b"GET / HTTP/1.1\r\n\r\n", "no PROXY header"),
])
def test_missing_or_bad_header_closes_with_protocol_error(
    certs: Certs, first_bytes: bytes | None, match: str,
) -> None:
    with server_thread(certs.server_context(), factory=lambda c: Watcher(), options=options()) as st:
        raw = socket.create_connection(("127.0.0.1", st.port), timeout=10)
        with raw:
            if first_bytes is None:
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost")
            else:
                raw.sendall(first_bytes)
                assert raw.recv(100) == b""  # closed, and nothing was said
            handler = only_handler(st)
            reason = wait_closed(handler)
            assert isinstance(reason, tlsuv.ProtocolError)
            assert match in str(reason)
            assert handler.events == ["closed"]  # never established: the peer was never known
            assert st.call(lambda: st.server.handshakes_failed) == 1


def test_slow_header_times_out_with_its_own_phase(certs: Certs) -> None:
    opts = tlsuv.ConnectionOptions(handshake_timeout=30.0, proxy=ProxyOptions(timeout=0.3))
    with server_thread(certs.server_context(), factory=lambda c: Watcher(), options=opts) as st:
        raw = socket.create_connection(("127.0.0.1", st.port), timeout=10)
        with raw:
            raw.sendall(V1_HEADER[:10])  # a balancer that stalls mid-header
            reason = wait_closed(only_handler(st))
            assert isinstance(reason, tlsuv.TimeoutError)
            assert reason.phase == "proxy header"  # the 0.3 s header deadline, not the 30 s handshake one


def test_handshake_deadline_starts_after_the_header(certs: Certs) -> None:
    opts = tlsuv.ConnectionOptions(handshake_timeout=0.3, proxy=ProxyOptions(timeout=30.0))
    with server_thread(certs.server_context(), factory=lambda c: Watcher(), options=opts) as st:
        raw = socket.create_connection(("127.0.0.1", st.port), timeout=10)
        with raw:
            raw.sendall(V1_HEADER)  # then no ClientHello
            handler = only_handler(st)
            reason = wait_closed(handler)
            assert isinstance(reason, tlsuv.TimeoutError)
            assert reason.phase == "handshake"
            assert handler.events == ["established", "closed"]


def test_eof_inside_the_header(certs: Certs) -> None:
    with server_thread(certs.server_context(), factory=lambda c: Watcher(), options=options()) as st:
        raw = socket.create_connection(("127.0.0.1", st.port), timeout=10)
        raw.sendall(V1_HEADER[:20])
        raw.shutdown(socket.SHUT_WR)
        reason = wait_closed(only_handler(st))
        raw.close()
        assert isinstance(reason, tlsuv.ProtocolError)
        assert "before the PROXY header ended" in str(reason)


def test_sources_outside_allow_from_are_refused_at_accept(certs: Certs) -> None:
    opts = options(allow_from=parse_networks("127.0.0.2/32"))
    with server_thread(certs.server_context(), factory=lambda c: Watcher(), options=opts) as st:
        # 127.0.0.3 is loopback too, but not the trusted balancer.
        refused = socket.create_connection(("127.0.0.1", st.port), timeout=10,
                                           source_address=("127.0.0.3", 0))
        with refused:
            refused.sendall(V1_HEADER)
            # The header may arrive after the close; the kernel then answers RST.
            with contextlib.suppress(ConnectionResetError):
                assert refused.recv(100) == b""
        st.wait_for(lambda: st.server.refused == 1, what="the server to refuse the connection")
        assert st.handlers == []  # no handler, no TLS state for an untrusted source
        assert st.call(lambda: st.server.accepted) == 0

        allowed = socket.create_connection(("127.0.0.1", st.port), timeout=10,
                                           source_address=("127.0.0.2", 0))
        allowed.sendall(V1_HEADER)
        with certs.client_ssl_context().wrap_socket(allowed, server_hostname="localhost") as s:
            assert recv_exactly(s, len(GREETING)) == GREETING
            assert st.call(lambda: st.connections[0].proxy_peer)[0] == "127.0.0.2"


def test_without_the_option_a_header_is_not_guessed(certs: Certs) -> None:
    """The spec forbids auto-detection: a server not configured for PROXY treats it as bad TLS."""
    with server_thread(certs.server_context(), factory=lambda c: Watcher()) as st:
        raw = socket.create_connection(("127.0.0.1", st.port), timeout=10)
        with raw:
            raw.sendall(V1_HEADER)
            reason = wait_closed(only_handler(st))
        assert isinstance(reason, tlsuv.HandshakeError)
        assert st.call(lambda: st.connections[0].proxy_peer) is None


def test_server_close_does_not_wait_for_a_pending_header(certs: Certs) -> None:
    with server_thread(certs.server_context(), factory=lambda c: Watcher(), options=options(),
                       grace=30.0) as st:
        raw = socket.create_connection(("127.0.0.1", st.port), timeout=10)
        raw.sendall(V1_HEADER[:5])
        handler = only_handler(st)
        st.stop(timeout=10.0)  # fails if the close waited out its 30 s grace
        assert handler.closed_event.is_set() and handler.reason is None
        raw.close()
