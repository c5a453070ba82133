"""Real TLS clients for the loopback tests: Python's ssl (blocking or asyncio), and pyOpenSSL
over a socket.  They talk to a tlsuv server; tests/peers.py has tlsuv's client and its peers."""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field

from conftest import Certs, recv_exactly
from helpers import GREETING
from OpenSSL import SSL


async def echo_session(host: str, port: int, ctx: ssl.SSLContext, payload: bytes,
                       chunk: int = 65536) -> bytes:
    """Connect, read the greeting, send ``payload`` while reading its echo; return what came back."""
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost")
    try:
        greeting = await reader.readexactly(len(GREETING))
        assert greeting == GREETING, greeting

        async def send() -> None:
            for i in range(0, len(payload), chunk):
                writer.write(payload[i : i + chunk])
                await writer.drain()

        sender = asyncio.create_task(send())
        echoed = await reader.readexactly(len(payload))
        await sender
        return echoed
    finally:
        writer.close()
        # The server may close first; the echo is what is under test.
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def tls_client(certs: Certs, port: int) -> ssl.SSLSocket:
    """Python's ssl, connected and verified, to a server on 127.0.0.1:``port``."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    # suppress_ragged_eofs=False: a TCP close without close_notify raises
    # instead of looking like a clean end, so tests can tell the two apart.
    return certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost",
                                                  suppress_ragged_eofs=False)


def echo_once(certs: Certs, port: int, payload: bytes = b"ping") -> int:
    """One full, cleanly closed session with an echo server; returns the client's local port.

    (tests/peers.py's :func:`~peers.client_echo_once` is the same with tlsuv's client.)
    """
    with tls_client(certs, port) as s:
        local = int(s.getsockname()[1])
        assert recv_exactly(s, len(GREETING)) == GREETING
        s.sendall(payload)
        assert recv_exactly(s, len(payload)) == payload
        s.unwrap()  # close_notify, so the server counts a clean close
    return local


@dataclass
class StreamResult:
    sent: int = 0
    received: bytearray = field(default_factory=bytearray)


def pyopenssl_stream(host: str, port: int, ctx: SSL.Context, payload: bytes, *,
                     timeout: float = 60.0, chunk: int = 16384) -> StreamResult:
    """Send ``payload`` and read the echo at the same time over one pyOpenSSL socket.

    One thread, non-blocking socket, a selector: OpenSSL objects must not be
    used from two threads at once, and a renegotiation needs reads and writes
    interleaved freely -- which is exactly what this loop does.
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setblocking(False)
    conn = SSL.Connection(ctx, sock)
    conn.set_tlsext_host_name(b"localhost")
    conn.set_connect_state()
    result = StreamResult()
    expected = len(GREETING) + len(payload)
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    deadline = time.monotonic() + timeout
    try:
        while len(result.received) < expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream stalled at {len(result.received)}/{expected} bytes")
            sel.select(0.5)
            # OpenSSL clients cannot SSL_write while their side of a renegotiation
            # is in flight if application data may still arrive ("unexpected
            # record"): a real client reads until the handshake is done.
            if result.sent < len(payload) and not conn.renegotiate_pending():
                with contextlib.suppress(SSL.WantReadError, SSL.WantWriteError):
                    result.sent += conn.send(payload[result.sent : result.sent + chunk])
            try:
                while True:
                    result.received += conn.recv(65536)
            except (SSL.WantReadError, SSL.WantWriteError):
                pass  # all the plaintext there is for now has been read
            if result.sent >= len(payload):
                sel.modify(sock, selectors.EVENT_READ)
        return result
    finally:
        sel.close()
        conn.close()


