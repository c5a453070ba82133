"""End to end through a real HAProxy: TCP mode, two tlsuv servers, the PROXY protocol.

The HAProxy configuration is read from docs/deployment.md (addresses and the
CA path replaced by the test's own): if this test passes, the documented
set-up works, and the guide cannot drift from what was tested.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import Certs, ServerThread, recv_exactly
from helpers import GREETING, unavailable, wait_until

import tlsuv
from tlsuv.echo import EchoHandler
from tlsuv.proxy import ProxyOptions

INSTALL = "apt-get install -y haproxy"
HAPROXY = shutil.which("haproxy") or next(
    (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)), None)



@pytest.fixture(autouse=True)
def _haproxy_installed() -> None:
    if HAPROXY is not None:
        return
    unavailable(f"HAProxy is not installed (Debian/Ubuntu, as root: {INSTALL})", "TLSUV_REQUIRE_HAPROXY")


DEPLOYMENT = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"

# What the documented configuration names, and what this test puts in its place.
DOC_VALUES = {
    "bind :443": "bind 127.0.0.1:{port}",
    "bind [::]:443 v6only": "bind [::1]:{port}",
    "server tlsuv1 10.0.0.11:4433": "server tlsuv1 127.0.0.1:{port1}",
    "server tlsuv2 10.0.0.12:4433": "server tlsuv2 127.0.0.1:{port2}",
    "check-sni tls.example.com": "check-sni localhost",  # the test certificate's name
    "ca-file /etc/haproxy/tlsuv-ca.pem": "ca-file {ca}",
    "default-server send-proxy-v2": "default-server {send_proxy}",
}


def documented_config() -> str:
    """The ```haproxy block of docs/deployment.md, turned into a template for this test."""
    text = DEPLOYMENT.read_text()
    blocks: list[str] = re.findall(r"```haproxy\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 1, "docs/deployment.md must hold exactly one ```haproxy block"
    config = blocks[0].replace("{", "{{").replace("}", "}}")
    for documented, ours in DOC_VALUES.items():
        # Each documented value must be there exactly once: the doc cannot drift from the test.
        assert config.count(documented) == 1, f"docs/deployment.md no longer says {documented!r}"
        config = config.replace(documented, ours)
    return config


@dataclass
class Seen:
    """What a handler saw of its connection, read on the loop thread."""

    peer: tuple[str, int] | None = None
    proxy_peer: tuple[str, int] | None = None
    local: bool = False
    handshake: bool = False
    echoed: int = 0


class Recording(EchoHandler):
    __slots__ = ("seen",)

    def __init__(self, log: list[Seen]) -> None:
        self.seen = Seen()
        log.append(self.seen)

    def established(self, conn: tlsuv.Connection) -> None:
        header = conn.proxy_header
        self.seen.peer, self.seen.proxy_peer = conn.peer, conn.proxy_peer
        self.seen.local = header is not None and header.local
        super().established(conn)

    def handshake_complete(self, conn: tlsuv.Connection) -> None:
        self.seen.handshake = True

    def read(self, conn: tlsuv.Connection, data: bytes) -> None:
        self.seen.echoed += len(data)
        super().read(conn, data)


@dataclass
class Backend:
    thread: ServerThread
    seen: list[Seen] = field(default_factory=list)

    def clients(self) -> list[Seen]:
        """Connections that carried data: the clients (health checks never send any)."""
        return [s for s in list(self.seen) if s.echoed]

    def health_checks(self) -> list[Seen]:
        return [s for s in list(self.seen) if s.local and s.handshake]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    """Whether something listens on ``port`` (from /proc, so no test connection is made)."""
    want = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                fields_ = line.split()
                if fields_[1].endswith(want.strip()) and fields_[3] == "0A":
                    return True
    return False


