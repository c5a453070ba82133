"""``python -m tlsuv.client`` as a user runs it: arguments, exit codes, pipes and files."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Certs, TLSFiles
from helpers import GREETING
from peers import Interactive, PySSLServer

from tlsuv.client_cli import EXIT_CONNECT, EXIT_OK, EXIT_TLS

CLIENT = [sys.executable, "-m", "tlsuv.client"]


def run_client(*args: str, stdin: bytes | Path = b"") -> subprocess.CompletedProcess[bytes]:
    """Run the client to its end; ``stdin`` is bytes (a pipe) or a file opened as stdin."""
    if isinstance(stdin, Path):
        with stdin.open("rb") as f:
            return subprocess.run([*CLIENT, *args], stdin=f, capture_output=True, timeout=20, check=False)
    return subprocess.run([*CLIENT, *args], input=stdin, capture_output=True, timeout=20, check=False)


def one_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {proc.stderr!r}"
    assert "Traceback" not in lines[0]
    return lines[0]


def server_ctx(certs: Certs, client_ca: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs.cert_file, certs.key_file)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    ctx.set_alpn_protocols(["h2", "x-tlsuv"])
    return ctx


@pytest.fixture
def py_server(certs: Certs) -> Iterator[PySSLServer]:
    with PySSLServer(server_ctx(certs)) as srv:
        yield srv


@pytest.mark.parametrize(("args", "fragment"), [
    ([], "the following arguments are required: HOST:PORT"),
    (["localhost"], "expected HOST:PORT"),
    (["localhost:0"], "port 1-65535"),
    (["localhost:https"], "not a port number"),
    (["::1:443"], "IPv6 as [::1]:PORT"),
    (["[::1]"], "expected [IPv6]:PORT"),
    (["localhost:443", "--cert", "c.pem"], "--cert and --key go together"),
    (["localhost:443", "--cafile", "ca.pem", "--insecure"], "contradict"),
    (["localhost:443", "--alpn", ""], "1-255 bytes"),
    (["localhost:443", "--tls-min", "1.0"], "invalid choice"),
    (["localhost:443", "--connect-timeout", "0"], "positive"),
    (["localhost:443", "--keepalive", "-3"], "must be 1-32767 seconds or 'off'"),
    (["localhost:443", "--send-timeout", "off!"], "not a number"),
    (["localhost:443", "--servername", ""], "--servername cannot be empty"),
    (["localhost:443", "--cafile", "/nonexistent/ca.pem"], "CA file not found"),
    (["localhost:443", "--cert", "/nonexistent/c.pem", "--key", "/nonexistent/k.pem"],
     "certificate file not found"),
])
def test_bad_arguments_are_one_line_exit_2(args: list[str], fragment: str) -> None:
    proc = run_client(*args)
    assert proc.returncode == 2, proc
    assert fragment in one_line(proc)


def test_pipe_in_pipe_out(certs: Certs, py_server: PySSLServer) -> None:
    proc = run_client("--cafile", str(certs.ca_file), f"localhost:{py_server.port}", stdin=b"hello")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout == GREETING + b"hello"
    assert proc.stderr == b""
    assert py_server.accepted[0].sni == "localhost"
    assert py_server.accepted[0].close_notify  # end of stdin became close_notify


def test_stdin_from_a_file_with_flow_control(certs: Certs, py_server: PySSLServer, tmp_path: Path) -> None:
    # A regular file cannot be polled by libuv: the reader thread handles it.  4 MiB is far
    # above the water marks, so the thread must pause and resume while the server echoes.
    data = os.urandom(4 * 1024 * 1024)
    source = tmp_path / "input.bin"
    source.write_bytes(data)
    proc = run_client("--cafile", str(certs.ca_file), f"127.0.0.1:{py_server.port}", stdin=source)
    assert proc.returncode == EXIT_OK, proc.stderr
    assert proc.stdout == GREETING + data


def test_alpn_servername_and_info_line(certs: Certs, py_server: PySSLServer) -> None:
    proc = run_client("--cafile", str(certs.ca_file), "--alpn", "x-tlsuv,http/1.1", "--servername",
                      "localhost", "--log-level", "info", f"127.0.0.1:{py_server.port}")
    assert proc.returncode == EXIT_OK, proc.stderr
    assert "ALPN x-tlsuv" in proc.stderr.decode()
    assert py_server.accepted[0].alpn == "x-tlsuv"
    assert py_server.accepted[0].sni == "localhost"


def test_client_certificate(certs: Certs, tls_files: TLSFiles) -> None:
    with PySSLServer(server_ctx(certs, client_ca=tls_files.client_ca_file)) as srv:
        proc = run_client("--cafile", str(certs.ca_file), "--cert", str(tls_files.client_cert),
                          "--key", str(tls_files.client_key), f"localhost:{srv.port}", stdin=b"me")
        assert proc.returncode == EXIT_OK, proc.stderr
        assert proc.stdout == GREETING + b"me"
        peer = srv.accepted[0].peer_cert
        assert peer is not None and (("commonName", "alice"),) in peer["subject"]


def test_verification_failures_exit_with_the_tls_code(certs: Certs, py_server: PySSLServer) -> None:
    wrong_name = run_client("--cafile", str(certs.ca_file), "--servername", "wrong.test",
                            f"127.0.0.1:{py_server.port}")
    assert wrong_name.returncode == EXIT_TLS
    assert "certificate verify failed: hostname mismatch" in one_line(wrong_name)
    untrusted = run_client(f"localhost:{py_server.port}")  # the system store knows no trustme CA
    assert untrusted.returncode == EXIT_TLS
    assert "certificate verify failed" in one_line(untrusted)
    insecure = run_client("--insecure", "--servername", "wrong.test", f"127.0.0.1:{py_server.port}",
                          stdin=b"anyway")
    assert insecure.returncode == EXIT_OK, insecure.stderr
    assert insecure.stdout == GREETING + b"anyway"


def test_connection_failures_exit_with_the_connect_code() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound but not listening: refused
        refused = run_client(f"127.0.0.1:{s.getsockname()[1]}")
    assert refused.returncode == EXIT_CONNECT
    assert "connection refused" in one_line(refused)
    unknown = run_client("no-such-host.invalid:443")
    assert unknown.returncode == EXIT_CONNECT
    assert "cannot resolve" in one_line(unknown)


def test_a_server_that_does_not_speak_tls(certs: Certs) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        def answer() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        proc = run_client("--cafile", str(certs.ca_file), f"127.0.0.1:{srv.getsockname()[1]}")
        t.join(5)
    assert proc.returncode == EXIT_TLS
    assert "TLS error" in one_line(proc)


def test_truncated_answer_is_a_tls_failure(certs: Certs) -> None:
    with PySSLServer(server_ctx(certs), farewell=b"and then", truncate_after_close=True) as srv:
        proc = run_client("--cafile", str(certs.ca_file), f"localhost:{srv.port}", stdin=b"x")
    assert proc.returncode == EXIT_TLS
    assert proc.stdout == GREETING + b"x" + b"and then"  # what came is delivered...
    assert "may be truncated" in one_line(proc)  # ...and flagged as possibly incomplete


def test_sigint_stops_the_client(certs: Certs, py_server: PySSLServer) -> None:
    with Interactive([*CLIENT, "--cafile", str(certs.ca_file), f"localhost:{py_server.port}"]) as p:
        p.read_until(GREETING)
        p.proc.send_signal(signal.SIGINT)
        assert p.wait(10) == 128 + signal.SIGINT
        assert b"Traceback" not in p.err
