"""Real TLS clients for the loopback tests: asyncio + ssl, and pyOpenSSL over a socket."""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import ssl
import time
from dataclasses import dataclass, field

from OpenSSL import SSL

GREETING = b"OK\r\n"


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
                pass
            if result.sent >= len(payload):
                sel.modify(sock, selectors.EVENT_READ)
        return result
    finally:
        sel.close()
        conn.close()
