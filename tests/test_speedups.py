"""tlsuv._speedups on its own: the compiled data path against two in-memory pyOpenSSL peers.

Everything the pure path guarantees is tested through TLSEngine on every path
(tests/test_tls_core.py); these tests hold the C module to its own contract,
with the corners an engine rarely reaches: bounds, partial socket writes,
failed binds, a closed Pipe, reference counts.  Without a C compiler the
module is not built and these tests skip -- unless TLSUV_REQUIRE_SPEEDUPS=1
(CI sets it), which makes a missing build a failure.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import socket
import subprocess
import sys
import weakref
from typing import Any

import pytest
from conftest import Certs, require_speedups
from memory_peers import PlainPeer
from OpenSSL import SSL
from OpenSSL._util import ffi, lib

from tlsuv import _openssl
from tlsuv import tls as tls_module

speedups: Any = _openssl.SPEEDUPS


@pytest.fixture(autouse=True)
def _compiled_path() -> None:
    require_speedups()


class Server:
    """The server side as tlsuv's engine holds it: a pyOpenSSL memory-BIO connection and its Pipe."""

    def __init__(self, certs: Certs, version: int = SSL.TLS1_3_VERSION) -> None:
        self.conn = SSL.Connection(certs.server_context(max_version=version), None)
        self.conn.set_accept_state()
        _openssl.tune(self.conn)
        handles = _openssl.fast_handles(self.conn)
        assert handles is not None
        self.handles = handles
        self.pipe = _openssl.new_pipe(self.conn, handles)

    def output(self) -> bytes:
        out = bytearray()
        while True:
            r = self.pipe.flush(-1)
            if r == 0:
                return bytes(out)
            size, rest = r
            assert len(rest) == size
            out += rest


def handshake(certs: Certs, version: int = SSL.TLS1_3_VERSION) -> tuple[Server, PlainPeer]:
    server = Server(certs, version)
    peer = PlainPeer(certs.client_pyopenssl_context())
    peer.kick()
    for _ in range(10):
        # The handshake itself runs through pyOpenSSL: the Pipe is for established connections.
        server.conn.bio_write(peer.outgoing())
        with contextlib.suppress(SSL.WantReadError):
            server.conn.do_handshake()
        peer.incoming(server.output())
        peer.kick()
        if server.conn.get_state_string() == b"SSL negotiation finished successfully" \
                and not _openssl.BIO_get_mem_data(peer.ssl._from_ssl, _openssl.NULL):
            break
    out: list[bytes] = []
    assert server.pipe.receive(peer.outgoing(), out) == 1
    assert out == []
    return server, peer


@pytest.fixture(params=[SSL.TLS1_2_VERSION, SSL.TLS1_3_VERSION], ids=["TLSv1.2", "TLSv1.3"])
def pair(request: pytest.FixtureRequest, certs: Certs) -> tuple[Server, PlainPeer]:
    return handshake(certs, request.param)


def test_symbols_and_sizes_match_the_pure_path() -> None:
    assert tuple(speedups.SYMBOLS) == tuple(_openssl.SPEEDUPS_PROTOTYPES)
    assert speedups.RECV_SIZE == tls_module.RECV_SIZE
    assert speedups.OUTPUT_MAX == tls_module.OUTPUT_MAX


def test_echo_both_ways(pair: tuple[Server, PlainPeer]) -> None:
    server, peer = pair
    for size in (1, 64, 1000, 16384, 16385, 70000):
        payload = random.Random(size).randbytes(size)
        assert peer.send(payload)
        out: list[bytes] = []
        assert server.pipe.receive(peer.outgoing(), out) == 1
        assert b"".join(out) == payload
        assert len(out) == 1, "plaintext of one receive is one chunk while it fits"
        assert server.pipe.write(payload) == size
        peer.received.clear()
        peer.incoming(server.output())
        assert bytes(peer.received) == payload


