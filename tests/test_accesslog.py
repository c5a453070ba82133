"""``--access-log``: one JSON line per connection, checked field by field against what the client did.

Real echo processes and real clients; the file is read as a log shipper
(or jq) would.  Also: a PROXY header's client and balancer, a full disk
(/dev/full), logrotate's rename + SIGUSR1, a deleted file, stderr, and
workers appending to one file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from clients import CountingClient
from conftest import Certs
from cryptography import x509
from helpers import GREETING
from test_workers import ECHO, Supervised

FIELDS = {
    "time", "client", "client_port", "balancer", "balancer_port", "server", "server_port", "worker", "sni",
    "alpn", "tls_version", "cipher", "resumed", "client_subject", "handshake_seconds", "duration_seconds",
    "bytes_in", "bytes_out", "close", "handshake_failure", "error", "message", "alert",
}
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def read_lines(path: Path, n: int, timeout: float = 10.0) -> list[dict[str, Any]]:
    """Wait until ``path`` holds ``n`` lines (written at the end of a loop iteration); parse them."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        lines = text.splitlines()
        if len(lines) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(lines) == n, text
    assert text.endswith("\n")
    records = [json.loads(line) for line in lines]
    for r in records:
        assert set(r) == FIELDS, sorted(set(r) ^ FIELDS)
        assert TIME.match(r["time"]), r["time"]
    return records


@contextlib.contextmanager
def echo(certs: Certs, *args: str) -> Iterator[Supervised]:
    sup = Supervised([*ECHO, "--port", "0", "--cert", str(certs.cert_file), "--key", str(certs.key_file),
                      *args])
    try:
        yield sup
    finally:
        sup.stop()
        assert not any("Traceback" in line for line in sup.lines), "\n".join(sup.lines)


def session(c: CountingClient, payload: bytes = b"hello") -> None:
    c.handshake()
    assert c.read_exactly(len(GREETING)) == GREETING
    c.echo(payload)


def check_good(r: dict[str, Any], c: CountingClient, port: int, *, close: str = "clean",
               resumed: bool = False, subject: str | None = None, alpn: str | None = None) -> None:
    assert c.obj is not None
    cipher = c.obj.cipher()
    assert cipher is not None
    assert r["client"] == "127.0.0.1" and r["client_port"] == c.local_port
    assert r["balancer"] is None and r["balancer_port"] is None
    assert r["server"] == "127.0.0.1" and r["server_port"] == port
    assert r["worker"] is None
    assert r["sni"] == "localhost"
    assert r["alpn"] == alpn
    assert r["tls_version"] == c.obj.version()
    assert r["cipher"] == cipher[0]
    assert r["resumed"] is resumed
    assert r["client_subject"] == subject
    assert isinstance(r["handshake_seconds"], float) and 0 <= r["handshake_seconds"] <= r["duration_seconds"]
    assert r["bytes_in"] == c.sent and r["bytes_out"] == c.received
    assert r["close"] == close
    assert r["handshake_failure"] is None


