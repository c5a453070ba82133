"""The server over loopback sockets with real TLS clients."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import socket
import ssl
import struct
import subprocess
import threading
from typing import IO

import pytest
from clients import echo_session, pyopenssl_stream
from conftest import Certs, Recorder, recv_exactly, server_thread
from helpers import GREETING
from OpenSSL import SSL

import tlsuv
from tlsuv.echo import EchoHandler


def test_greeting_arrives_first_and_intact(certs: Certs) -> None:
    with server_thread(certs.server_context()) as st, st.connect(certs) as s:
        # Say nothing first: the greeting was written before the handshake and must
        # come out of the deferred path by itself.
        assert recv_exactly(s, len(GREETING)) == GREETING
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_python_ssl_client_both_versions(certs: Certs, version: ssl.TLSVersion) -> None:
    with server_thread(certs.server_context()) as st, \
            st.connect(certs, minimum_version=version, maximum_version=version) as s:
        assert recv_exactly(s, 4) == GREETING
        assert s.version() == version.name.replace("_", ".")  # TLSv1_3 -> TLSv1.3
        for size in (1, 100, 16384, 16385, 100_000):
            data = os.urandom(size)
            s.sendall(data)
            assert recv_exactly(s, size) == data
        conn = st.connections[0]
        assert st.call(lambda: conn.tls_version) == s.version()
        cipher = s.cipher()
        assert cipher is not None
        assert st.call(lambda: conn.cipher) == cipher[0]
        assert st.call(lambda: conn.peer) == s.getsockname()[:2]


def test_connections_share_their_local_address_and_keep_their_own_peer(certs: Certs) -> None:
    with server_thread(certs.server_context()) as st, st.connect(certs) as a, st.connect(certs) as b:
        assert recv_exactly(a, 4) == GREETING
        assert recv_exactly(b, 4) == GREETING
        first, second = st.connections[0], st.connections[1]
        assert st.call(lambda: first.sockname) == a.getpeername()[:2]
        assert st.call(lambda: first.sockname is second.sockname), "one tuple per listener address"
        peers = {st.call(lambda: first.peer), st.call(lambda: second.peer)}
        assert peers == {a.getsockname()[:2], b.getsockname()[:2]}


def test_a_wildcard_listener_asks_each_connection_its_local_address(certs: Certs) -> None:
    # A listener on one address gives every connection that address without a
    # system call; one on 0.0.0.0 cannot know which local address a client
    # reached, so each connection asks the kernel.
    with server_thread(certs.server_context(), host="0.0.0.0") as st, \
            socket.create_connection(("127.0.0.1", st.port), timeout=10) as raw, \
            certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
        assert recv_exactly(s, 4) == GREETING
        (conn,) = st.connections
        assert st.call(lambda: conn.sockname) == ("127.0.0.1", st.port)


def test_a_transparent_listener_asks_each_connection_its_local_address(certs: Certs) -> None:
    # IP_TRANSPARENT (systemd's Transparent=yes, TPROXY): connections carry the
    # address the client dialled, not the listener's.  Without TPROXY routing
    # in the test both are the same, so this checks that the server does not
    # take the listener's address for them.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT; needs CAP_NET_ADMIN
    except PermissionError:
        sock.close()
        pytest.fail("IP_TRANSPARENT needs CAP_NET_ADMIN, which the test suite runs with in CI")
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    with server_thread(certs.server_context()) as st:
        port = st.call(lambda: st.server.listen_socket(sock)[1])
        assert st.call(lambda: len(st.server._local)) == 1, "only the test's own listener takes the shortcut"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
            assert recv_exactly(s, 4) == GREETING
            conn = st.connections[-1]
            assert st.call(lambda: conn.sockname) == ("127.0.0.1", port)


def test_the_echo_servers_handlers_carry_no_instance_dict(certs: Certs) -> None:
    # Handler and EchoHandler declare empty __slots__ so that each connection of the
    # echo server saves a __dict__; one missing declaration anywhere brings it back.
    # (That a subclass without __slots__ keeps its __dict__ is Python's rule, and
    # every Recorder in these tests relies on it.)
    with server_thread(certs.server_context()) as st, st.connect(certs) as s:
        assert recv_exactly(s, len(GREETING)) == GREETING
        (handler,) = st.handlers
        assert type(handler) is EchoHandler
        assert not hasattr(handler, "__dict__"), "an echo connection's handler grew a __dict__"


def test_ipv6_and_port_zero(certs: Certs) -> None:
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 loopback; the IPv6 listener cannot be tested")
    with server_thread(certs.server_context(), host="::1") as st:
        assert st.port != 0
        raw = socket.create_connection(("::1", st.port), timeout=10)
        with certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
            assert recv_exactly(s, 4) == GREETING
            s.sendall(b"six")
            assert recv_exactly(s, 3) == b"six"


def read_until(stream: IO[bytes], expected: bytes, timeout: float = 20.0) -> bytes:
    """Read a subprocess pipe until ``expected`` bytes arrived (or EOF), bounded in time."""
    got = b""
    done = threading.Event()

    def reader() -> None:
        nonlocal got
        while len(got) < len(expected):
            b = stream.read1(65536) if hasattr(stream, "read1") else stream.read(1)
            if not b:
                break
            got += b
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    done.wait(timeout)
    return got


def test_openssl_s_client_echo(certs: Certs) -> None:
    assert shutil.which("openssl"), "openssl is required"
    with server_thread(certs.server_context()) as st:
        # -quiet implies -ign_eof, so s_client stays until we end it: talk, read, then close stdin.
        with subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{st.port}", "-quiet",
             "-CAfile", str(certs.ca_file), "-servername", "localhost", "-verify_return_error"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        ) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(b"hello from s_client\n")
            proc.stdin.flush()
            got = read_until(proc.stdout, GREETING + b"hello from s_client\n")
            proc.terminate()
        assert got == GREETING + b"hello from s_client\n"


def test_one_10mb_write_echoed_intact(certs: Certs) -> None:
    payload = os.urandom(10 * 1024 * 1024)
    with server_thread(certs.server_context()) as st:
        echoed = asyncio.run(echo_session("127.0.0.1", st.port, certs.client_ssl_context(), payload,
                                          chunk=len(payload)))
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


def test_500_concurrent_connections(certs: Certs) -> None:
    n = 500

    async def main(port: int) -> list[bytes]:
        ctx = certs.client_ssl_context()
        payloads = [f"client {i} ".encode() * (i % 7 + 1) for i in range(n)]
        results = await asyncio.gather(*(echo_session("127.0.0.1", port, ctx, p) for p in payloads))
        return [r for r, p in zip(results, payloads, strict=True) if r != p]

    with server_thread(certs.server_context()) as st:
        mismatched = asyncio.run(main(st.port))
        assert not mismatched
        assert st.server.accepted == n


class Renegotiator(tlsuv.Handler):
    """Echoes, and starts a server-side renegotiation every ``every`` bytes received."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.next_at = every
        self.received = 0
        self.count = 0
        self.final_renegotiations = 0

    def established(self, conn: tlsuv.Connection) -> None:
        conn.write(GREETING)

    def read(self, conn: tlsuv.Connection, data: bytes) -> None:
        self.received += len(data)
        conn.write(data)
        if self.received >= self.next_at and conn.renegotiate():
            self.next_at += self.every
            self.count += 1

    def closed(self, conn: tlsuv.Connection, reason: BaseException | None) -> None:
        self.final_renegotiations = conn.renegotiations

    def pause_writing(self, conn: tlsuv.Connection) -> None:
        conn.pause_reading()

    def resume_writing(self, conn: tlsuv.Connection) -> None:
        conn.resume_reading()


