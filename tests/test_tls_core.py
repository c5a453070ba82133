"""The I/O-free core against a second in-memory TLS peer: no sockets, every byte boundary chosen."""

from __future__ import annotations

import os
import random
from typing import Any

import pytest
from conftest import Certs, require_speedups
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memory_peers import PlainPeer, pump
from OpenSSL import SSL

from tlsuv import _openssl as tlsuv_openssl
from tlsuv import tls as tls_module
from tlsuv.errors import HandshakeError, TLSError, TruncationError
from tlsuv.tls import OUTPUT_MAX, InvalidTransition, State, TLSEngine

VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}


@pytest.fixture(autouse=True, params=["compiled", "fast", "public"])
def io_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every core test on three paths: compiled, direct OpenSSL calls, pyOpenSSL's public API.

    "compiled" is tlsuv._speedups (skipped where it is not built, unless
    TLSUV_REQUIRE_SPEEDUPS=1); "fast" the same steps in Python through
    pyOpenSSL's cffi binding (the reference, and what runs without the
    extension); "public" what tlsuv falls back to if pyOpenSSL's private
    binding changes.  All three must behave identically.
    """
    if request.param == "public":
        monkeypatch.setattr(tlsuv_openssl, "fast_handles", lambda conn: None)
    elif request.param == "fast":
        assert tlsuv_openssl.FAST_IO, "this pyOpenSSL should offer the fast path"
        monkeypatch.setattr(tlsuv_openssl, "SPEEDUPS", None)
    else:
        require_speedups()
    return str(request.param)


def make_pair(certs: Certs, version: str = "TLSv1.3",
              allow_client_renegotiation: bool = False) -> tuple[TLSEngine, PlainPeer]:
    server_ctx = certs.server_context(max_version=VERSIONS[version])
    engine = TLSEngine(server_ctx, allow_client_renegotiation=allow_client_renegotiation)
    peer = PlainPeer(certs.client_pyopenssl_context())
    peer.kick()
    return engine, peer


def test_the_path_under_test_is_the_one_in_use(certs: Certs, io_path: str) -> None:
    engine = TLSEngine(certs.server_context())
    assert (engine._ptr is not None) == (io_path != "public")
    assert (engine.pipe is not None) == (io_path == "compiled")


def state(engine: TLSEngine) -> State:
    """The engine's state, read through a call so mypy does not pin it after an assert."""
    return engine.state


@pytest.mark.parametrize("version", VERSIONS)
def test_greeting_before_handshake_is_deferred_then_delivered(certs: Certs, version: str) -> None:
    engine, peer = make_pair(certs, version)
    engine.write(b"OK\r\n")
    assert engine.deferred, "a write before the handshake must become a deferred write"
    assert state(engine) is State.HANDSHAKING
    pump(engine, peer)
    assert state(engine) is State.ESTABLISHED
    assert engine.version == version
    assert not engine.deferred
    assert bytes(peer.received) == b"OK\r\n"


