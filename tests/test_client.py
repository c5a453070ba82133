"""tlsuv's client (tlsuv.client) against a real server, Python's ssl (openssl s_server: test_interop)."""

from __future__ import annotations

import errno
import select
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import pyuv
from conftest import Certs, CheckedLoop, TLSFiles
from helpers import GREETING, wait_until
from peers import ClientRecorder, PySSLServer, client_echo_once, run_loop

import tlsuv
from tlsuv.client import Client, connect, pending_list_users
from tlsuv.errors import CertificateVerifyError
from tlsuv.policy import build_client_context

BOTH_VERSIONS = [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3]


def py_server_ctx(cert: Path, key: Path, *, version: ssl.TLSVersion | None = None,
                  alpn: list[str] | None = None, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    return ctx


@pytest.fixture
def py_server(certs: Certs) -> Iterator[PySSLServer]:
    with PySSLServer(py_server_ctx(certs.cert_file, certs.key_file)) as srv:
        yield srv


# -- verification ----------------------------------------------------------------------


def test_verified_echo_by_host_name_sends_sni(loop: CheckedLoop, certs: Certs,
                                              py_server: PySSLServer) -> None:
    # "localhost" goes through libuv's getaddrinfo, verification and SNI.
    h = client_echo_once(loop, py_server.port, "localhost", cafile=certs.ca_file)
    assert h.reason is None, h.reason
    assert bytes(h.data) == GREETING + b"ping"
    assert h.events == ["established", "handshake_complete", "closed"]
    assert h.info["version"] == "TLSv1.3"
    assert py_server.accepted[0].sni == "localhost"
    assert h.info["server_name"] == "localhost"
    assert bytes(py_server.accepted[0].received) == b"ping"
    assert py_server.accepted[0].close_notify  # a clean close, not a dropped socket
    assert pending_list_users(loop) == 0


def test_ip_address_is_verified_and_sends_no_sni(loop: CheckedLoop, certs: Certs,
                                                 py_server: PySSLServer) -> None:
    h = client_echo_once(loop, py_server.port, "127.0.0.1", cafile=certs.ca_file)
    assert h.reason is None, h.reason
    assert py_server.accepted[0].sni is None  # RFC 6066: no IP literals in SNI


def test_ip_not_in_certificate_fails(loop: CheckedLoop, certs: Certs, tls_files: TLSFiles) -> None:
    cert, key = tls_files.sni["alpha.test"]
    with PySSLServer(py_server_ctx(cert, key)) as srv:
        h = client_echo_once(loop, srv.port, "127.0.0.1", cafile=certs.ca_file)
    assert isinstance(h.reason, CertificateVerifyError), h.reason
    assert h.reason.verify_message == "IP address mismatch"
    assert "handshake_complete" not in h.events


def test_servername_selects_name_to_send_and_verify(loop: CheckedLoop, certs: Certs,
                                                    tls_files: TLSFiles) -> None:
    cert, key = tls_files.sni["alpha.test"]
    with PySSLServer(py_server_ctx(cert, key)) as srv:
        h = client_echo_once(loop, srv.port, "127.0.0.1", cafile=certs.ca_file, server_hostname="alpha.test")
        assert h.reason is None, h.reason
        assert srv.accepted[0].sni == "alpha.test"


def test_host_name_mismatch_fails_with_clear_reason(loop: CheckedLoop, certs: Certs,
                                                    py_server: PySSLServer) -> None:
    h = client_echo_once(loop, py_server.port, cafile=certs.ca_file, server_hostname="wrong.test")
    assert isinstance(h.reason, CertificateVerifyError), h.reason
    assert h.reason.verify_message == "hostname mismatch"
    assert "hostname mismatch" in str(h.reason)
    assert h.events == ["established", "closed"]
    # The server learnt why: OpenSSL's bad_certificate alert was flushed before closing.
    error = wait_until(lambda: py_server.accepted and py_server.accepted[0].error,
                       what="the Python server to record its handshake failure")
    assert "BAD_CERTIFICATE" in repr(error).upper()


def test_untrusted_ca_fails(loop: CheckedLoop, py_server: PySSLServer, tls_files: TLSFiles) -> None:
    h = client_echo_once(loop, py_server.port, cafile=tls_files.other_ca_file)
    assert isinstance(h.reason, CertificateVerifyError), h.reason
    assert "issuer" in h.reason.verify_message


def test_verification_defaults_to_system_store(loop: CheckedLoop, certs: Certs, py_server: PySSLServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # The trustme CA is in no system store: verification is on without being asked.
    h = client_echo_once(loop, py_server.port)
    assert isinstance(h.reason, CertificateVerifyError), h.reason
    # OpenSSL's default store honours SSL_CERT_FILE: proof that it is the store in use.
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_file))
    h = client_echo_once(loop, py_server.port)
    assert h.reason is None, h.reason