def test_server_renegotiation_while_streaming_10mb(certs: Certs) -> None:
    payload = os.urandom(10 * 1024 * 1024)
    handlers: list[Renegotiator] = []

    def factory(conn: tlsuv.Connection) -> tlsuv.Handler:
        h = Renegotiator(every=1024 * 1024)
        handlers.append(h)
        return h

    ctx = certs.server_context(max_version=SSL.TLS1_2_VERSION)
    with server_thread(ctx, factory=factory) as st:
        result = pyopenssl_stream("127.0.0.1", st.port, certs.client_pyopenssl_context(), payload)
    assert bytes(result.received[:4]) == GREETING
    assert hashlib.sha256(result.received[4:]).digest() == hashlib.sha256(payload).digest()
    (h,) = handlers
    # One every MiB unless the previous one was still in flight (OpenSSL cannot
    # stack them); OpenSSL's own count agrees with ours.
    assert h.count >= 5
    assert h.final_renegotiations == h.count


def _client_renegotiate(port: int, certs: Certs) -> tuple[bytes, int]:
    """Handshake on TLS 1.2, start a renegotiation from the client, then echo one line."""
    ctx = certs.client_pyopenssl_context(max_version=SSL.TLS1_2_VERSION)
    sock = socket.create_connection(("127.0.0.1", port))
    # pyOpenSSL needs a blocking socket (a Python timeout makes it non-blocking);
    # SO_RCVTIMEO still bounds every read so a hang fails instead of stalling.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    try:
        conn.do_handshake()
        got = b""
        while len(got) < 4:
            got += conn.recv(4 - len(got))
        assert conn.renegotiate()
        conn.do_handshake()
        conn.sendall(b"after renegotiation")
        got = b""
        while len(got) < 19:
            got += conn.recv(19 - len(got))
        assert not conn.renegotiate_pending()
        return got, conn.total_renegotiations()
    finally:
        conn.close()


