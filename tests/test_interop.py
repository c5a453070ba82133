"""The interop matrix: tlsuv's echo server and client against other TLS stacks, with every profile.

Echo server (``python -m tlsuv.echo --tls-profile P``, for each of modern, intermediate and old)
<- openssl s_client, GnuTLS gnutls-cli and Python's ssl, each pinned to TLS 1.0, 1.1, 1.2 and
1.3 in turn, and tlsuv's client (library: TLS 1.2, 1.3; CLI).  A version the profile offers must
give a byte-exact echo and a clean ending; a version it does not offer must be refused (the
peer fails its handshake) -- modern refuses TLS 1.2, intermediate 1.0 and 1.1.
tlsuv's client (library, for each profile; CLI) -> openssl s_server pinned to each version.

Every success checks a byte-exact echo and a clean ending (exit code 0, or a ``closed(None)``).
A missing tool skips its cells with the install command; under ``TLSUV_REQUIRE_INTEROP=1``
(set by ``.ci/run``) it fails them instead.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Certs, CheckedLoop, TLSFiles, recv_exactly
from helpers import GREETING
from peers import ClientRecorder, Interactive, echo_cli, openssl_s_server, require_tool, run_loop

import tlsuv
from tlsuv import profiles
from tlsuv.client import connect

PAYLOAD = b"interop: tlsuv echo \x01\x02\xfe\xff\n"
# gnutls-cli and s_client read stdin by lines; a line of text suits both.
TEXT_LINE = b"interop check 0123456789\n"

VERSIONS = ("1.0", "1.1", "1.2", "1.3")
# TLS 1.0 and 1.1 sign their handshake with MD5+SHA-1, which OpenSSL 3 refuses
# unless its security level is 0 -- on the client as much as on the server.
LEGACY_CIPHERS = "DEFAULT:@SECLEVEL=0"

ClientArgv = Callable[[int, Certs], list[str]]


@dataclass(frozen=True)
class Served:
    port: int
    profile: profiles.Profile

    def offers(self, version: str) -> bool:
        v = profiles.PROTOCOL_VERSIONS
        return v[self.profile.min_version] <= v[version]


@pytest.fixture(scope="module")
def echo_port(certs: Certs) -> Iterator[int]:
    """The echo server with its defaults."""
    with echo_cli("--cert", str(certs.cert_file), "--key", str(certs.key_file)) as (_, port):
        yield port


@pytest.fixture(scope="module", params=list(profiles.PROFILES))
def served(request: pytest.FixtureRequest, certs: Certs) -> Iterator[Served]:
    """The echo server with each ``--tls-profile``."""
    name: str = request.param
    with echo_cli("--cert", str(certs.cert_file), "--key", str(certs.key_file),
                  "--tls-profile", name) as (_, port):
        yield Served(port, profiles.get(name))


def s_client_argv(version: str) -> ClientArgv:
    flag = {"1.0": "-tls1", "1.1": "-tls1_1", "1.2": "-tls1_2", "1.3": "-tls1_3"}[version]
    legacy = ["-cipher", LEGACY_CIPHERS] if version in ("1.0", "1.1") else []

    def argv(port: int, certs: Certs) -> list[str]:
        return [require_tool("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", flag, *legacy,
                "-servername", "localhost", "-verify_return_error", "-verify_hostname", "localhost",
                "-CAfile", str(certs.ca_file), "-brief"]
    return argv


def gnutls_argv(version: str) -> ClientArgv:
    def argv(port: int, certs: Certs) -> list[str]:
        return [require_tool("gnutls-cli"), "--x509cafile", str(certs.ca_file), "-p", str(port),
                "--priority", f"NORMAL:-VERS-ALL:+VERS-TLS{version}", "--logfile", "/dev/null", "localhost"]
    return argv


def tlsuv_cli_argv(port: int, certs: Certs) -> list[str]:
    return [sys.executable, "-m", "tlsuv.client", "--cafile", str(certs.ca_file), f"localhost:{port}"]


CLI_CLIENTS = {
    **{f"openssl-s_client-tls{v}": (v, s_client_argv(v)) for v in VERSIONS},
    **{f"gnutls-cli-tls{v}": (v, gnutls_argv(v)) for v in VERSIONS},
    # The client's own default profile (intermediate): the newest version both offer.
    "tlsuv-client-cli": ("1.3", tlsuv_cli_argv),
}


@pytest.mark.parametrize("client", list(CLI_CLIENTS))
def test_echo_server_with_command_line_client(served: Served, certs: Certs, client: str) -> None:
    version, argv = CLI_CLIENTS[client]
    with Interactive(argv(served.port, certs)) as peer:
        if not served.offers(version):
            # Refused: the client's handshake fails, it says so, and no byte is echoed.
            assert peer.wait(10) != 0, bytes(peer.out)
            assert GREETING not in bytes(peer.out)
            return
        peer.read_until(GREETING)
        peer.write(TEXT_LINE)
        peer.read_until(GREETING + TEXT_LINE)
        # End of stdin: each client sends close_notify and must see a clean end.
        peer.close_stdin()
        assert peer.wait(10) == 0, bytes(peer.err)
        assert bytes(peer.out) == GREETING + TEXT_LINE


PY_VERSIONS = {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1,
               "1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@pytest.mark.parametrize("version", VERSIONS, ids=[f"tls{v}" for v in VERSIONS])
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_echo_server_with_python_ssl(served: Served, certs: Certs, version: str) -> None:
    ctx = ssl.create_default_context(cafile=str(certs.ca_file))
    ctx.minimum_version = ctx.maximum_version = PY_VERSIONS[version]
    if version in ("1.0", "1.1"):
        ctx.set_ciphers(LEGACY_CIPHERS)
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as raw:
        if not served.offers(version):
            with pytest.raises(ssl.SSLError):
                ctx.wrap_socket(raw, server_hostname="localhost")
            return
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            assert recv_exactly(s, len(GREETING)) == GREETING
            s.sendall(PAYLOAD)
            assert recv_exactly(s, len(PAYLOAD)) == PAYLOAD
            assert s.version() == PY_VERSIONS[version].name.replace("_", ".")
            s.unwrap()  # close_notify both ways: the server answered ours


@pytest.mark.parametrize("max_version", ["1.2", None], ids=["tls1.2", "tls1.3"])
def test_echo_server_with_tlsuv_client(served: Served, certs: Certs, loop: CheckedLoop,
                                       max_version: str | None) -> None:
    h = ClientRecorder(PAYLOAD, len(GREETING) + len(PAYLOAD))
    run_loop(loop, [connect(loop, "localhost", served.port, lambda c: h, cafile=certs.ca_file,
                            max_version=max_version)])
    if not served.offers(max_version or "1.3"):
        assert isinstance(h.reason, tlsuv.HandshakeError), h.reason
        return
    assert h.reason is None, h.reason
    assert bytes(h.data) == GREETING + PAYLOAD
    assert h.info["version"] == ("TLSv1.2" if max_version else "TLSv1.3")


OPENSSL_VERSION_NAMES = {"1.0": "TLSv1", "1.1": "TLSv1.1", "1.2": "TLSv1.2", "1.3": "TLSv1.3"}
S_SERVER_VERSIONS = {"1.0": ["-tls1", "-cipher", LEGACY_CIPHERS],
                     "1.1": ["-tls1_1", "-cipher", LEGACY_CIPHERS],
                     "1.2": ["-tls1_2"], "1.3": ["-tls1_3"]}


@pytest.mark.parametrize("version", VERSIONS, ids=[f"tls{v}" for v in VERSIONS])
@pytest.mark.parametrize("profile", list(profiles.PROFILES))
def test_tlsuv_client_profiles_with_openssl_s_server(loop: CheckedLoop, certs: Certs, profile: str,
                                                     version: str) -> None:
    # The client follows the same profiles: what it offers decides what it can reach.
    with openssl_s_server("-cert", str(certs.cert_file), "-key", str(certs.key_file), "-rev",
                          "-naccept", "1", *S_SERVER_VERSIONS[version]) as (srv, port):
        h = ClientRecorder(b"hello\n", len(b"olleh\n"))
        run_loop(loop, [connect(loop, "localhost", port, lambda c: h, cafile=certs.ca_file, profile=profile)])
        srv.wait(10)
    v = profiles.PROTOCOL_VERSIONS
    if v[version] < v[profiles.get(profile).min_version]:
        assert isinstance(h.reason, tlsuv.HandshakeError), h.reason
        return
    assert h.reason is None, h.reason
    assert bytes(h.data) == b"olleh\n"
    assert h.info["version"] == OPENSSL_VERSION_NAMES[version]


def test_default_tlsuv_client_refuses_a_cbc_only_server(loop: CheckedLoop, certs: Certs) -> None:
    # The obsolete CBC suites intermediate left out: a server with nothing else is refused.
    with openssl_s_server("-cert", str(certs.cert_file), "-key", str(certs.key_file), "-rev",
                          "-naccept", "1", "-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA") as (srv, port):
        h = ClientRecorder(b"hello\n", len(b"olleh\n"))
        run_loop(loop, [connect(loop, "localhost", port, lambda c: h, cafile=certs.ca_file)])
        srv.wait(10)
    assert isinstance(h.reason, tlsuv.HandshakeError), h.reason


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