def test_ciphertext_cut_anywhere(pair: tuple[Server, PlainPeer]) -> None:
    server, peer = pair
    rnd = random.Random(7)
    payload = rnd.randbytes(50_000)
    assert peer.send(payload)
    wire = peer.outgoing()
    got = bytearray()
    i = 0
    while i < len(wire):
        n = rnd.choice([1, 2, 5, 17, 300, 4000, 20000])
        out: list[bytes] = []
        assert server.pipe.receive(wire[i:i + n], out) == 1
        got += b"".join(out)
        i += n
    assert bytes(got) == payload


@pytest.mark.parametrize("records", [3, 14, 15, 16, 20, 40])
def test_chunks_are_bounded_by_the_scratch_buffer(certs: Certs, records: int) -> None:
    """Records go one after another into the scratch buffer; a chunk is handed over before a
    record could overflow it -- exactly where the pure path splits them."""
    server, peer = handshake(certs)
    payloads = [random.Random(i).randbytes(16384) for i in range(records)]
    for p in payloads:
        assert peer.send(p)
    out: list[bytes] = []
    assert server.pipe.receive(peer.outgoing(), out) == 1
    assert b"".join(out) == b"".join(payloads)
    limit = speedups.OUTPUT_MAX - speedups.RECV_SIZE
    assert all(len(c) <= limit + speedups.RECV_SIZE for c in out)
    # The pure path's rule: a chunk closes once more than OUTPUT_MAX - RECV_SIZE bytes are in it.
    expected, used = [], 0
    for _ in payloads:
        used += 16384
        if used > limit:
            expected.append(used)
            used = 0
    if used:
        expected.append(used)
    assert [len(c) for c in out] == expected


@pytest.mark.parametrize("tail", [0, 1, 100, 20_000, 40_000])
def test_a_record_openssl_holds_and_more_behind_it_come_out_as_one_chunk(certs: Certs, tail: int) -> None:
    """Large inputs are decrypted straight into the bytes handed over; when part of a record was
    read earlier (OpenSSL holds it) and more records follow, the chunk grows instead of splitting."""
    server, peer = handshake(certs)
    first = random.Random(1).randbytes(16384)
    rest = random.Random(2).randbytes(tail)
    assert peer.send(first)
    record = peer.outgoing()
    if rest:
        assert peer.send(rest)
    behind = peer.outgoing()
    out: list[bytes] = []
    assert server.pipe.receive(record[:12_000], out) == 1 and out == [], "a partial record: nothing yet"
    second = record[12_000:] + behind
    assert len(second) >= 4096, "the direct path"
    assert server.pipe.receive(second, out) == 1
    assert out == [first + rest]


def test_close_notify_is_handed_back_with_the_data_before_it(pair: tuple[Server, PlainPeer]) -> None:
    server, peer = pair
    assert peer.send(b"last words")
    peer.ssl.shutdown()
    out: list[bytes] = []
    status = server.pipe.receive(peer.outgoing(), out)
    assert status is not None and status <= 0
    assert out == [b"last words"]
    # The engine asks SSL_get_error again: it only peeks, so the answer is the same.
    assert _openssl.SSL_get_error(server.handles[0], status) == _openssl.ERROR_ZERO_RETURN
    with pytest.raises(SSL.ZeroReturnError):
        _openssl.raise_ssl_error(server.conn, status)


def test_a_bad_record_is_handed_back_for_pyopenssls_mapping(pair: tuple[Server, PlainPeer]) -> None:
    server, _ = pair
    out: list[bytes] = []
    status = server.pipe.receive(b"\x17\x03\x03\x00\x20" + b"\x00" * 32, out)
    assert status is not None and status <= 0
    assert out == []
    with pytest.raises(SSL.Error, match=r"bad record mac|decryption failed"):
        _openssl.raise_ssl_error(server.conn, status)


def test_receive_without_input_drains_what_openssl_holds(pair: tuple[Server, PlainPeer]) -> None:
    server, peer = pair
    out: list[bytes] = []
    assert server.pipe.receive(b"", out) == 1
    assert out == []
    assert peer.send(b"x" * 100)
    wire = peer.outgoing()
    assert server.pipe.receive(wire[:50], out) == 1 and out == []
    assert server.pipe.receive(wire[50:], out) == 1 and out == [b"x" * 100]