def test_each_line_matches_what_the_client_did(certs: Certs, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    alice = certs.ca.issue_cert("alice.example.org", common_name="alice")
    alice_pem = tmp_path / "alice.pem"
    alice.private_key_and_cert_chain_pem.write_to_path(str(alice_pem))
    stranger = trustme.CA().issue_cert("mallory.example.org", common_name="mallory")
    stranger_pem = tmp_path / "mallory.pem"
    stranger.private_key_and_cert_chain_pem.write_to_path(str(stranger_pem))
    with echo(certs, "--access-log", str(log), "--alpn", "h2,http/1.1", "--client-ca", str(certs.ca_file),
              "--handshake-timeout", "0.3") as sup:
        port = sup.port
        # 1. ALPN h2 and a client certificate; a clean close.
        ctx = certs.client_ssl_context()
        ctx.set_alpn_protocols(["h2"])
        ctx.load_cert_chain(str(alice_pem))
        first = CountingClient(port, ctx)
        session(first)
        ticket = first.obj.session if first.obj is not None else None
        first.close_clean()
        # 2. The same client resumes; then cuts the connection (truncation).
        second = CountingClient(port, ctx, session=ticket)
        session(second, b"x" * 5000)
        assert second.obj is not None and second.obj.session_reused
        second.finish()
        # 3. TLS 1.2, no certificate, no ALPN.
        third = CountingClient(port, certs.client_ssl_context(maximum_version=ssl.TLSVersion.TLSv1_2))
        session(third)
        third.close_clean()
        # 4. Plain text.
        garbage = CountingClient(port, None, prefix=b"HELO there\r\n")
        garbage.wait_eof()
        # 5. A certificate from a CA the server does not trust.  TLS 1.2, where the
        # server's alert is a plaintext record the log can name (TLS 1.3 encrypts it).
        bad_ctx = certs.client_ssl_context(maximum_version=ssl.TLSVersion.TLSv1_2)
        bad_ctx.load_cert_chain(str(stranger_pem))
        bad = CountingClient(port, bad_ctx)
        with pytest.raises(ssl.SSLError):
            session(bad)
        bad.finish()
        # 6. Silence until the handshake timeout.
        silent = CountingClient(port, None)
        silent.wait_eof()
        r1, r2, r3, r4, r5, r6 = read_lines(log, 6)
        alice_subject = x509.load_pem_x509_certificate(alice.cert_chain_pems[0].bytes()).subject
        subject = alice_subject.rfc4514_string()

        check_good(r1, first, port, subject=subject, alpn="h2")
        assert r1["error"] is None and r1["message"] is None and r1["alert"] is None
        check_good(r2, second, port, close="truncated", resumed=True, subject=subject, alpn="h2")
        assert r2["error"] == "TruncationError" and "close_notify" in r2["message"]
        check_good(r3, third, port)
        assert r3["tls_version"] == "TLSv1.2"

        assert r4["client_port"] == garbage.local_port
        assert r4["handshake_failure"] == "protocol" and r4["close"] == "handshake_failed"
        assert r4["error"] == "HandshakeError" and "wrong version number" in r4["message"]
        assert r4["tls_version"] is None and r4["cipher"] is None and r4["handshake_seconds"] is None
        assert r4["bytes_in"] == garbage.sent == len(b"HELO there\r\n")
        assert r4["bytes_out"] == garbage.received

        assert r5["client_port"] == bad.local_port
        assert r5["handshake_failure"] == "client_certificate" and r5["error"] == "CertificateVerifyError"
        assert r5["alert"] == "unknown_ca" and r5["client_subject"] is None and r5["sni"] == "localhost"
        assert r5["bytes_in"] == bad.sent and r5["bytes_out"] == bad.received

        assert r6["client_port"] == silent.local_port
        assert r6["handshake_failure"] == "timeout" and r6["close"] == "timeout_handshake"
        assert r6["error"] == "TimeoutError" and r6["bytes_in"] == 0 and r6["bytes_out"] == 0
        assert r6["duration_seconds"] >= 0.3
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0


def test_proxy_header_names_the_client_and_the_balancer(certs: Certs, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    with echo(certs, "--access-log", str(log), "--proxy-protocol") as sup:
        header = b"PROXY TCP4 203.0.113.9 192.0.2.1 51000 443\r\n"
        c = CountingClient(sup.port, certs.client_ssl_context(), prefix=header)
        session(c)
        c.close_clean()
        broken = CountingClient(sup.port, None, prefix=b"PROXY NONSENSE\r\n")
        broken.wait_eof()
        (r, r_bad) = read_lines(log, 2)
        assert (r["client"], r["client_port"]) == ("203.0.113.9", 51000)
        assert (r["server"], r["server_port"]) == ("192.0.2.1", 443)
        assert (r["balancer"], r["balancer_port"]) == ("127.0.0.1", c.local_port)
        assert r["bytes_in"] == c.sent and r["close"] == "clean"
        assert (r_bad["client"], r_bad["client_port"]) == ("127.0.0.1", broken.local_port)
        assert r_bad["balancer"] is None
        assert r_bad["close"] == "proxy_header" and r_bad["handshake_failure"] == "proxy_header"
        assert r_bad["error"] == "ProtocolError"


def test_a_full_disk_is_one_error_line_and_the_server_goes_on(certs: Certs) -> None:
    with echo(certs, "--access-log", "/dev/full") as sup:
        for _ in range(3):
            c = CountingClient(sup.port, certs.client_ssl_context())
            session(c)
            c.close_clean()
        sup.wait_for(r"access log /dev/full: No space left on device; dropping lines")
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        errors = [line for line in sup.lines if "access log /dev/full" in line]
        assert len(errors) == 1, errors


def test_rotation_reopens_on_sigusr1_and_a_deleted_file_comes_back(certs: Certs, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    with echo(certs, "--access-log", str(log)) as sup:

        def one() -> CountingClient:
            c = CountingClient(sup.port, certs.client_ssl_context())
            session(c)
            c.close_clean()
            return c

        before = one()
        assert read_lines(log, 1)[0]["client_port"] == before.local_port
        rotated = tmp_path / "access.log.1"
        log.rename(rotated)  # what logrotate does, then its postrotate sends SIGUSR1
        sup.signal(signal.SIGUSR1)
        sup.wait_for(r"access log .* reopened")
        after = one()
        assert read_lines(log, 1)[0]["client_port"] == after.local_port
        assert read_lines(rotated, 1)[0]["client_port"] == before.local_port
        log.unlink()
        # The name is checked at most once a second: connect until the file is back.
        deadline = time.monotonic() + 10
        while not log.exists() and time.monotonic() < deadline:
            one()
        assert log.exists()
        sup.wait_for(r"access log .* was deleted; creating it again")
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
        assert len([x for x in sup.lines if "was deleted; creating it again" in x]) == 1


def test_dash_writes_to_stderr(certs: Certs) -> None:
    with echo(certs, "--access-log", "-") as sup:
        c = CountingClient(sup.port, certs.client_ssl_context())
        session(c)
        c.close_clean()
        m = sup.wait_for(r'^\{"time":.*\}$')
        r = json.loads(m.group(0))
        assert r["client_port"] == c.local_port and r["close"] == "clean"


def test_workers_append_to_one_file_and_reopen_on_the_parents_sigusr1(certs: Certs, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    with echo(certs, "--access-log", str(log), "--workers", "2") as sup:
        sup.worker_pids(2)
        clients = []
        for _ in range(6):
            c = CountingClient(sup.port, certs.client_ssl_context())
            session(c)
            c.close_clean()
            clients.append(c)
        records = read_lines(log, 6)
        assert sorted(r["client_port"] for r in records) == sorted(c.local_port for c in clients)
        assert {r["worker"] for r in records} <= {1, 2}
        log.rename(tmp_path / "access.log.1")
        sup.signal(signal.SIGUSR1)
        for n in (1, 2):
            sup.wait_for(rf"worker {n}: access log .* reopened")
        assert os.path.exists(log)
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0


def test_an_unwritable_path_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "tlsuv.echo", "--port", "0", "--access-log",
                           str(tmp_path / "no" / "such" / "dir.log")], check=False, capture_output=True,
                          text=True, timeout=20)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"python -m tlsuv.echo: error: --access-log {tmp_path}/no/such/dir.log: No such file or directory"]