class RawTLSClient:
    """A TLS client whose every step the test controls: pyOpenSSL over memory BIOs on a socket.

    Python's ssl module hides close_notify, truncation and resets behind one
    ``unwrap``; the lifecycle tests need each of them on its own.
    """

    def __init__(self, port: int, ctx: SSL.Context, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.ssl = SSL.Connection(ctx, None)
        self.ssl.set_tlsext_host_name(b"localhost")
        self.ssl.set_connect_state()
        self.received = bytearray()
        self.got_close_notify = False
        self.eof = False

    def _flush(self) -> None:
        while True:
            try:
                data = self.ssl.bio_read(65536)
            except SSL.WantReadError:
                return
            self.sock.sendall(data)

    def _pump_once(self) -> bool:
        """Read one chunk from the socket into OpenSSL; False at EOF."""
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.ssl.bio_write(data)
        try:
            while True:
                self.received += self.ssl.recv(65536)
        except SSL.WantReadError:
            pass  # all the plaintext there is for now has been read
        except SSL.ZeroReturnError:
            self.got_close_notify = True
        self._flush()
        return True

    def pump(self) -> None:
        """Send what OpenSSL has for the server, then hand it one chunk from the socket, unread.

        Unlike the other steps this does not call SSL_read: a handshake driven
        by ``do_handshake`` and this leaves the client's last flight unsent.
        """
        self._flush()
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection")
        self.ssl.bio_write(data)

    def handshake(self) -> None:
        while True:
            try:
                self.ssl.do_handshake()
                break
            except SSL.WantReadError:
                self._flush()
                if not self._pump_once():
                    raise ConnectionError("server closed during the handshake") from None
        self._flush()

    def send(self, data: bytes) -> None:
        self.ssl.sendall(data)
        self._flush()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_until(self, n: int) -> bytes:
        while len(self.received) < n and not self.got_close_notify and self._pump_once():
            pass
        return bytes(self.received[:n])

    def read_to_end(self) -> bytes:
        """Read until close_notify or EOF; return everything received."""
        while not self.got_close_notify and self._pump_once():
            pass
        return bytes(self.received)

    def send_close_notify(self) -> None:
        self.ssl.shutdown()
        self._flush()

    def close_tcp(self) -> None:
        self.sock.close()

    def reset(self) -> None:
        """Close with RST (SO_LINGER 0): the abrupt ending a crashed peer produces."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class CountingClient:
    """Python's ssl over memory BIOs on a plain socket, counting every byte on the wire.

    The metrics and access-log tests compare the server's byte counts with
    what the client really sent and received, so every step reads the
    socket itself and every ending reads to the server's EOF (nothing left
    unread, which would turn the client's close into a reset).
    """

    def __init__(self, port: int, ctx: ssl.SSLContext | None, *, session: ssl.SSLSession | None = None,
                 server_hostname: str | None = "localhost", prefix: bytes = b"",
                 timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.local_port = int(self.sock.getsockname()[1])
        self.sent = 0
        self.received = 0
        self.eof = False
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname=server_hostname,
                                session=session) if ctx is not None else None
        if prefix:
            self.send_raw(prefix)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def _send_pending(self) -> None:
        data = self.outgoing.read()
        if data:
            self.send_raw(data)

    def _recv(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        self.received += len(data)
        if not data:
            self.eof = True
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def handshake(self) -> None:
        assert self.obj is not None
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._send_pending()
                if not self._recv():
                    raise ConnectionError("server closed during the handshake") from None
            except ssl.SSLError:
                self._send_pending()  # the alert this client sends the server
                raise
        self._send_pending()

    def read_exactly(self, n: int) -> bytes:
        assert self.obj is not None
        buf = bytearray()
        while len(buf) < n:
            try:
                buf += self.obj.read(n - len(buf))
            except ssl.SSLWantReadError:
                if not self._recv():
                    raise EOFError(f"EOF after {len(buf)} of {n} bytes") from None
        return bytes(buf)

    def write(self, data: bytes) -> None:
        assert self.obj is not None
        self.obj.write(data)
        self._send_pending()

    def echo(self, payload: bytes) -> None:
        self.write(payload)
        assert self.read_exactly(len(payload)) == payload

    def close_clean(self) -> None:
        """close_notify both ways, then the server's EOF."""
        assert self.obj is not None
        while True:
            try:
                self.obj.unwrap()
                break
            except ssl.SSLWantReadError:
                self._send_pending()
                if not self._recv():
                    break
        self._send_pending()
        self.finish()

    def finish(self) -> None:
        """Half-close (FIN) and read to the server's EOF; then close."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self.wait_eof()

    def wait_eof(self) -> None:
        """Read (and count) until the server closes; then close."""
        while not self.eof:
            self._recv()
        self.sock.close()
