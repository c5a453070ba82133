"""``python -m tlsuv.echo`` as a user runs it: arguments, files, signals."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Certs, recv_exactly
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import GREETING
from peers import Interactive

ECHO = [sys.executable, "-m", "tlsuv.echo"]


def run_echo(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ECHO, *args], capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {proc.stderr!r}"
    assert "Traceback" not in proc.stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--port", "99999"], "port must be 0-65535"),
        (["--port", "http"], "not a port number"),
        (["--bogus"], "unrecognized arguments"),
        (["--handshake-timeout", "-1"], "positive"),
        (["--max-connections", "0"], "at least 1"),
        (["--cert", "x.pem"], "--cert and --key go together"),
        (["--log-level", "loud"], "invalid choice"),
        (["--keepalive", "0"], "must be 1-32767 seconds or 'off'"),
        (["--keepalive", "1.5"], "not whole seconds or 'off'"),
        (["--send-timeout", "0"], "positive"),
        (["--send-timeout", "never"], "not a number"),
    ],
)
def test_bad_arguments(args: list[str], fragment: str) -> None:
    assert_one_line_error(run_echo(*args), fragment)


def test_missing_certificate_file(tmp_path: Path, certs: Certs) -> None:
    proc = run_echo("--cert", str(tmp_path / "nope.pem"), "--key", str(certs.key_file))
    assert_one_line_error(proc, "certificate file not found")


def test_garbage_certificate_file(tmp_path: Path, certs: Certs) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    proc = run_echo("--cert", str(bad), "--key", str(certs.key_file))
    assert_one_line_error(proc, "no valid PEM certificate")


def test_unreadable_key_file(tmp_path: Path, certs: Certs) -> None:
    assert_one_line_error(run_echo("--cert", str(certs.cert_file), "--key", str(tmp_path)), "is a directory")


def test_key_that_does_not_match(tmp_path: Path, certs: Certs) -> None:
    other = certs.ca.issue_cert("other.example")
    key = tmp_path / "other.key"
    other.private_key_pem.write_to_path(str(key))
    assert_one_line_error(run_echo("--cert", str(certs.cert_file), "--key", str(key)),
                          "key does not match the certificate")


def test_port_in_use() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_one_line_error(run_echo("--port", str(port)), "address already in use")


def start_echo(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int, list[str]]:
    proc = subprocess.Popen([*ECHO, "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout is not None
    deadline = time.monotonic() + 20
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on .*:(\d+)$", line.strip())
        if m:
            return proc, int(m.group(1)), lines
    proc.kill()
    raise AssertionError(f"echo server did not start: {lines!r} {proc.stderr.read() if proc.stderr else ''}")


def stop_cleanly(proc: subprocess.Popen[str]) -> None:
    """SIGTERM, as an init system would: the server must drain and exit 0."""
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=15) == 0


def reap(proc: subprocess.Popen[str]) -> None:
    """Whatever happened in the test, leave no server behind."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_exit_0(certs: Certs, signum: int) -> None:
    proc, port, _ = start_echo("--cert", str(certs.cert_file), "--key", str(certs.key_file),
                               "--grace", "1")
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
            assert recv_exactly(s, 4) == GREETING
            os.kill(proc.pid, signum)
            # Served until the grace period ends, then close_notify: a clean EOF, not a
            # reset or truncation.
            s.sendall(b"still served")
            assert recv_exactly(s, 12) == b"still served"
            assert s.recv(10) == b""
        assert proc.wait(timeout=15) == 0
        assert proc.stderr is not None
        assert "Traceback" not in proc.stderr.read()
    finally:
        reap(proc)


def keepalive_timer(port: int) -> tuple[int, int]:
    """The kernel's timer on the server side of our one connection: (kind, hundredths of a second).

    /proc/net/tcp's ``tr`` is 1 while data waits to be acknowledged, 2 for the keepalive
    timer of an established socket, 0 for none.
    """
    deadline = time.monotonic() + 10
    while True:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                kind, when = fields[5].split(":")
                if kind != "01":  # not while the greeting is still unacknowledged
                    return int(kind, 16), int(when, 16)
        assert time.monotonic() < deadline, "no settled server-side socket in /proc/net/tcp"
        time.sleep(0.05)


@pytest.mark.parametrize(("args", "seconds"), [([], 30), (["--keepalive", "7"], 7),
                                               (["--keepalive", "off", "--send-timeout", "off"], None)])
