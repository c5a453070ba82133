"""The interop matrix: tlsuv's echo server and client against other TLS stacks.

Echo server (``python -m tlsuv.echo``) <- openssl s_client (TLS 1.2, 1.3), GnuTLS gnutls-cli
(TLS 1.2, 1.3), Python's ssl (TLS 1.2, 1.3), tlsuv's client (CLI and library).
tlsuv's client (CLI and library) -> openssl s_server (TLS 1.2, 1.3).

Every cell checks a byte-exact echo and a clean ending (exit code 0, or a
``closed(None)``).  A missing tool skips its cells with the install command;
under ``TLSUV_REQUIRE_INTEROP=1`` (set by ``.ci/run``) it fails them instead.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Certs, CheckedLoop, TLSFiles, recv_exactly
from helpers import GREETING
from peers import ClientRecorder, Interactive, echo_cli, openssl_s_server, require_tool, run_loop

from tlsuv.client import connect

PAYLOAD = b"interop: tlsuv echo \x01\x02\xfe\xff\n"
# gnutls-cli and s_client read stdin by lines; a line of text suits both.
TEXT_LINE = b"interop check 0123456789\n"

ServerArgv = Callable[[int, Certs], list[str]]


@pytest.fixture(scope="module")
def echo_port(certs: Certs) -> Iterator[int]:
    with echo_cli("--cert", str(certs.cert_file), "--key", str(certs.key_file)) as (_, port):
        yield port


def s_client_argv(version: str) -> ServerArgv:
    def argv(port: int, certs: Certs) -> list[str]:
        return [require_tool("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", version,
                "-servername", "localhost", "-verify_return_error", "-verify_hostname", "localhost",
                "-CAfile", str(certs.ca_file), "-brief"]
    return argv


def gnutls_argv(priority: str) -> ServerArgv:
    def argv(port: int, certs: Certs) -> list[str]:
        return [require_tool("gnutls-cli"), "--x509cafile", str(certs.ca_file), "-p", str(port),
                "--priority", priority, "--logfile", "/dev/null", "localhost"]
    return argv


def tlsuv_cli_argv(port: int, certs: Certs) -> list[str]:
    return [sys.executable, "-m", "tlsuv.client", "--cafile", str(certs.ca_file), f"localhost:{port}"]


@pytest.mark.parametrize("argv", [
    s_client_argv("-tls1_2"),
    s_client_argv("-tls1_3"),
    gnutls_argv("NORMAL:-VERS-ALL:+VERS-TLS1.2"),
    gnutls_argv("NORMAL:-VERS-ALL:+VERS-TLS1.3"),
    tlsuv_cli_argv,
], ids=["openssl-s_client-tls1.2", "openssl-s_client-tls1.3", "gnutls-cli-tls1.2", "gnutls-cli-tls1.3",
        "tlsuv-client-cli"])
def test_echo_server_with_command_line_client(echo_port: int, certs: Certs, argv: ServerArgv) -> None:
    with Interactive(argv(echo_port, certs)) as peer:
        peer.read_until(GREETING)
        peer.write(TEXT_LINE)
        peer.read_until(GREETING + TEXT_LINE)
        # End of stdin: each client sends close_notify and must see a clean end.
        peer.close_stdin()
        assert peer.wait(10) == 0, bytes(peer.err)
        assert bytes(peer.out) == GREETING + TEXT_LINE


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls1.2", "tls1.3"])
def test_echo_server_with_python_ssl(echo_port: int, certs: Certs, version: ssl.TLSVersion) -> None:
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    ctx.minimum_version = ctx.maximum_version = version
    with socket.create_connection(("127.0.0.1", echo_port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        assert recv_exactly(s, len(GREETING)) == GREETING
        s.sendall(PAYLOAD)
        assert recv_exactly(s, len(PAYLOAD)) == PAYLOAD
        assert s.version() == version.name.replace("_", ".")
        s.unwrap()  # close_notify both ways: the server answered ours


@pytest.mark.parametrize("max_version", ["1.2", None], ids=["tls1.2", "tls1.3"])
def test_echo_server_with_tlsuv_client(echo_port: int, certs: Certs, loop: CheckedLoop,
                                       max_version: str | None) -> None:
    h = ClientRecorder(PAYLOAD, len(GREETING) + len(PAYLOAD))
    run_loop(loop, [connect(loop, "localhost", echo_port, lambda c: h, cafile=certs.ca_file,
                            max_version=max_version)])
    assert h.reason is None, h.reason
    assert bytes(h.data) == GREETING + PAYLOAD
    assert h.info["version"] == ("TLSv1.2" if max_version else "TLSv1.3")


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_tlsuv_client_cli_with_openssl_s_server(certs: Certs, version: str) -> None:
    # -rev answers each line reversed, and ends the session at our close_notify.
    with openssl_s_server("-cert", str(certs.cert_file), "-key", str(certs.key_file), "-rev",
                          "-naccept", "1", version) as (srv, port), \
            Interactive([sys.executable, "-m", "tlsuv.client", "--cafile", str(certs.ca_file),
                         f"localhost:{port}"]) as cli:
        cli.write(b"hello\n")
        cli.read_until(b"olleh\n")
        cli.write(b"world\n")
        cli.read_until(b"dlrow\n")
        cli.close_stdin()
        assert cli.wait(10) == 0, bytes(cli.err)
        assert bytes(cli.out) == b"olleh\ndlrow\n"
        assert srv.wait(10) == 0


@pytest.mark.parametrize("version", ["-tls1_2", "-tls1_3"])
def test_tlsuv_client_with_openssl_s_server(loop: CheckedLoop, certs: Certs, tls_files: TLSFiles,
                                            version: str) -> None:
    # The library this time, with ALPN and a client certificate s_server requires (-Verify).
    with openssl_s_server("-cert", str(certs.cert_file), "-key", str(certs.key_file), "-rev",
                          "-naccept", "1", "-alpn", "h2,echo", "-Verify", "1",
                          "-verifyCAfile", str(tls_files.client_ca_file), version) as (srv, port):
        h = ClientRecorder(b"hello\n", len(b"olleh\n"))
        conn = connect(loop, "localhost", port, lambda c: h, cafile=certs.ca_file, alpn=["echo"],
                       cert=tls_files.client_cert, key=tls_files.client_key)
        run_loop(loop, [conn])
        assert srv.wait(10) == 0
    assert h.reason is None, h.reason
    assert bytes(h.data) == b"olleh\n"
    assert h.info["alpn"] == "echo"
    assert h.info["version"] == {"-tls1_2": "TLSv1.2", "-tls1_3": "TLSv1.3"}[version]
    assert b"alice" in srv.out + srv.err  # s_server printed the client certificate it verified


def test_tlsuv_client_cli_pipes_a_file_through_the_echo_server(echo_port: int, certs: Certs,
                                                               tmp_path: Path) -> None:
    # Both ends are tlsuv: stdin read from a file, flow control on both sides, the
    # client's half-close at the end of the file, and the server echoing up to it.
    data = os.urandom(3 * 1024 * 1024)
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    with source.open("rb") as f:
        proc = subprocess.run([*tlsuv_cli_argv(echo_port, certs)], stdin=f, capture_output=True,
                              timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == GREETING + data


def test_tlsuv_client_cli_one_shot_pipe(echo_port: int, certs: Certs) -> None:
    # stdin ends at once: Finished, data and close_notify often reach the server in one read
    # (deterministically covered in test_client.py::test_finished_data_and_close_notify_in_one_read).
    for _ in range(3):
        proc = subprocess.run([*tlsuv_cli_argv(echo_port, certs)], input=b"hello", capture_output=True,
                              timeout=30, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == GREETING + b"hello"