def test_verify_false_accepts_any_certificate(loop: CheckedLoop, py_server: PySSLServer) -> None:
    h = client_echo_once(loop, py_server.port, verify=False, server_hostname="wrong.test")
    assert h.reason is None, h.reason
    assert bytes(h.data) == GREETING + b"ping"


# -- client certificate, ALPN, versions ------------------------------------------------------


def test_client_certificate_is_presented(loop: CheckedLoop, certs: Certs, tls_files: TLSFiles) -> None:
    ctx = py_server_ctx(certs.cert_file, certs.key_file, client_ca=tls_files.client_ca_file)
    with PySSLServer(ctx) as srv:
        h = client_echo_once(loop, srv.port, cafile=certs.ca_file, cert=tls_files.client_cert,
                      key=tls_files.client_key)
        assert h.reason is None, h.reason
        peer = srv.accepted[0].peer_cert
        assert peer is not None
        assert (("commonName", "alice"),) in peer["subject"]


def test_missing_client_certificate_is_refused(loop: CheckedLoop, certs: Certs, tls_files: TLSFiles) -> None:
    ctx = py_server_ctx(certs.cert_file, certs.key_file, client_ca=tls_files.client_ca_file)
    with PySSLServer(ctx) as srv:
        h = client_echo_once(loop, srv.port, cafile=certs.ca_file)
    # TLS 1.3: the client finishes first; the server's alert arrives after.
    assert isinstance(h.reason, tlsuv.TLSError), h.reason
    assert "certificate required" in str(h.reason)
    assert not h.data


@pytest.mark.parametrize("version", BOTH_VERSIONS, ids=["tls1.2", "tls1.3"])
def test_alpn_offer(loop: CheckedLoop, certs: Certs, version: ssl.TLSVersion) -> None:
    ctx = py_server_ctx(certs.cert_file, certs.key_file, version=version, alpn=["h2", "http/1.1"])
    with PySSLServer(ctx) as srv:
        h = client_echo_once(loop, srv.port, cafile=certs.ca_file, alpn=["spdy/1", "http/1.1"])
        assert h.reason is None, h.reason
        assert h.info["alpn"] == "http/1.1"
        assert srv.accepted[0].alpn == "http/1.1"
        assert h.info["version"] == version.name.replace("_", ".")
        h = client_echo_once(loop, srv.port, cafile=certs.ca_file)
        assert h.info["alpn"] is None
        assert srv.accepted[1].alpn is None


def test_max_version(loop: CheckedLoop, certs: Certs, py_server: PySSLServer) -> None:
    h = client_echo_once(loop, py_server.port, cafile=certs.ca_file, max_version="1.2")
    assert h.reason is None, h.reason
    assert h.info["version"] == "TLSv1.2"
    assert py_server.accepted[0].version == "TLSv1.2"


# -- resumption ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", BOTH_VERSIONS, ids=["tls1.2", "tls1.3"])
def test_client_resumes_its_session(loop: CheckedLoop, certs: Certs, version: ssl.TLSVersion) -> None:
    with PySSLServer(py_server_ctx(certs.cert_file, certs.key_file, version=version)) as srv:
        client = Client(loop, cafile=certs.ca_file)
        reused = []
        for _ in range(2):
            h = ClientRecorder(b"x", len(GREETING) + 1)
            run_loop(loop, [client.connect("localhost", srv.port, lambda c, h=h: h)])
            assert h.reason is None, h.reason
            reused.append(h.info["reused"])
        assert reused == [False, True]
        assert [a.session_reused for a in srv.accepted] == [False, True]
        # A different name is a different server as far as the cache knows.
        h = ClientRecorder(b"x", len(GREETING) + 1)
        run_loop(loop, [client.connect("127.0.0.1", srv.port, lambda c: h)])
        assert h.reason is None and h.info["reused"] is False