def test_client_renegotiation_refused_by_default(certs: Certs) -> None:
    ctx = certs.server_context(max_version=SSL.TLS1_2_VERSION)
    with server_thread(ctx) as st:
        with pytest.raises(SSL.Error, match="no renegotiation"):
            _client_renegotiate(st.port, certs)
        # The server goes on serving everyone else.
        with st.connect(certs) as s:
            assert recv_exactly(s, 4) == GREETING
            s.sendall(b"still here")
            assert recv_exactly(s, 10) == b"still here"


def test_client_renegotiation_allowed_by_option(certs: Certs) -> None:
    ctx = certs.server_context(max_version=SSL.TLS1_2_VERSION)
    options = tlsuv.ConnectionOptions(allow_client_renegotiation=True)
    with server_thread(ctx, options=options) as st:
        # OpenSSL counts renegotiations on the side that starts them: the client's
        # count proves the server went through a second handshake and kept echoing.
        assert _client_renegotiate(st.port, certs) == (b"after renegotiation", 1)


def test_handler_exception_closes_only_that_connection(
    certs: Certs, caplog: pytest.LogCaptureFixture
) -> None:
    class Boom(Recorder):
        def read(self, conn: tlsuv.Connection, data: bytes) -> None:
            if data == b"boom":
                raise RuntimeError("handler bug")
            conn.write(data)

    handlers: list[Boom] = []

    def factory(conn: tlsuv.Connection) -> tlsuv.Handler:
        handlers.append(Boom(greeting=GREETING))
        return handlers[-1]

    with caplog.at_level(logging.ERROR, logger="tlsuv"), \
            server_thread(certs.server_context(), factory=factory) as st, \
            st.connect(certs) as good, st.connect(certs) as bad:
        assert recv_exactly(good, 4) == GREETING
        assert recv_exactly(bad, 4) == GREETING
        bad.sendall(b"boom")
        assert bad.recv(10) == b""  # closed on us
        good.sendall(b"fine")
        assert recv_exactly(good, 4) == b"fine"
    # One ERROR record, naming the callback, with the handler's own exception attached.
    logged = [r for r in caplog.records
              if r.exc_info and repr(r.exc_info[1]) == "RuntimeError('handler bug')"]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]
    assert "handler.read raised" in logged[0].getMessage()
    reasons = [h.reason for h in handlers]
    assert sum(isinstance(r, tlsuv.HandlerError) for r in reasons) == 1
    assert all(h.closed_count == 1 for h in handlers)


def test_handshake_failure_counter_counts_only_failed_handshakes(certs: Certs) -> None:
    with server_thread(certs.server_context()) as st:
        # Completed, then truncated: not a failed handshake.
        raw = socket.create_connection(("127.0.0.1", st.port), timeout=10)
        s = certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost")
        assert recv_exactly(s, 4) == GREETING
        socket.socket(fileno=s.detach()).close()
        # Never completed: a failed handshake.
        with socket.create_connection(("127.0.0.1", st.port), timeout=10) as bad:
            bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while bad.recv(100):
                pass
        st.wait_for(lambda: not st.server.connections)
        assert st.server.accepted == 2
        assert st.server.handshakes_failed == 1
