"""The benchmark's echo contract on asyncio: with ``ssl``, on uvloop, or plain TCP.

``OK\\r\\n`` as soon as the connection is up, then every byte straight back.
This is the server a user would write with the standard library: one
:class:`asyncio.Protocol`, ``loop.create_server(ssl=...)``.  Flow control
mirrors ``tlsuv.echo``: while the transport's write buffer is over its high
water mark we stop reading, so a peer that does not read its echoes cannot
grow our memory.

    python scripts/bench/echo_asyncio.py --port 4440 --cert c.pem --key k.pem [--loop uvloop]
    python scripts/bench/echo_asyncio.py --port 4441 --plain
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys
from collections.abc import Callable, Sequence
from typing import cast

GREETING = b"OK\r\n"
# tlsuv listens with this backlog; the same queue depth keeps a burst of
# connects from being dropped (and retried a second later) on one server only.
BACKLOG = 4096


class Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports quack like asyncio.Transport without subclassing it.
        self.transport = cast("asyncio.Transport", transport)
        self.transport.write(GREETING)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def pause_writing(self) -> None:
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()


class PlainEcho(Echo, asyncio.BufferedProtocol):
    """The plain-TCP echo: the load generator's ceiling, so the leanest asyncio allows.

    A plain ``Protocol`` gets each read as a fresh ``bytes`` from
    ``sock.recv(256 KiB)``: a 256 KiB allocation per read.  Reading into one
    buffer shared by all connections avoids that; sharing is safe because
    ``transport.write`` sends or copies the bytes before returning.
    (asyncio's TLS transport already reads this way, into a buffer per
    connection.)
    """

    __slots__ = ()
    shared = memoryview(bytearray(256 * 1024))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.shared

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None
        self.transport.write(self.shared[:nbytes])


def server_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # as tlsuv.certs.new_context
    ctx.load_cert_chain(cert, key)
    # Python's ssl sets server cipher preference, and OpenSSL's own order puts
    # AES-256 first; the benchmark compares every server on AES-128-GCM, which
    # the load generator asks for.
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    return ctx


async def serve(host: str, port: int, ctx: ssl.SSLContext | None, label: str) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = await loop.create_server(Echo if ctx is not None else PlainEcho, host, port, ssl=ctx,
                                      backlog=BACKLOG)
    bound = server.sockets[0].getsockname()
    print(f"{label} echo server listening on {bound[0]}:{bound[1]} "
          f"({type(loop).__module__}.{type(loop).__name__})", flush=True)
    await stop.wait()
    server.close()
    # The load generator closes its connections before stopping us; anything
    # left is simply dropped with the process.


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", help="PEM certificate")
    p.add_argument("--key", help="PEM private key")
    p.add_argument("--plain", action="store_true", help="no TLS: the load generator's ceiling")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = p.parse_args(argv)
    if args.plain == (args.cert is not None) or (args.cert is None) != (args.key is None):
        p.error("give --cert and --key, or --plain")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = None if args.plain else server_context(args.cert, args.key)
    label = f"{args.loop}{'' if args.plain else '+ssl'}"
    factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if args.loop == "uvloop":
        import uvloop  # noqa: PLC0415  # only the bench extra has it; asyncio and plain run without

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.host, args.port, ctx, label))
    return 0


if __name__ == "__main__":
    sys.exit(main())
