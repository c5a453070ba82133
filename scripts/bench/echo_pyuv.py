"""A plain-TCP echo server on pyuv, no TLS: the floor under tlsuv's own figures.

Not a competitor and not in the default run (``--servers ...,pyuv`` adds it).
It answers how much of tlsuv's CPU per message is the pyuv and Python around
it rather than TLS: one Python read callback per message, the echo written
with a direct non-blocking ``write(2)`` exactly as tlsuv's flush does (libuv
1.13's ``try_write`` would add an ``epoll_ctl`` per write), ``uv_write`` only
for what the kernel does not take.  Same contract as the others: ``OK\\r\\n``
on connect, then every byte back.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence

import pyuv

GREETING = b"OK\r\n"


class Echo:
    __slots__ = ("fd", "tcp")

    def __init__(self, tcp: pyuv.TCP) -> None:
        self.tcp = tcp
        self.fd = tcp.fileno()
        self.send(GREETING)
        tcp.start_read(self.on_read)

    def send(self, data: bytes) -> None:
        tcp = self.tcp
        if tcp.write_queue_size == 0:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:  # the socket buffer is full: libuv queues it all below
                n = 0
            except OSError:  # the peer reset (the bench closes that way): the connection is over
                self.close()
                return
            if n == len(data):
                return
            data = data[n:]
        tcp.write(data)

    def on_read(self, tcp: pyuv.TCP, data: bytes | None, error: int | None) -> None:
        if error is not None:
            self.close()
        elif data:
            self.send(data)

    def close(self) -> None:
        if not self.tcp.closed:
            self.tcp.stop_read()  # drops the bound method: no cycle left for the GC
            self.tcp.close()


def serve(host: str, port: int, label: str, on_accept: Callable[[pyuv.TCP], object]) -> None:
    """Listen, hand every accepted handle (TCP_NODELAY set) to ``on_accept``, run until SIGTERM.

    Shared with echo_floor.py: the handle's read callback keeps whatever
    ``on_accept`` makes alive, so nothing else holds the connections.
    """
    loop = pyuv.Loop.default_loop()
    server = pyuv.TCP(loop)
    server.bind((host, port))

    def on_connection(listener: pyuv.TCP, error: int | None) -> None:
        if error is None:
            tcp = pyuv.TCP(loop)
            listener.accept(tcp)
            tcp.nodelay(True)
            on_accept(tcp)

    server.listen(on_connection, 1024)
    stop = pyuv.Signal(loop)
    stop.start(lambda handle, signum: loop.stop(), signal.SIGTERM)
    stop.ref = False
    print(f"{label} listening on {host}:{port}", flush=True)
    loop.run()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    serve(args.host, args.port, "pyuv plain echo server", Echo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
