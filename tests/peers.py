"""Real TLS peers for the feature tests: openssl/gnutls subprocesses, a Python ssl server, and
helpers to drive tlsuv clients on a loop in the test thread."""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import pyuv
from helpers import GREETING, unavailable

import tlsuv
from tlsuv.client import connect

PYTHON_TLSUV = [sys.executable, "-m"]


INSTALL_HINTS = {
    "openssl": "apt-get install openssl",
    "gnutls-cli": "apt-get install gnutls-bin",
}


def require_tool(name: str) -> str:
    """The tool's path; skip (or, in CI, fail) with the install command when it is missing."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not installed (install it with: {INSTALL_HINTS.get(name, name)})",
                    "TLSUV_REQUIRE_INTEROP")
    return path


# -- interactive subprocesses ---------------------------------------------------------


class Interactive:
    """A subprocess whose stdin the test writes and whose stdout/stderr it reads with deadlines."""

    def __init__(self, argv: Sequence[str], cwd: str | None = None, env: dict[str, str] | None = None):
        self.argv = list(argv)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, cwd=cwd, env=env)
        self.out = bytearray()
        self.err = bytearray()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._streams: dict[int, tuple[IO[bytes], bytearray]] = {
            self.proc.stdout.fileno(): (self.proc.stdout, self.out),
            self.proc.stderr.fileno(): (self.proc.stderr, self.err),
        }
        self._sel = selectors.DefaultSelector()
        for stream, _ in self._streams.values():
            self._sel.register(stream, selectors.EVENT_READ)

    def _pump(self, timeout: float) -> bool:
        """Read what is available within ``timeout``; False once both streams ended."""
        if not self._sel.get_map():
            # Both streams ended: what is left to wait for is the process's exit.
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
            return False
        for key, _ in self._sel.select(timeout):
            stream, buf = self._streams[key.fd]
            data = os.read(key.fd, 65536)
            if data:
                buf += data
            else:
                self._sel.unregister(stream)
        return True

    def read_match(self, pattern: bytes, *, stream: str = "out", timeout: float = 10.0) -> re.Match[bytes]:
        """Wait until ``pattern`` (a regex) matches what the process wrote to stdout or stderr."""
        buf = self.out if stream == "out" else self.err
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, buf)) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (not self._pump(min(remaining, 0.1)) and self.proc.poll() is not None):
                raise AssertionError(
                    f"{self.argv[0]}: {pattern!r} not seen on std{stream}; "
                    f"stdout={bytes(self.out)[-500:]!r} stderr={bytes(self.err)[-500:]!r}")
        return match

    def read_until(self, needle: bytes, *, stream: str = "out", timeout: float = 10.0) -> bytes:
        self.read_match(re.escape(needle), stream=stream, timeout=timeout)
        return bytes(self.out if stream == "out" else self.err)

    def write(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()

    def wait(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None or self._sel.get_map():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.argv[0]} did not exit; stderr={bytes(self.err)[-500:]!r}")
            self._pump(0.05)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._sel.close()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()

    def __enter__(self) -> Interactive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def openssl_s_server(*args: str) -> Iterator[tuple[Interactive, int]]:
    """``openssl s_server`` on a free loopback port; yields the process and the port."""
    openssl = require_tool("openssl")
    with Interactive([openssl, "s_server", "-accept", "127.0.0.1:0", *args]) as proc:
        match = proc.read_match(rb"ACCEPT 127\.0\.0\.1:(\d+)\r?\n", timeout=10)
        yield proc, int(match.group(1))


@contextlib.contextmanager
def echo_cli(*args: str) -> Iterator[tuple[Interactive, int]]:
    """``python -m tlsuv.echo`` on a free port; stopped with SIGTERM (it must exit 0)."""
    with Interactive([*PYTHON_TLSUV, "tlsuv.echo", "--port", "0", "--log-level", "warning", *args]) as p:
        match = p.read_match(rb"listening on (?:\[[^\]]+\]|[^ :]+):(\d+)\r?\n", timeout=20)
        yield p, int(match.group(1))
        if p.proc.poll() is None:
            p.proc.terminate()
            assert p.wait(15) == 0, p.err


# -- a Python ssl server on a thread --------------------------------------------------


@dataclass
class Accepted:
    """What the Python ssl server saw of one client."""

    sni: str | None = None
    alpn: str | None = None
    version: str | None = None
    peer_cert: dict[str, Any] | None = None
    session_reused: bool = False
    received: bytearray = field(default_factory=bytearray)
    error: BaseException | None = None
    close_notify: bool = False


class PySSLServer:
    """Python's ssl as the server peer of a tlsuv client.

    Each client gets ``OK\\r\\n`` and then its bytes echoed.  At the client's
    close_notify the server sends ``farewell`` (to show a half-closed client
    still reads) and answers close_notify -- or, with ``truncate_after_close``,
    just drops TCP.
    """

    def __init__(self, ctx: ssl.SSLContext, host: str = "127.0.0.1", *, farewell: bytes = b"",
                 truncate_after_close: bool = False) -> None:
        self.ctx = ctx
        self.farewell = farewell
        self.truncate_after_close = truncate_after_close
        self.accepted: list[Accepted] = []
        self._sni: str | None = None
        ctx.sni_callback = self._on_sni
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, 0), family=family)
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread = threading.Thread(target=self._serve, name="py-ssl-server", daemon=True)

    def _on_sni(self, sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, ctx: ssl.SSLContext) -> None:
        self._sni = name

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._handle, args=(raw,), daemon=True)
            self._threads.append(t)
            t.start()

    def _handle(self, raw: socket.socket) -> None:
        rec = Accepted()
        self.accepted.append(rec)
        raw.settimeout(10)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                rec.sni = self._sni
                rec.alpn = s.selected_alpn_protocol()
                rec.version = s.version()
                rec.peer_cert = s.getpeercert()
                rec.session_reused = bool(s.session_reused)
                s.sendall(GREETING)
                while True:
                    data = s.recv(65536)
                    if not data:
                        rec.close_notify = True
                        break
                    rec.received += data
                    s.sendall(data)
                if self.farewell:
                    s.sendall(self.farewell)
                if self.truncate_after_close:
                    return
                with contextlib.suppress(OSError, ssl.SSLError):
                    s.unwrap()
        except (OSError, ssl.SSLError) as exc:
            rec.error = exc

    def __enter__(self) -> PySSLServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for t in self._threads:
            t.join(5)
        self.sock.close()


# -- tlsuv clients on a loop in the test thread ----------------------------------------------


class ClientRecorder(tlsuv.Handler):
    """Sends ``send`` once connected, closes once ``expect`` bytes arrived; records everything."""

    def __init__(self, send: bytes = b"", expect: int | None = None, *, half_close: bool = False) -> None:
        self.send = send
        self.expect = expect
        self.half_close = half_close
        self.events: list[str] = []
        self.data = bytearray()
        self.reason: BaseException | None = None
        self.info: dict[str, Any] = {}

    def established(self, conn: tlsuv.Connection) -> None:
        self.events.append("established")
        if self.send:
            conn.write(self.send)
        if self.half_close:
            conn.write_eof()

    def handshake_complete(self, conn: tlsuv.Connection) -> None:
        self.events.append("handshake_complete")
        self.info = {
            "version": conn.tls_version, "cipher": conn.cipher, "alpn": conn.alpn_protocol,
            "reused": conn.session_reused, "subject": conn.peer_subject,
            "server_name": conn.server_name, "peer": conn.peer,
        }

    def read(self, conn: tlsuv.Connection, data: bytes) -> None:
        self.data += data
        if self.expect is not None and len(self.data) >= self.expect and not conn.closing:
            conn.close()

    def closed(self, conn: tlsuv.Connection, reason: BaseException | None) -> None:
        self.events.append("closed")
        self.reason = reason


def run_loop(loop: pyuv.Loop, conns: Sequence[tlsuv.Connection], timeout: float = 10.0) -> None:
    """Run until every connection is closed; abort them (and fail) after ``timeout``."""
    fired: list[bool] = []

    def expire(timer: pyuv.Timer) -> None:
        fired.append(True)
        for c in conns:
            c.abort()

    watchdog = pyuv.Timer(loop)
    watchdog.start(expire, timeout, 0.0)
    watchdog.ref = False  # a watchdog must not keep the loop running
    loop.run()
    watchdog.close()
    loop.run(pyuv.UV_RUN_NOWAIT)
    assert not fired, f"connections still open after {timeout}s: {conns}"


def client_echo_once(loop: pyuv.Loop, port: int, host: str = "127.0.0.1", payload: bytes = b"ping",
                     **kwargs: object) -> ClientRecorder:
    """tlsuv's client against an echo server (PySSLServer, s_server): send, read the echo, close.

    ``kwargs`` go to :func:`tlsuv.client.connect` (cafile, server_hostname, alpn...).
    """
    h = ClientRecorder(payload, len(GREETING) + len(payload))
    # Each test passes the keyword arguments of connect() it needs; ** hides their types.
    conn = connect(loop, host, port, lambda c: h, **kwargs)  # type: ignore[arg-type]
    run_loop(loop, [conn])
    return h