def test_flush_writes_to_the_socket_and_returns_what_the_kernel_refused(certs: Certs) -> None:
    server, peer = handshake(certs)
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        payload = random.Random(3).randbytes(1_000_000)  # > OUTPUT_MAX of ciphertext: two BIO reads
        assert server.pipe.write(payload) == len(payload)
        r = server.pipe.flush(a.fileno())
        assert isinstance(r, tuple), "a 1 MB flush cannot fit a 4 KiB socket buffer"
        size, rest = r
        assert isinstance(rest, bytes) and 0 < len(rest) < size
        assert server.pipe.flush(a.fileno()) == 0, "the BIO was drained completely"
        sent = size - len(rest)
        wire = bytearray()
        while len(wire) < sent:
            wire += b.recv(65536)
        assert len(wire) == sent
        peer.incoming(bytes(wire) + rest)
        assert bytes(peer.received) == payload
        # And a small one goes out whole: the count of bytes, no copy.
        assert server.pipe.write(b"ping") == 4
        n = server.pipe.flush(a.fileno())
        assert isinstance(n, int) and n > 4
        peer.received.clear()
        peer.incoming(b.recv(65536))
        assert bytes(peer.received) == b"ping"


def test_flush_reports_a_failed_write_as_errno(certs: Certs) -> None:
    server, _ = handshake(certs)
    a, b = socket.socketpair()
    b.close()
    with a:
        assert server.pipe.write(b"to nobody") == 9
        size, err = server.pipe.flush(a.fileno())
        assert size > 9 and err == 32  # EPIPE (Python ignores SIGPIPE)
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    assert server.pipe.write(b"to no file") == 10
    size, err = server.pipe.flush(w)
    assert size > 10 and err == 9  # EBADF


def test_flush_with_nothing_to_send(pair: tuple[Server, PlainPeer]) -> None:
    assert pair[0].pipe.flush(-1) == 0
    assert pair[0].pipe.flush(0) == 0, "nothing drained: the fd is never written"


def test_arguments_are_checked(pair: tuple[Server, PlainPeer]) -> None:
    pipe = pair[0].pipe
    with pytest.raises(TypeError):
        pipe.receive(bytearray(b"x"), [])
    with pytest.raises(TypeError):
        pipe.receive(b"x", ())
    with pytest.raises(TypeError):
        pipe.receive(b"x")
    with pytest.raises(TypeError):
        pipe.write(memoryview(b"x"))
    with pytest.raises(TypeError):
        pipe.flush("1")
    with pytest.raises(OverflowError):
        pipe.flush(2**40)
    with pytest.raises(ValueError):
        speedups.Pipe(pair[0].conn, 0, 1, 1)
    with pytest.raises(TypeError):
        speedups.Pipe(pair[0].conn, "ssl", 1, 1)


def test_a_closed_pipe_refuses_and_lets_its_connection_go(certs: Certs) -> None:
    server, _ = handshake(certs)
    pipe, ref = server.pipe, weakref.ref(server.conn)
    del server
    gc.collect()
    assert ref() is not None, "the Pipe keeps the pyOpenSSL connection (and so its SSL*) alive"
    pipe.close()
    assert pipe.closed
    gc.collect()
    assert ref() is None
    with pytest.raises(ValueError, match="closed"):
        pipe.receive(b"x", [])
    with pytest.raises(ValueError, match="closed"):
        pipe.write(b"x")
    with pytest.raises(ValueError, match="closed"):
        pipe.flush(-1)
    pipe.close()  # idempotent


def test_no_reference_leaks(certs: Certs) -> None:
    server, peer = handshake(certs)
    payload = b"y" * 64
    assert peer.send(payload)
    wire = peer.outgoing()
    out: list[bytes] = []
    server.pipe.receive(wire, out)
    chunk = out[0]
    assert sys.getrefcount(chunk) == 3  # out, chunk, getrefcount's argument
    before = sys.getrefcount(payload), sys.getrefcount(wire), sys.getrefcount(server.conn)
    for _ in range(100):
        assert peer.send(payload)
        out.clear()
        assert server.pipe.receive(peer.outgoing(), out) == 1
        server.pipe.write(payload)
        server.pipe.flush(-1)
    assert (sys.getrefcount(payload), sys.getrefcount(wire), sys.getrefcount(server.conn)) == before


