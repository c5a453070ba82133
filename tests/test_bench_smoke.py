"""The benchmark's load generator against the tlsuv echo server: bytes verified, not timings.

``make bench`` trusts the load generator to check every echoed byte; these
runs are short and bounded by message counts (the durations given are only
upper bounds), and one of them proves that a corrupted echo is caught.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# scripts/bench is not an installed package: tests/helpers.py (imported by
# conftest, which pytest loads first) puts scripts/ on sys.path.
from bench import loadgen, report, servers
from conftest import Certs, server_thread

import tlsuv
from tlsuv.echo import EchoHandler

UPPER_BOUND = 20.0  # seconds; each run stops long before, at its count


def target(port: int, certs: Certs) -> loadgen.Target:
    # No OPENSSL_CONF here, so the cipher is whatever the defaults pick.
    return loadgen.Target("127.0.0.1", port, cafile=str(certs.ca_file), expect_cipher=None)


def test_pingpong_verifies_every_echoed_byte(certs: Certs) -> None:
    with server_thread(certs.server_context()) as st:
        small = loadgen.run_pingpong(target(st.port, certs), conns=4, size=64, warmup=0.0,
                                     duration=UPPER_BOUND, max_messages=400)
        large = loadgen.run_pingpong(target(st.port, certs), conns=2, size=16384, warmup=0.0,
                                     duration=UPPER_BOUND, max_messages=50)
    assert small.count >= 400
    assert small.verified_bytes == small.nbytes >= 400 * 64
    assert small.p50_us is not None and small.p99_us is not None
    assert small.tls_version == "TLSv1.3"
    assert large.verified_bytes >= 50 * 16384


def test_stream_verifies_every_echoed_byte(certs: Certs) -> None:
    with server_thread(certs.server_context()) as st:
        result = loadgen.run_stream(target(st.port, certs), conns=2, chunk=65536, warmup=0.0,
                                    duration=UPPER_BOUND, max_bytes=4 << 20)
    assert result.verified_bytes >= 4 << 20


def test_handshakes_are_full_and_greeted(certs: Certs) -> None:
    with server_thread(certs.server_context()) as st:
        result = loadgen.run_handshakes(target(st.port, certs), concurrency=4, warmup=0.0,
                                        duration=UPPER_BOUND, max_handshakes=20)
    assert result.count >= 20
    assert result.verified_bytes >= 20 * len(loadgen.GREETING)


def test_lean_tls13_handshakes_against_tlsuv(certs: Certs) -> None:
    with server_thread(certs.server_context()) as st:
        t = loadgen.Target("127.0.0.1", st.port, expect_cipher="TLS_AES_128_GCM_SHA256",
                           pinned_cert=str(certs.cert_file))
        result = loadgen.run_handshakes(t, concurrency=4, warmup=0.0, duration=UPPER_BOUND,
                                        max_handshakes=20, engine="tls13")
        idle = loadgen.open_connections(t, 8, engine="tls13")
        for s in idle:
            s.close()
    assert result.count >= 20
    assert result.cipher == "TLS_AES_128_GCM_SHA256"
    assert result.session_ticket  # tlsuv issues tickets as usual; the client never uses them


def test_lean_tls13_insists_on_the_expected_certificate(certs: Certs) -> None:
    with server_thread(certs.server_context()) as st:
        t = loadgen.Target("127.0.0.1", st.port, pinned_cert=str(certs.ca_file))
        with pytest.raises(loadgen.VerificationError, match="certificate other than"):
            loadgen.run_handshakes(t, concurrency=1, warmup=0.0, duration=UPPER_BOUND, max_handshakes=1,
                                   engine="tls13")


class Corrupting(EchoHandler):
    """Echoes with the first byte of every chunk flipped."""

    __slots__ = ()

    def read(self, conn: tlsuv.Connection, data: bytes) -> None:
        conn.write(bytes([data[0] ^ 0x01]) + data[1:])


def test_a_corrupted_echo_is_caught(certs: Certs) -> None:
    with server_thread(certs.server_context(), factory=lambda conn: Corrupting()) as st:
        with pytest.raises(loadgen.VerificationError, match="message"):
            loadgen.run_pingpong(target(st.port, certs), conns=1, size=64, warmup=0.0,
                                 duration=UPPER_BOUND, max_messages=10)
        with pytest.raises(loadgen.VerificationError, match="stream offset"):
            loadgen.run_stream(target(st.port, certs), conns=1, chunk=65536, warmup=0.0,
                               duration=UPPER_BOUND, max_bytes=1 << 20)


def test_an_unexpected_cipher_is_caught(certs: Certs) -> None:
    with server_thread(certs.server_context()) as st:
        bad = loadgen.Target("127.0.0.1", st.port, cafile=str(certs.ca_file), expect_cipher="TLS_NONE")
        with pytest.raises(loadgen.VerificationError, match="negotiated"):
            loadgen.run_handshakes(bad, concurrency=1, warmup=0.0, duration=UPPER_BOUND, max_handshakes=1)


@pytest.mark.parametrize("name", ["pyuv", "floor"])
def test_the_floor_servers_keep_the_echo_contract(certs: Certs, tmp_path: Path, name: str) -> None:
    """The optional reference columns (plain TCP on pyuv; tlsuv's parts without tlsuv) must echo
    every byte like the others, or their figures would mean nothing."""
    spec = {s.name: s for s in servers.SERVERS}[name]
    with servers.RunningServer(spec, cert=certs.cert_file, key=certs.key_file, log=tmp_path / "log",
                               cpu=None) as srv:
        t = loadgen.Target("127.0.0.1", srv.port, tls=spec.tls, expect_cipher=None)
        pp = loadgen.run_pingpong(t, conns=4, size=64, warmup=0.0, duration=UPPER_BOUND, max_messages=400)
        stream = loadgen.run_stream(t, conns=2, chunk=65536, warmup=0.0, duration=UPPER_BOUND,
                                    max_bytes=4 << 20)
        problems = srv.stop()
    assert pp.verified_bytes == pp.nbytes >= 400 * 64
    assert stream.verified_bytes >= 4 << 20
    assert not problems, problems


def test_the_pure_python_tlsuv_column_runs_the_pure_path(certs: Certs, tmp_path: Path) -> None:
    """`--servers ...,tlsuv-pure` is tlsuv with TLSUV_NO_EXTENSIONS=1 in its environment."""
    spec = {s.name: s for s in servers.SERVERS}["tlsuv-pure"]
    with servers.RunningServer(spec, cert=certs.cert_file, key=certs.key_file, log=tmp_path / "log",
                               cpu=None) as srv:
        environ = Path(f"/proc/{srv.pid}/environ").read_bytes().split(b"\0")
        t = loadgen.Target("127.0.0.1", srv.port, tls=spec.tls, expect_cipher=None)
        pp = loadgen.run_pingpong(t, conns=4, size=64, warmup=0.0, duration=UPPER_BOUND, max_messages=400)
        problems = srv.stop()
    assert b"TLSUV_NO_EXTENSIONS=1" in environ
    assert pp.verified_bytes == pp.nbytes >= 400 * 64
    assert not problems, problems


def test_paired_ratios_divide_within_each_repetition() -> None:
    """The spread report pairs each repetition with the baseline's own, never with its median."""
    def run(server: str, rep: int, cpu: float, user: float) -> dict[str, object]:
        return {"scenario": "pp64", "server": server, "rep": rep,
                "figures": {"cpu_us_msg": cpu, "user_us_msg": user, "msg_s": 1.0}}

    runs = [
        run("uvloop", 0, 10.0, 5.0), run("tlsuv", 0, 8.0, 3.0),
        run("uvloop", 1, 20.0, 8.0), run("tlsuv", 1, 18.0, 4.0),  # a slow moment for both
        run("tlsuv", 2, 1.0, 1.0),  # no baseline in this repetition: left out
        {"scenario": "pp64", "server": "uvloop", "rep": 3, "error": "boom"},  # no figures
    ]
    scenarios = [("pp64", "ping-pong", ("msg_s", "cpu_us_msg", "user_us_msg"))]
    lines = report.paired_ratios(scenarios, [("tlsuv", "tlsuv"), ("uvloop", "uvloop+ssl")], runs, "uvloop")
    assert lines == [
        "ping-pong, server CPU µs/message: tlsuv 0.80 0.90 (median 0.85)",
        "ping-pong, of which user space: tlsuv 0.60 0.50 (median 0.55)",
    ]
