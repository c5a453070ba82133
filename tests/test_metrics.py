"""``--metrics``: /metrics over a real socket, parsed with prometheus_client's own parser.

A known mix of clients -- clean sessions, TLS 1.2, a resumed session, ALPN,
plain-text garbage, a client that rejects the certificate, one that hangs
up mid-handshake, one that never speaks (handshake timeout), a truncation,
and refusals at the connection limit -- then every counter is compared
with what those clients did, bytes included (the clients count theirs on
the wire).  Once for one process, once for ``--workers 2`` with a worker
killed by SIGKILL and restarted in between.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import pyuv
from clients import CountingClient
from conftest import Certs, ServerThread
from cryptography import x509
from hammer import ServerProcess
from helpers import GREETING
from OpenSSL import SSL
from peers import Interactive, require_tool
from prometheus_client.parser import text_string_to_metric_families
from test_workers import ECHO, Supervised

import tlsuv
from tlsuv import metrics
from tlsuv.stats import CLOSE_REASONS, HANDSHAKE_FAILURES, REFUSAL_REASONS

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int, path: str = "/metrics") -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


@dataclass
class Expected:
    """What the clients did, counted on the client side."""

    accepted: int = 0
    refused: int = 0
    handshakes: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    closed: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    ciphers: dict[str, int] = field(default_factory=dict)
    alpn: dict[str, int] = field(default_factory=dict)
    resumed: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def add(self, counts: dict[str, int], key: str) -> None:
        counts[key] = counts.get(key, 0) + 1

    def client(self, c: CountingClient) -> None:
        self.accepted += 1
        self.bytes_in += c.sent
        self.bytes_out += c.received

    def good(self, c: CountingClient, closed: str = "clean") -> None:
        assert c.obj is not None
        self.client(c)
        self.handshakes += 1
        self.add(self.closed, closed)
        self.add(self.versions, str(c.obj.version()))
        cipher = c.obj.cipher()
        assert cipher is not None
        self.add(self.ciphers, cipher[0])
        proto = c.obj.selected_alpn_protocol()
        if proto:
            self.add(self.alpn, proto)
        self.resumed += bool(c.obj.session_reused)

    def failed(self, c: CountingClient, reason: str, closed: str = "handshake_failed") -> None:
        self.client(c)
        self.add(self.failures, reason)
        self.add(self.closed, closed)


def good_session(certs: Certs, port: int, ctx: ssl.SSLContext | None = None,
                 session: ssl.SSLSession | None = None) -> CountingClient:
    c = CountingClient(port, ctx or certs.client_ssl_context(), session=session)
    c.handshake()
    assert c.read_exactly(len(GREETING)) == GREETING  # TLS 1.3 tickets came before it
    c.echo(b"ping")
    return c


def run_mix(certs: Certs, port: int, exp: Expected) -> None:
    """Every kind of client once (the connection limit is tested on its own)."""
    # Clean sessions; the first one's TLS 1.3 ticket resumes the second.
    ctx = certs.client_ssl_context()
    c = good_session(certs, port, ctx)
    session = c.obj.session if c.obj is not None else None
    c.close_clean()
    exp.good(c)
    c = good_session(certs, port, ctx, session=session)
    assert c.obj is not None and c.obj.session_reused
    c.close_clean()
    exp.good(c)
    # TLS 1.2, with ALPN.
    ctx12 = certs.client_ssl_context(maximum_version=ssl.TLSVersion.TLSv1_2)
    ctx12.set_alpn_protocols(["http/1.1"])
    c = good_session(certs, port, ctx12)
    assert c.obj is not None and c.obj.selected_alpn_protocol() == "http/1.1"
    c.close_clean()
    exp.good(c)
    # Truncation: the handshake completes, then a FIN without close_notify.
    c = good_session(certs, port)
    c.finish()
    exp.good(c, closed="truncated")
    # Plain-text garbage: OpenSSL refuses it and sends an alert.
    c = CountingClient(port, None, prefix=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    c.wait_eof()
    exp.failed(c, "protocol")
    # A client that does not trust the certificate: it sends unknown_ca.
    c = CountingClient(port, ssl.create_default_context())
    with pytest.raises(ssl.SSLCertVerificationError):
        c.handshake()
    c.finish()
    exp.failed(c, "certificate_rejected")
    # A client that hangs up mid-handshake (after its ClientHello).
    c = CountingClient(port, certs.client_ssl_context())
    with contextlib.suppress(ssl.SSLWantReadError):
        # obj is set for a connected client; typeshed's Optional cannot know that.
        c.obj.do_handshake()  # type: ignore[union-attr]
    c._send_pending()
    c.finish()
    exp.failed(c, "peer_closed")
    # One that never speaks: the handshake timeout (--handshake-timeout 0.3) ends it.
    c = CountingClient(port, None)
    c.wait_eof()
    exp.failed(c, "timeout", closed="timeout_handshake")


def check(samples: Samples, exp: Expected, *, refused_max: int, open_now: int = 0) -> None:
    """Every tlsuv counter against the expectation: nothing more, nothing less."""
    def v(metric: str, /, **labels: str) -> float:
        return value(samples, metric, **labels)

    assert v("tlsuv_connections_accepted_total") == exp.accepted
    for reason in REFUSAL_REASONS:
        want = refused_max if reason == "max_connections" else 0
        assert v("tlsuv_connections_refused_total", reason=reason) == want, reason
    assert v("tlsuv_connections_open") == open_now
    for reason in CLOSE_REASONS:
        assert v("tlsuv_connections_closed_total", reason=reason) == exp.closed.get(reason, 0), reason
    assert v("tlsuv_handshakes_completed_total") == exp.handshakes
    for reason in HANDSHAKE_FAILURES:
        assert v("tlsuv_handshakes_failed_total", reason=reason) == exp.failures.get(reason, 0), reason
    assert v("tlsuv_handshake_duration_seconds_count") == exp.handshakes
    assert v("tlsuv_handshake_duration_seconds_bucket", le="+Inf") == exp.handshakes
    assert v("tlsuv_handshake_duration_seconds_sum") >= 0
    assert v("tlsuv_received_bytes_total") == exp.bytes_in
    assert v("tlsuv_sent_bytes_total") == exp.bytes_out
    assert v("tlsuv_session_resumptions_total") == exp.resumed
    assert v("tlsuv_renegotiations_total") == 0
    for name, label, counts in (("tlsuv_tls_versions_total", "version", exp.versions),
                                ("tlsuv_tls_ciphers_total", "cipher", exp.ciphers),
                                ("tlsuv_alpn_protocols_total", "protocol", exp.alpn)):
        got = {dict(k[1])[label]: val for k, val in samples.items() if k[0] == name}
        assert got == counts, name
    assert v("tlsuv_certificate_reloads_total", result="ok") == 0
    assert v("tlsuv_certificate_reloads_total", result="failed") == 0
    assert v("tlsuv_certificate_last_reload_timestamp_seconds") == 0
    # The invariants the docs promise.
    assert exp.accepted == open_now + sum(exp.closed.values())


def expiry_of(certs: Certs) -> float:
    return x509.load_pem_x509_certificate(certs.cert_file.read_bytes()).not_valid_after_utc.timestamp()


def hold_until_refused(certs: Certs, port: int, exp: Expected, capacity: int,
                       refusals: int) -> list[CountingClient]:
    """Open connections and keep them until ``capacity`` are held and ``refusals`` were refused.

    A refused connection is accepted by the kernel and closed by the server
    before any TLS: the client's handshake meets EOF.  (With workers, each
    has its own limit and the kernel picks the worker: refusals may come
    before every worker is full.)
    """
    held: list[CountingClient] = []
    refused = 0
    for _ in range(100):
        c = CountingClient(port, certs.client_ssl_context())
        try:
            c.handshake()
        except ConnectionError:
            assert c.received == 0
            c.wait_eof()
            refused += 1
            exp.refused += 1
        else:
            assert c.read_exactly(len(GREETING)) == GREETING
            held.append(c)
        if len(held) == capacity and refused >= refusals:
            return held
    raise AssertionError(f"held {len(held)}, refused {refused}: the limit did not work as expected")


def wait_for(predicate: object, what: str, timeout: float = 15.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def metrics_port(sup: Supervised) -> int:
    return int(sup.wait_for(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", stream=sup.out).group(1))


@contextlib.contextmanager
def echo_with_metrics(certs: Certs, *args: str) -> Iterator[tuple[Supervised, int]]:
    sup = Supervised([*ECHO, "--port", "0", "--cert", str(certs.cert_file), "--key", str(certs.key_file),
                      "--alpn", "h2,http/1.1", "--metrics", "127.0.0.1:0", *args])
    try:
        yield sup, metrics_port(sup)
    finally:
        sup.stop()
        assert not any("Traceback" in line for line in sup.lines), "\n".join(sup.lines)


def test_one_process_counts_every_connection_exactly(certs: Certs) -> None:
    with echo_with_metrics(certs, "--handshake-timeout", "0.3", "--max-connections", "2") as (sup, mport):
        assert status(mport, "/-/healthy") == 200
        assert status(mport, "/-/ready") == 200
        assert status(mport, "/healthz") == 200
        assert status(mport, "/nothing") == 404
        exp = Expected()
        run_mix(certs, sup.port, exp)
        held = hold_until_refused(certs, sup.port, exp, capacity=2, refusals=2)
        assert exp.refused == 2
        # Open connections count at once: their handshakes and bytes so far.
        samples = scrape(mport)
        assert value(samples, "tlsuv_connections_open") == 2
        assert value(samples, "tlsuv_connections_refused_total", reason="max_connections") == 2
        for c in held:
            c.close_clean()
            exp.good(c)
        wait_for(lambda: value(scrape(mport), "tlsuv_connections_open") == 0, "the held connections to end")
        samples = scrape(mport)
        check(samples, exp, refused_max=2)
        assert value(samples, "tlsuv_certificate_expiry_timestamp_seconds", name="default") == \
            pytest.approx(expiry_of(certs))
        assert value(samples, "tlsuv_accepting") == 1
        assert ("python_info", frozenset()) not in samples  # (python_info has labels)
        assert any(k[0] == "python_info" for k in samples)
        # Draining: not ready any more while a connection keeps the server open.
        c = good_session(certs, sup.port)
        sup.signal(signal.SIGTERM)
        wait_for(lambda: status(mport, "/-/ready") == 503, "/-/ready to turn 503")
        assert status(mport, "/-/healthy") == 200
        assert value(scrape(mport), "tlsuv_accepting") == 0
        c.close_clean()  # the drain sent close_notify; answering it ends the connection
        assert sup.wait() == 0


def test_workers_sum_and_keep_counts_across_a_killed_worker(certs: Certs) -> None:
    with echo_with_metrics(certs, "--workers", "2", "--handshake-timeout", "0.3",
                           "--max-connections", "1") as (sup, mport):
        pids = sup.worker_pids(2)
        assert status(mport, "/-/ready") == 200
        exp = Expected()
        run_mix(certs, sup.port, exp)
        # One connection per worker is the limit: two held, and refusals.
        held = hold_until_refused(certs, sup.port, exp, capacity=2, refusals=2)
        for c in held:
            c.close_clean()
            exp.good(c)
        # Workers report at most a second late: wait for the sum, then check it.
        wait_for(lambda: value(scrape(mport), "tlsuv_connections_accepted_total") == exp.accepted
                 and value(scrape(mport), "tlsuv_connections_open") == 0
                 and sum(v for k, v in scrape(mport).items() if k[0] == "tlsuv_connections_closed_total")
                 == exp.accepted, "the workers' reports")
        check(scrape(mport), exp, refused_max=exp.refused)
        os.kill(pids[1], signal.SIGKILL)
        sup.wait_for(rf"worker 1 listening \(pid (?!{pids[1]}\))\d+\)")
        # The dead worker's counts stayed; the new one adds to them.
        check(scrape(mport), exp, refused_max=exp.refused)
        samples = scrape(mport)
        assert value(samples, "tlsuv_worker_restarts_total") == 1
        assert value(samples, "tlsuv_workers") == 2
        run_mix(certs, sup.port, exp)
        wait_for(lambda: value(scrape(mport), "tlsuv_connections_accepted_total") == exp.accepted
                 and sum(v for k, v in scrape(mport).items() if k[0] == "tlsuv_connections_closed_total")
                 == exp.accepted, "the workers' reports after the restart")
        check(scrape(mport), exp, refused_max=exp.refused)
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0


def test_metrics_address_errors_are_one_line() -> None:
    for bad, fragment in (("nonsense", "expected HOST:PORT"), ("localhost:80", "not a numeric IP"),
                          ("127.0.0.1:99999", "port must be")):
        proc = subprocess.run([sys.executable, "-m", "tlsuv.echo", "--port", "0", "--metrics", bad],
                              check=False, capture_output=True, text=True, timeout=20)
        assert proc.returncode == 2
        assert fragment in proc.stderr and "Traceback" not in proc.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for extra in ([], ["--workers", "2"]):
            proc = subprocess.run([sys.executable, "-m", "tlsuv.echo", "--port", "0", "--metrics",
                                   f"127.0.0.1:{port}", *extra], check=False, capture_output=True,
                                  text=True, timeout=20)
            assert proc.returncode == 2, proc.stderr
            assert "cannot serve metrics" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_an_embedding_application_registers_the_collector_itself(certs: Certs) -> None:
    """The library: ServerCollector(server) in the application's own registry."""
    # Here, as an application would import it; tlsuv itself imports it only with --metrics.
    from prometheus_client import CollectorRegistry, generate_latest  # noqa: PLC0415

    loop = pyuv.Loop()
    server = tlsuv.Server(loop, certs.server_context(), lambda conn: tlsuv.Handler())
    registry = CollectorRegistry()
    registry.register(metrics.ServerCollector(server))
    server.stats.reloads_ok = 3  # what a certificate reloader sets
    server.stats.last_reload_time = 1700000000.0
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["tlsuv_connections_accepted"].samples[0].value == 0
    assert families["tlsuv_accepting"].samples[0].value == 0  # not listening yet
    reloads = {s.labels["result"]: s.value for s in families["tlsuv_certificate_reloads"].samples}
    assert reloads == {"ok": 3, "failed": 0}
    assert families["tlsuv_certificate_last_reload_timestamp_seconds"].samples[0].value == 1700000000.0
    server.close()
    loop.run()