def test_a_failed_bind_binds_nothing(certs: Certs) -> None:
    server, peer = handshake(certs)
    addresses = {name: int(ffi.cast("uintptr_t", getattr(lib, name)))
                 for name in speedups.SYMBOLS}
    for broken in ({k: v for k, v in addresses.items() if k != "SSL_read"},
                   addresses | {"BIO_write": 0}, addresses | {"SSL_pending": "x"}):
        with pytest.raises((LookupError, ValueError, TypeError)):
            speedups.bind(broken, lib.SSL_ERROR_WANT_READ)
    with pytest.raises(TypeError):
        speedups.bind(list(addresses), 2)
    # The earlier binding still stands.
    assert peer.send(b"still bound")
    out: list[bytes] = []
    assert server.pipe.receive(peer.outgoing(), out) == 1
    assert out == [b"still bound"]


class _Binding:
    """pyOpenSSL's binding with one function missing or swapped for another."""

    def __init__(self, missing: str | None = None, swapped: str | None = None) -> None:
        self.missing, self.swapped = missing, swapped

    def __getattr__(self, name: str) -> Any:
        if name == self.missing:
            raise AttributeError(name)
        if name == self.swapped:
            return lib.ERR_clear_error  # void(*)(void)
        return getattr(lib, name)


@pytest.mark.parametrize("name", list(_openssl.SPEEDUPS_PROTOTYPES))
def test_any_missing_or_mistyped_function_means_the_pure_path(name: str) -> None:
    for binding in (_Binding(missing=name), _Binding(swapped=name)):
        module, why = _openssl.load_speedups(binding)
        assert module is None
        assert why.startswith("pure Python") and name in why
    module, why = _openssl.load_speedups(lib)
    assert module is speedups and why.startswith("compiled")


@pytest.mark.parametrize("value,active", [("1", False), ("yes", False), ("0", True), ("", True)])
def test_tlsuv_no_extensions(value: str, active: bool) -> None:
    module, why = _openssl.load_speedups(environ={"TLSUV_NO_EXTENSIONS": value})
    assert (module is not None) == active, why


def _run(code: str, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if k != "TLSUV_NO_EXTENSIONS"} | env
    return subprocess.run([sys.executable, "-c", code], env=full, check=True, capture_output=True,
                          text=True, timeout=60).stdout.strip()


def test_speedups_active_in_a_fresh_interpreter() -> None:
    code = "import tlsuv; print(tlsuv.speedups_active(), tlsuv.data_path())"
    assert _run(code).startswith("True compiled")
    assert _run(code, TLSUV_NO_EXTENSIONS="1") == "False pure Python (TLSUV_NO_EXTENSIONS is set)"


def test_without_the_built_module_tlsuv_runs_the_pure_path(certs: Certs) -> None:
    # As on a machine without a C compiler: the import of tlsuv._speedups fails.
    code = f"""
import sys
sys.modules["tlsuv._speedups"] = None  # makes "from . import _speedups" raise ImportError
import tlsuv
from tlsuv.tls import TLSEngine
sys.path.insert(0, {os.path.dirname(__file__)!r})
from memory_peers import PlainPeer, pump
from OpenSSL import SSL
ctx = tlsuv.server_context(tlsuv.load_bundle({str(certs.cert_file)!r}, {str(certs.key_file)!r}))
engine = TLSEngine(ctx)
client = SSL.Context(SSL.TLS_METHOD)
peer = PlainPeer(client)
peer.kick()
engine.write(b"OK")
pump(engine, peer)
assert peer.send(b"ping")
got = bytearray()
pump(engine, peer, on_plain=got.extend)
assert bytes(got) == b"ping" and bytes(peer.received) == b"OK"
print(tlsuv.speedups_active(), engine._ptr is not None, tlsuv.data_path())
"""
    out = _run(code)
    assert out.startswith("False True pure Python (tlsuv._speedups is not built"), out