def test_keepalive_flag_reaches_the_sockets(certs: Certs, args: list[str], seconds: int | None) -> None:
    proc, port, _ = start_echo("--cert", str(certs.cert_file), "--key", str(certs.key_file), *args)
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
            assert recv_exactly(s, 4) == b"OK\r\n"
            kind, when = keepalive_timer(port)
        stop_cleanly(proc)
    finally:
        reap(proc)
    if seconds is None:
        assert kind == 0, "keepalive is on although --keepalive off"
    else:
        assert kind == 2, "no keepalive timer"
        # Seconds left until the first probe: within the idle time asked for, and more
        # than the next smaller setting tested here would allow.
        assert when <= seconds * 100, when
        assert seconds == 7 or when > 7 * 100, when


def test_self_signed_certificate_and_fingerprint() -> None:
    proc, port, lines = start_echo()
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            der = s.getpeercert(binary_form=True)
            assert der is not None
            assert recv_exactly(s, 4) == GREETING
        stop_cleanly(proc)
    finally:
        reap(proc)
    cert = x509.load_der_x509_certificate(der)
    printed = re.search(r"fingerprint ([0-9A-F:]{95})", "".join(lines))
    assert printed, lines
    assert printed.group(1) == ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.curve.name == "secp256r1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}


def test_second_signal_aborts_at_once(certs: Certs) -> None:
    # A long grace and close timeout: only the second signal can end this quickly.
    with Interactive([*ECHO, "--port", "0", "--cert", str(certs.cert_file), "--key", str(certs.key_file),
                      "--grace", "60", "--close-timeout", "60", "--log-level", "info"]) as proc:
        port = int(proc.read_match(rb"listening on .*:(\d+)\r?\n", timeout=20).group(1))
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s = certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost")
        assert recv_exactly(s, 4) == GREETING
        # Fill the server's send side: it cannot finish a graceful close while we do not read.
        s.setblocking(False)
        for _ in range(2000):
            try:
                s.send(b"x" * 65536)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                break
        os.kill(proc.proc.pid, signal.SIGTERM)
        proc.read_match(rb"SIGTERM: draining 1 connection\(s\), grace 60", stream="err")
        assert proc.proc.poll() is None, "a graceful stop waits for the connection"
        os.kill(proc.proc.pid, signal.SIGTERM)
        proc.read_match(rb"second signal: aborting all connections", stream="err")
        assert proc.wait(timeout=10) == 0
        s.close()


def test_log_levels(certs: Certs) -> None:
    proc, port, _ = start_echo("--cert", str(certs.cert_file), "--key", str(certs.key_file),
                               "--log-level", "debug")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as bad:
            bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
            while bad.recv(100):
                pass
            bad_port = bad.getsockname()[1]
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
            assert recv_exactly(s, 4) == GREETING
            good_port = s.getsockname()[1]
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        reap(proc)
    info = [line for line in err.splitlines() if " INFO " in line]
    debug = [line for line in err.splitlines() if " DEBUG " in line]
    # One INFO line for the failed handshake, with the peer and OpenSSL's reason.
    assert any(f"127.0.0.1:{bad_port}" in line and "http request" in line for line in info), err
    # Opens and closes at DEBUG.
    assert any(f"127.0.0.1:{good_port}: accepted" in line for line in debug), err
    assert any(f"127.0.0.1:{good_port}: closed" in line for line in debug), err


@pytest.mark.parametrize("no_extensions", [False, True], ids=["as-built", "TLSUV_NO_EXTENSIONS=1"])
def test_either_data_path_echoes_and_says_which_at_debug(certs: Certs, no_extensions: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TLSUV_NO_EXTENSIONS"}
    if no_extensions:
        env["TLSUV_NO_EXTENSIONS"] = "1"
    proc, port, _ = start_echo("--cert", str(certs.cert_file), "--key", str(certs.key_file),
                               "--log-level", "debug", env=env)
    payload = random.Random(11).randbytes(300_000)
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
            assert recv_exactly(s, 4) == b"OK\r\n"
            for i in range(0, len(payload), 50_000):  # within the server's high-water mark
                s.sendall(payload[i:i + 50_000])
                assert recv_exactly(s, 50_000) == payload[i:i + 50_000]
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        reap(proc)
    built = importlib.util.find_spec("tlsuv._speedups") is not None
    if no_extensions:
        expected = "data path: pure Python (TLSUV_NO_EXTENSIONS is set)"
    elif built:
        expected = "data path: compiled (tlsuv._speedups"
    else:
        expected = "data path: pure Python (tlsuv._speedups is not built"
    assert any(" DEBUG tlsuv.echo: " + expected in line for line in err.splitlines()), err