def test_renegotiations_the_server_starts_are_counted(certs: Certs) -> None:
    """The library's Connection.renegotiate() (TLS 1.2); counted when the connection ends."""
    openssl = require_tool("openssl")
    # -nbio: a blocking s_client waits in read(2) for data after the renegotiation and would
    # not see the end of its stdin (test_policy's s_client renegotiation test says more).
    with ServerThread(certs.server_context(max_version=SSL.TLS1_2_VERSION)) as st, \
            Interactive([openssl, "s_client", "-connect", f"127.0.0.1:{st.port}", "-brief", "-nbio",
                         "-CAfile", str(certs.ca_file), "-servername", "localhost"]) as p:
        p.read_until(GREETING)
        conn = st.connections[-1]
        assert st.call(conn.renegotiate)
        p.write(b"three\n")
        p.read_until(b"three\n")
        # s_client at the end of its stdin cannot send close_notify while its side of the
        # renegotiation is still running (a truncation, not a clean close): wait for the end.
        wait_for(lambda: not st.call(conn.ssl.renegotiate_pending), "the renegotiation to complete")
        p.close_stdin()
        assert p.wait() == 0
        wait_for(lambda: st.call(lambda: st.server.snapshot().open) == 0, "the connection to end")
        snap = st.call(st.server.snapshot)
        assert snap.renegotiations == 1 and snap.handshakes == 1 and snap.closed == {"clean": 1}


