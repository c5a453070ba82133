"""Two TLS peers joined by memory: a tlsuv TLSEngine and a plain pyOpenSSL connection.

The h11 idea: test the protocol core by wiring it to a second, independent
implementation with no sockets at all, so every byte boundary can be chosen
by the test.  The "network" is two byte buffers; ``pump`` moves ciphertext
across in chunks whose sizes the test picks (hypothesis picks them in the
property tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from OpenSSL import SSL

from tlsuv.tls import State, TLSEngine

ChunkSizes = Callable[[], int]


def whole() -> int:
    return 1 << 30


class PlainPeer:
    """The far end: pyOpenSSL with memory BIOs, driven by hand."""

    def __init__(self, ctx: SSL.Context, server_hostname: bytes | None = b"localhost") -> None:
        self.ssl = SSL.Connection(ctx, None)
        if server_hostname:
            self.ssl.set_tlsext_host_name(server_hostname)
        self.ssl.set_connect_state()
        self.received = bytearray()
        self.closed_by_peer = False

    def kick(self) -> None:
        """Make progress on the handshake (writes the ClientHello at first)."""
        with contextlib.suppress(SSL.WantReadError):
            self.ssl.do_handshake()

    def outgoing(self) -> bytes:
        out = bytearray()
        while True:
            try:
                out += self.ssl.bio_read(65536)
            except SSL.WantReadError:
                return bytes(out)

    def incoming(self, data: bytes) -> None:
        if data:
            self.ssl.bio_write(data)
        while True:
            try:
                self.received += self.ssl.recv(65536)
            except SSL.WantReadError:
                return
            except SSL.ZeroReturnError:
                self.closed_by_peer = True
                return

    def send(self, data: bytes) -> bool:
        """True when sent; False when pyOpenSSL wants to read first (caller retries)."""
        try:
            self.ssl.sendall(data)
        except SSL.WantReadError:
            return False
        return True


def chunks(data: bytes, sizes: ChunkSizes) -> Iterator[bytes]:
    i = 0
    while i < len(data):
        n = max(1, sizes())
        yield data[i : i + n]
        i += n


def drain(engine: TLSEngine) -> bytes:
    """The engine's output, as its owner takes it: through the compiled flush when that runs."""
    if engine.pipe is None:
        return engine.data_to_send()
    result = engine.output_to(-1)  # no descriptor: everything comes back as bytes
    if result == 0:
        return b""
    assert isinstance(result, tuple) and isinstance(result[1], bytes) and len(result[1]) == result[0]
    return result[1]


def check_fast(engine: TLSEngine) -> None:
    """``fast`` is the Pipe exactly while calling it is all receive()/write() would do."""
    pipe = engine.pipe
    want = pipe if pipe is not None and engine.state is State.ESTABLISHED and not engine.deferred else None
    assert engine.fast is want, (engine.state, engine.deferred, pipe, engine.fast)


def pump(engine: TLSEngine, peer: PlainPeer, sizes: ChunkSizes = whole, rounds: int = 50,
         on_plain: Callable[[bytes], None] | None = None) -> None:
    """Move ciphertext both ways until neither side has anything to say."""
    for _ in range(rounds):
        moved = False
        check_fast(engine)
        engine.retry_deferred()
        check_fast(engine)
        out = drain(engine)
        for piece in chunks(out, sizes):
            peer.incoming(piece)
            moved = True
        back = peer.outgoing()
        for piece in chunks(back, sizes):
            for plain in engine.receive(piece):
                if on_plain is not None:
                    on_plain(plain)
            check_fast(engine)
            moved = True
        if not moved and not engine.deferred:
            return
        if not moved:
            peer.kick()
    raise AssertionError("peers did not settle")
