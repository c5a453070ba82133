"""The floor of tlsuv's design: pyuv, pyOpenSSL memory BIOs and raw OpenSSL calls, nothing else.

Not a server anyone should run, and not in the default bench run
(``--servers ...,floor`` adds it): no error handling, no flow control, no
close_notify, no timeouts, no deferred writes, no renegotiation, one shared
buffer.  It keeps the byte order and every byte, so the load generator's
verification holds.  It answers one question with a number: how fast can *any*
server built from tlsuv's parts (a Python read callback per libuv read,
SSL_read/SSL_write through pyOpenSSL's cffi binding, a direct write(2)) be?
Everything tlsuv adds above this costs its difference to this column.

Same contract as the others: ``OK\\r\\n`` once the handshake is done (here:
right after it, not before it as in tlsuv), then every byte back.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyuv
from OpenSSL import SSL
from OpenSSL._util import ffi, lib

import tlsuv

# Spawned by path (servers.py), so the bench package is not on sys.path yet.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.echo_pyuv import serve

GREETING = b"OK\r\n"
BUFFER_SIZE = 256 * 1024  # a 64 KiB read or write, with room; one buffer for the process
RECORD = 16384  # the most plaintext one SSL_read returns

_buf: Any = ffi.new("char[]", BUFFER_SIZE)
_view = memoryview(ffi.buffer(_buf))


class FloorEcho:
    __slots__ = ("conn", "established", "fd", "rbio", "ssl", "tcp", "wbio")

    def __init__(self, tcp: pyuv.TCP, context: SSL.Context) -> None:
        self.tcp = tcp
        self.fd = tcp.fileno()
        conn = self.conn = SSL.Connection(context, None)
        conn.set_accept_state()
        lib.SSL_clear_mode(conn._ssl, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
        self.ssl, self.rbio, self.wbio = conn._ssl, conn._into_ssl, conn._from_ssl
        self.established = False
        tcp.start_read(self.on_read)

    def on_read(self, tcp: pyuv.TCP, data: bytes | None, error: int | None) -> None:
        if error is not None:
            tcp.stop_read()
            tcp.close()
            return
        if not data:
            return
        ssl, rbio, buf = self.ssl, self.rbio, _buf
        lib.BIO_write(rbio, data, len(data))
        if not self.established:
            try:
                self.conn.do_handshake()
            except SSL.WantReadError:  # the handshake waits for the client's next flight
                pass
            else:
                self.established = True
                lib.SSL_write(ssl, GREETING, len(GREETING))
        else:
            while True:
                n = lib.SSL_read(ssl, buf, RECORD)
                if n <= 0:
                    break
                chunk = ffi.unpack(buf, n)
                lib.SSL_write(ssl, chunk, n)
                if lib.BIO_get_mem_data(rbio, ffi.NULL) == 0:
                    break
        n = lib.BIO_read(self.wbio, buf, BUFFER_SIZE)
        if n > 0:
            if tcp.write_queue_size:
                tcp.write(_view[:n].tobytes())
                return
            try:
                sent = os.write(self.fd, _view[:n])
            except BlockingIOError:  # the socket buffer is full: libuv queues it all below
                sent = 0
            except OSError:  # the peer reset: the bench closes that way
                tcp.stop_read()
                tcp.close()
                return
            if sent < n:  # the bytes must go out in order: libuv queues the rest
                tcp.write(_view[sent:n].tobytes())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    args = p.parse_args(argv)
    context = tlsuv.server_context(tlsuv.load_bundle(args.cert, args.key))
    serve(args.host, args.port, "floor TLS echo server", lambda tcp: FloorEcho(tcp, context))
    return 0


if __name__ == "__main__":
    sys.exit(main())