@pytest.mark.parametrize("version", VERSIONS)
def test_writes_wait_for_the_handshake_without_calling_ssl_write(
        certs: Certs, version: str, io_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each SSL_write before the handshake completes could only fail with
    # WANT_READ, at the price of an exception: the engine must not try.
    engine, peer = make_pair(certs, version)
    states: list[State] = []

    def counting(real: Any) -> Any:
        def call(*args: Any) -> Any:
            states.append(engine.state)
            return real(*args)
        return call

    # One symbol for every direct SSL_write (the inlined fast path and _send_or_defer).
    monkeypatch.setattr(tls_module, "_SSL_write", counting(tls_module._SSL_write))
    monkeypatch.setattr(SSL.Connection, "send", counting(SSL.Connection.send))
    engine.write(b"OK")
    engine.write(bytearray(b"\r\n"))
    assert engine.deferred_bytes == 4
    assert not engine.retry_deferred()
    pump(engine, peer)
    assert bytes(peer.received) == b"OK\r\n"
    assert states and all(s is State.ESTABLISHED for s in states), states


@pytest.mark.parametrize("version", VERSIONS)
def test_echo_both_ways(certs: Certs, version: str) -> None:
    engine, peer = make_pair(certs, version)
    pump(engine, peer)
    got = bytearray()
    assert peer.send(b"ping" * 1000)
    pump(engine, peer, on_plain=got.extend)
    assert bytes(got) == b"ping" * 1000
    engine.write(bytes(got))
    pump(engine, peer)
    assert bytes(peer.received) == b"ping" * 1000


@pytest.mark.parametrize("size", [1, 64, 16384, 70000, OUTPUT_MAX + 5000])
def test_output_view_carries_the_same_records_as_data_to_send(certs: Certs, size: int, io_path: str) -> None:
    """The flush's zero-copy drain: a view valid until the next engine call, the rest by data_to_send."""
    engine, peer = make_pair(certs)
    pump(engine, peer)
    payload = random.Random(size).randbytes(size)
    engine.write(payload)
    view = engine.output_view()
    first = bytes(view)  # copied before any other engine call, as the contract says
    rest = engine.data_to_send() if len(view) >= OUTPUT_MAX else b""
    assert (len(view) >= OUTPUT_MAX) == (size > OUTPUT_MAX - 1000)
    if io_path != "public":
        assert len(view) <= OUTPUT_MAX, "the direct path drains through the scratch buffer"
    assert len(engine.output_view()) == 0, "the BIO must be drained"
    peer.incoming(first + rest)
    assert bytes(peer.received) == payload


@pytest.mark.parametrize("records", [3, 20])
def test_records_read_together_come_out_as_few_chunks(certs: Certs, records: int, io_path: str) -> None:
    """Plaintext of consecutive records is handed over in one chunk while it fits the scratch
    buffer (one Handler.read per socket read, not one per record), and exactly."""
    engine, peer = make_pair(certs)
    pump(engine, peer)
    payloads = [random.Random(i).randbytes(16384) for i in range(records)]
    for p in payloads:
        assert peer.send(p)  # one full record each
    chunks = engine.receive(peer.outgoing())
    assert b"".join(chunks) == b"".join(payloads)
    if io_path != "public":
        if 16384 * records <= OUTPUT_MAX - 16384:
            assert len(chunks) == 1
        else:  # 320 KiB: split where the scratch buffer is full, still far fewer than records
            assert 1 < len(chunks) < records


@pytest.mark.parametrize("tail", [1, 20_000])
def test_the_rest_of_a_record_and_more_behind_it_are_one_chunk(certs: Certs, tail: int, io_path: str) -> None:
    """Part of a record read earlier (OpenSSL holds it), then its rest and more records in one read:
    one chunk on the direct paths, whichever buffer the plaintext is decrypted into."""
    engine, peer = make_pair(certs)
    pump(engine, peer)
    first, rest = random.Random(1).randbytes(16384), random.Random(2).randbytes(tail)
    assert peer.send(first)
    record = peer.outgoing()
    assert peer.send(rest)
    assert engine.receive(record[:12_000]) == []
    chunks = engine.receive(record[12_000:] + peer.outgoing())
    assert b"".join(chunks) == first + rest
    if io_path != "public":
        assert len(chunks) == 1


# 40 per path in `make test`; `make hypothesis-long` asks for 2000 on the compiled path.
@settings(max_examples=int(os.environ.get("TLSUV_HYPOTHESIS_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    seed=st.integers(0, 2**32 - 1),
    max_chunk=st.sampled_from([1, 2, 7, 100, 1500, 20000]),
    payload_sizes=st.lists(st.integers(1, 40000), min_size=1, max_size=5),
    version=st.sampled_from(sorted(VERSIONS)),
)
def test_random_chunking_is_byte_exact(
    certs: Certs, seed: int, max_chunk: int, payload_sizes: list[int], version: str
) -> None:
    """Ciphertext cut anywhere, down to single bytes, still decrypts to the same stream."""
    rnd = random.Random(seed)

    def sizes() -> int:
        return rnd.randint(1, max_chunk)

    engine, peer = make_pair(certs, version)
    engine.write(b"OK\r\n")
    pump(engine, peer, sizes, rounds=200)
    sent = bytearray()
    got = bytearray()
    for n in payload_sizes:
        data = rnd.randbytes(n)
        sent += data
        assert peer.send(data)
        pump(engine, peer, sizes, rounds=200, on_plain=got.extend)
        engine.write(bytes(got[len(got) - n :]) if len(got) >= n else b"")
    pump(engine, peer, sizes, rounds=200)
    assert bytes(got) == bytes(sent)
    assert bytes(peer.received) == b"OK\r\n" + bytes(sent)


def test_server_initiated_renegotiation_in_memory(certs: Certs) -> None:
    engine, peer = make_pair(certs, "TLSv1.2")
    pump(engine, peer)
    before = engine.renegotiations
    assert engine.renegotiate()
    assert not engine.renegotiate(), "a second one cannot start while the first is in flight"
    # Data written while the renegotiation is in flight must not be lost.
    engine.write(b"during")
    got = bytearray()
    for _ in range(5):
        pump(engine, peer, on_plain=got.extend)
        peer.incoming(b"")
    assert peer.send(b"after")
    pump(engine, peer, on_plain=got.extend)
    assert engine.renegotiations == before + 1
    assert bytes(peer.received) == b"during"
    assert bytes(got) == b"after"


@pytest.mark.parametrize("allowed", [False, True])
def test_client_initiated_renegotiation(certs: Certs, allowed: bool) -> None:
    engine, peer = make_pair(certs, "TLSv1.2", allow_client_renegotiation=allowed)
    pump(engine, peer)
    assert peer.ssl.renegotiate()
    peer.kick()
    if allowed:
        pump(engine, peer)
        peer.kick()
        pump(engine, peer)
        assert peer.send(b"x")
        got = bytearray()
        pump(engine, peer, on_plain=got.extend)
        assert bytes(got) == b"x"
        assert state(engine) is State.ESTABLISHED
    else:
        # The engine refuses with a no_renegotiation alert, without failing itself; the
        # client (pyOpenSSL, inside pump) treats the alert as fatal.
        with pytest.raises(SSL.Error, match="no renegotiation"):
            pump(engine, peer)
        assert state(engine) is State.ESTABLISHED


def test_peer_close_notify_then_ours(certs: Certs) -> None:
    engine, peer = make_pair(certs)
    pump(engine, peer)
    assert peer.send(b"last words")
    peer.ssl.shutdown()
    got = bytearray()
    pump(engine, peer, on_plain=got.extend)
    assert bytes(got) == b"last words"
    assert state(engine) is State.PEER_CLOSED
    engine.shutdown()
    assert state(engine) is State.CLOSED
    pump(engine, peer)
    assert peer.closed_by_peer
    engine.eof_received()  # EOF after both close_notify is clean: no exception


def test_our_close_notify_drains_late_data(certs: Certs) -> None:
    engine, peer = make_pair(certs)
    pump(engine, peer)
    engine.shutdown()
    assert state(engine) is State.SHUTDOWN_SENT
    # The peer sent data before it saw our close_notify: drained, dropped, no error.
    assert peer.send(b"late")
    assert engine.receive(peer.outgoing()) == []
    pump(engine, peer)
    assert peer.closed_by_peer
    peer.ssl.shutdown()
    engine.receive(peer.outgoing())
    assert state(engine) is State.CLOSED


def test_eof_after_our_close_notify_is_clean(certs: Certs) -> None:
    engine, peer = make_pair(certs)
    pump(engine, peer)
    engine.shutdown()
    engine.eof_received()
    assert state(engine) is State.CLOSED


def test_eof_without_close_notify_is_truncation(certs: Certs) -> None:
    engine, peer = make_pair(certs)
    pump(engine, peer)
    with pytest.raises(TruncationError):
        engine.eof_received()
    assert state(engine) is State.FAILED


def test_eof_during_handshake_is_handshake_error(certs: Certs) -> None:
    engine, _ = make_pair(certs)
    with pytest.raises(HandshakeError):
        engine.eof_received()


def test_plain_http_fails_the_handshake_with_openssls_reason(certs: Certs) -> None:
    engine = TLSEngine(certs.server_context())
    with pytest.raises(HandshakeError) as info:
        engine.receive(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert info.value.reason is not None and "http request" in info.value.reason
    assert isinstance(info.value.__cause__, SSL.Error)
    assert state(engine) is State.FAILED
    with pytest.raises(TLSError, match="cannot write: TLS connection is failed"):
        engine.write(b"too late")


def test_bad_handshake_record_leaves_an_alert_for_the_peer(certs: Certs, io_path: str) -> None:
    engine = TLSEngine(certs.server_context())
    # A well-framed handshake record whose message is nonsense: OpenSSL answers with an alert.
    body = b"\x01\x00\x00\x04" + b"\xff" * 4
    with pytest.raises(HandshakeError) as info:
        engine.receive(b"\x16\x03\x01" + len(body).to_bytes(2, "big") + body)
    assert info.value.reason
    # Naming the alert needs a look into the outgoing BIO, which only the direct path has.
    assert info.value.alert == ("decode_error" if io_path != "public" else None)
    alert = engine.data_to_send()
    assert alert[:1] == b"\x15", f"expected an alert record, got {alert!r}"
    assert alert[5:7] == b"\x02\x32", "fatal (2) decode_error (50)"


def test_bad_record_after_handshake_is_tls_error(certs: Certs) -> None:
    engine, peer = make_pair(certs)
    pump(engine, peer)
    # An application-data record with a corrupted body fails authentication.
    with pytest.raises(TLSError) as info:
        engine.receive(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)
    assert not isinstance(info.value, HandshakeError)
    # TLS 1.3 encrypts alerts, so check what the peer makes of our output.
    with pytest.raises(SSL.Error, match="bad record mac"):
        peer.incoming(engine.data_to_send())


# -- memory: idle connections give their buffers back ----------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_drained_deferred_writes_leave_no_deque(certs: Certs, version: str) -> None:
    engine, peer = make_pair(certs, version)
    engine.write(b"OK\r\n")
    assert engine.deferred
    pump(engine, peer)
    assert engine.deferred is None, "an idle connection should not keep an empty deque"
    assert bytes(peer.received) == b"OK\r\n"
    engine.write(b"more")  # and writing still works without it
    pump(engine, peer)
    assert bytes(peer.received) == b"OK\r\nmore"


@pytest.mark.parametrize("version", VERSIONS)
def test_compaction_frees_the_bios_and_the_connection_keeps_working(
        certs: Certs, version: str, io_path: str) -> None:
    engine, peer = make_pair(certs, version)
    engine.write(b"OK\r\n")
    pump(engine, peer)
    assert engine.wants_compaction, "the handshake asks for a compaction"
    if io_path == "public":
        assert not engine.compact(), "the public path has no BIOs of its own to free"
        return
    assert engine.compact()
    assert engine.detached
    assert engine.pending_output() == 0
    assert not engine.deferred
    assert engine.data_to_send() == b""
    assert not engine.compact(), "nothing left to free"
    # The peer speaks first after a compaction: every byte arrives.
    payload = random.Random(5).randbytes(50_000)
    assert peer.send(payload)
    got = bytearray()
    pump(engine, peer, on_plain=got.extend)
    assert bytes(got) == payload
    # Then the engine, after another compaction.
    assert engine.wants_compaction, "BIOs made again are given back again"
    assert engine.compact()
    engine.write(payload[::-1])
    pump(engine, peer)
    assert bytes(peer.received) == b"OK\r\n" + payload[::-1]
    # And a graceful close after a third.
    assert engine.compact()
    engine.shutdown()
    pump(engine, peer)
    assert peer.closed_by_peer
    assert state(engine) is State.SHUTDOWN_SENT


def test_renegotiation_after_compaction(certs: Certs, io_path: str) -> None:
    engine, peer = make_pair(certs, "TLSv1.2")
    pump(engine, peer)
    assert engine.compact() == (io_path != "public")
    assert engine.renegotiate()
    got = bytearray()
    for _ in range(5):
        pump(engine, peer, on_plain=got.extend)
        peer.incoming(b"")
    assert engine.renegotiations == 1
    assert peer.send(b"after")
    pump(engine, peer, on_plain=got.extend)
    assert bytes(got) == b"after"


def test_compaction_waits_for_the_handshake(certs: Certs, io_path: str) -> None:
    engine, peer = make_pair(certs, "TLSv1.3")
    engine.receive(peer.outgoing())  # the ClientHello: the handshake is under way
    engine.wants_compaction = True  # as a big flight would; the state must still forbid it
    assert not engine.deferred
    assert not engine.compact(), "not during the handshake"
    pump(engine, peer)
    assert state(engine) is State.ESTABLISHED
    assert engine.compact() == (io_path != "public")


def renegotiation_in_flight(certs: Certs) -> tuple[TLSEngine, PlainPeer]:
    """An established engine halfway through a TLS 1.2 renegotiation it started, both BIOs
    drained, waiting for the client's second flight: where an established engine defers writes."""
    engine, peer = make_pair(certs, "TLSv1.2")
    pump(engine, peer)
    assert engine.renegotiate()
    peer.incoming(engine.data_to_send())  # HelloRequest in, ClientHello out
    engine.receive(peer.outgoing())  # ServerHello ... ServerHelloDone
    peer.incoming(engine.data_to_send())
    return engine, peer


def test_compaction_waits_for_the_deferred_writes(certs: Certs, io_path: str) -> None:
    engine, peer = renegotiation_in_flight(certs)
    twin, _ = renegotiation_in_flight(certs)
    engine.write(b"written during the renegotiation")
    assert engine.deferred, "SSL_write must wait for the client's flight"
    # Everything compact() looks at besides the deferred write is the same for both.
    assert not twin.deferred
    for e in (engine, twin):
        assert state(e) is State.ESTABLISHED
        assert e.wants_compaction
        assert e.pending_output() == (0 if io_path != "public" else -1)
    if io_path == "public":
        assert not engine.compact() and not twin.compact(), "no BIOs of its own to free"
        return
    assert twin.compact(), "without a deferred write this engine is compacted"
    assert not engine.compact(), "the deferred write keeps the BIOs"
    got = bytearray()
    for _ in range(5):
        pump(engine, peer, on_plain=got.extend)
        peer.incoming(b"")
    assert engine.renegotiations == 1
    assert bytes(peer.received) == b"written during the renegotiation"
    assert not engine.deferred
    assert engine.compact(), "once the write is out, the same engine is compacted"


def test_renegotiation_refused_on_tls13(certs: Certs) -> None:
    engine, peer = make_pair(certs, "TLSv1.3")
    pump(engine, peer)
    with pytest.raises(TLSError, match=r"TLS 1\.2"):
        engine.renegotiate()
    assert state(engine) is State.ESTABLISHED


def test_transition_guard_refuses_illegal_moves(certs: Certs) -> None:
    engine = TLSEngine(certs.server_context())
    with pytest.raises(InvalidTransition, match="cannot go from handshaking to closed"):
        engine._set_state(State.CLOSED)
    assert state(engine) is State.HANDSHAKING
    with pytest.raises(TLSError, match="cannot send close_notify before the handshake completed"):
        engine.shutdown()



def test_fast_follows_state_bios_and_deferred_writes(certs: Certs, io_path: str) -> None:
    """The owner's shortcut (TLSEngine.fast) is there exactly while the compiled call is the whole job."""
    compiled = io_path == "compiled"
    engine, peer = make_pair(certs, "TLSv1.2")
    assert engine.fast is None, "not while handshaking"
    pump(engine, peer)
    assert (engine.fast is engine.pipe is not None) == compiled
    # A write that must wait for the peer's flight turns it off until the write is out.
    engine, peer = renegotiation_in_flight(certs)
    assert (engine.fast is not None) == compiled
    engine.write(b"deferred")
    assert engine.deferred and engine.fast is None
    for _ in range(5):
        pump(engine, peer)
        peer.incoming(b"")
    assert not engine.deferred and bytes(peer.received) == b"deferred"
    assert (engine.fast is not None) == compiled
    # Compacted: no BIOs, no Pipe, no shortcut -- and all three back on the next use.
    engine.wants_compaction = True
    assert engine.compact() == (io_path != "public")
    assert engine.fast is None
    engine.write(b"after compaction")
    assert (engine.fast is not None) == compiled
    pump(engine, peer)
    # Closing ends it for good.
    engine.shutdown()
    assert engine.state is State.SHUTDOWN_SENT and engine.fast is None