def test_an_upgrade_hands_the_metrics_address_to_the_new_tree(certs: Certs) -> None:
    """SIGUSR2: the new tree binds the same --metrics address while the old one drains."""
    with socket.socket() as probe:  # a fixed port, so both trees use the same one
        probe.bind(("127.0.0.1", 0))
        mport = int(probe.getsockname()[1])
    srv = ServerProcess([*ECHO, "--port", "0", "--cert", str(certs.cert_file), "--key", str(certs.key_file),
                         "--workers", "2", "--grace", "1", "--metrics", f"127.0.0.1:{mport}"])
    try:
        port = srv.port()
        srv.wait_for(rf"metrics on http://127\.0\.0\.1:{mport}/metrics", stream="out")
        c = good_session(certs, port)
        c.close_clean()
        wait_for(lambda: value(scrape(mport), "tlsuv_handshakes_completed_total") == 1, "old tree")
        mark = srv.mark()
        srv.signal(signal.SIGUSR2)
        new = int(srv.wait_for(r"upgrade: the new tree \(pid (\d+)\) serves", start=mark).group(1))
        assert srv.wait() == 0  # the old parent, drained; its endpoint closed with it
        # Only the new tree answers now, from zero.
        assert status(mport, "/-/ready") == 200
        assert value(scrape(mport), "tlsuv_handshakes_completed_total") == 0
        for _ in range(2):
            c = good_session(certs, port)
            c.close_clean()
        wait_for(lambda: value(scrape(mport), "tlsuv_handshakes_completed_total") == 2, "new tree")
        os.kill(new, signal.SIGTERM)
        srv.wait_group_gone()
        assert not srv.tracebacks(), "\n".join(srv.err)
    finally:
        srv.stop()