@contextlib.contextmanager
def haproxy(config: str, tmp: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    assert HAPROXY is not None
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(config)
    check = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, timeout=30, check=False)
    assert check.returncode == 0, check.stderr.decode() + check.stdout.decode()
    log = (tmp / "haproxy.log").open("wb")
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _listening(port) or proc.poll() is not None, timeout=15,
                   what="HAProxy to listen")
        assert proc.poll() is None, (tmp / "haproxy.log").read_text()
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - only if HAProxy hangs
            proc.kill()
            proc.wait()
        log.close()


def _client(certs: Certs, family: socket.AddressFamily, source: str, port: int,
            payload: bytes) -> tuple[tuple[str, int], bytes]:
    """One client session through HAProxy: its own address, and what came back."""
    dest = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    raw = socket.create_connection((dest, port), timeout=20, source_address=(source, 0))
    with certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
        local = s.getsockname()
        assert recv_exactly(s, len(GREETING)) == GREETING
        # One thread per SSL object (OpenSSL's rule): send it all, then read.
        # Well under the socket and HAProxy buffers, so nothing can block.
        s.sendall(payload)
        echoed = recv_exactly(s, len(payload))
        s.unwrap()
    return (str(local[0]), int(local[1])), echoed


@pytest.mark.parametrize("send_proxy", ["send-proxy-v2", "send-proxy"])
def test_clients_through_haproxy(certs: Certs, tmp_path: Path, send_proxy: str) -> None:
    options = tlsuv.ConnectionOptions(proxy=ProxyOptions())  # HAProxy is on loopback: the default
    backends: list[Backend] = []
    with contextlib.ExitStack() as stack:
        for _ in range(2):
            seen: list[Seen] = []
            # The default argument pins this backend's list (late binding would share one).
            st = stack.enter_context(ServerThread(
                certs.server_context(), factory=lambda conn, seen=seen: Recording(seen), options=options))  # type: ignore[misc]
            backends.append(Backend(st, seen))
        port = _free_port()
        config = documented_config().format(
            port=port, port1=backends[0].thread.port, port2=backends[1].thread.port,
            send_proxy=send_proxy, ca=certs.ca_file)
        stack.enter_context(haproxy(config, tmp_path, port))

        # Clients from distinct loopback addresses, so "the real address" is
        # not just HAProxy's 127.0.0.1 with another port; two over IPv6.
        results: list[tuple[tuple[str, int], bytes]] = []
        payloads: dict[int, bytes] = {}
        clients = [(socket.AF_INET, f"127.0.0.{10 + i}") for i in range(6)]
        clients += [(socket.AF_INET6, "::1")] * 2
        for i, (family, source) in enumerate(clients):
            payloads[i] = os.urandom(50_000 + 1000 * i)
            results.append(_client(certs, family, source, port, payloads[i]))
        # Byte-exact echoes through HAProxy.
        assert [echoed for _, echoed in results] == [payloads[i] for i in range(len(clients))]

        def seen_by_backends() -> list[Seen]:
            return [s for b in backends for s in b.thread.call(b.clients)]

        # The last echo can reach the client before its handler's bookkeeping is read here.
        wait_until(lambda: len(seen_by_backends()) == len(clients),
                   what=f"the backends to have served all {len(clients)} clients")
        seen = seen_by_backends()
        # Each handler saw its client's own address and port, and HAProxy's as proxy_peer.
        assert sorted(s.peer for s in seen if s.peer) == sorted(addr for addr, _ in results)
        assert all(s.proxy_peer is not None and s.proxy_peer[0] == "127.0.0.1" for s in seen)
        assert {s.peer[0] for s in seen if s.peer} == {f"127.0.0.{10 + i}" for i in range(6)} | {"::1"}
        # Round robin: both servers served clients.
        per_server = [len(b.thread.call(b.clients)) for b in backends]
        assert all(n > 0 for n in per_server), per_server
        assert sum(per_server) == len(clients)

        if send_proxy == "send-proxy-v2":
            # The documented health check works: a LOCAL header, then a full handshake.
            wait_until(lambda: all(b.thread.call(b.health_checks) for b in backends),
                       what="a successful HAProxy health check on each server")