# -- half-close and truncation -------------------------------------------------------------------


def test_write_eof_keeps_reading_until_the_server_closes(loop: CheckedLoop, certs: Certs) -> None:
    ctx = py_server_ctx(certs.cert_file, certs.key_file)
    with PySSLServer(ctx, farewell=b"goodbye") as srv:
        h = ClientRecorder(b"ping", half_close=True)
        run_loop(loop, [connect(loop, "127.0.0.1", srv.port, lambda c: h, cafile=certs.ca_file)])
    assert h.reason is None, h.reason
    # "goodbye" was sent after the server had read our close_notify.
    assert bytes(h.data) == GREETING + b"ping" + b"goodbye"
    assert srv.accepted[0].close_notify


def test_eof_without_close_notify_after_write_eof_is_truncation(loop: CheckedLoop, certs: Certs) -> None:
    ctx = py_server_ctx(certs.cert_file, certs.key_file)
    with PySSLServer(ctx, farewell=b"partial", truncate_after_close=True) as srv:
        h = ClientRecorder(b"ping", half_close=True)
        run_loop(loop, [connect(loop, "127.0.0.1", srv.port, lambda c: h, cafile=certs.ca_file)])
    assert isinstance(h.reason, tlsuv.TruncationError), h.reason
    assert bytes(h.data).endswith(b"partial")


# -- connecting -------------------------------------------------------------------------------------


def test_connection_refused(loop: CheckedLoop) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: the kernel refuses
        h = ClientRecorder()
        run_loop(loop, [connect(loop, "127.0.0.1", port, lambda c: h)])
    assert isinstance(h.reason, tlsuv.TransportError), h.reason
    assert h.reason.errno == pyuv.errno.UV_ECONNREFUSED
    assert "connection refused" in str(h.reason)
    assert h.events == ["closed"]  # never established


def test_name_that_does_not_resolve(loop: CheckedLoop) -> None:
    h = ClientRecorder()
    run_loop(loop, [connect(loop, "no-such-host.invalid", 443, lambda c: h)])
    assert isinstance(h.reason, tlsuv.TransportError), h.reason
    assert "cannot resolve no-such-host.invalid" in str(h.reason)


def connected(socks: list[socket.socket]) -> bool:
    """Whether any of these non-blocking sockets finished connecting."""
    _, writable, _ = select.select([], socks, [], 0)
    return any(s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0 for s in writable)


def test_connect_timeout(loop: CheckedLoop) -> None:
    # A listener whose accept queue is full drops further SYNs: the connect hangs.
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        port = srv.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                f = socket.socket()
                f.setblocking(False)
                if f.connect_ex(("127.0.0.1", port)) not in (0, errno.EINPROGRESS):
                    f.close()
                    continue
                fillers.append(f)
            # One filler through the three-way handshake fills the queue (backlog 0 holds
            # one): from then on the kernel drops SYNs, the client's included.
            wait_until(lambda: connected(fillers), timeout=5, what="a filler to fill the accept queue")
            h = ClientRecorder()
            run_loop(loop, [connect(loop, "127.0.0.1", port, lambda c: h, connect_timeout=0.3)])
        finally:
            for f in fillers:
                f.close()
    assert isinstance(h.reason, tlsuv.TimeoutError), h.reason
    assert h.reason.phase == "connect"  # the connect deadline, not the kernel's SYN retries


def test_ipv6(loop: CheckedLoop, certs: Certs) -> None:
    with PySSLServer(py_server_ctx(certs.cert_file, certs.key_file), host="::1") as srv:
        h = client_echo_once(loop, srv.port, "::1", cafile=certs.ca_file)
        assert h.reason is None, h.reason
        assert h.info["peer"] == ("::1", srv.port)


def test_write_before_connected_is_delivered(loop: CheckedLoop, certs: Certs, py_server: PySSLServer) -> None:
    h = ClientRecorder(b"", len(GREETING) + 5)
    conn = connect(loop, "localhost", py_server.port, lambda c: h, cafile=certs.ca_file)
    conn.write(b"early")  # the name is not even resolved yet
    run_loop(loop, [conn])
    assert h.reason is None, h.reason
    assert bytes(h.data) == GREETING + b"early"


def test_close_and_abort_before_connected(loop: CheckedLoop, py_server: PySSLServer) -> None:
    closed_early = ClientRecorder()
    c1 = connect(loop, "localhost", py_server.port, lambda c: closed_early)
    c1.close()
    aborted = ClientRecorder()
    c2 = connect(loop, "127.0.0.1", py_server.port, lambda c: aborted)
    c2.abort()
    run_loop(loop, [c1, c2])
    assert closed_early.events == ["closed"] and closed_early.reason is None
    assert aborted.events == ["closed"]
    assert isinstance(aborted.reason, tlsuv.ConnectionClosedError)


def test_handler_factory_error_leaves_nothing_behind(loop: CheckedLoop, py_server: PySSLServer) -> None:
    def broken(conn: tlsuv.Connection) -> tlsuv.Handler:
        raise RuntimeError("no handler for you")

    conn = connect(loop, "127.0.0.1", py_server.port, broken)
    run_loop(loop, [conn])
    assert conn.closed
    assert pending_list_users(loop) == 0


def test_connections_on_one_loop_share_one_pending_list(loop: CheckedLoop, certs: Certs,
                                                        py_server: PySSLServer) -> None:
    client = Client(loop, cafile=certs.ca_file)
    handlers = [ClientRecorder(b"%d" % i, len(GREETING) + 1) for i in range(5)]
    conns = [client.connect("127.0.0.1", py_server.port, lambda c, h=h: h)
             for h in handlers]
    assert pending_list_users(loop) == 5
    run_loop(loop, conns)
    assert [bytes(h.data) for h in handlers] == [GREETING + b"%d" % i for i in range(5)]
    # The last connection closed the shared Prepare/Idle handles (CheckedLoop checks none is open).
    assert pending_list_users(loop) == 0
    assert not client.connections


def test_bad_arguments_raise_before_anything_starts(loop: CheckedLoop, certs: Certs) -> None:
    with pytest.raises(ValueError, match="not a valid host name"):
        connect(loop, "a..b", 443, lambda c: ClientRecorder())
    with pytest.raises(ValueError, match="port must be 1-65535"):
        connect(loop, "localhost", 0, lambda c: ClientRecorder())
    with pytest.raises(ValueError, match="either a ready context"):
        Client(loop, build_client_context(), cafile=certs.ca_file)
    assert pending_list_users(loop) == 0  # and CheckedLoop finds no handle left open


def test_a_ready_context_still_gets_the_host_name_check(loop: CheckedLoop, certs: Certs,
                                                        py_server: PySSLServer) -> None:
    client = Client(loop, build_client_context(cafile=certs.ca_file))
    good, bad = ClientRecorder(b"a", len(GREETING) + 1), ClientRecorder()
    conns = [client.connect("localhost", py_server.port, lambda c: good),
             client.connect("127.0.0.1", py_server.port, lambda c: bad, server_hostname="other.test")]
    run_loop(loop, conns)
    assert good.reason is None, good.reason
    assert isinstance(bad.reason, CertificateVerifyError) and bad.reason.verify_message == "hostname mismatch"


# -- a fast client's first flight after the handshake ----------------------------------------------


def test_finished_data_and_close_notify_in_one_read(certs: Certs) -> None:
    """A TLS 1.3 client may send its Finished, data and close_notify before the server reads any.

    ``python -m tlsuv.client`` does exactly that with ``printf x |``.  The server must see a
    completed handshake, the data, then a clean close -- not "close_notify before the handshake".
    Driven in memory so the single read is certain, not a race.
    """
    client = tlsuv.TLSEngine(certs.client_pyopenssl_context(), server_side=False,
                             server_hostname="localhost")
    server = tlsuv.TLSEngine(certs.server_context())
    client.receive(b"")
    server.receive(client.data_to_send())
    assert client.receive(server.data_to_send()) == []
    assert (client.state, server.state) == (tlsuv.State.ESTABLISHED, tlsuv.State.HANDSHAKING)
    client.write(b"x")
    client.shutdown()
    assert server.receive(client.data_to_send()) == [b"x"]
    assert (client.state, server.state) == (tlsuv.State.SHUTDOWN_SENT, tlsuv.State.PEER_CLOSED)
    server.write(b"echo of x")  # a TLS 1.3 peer's close_notify only closes its direction
    server.shutdown()
    client.read_after_shutdown = True
    assert client.receive(server.data_to_send()) == [b"echo of x"]
    assert (client.state, server.state) == (tlsuv.State.CLOSED, tlsuv.State.CLOSED)
