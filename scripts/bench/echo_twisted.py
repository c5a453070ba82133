"""The benchmark's echo contract on Twisted's TLS layer: tlsuv's closest peer.

``reactor.listenSSL`` wraps every connection in
``twisted.protocols.tls.TLSMemoryBIOProtocol`` -- pyOpenSSL with two memory
BIOs over a non-blocking socket, the same design as tlsuv -- so the two share
the OpenSSL build (the one bundled with ``cryptography``) and differ only in
the Python around it.  The context is what a Twisted user gets from
``PrivateCertificate.options()``: note its defaults (server cipher order, no
session tickets, SSL_MODE_RELEASE_BUFFERS) differ from tlsuv's.  The
negotiated cipher is still AES-128-GCM because the load generator offers
nothing else.

    python scripts/bench/echo_twisted.py --port 4442 --cert c.pem --key k.pem
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import protocol
from twisted.internet import reactor as _reactor  # installs the default reactor (epoll on Linux)
from twisted.internet import ssl as _tssl
from twisted.python import log as _log

# Twisted declares its interfaces with zope.interface, which mypy only
# understands through the mypy-zope plugin; without it every call through an
# interface (transport.write, reactor.listenSSL) is an error.  Twisted is used
# through these Any-typed names instead, so the types checked are the same
# with or without the bench extra installed.
reactor: Any = _reactor
tssl: Any = _tssl
log: Any = _log

GREETING = b"OK\r\n"
BACKLOG = 4096  # as tlsuv and the asyncio servers


class Echo(protocol.Protocol):  # type: ignore[misc, unused-ignore]  # Any without the bench extra
    def connectionMade(self) -> None:
        # Written before the handshake, as tlsuv does; the TLS layer holds it
        # until the handshake is done.
        transport: Any = self.transport
        transport.write(GREETING)

    def dataReceived(self, data: bytes) -> None:
        transport: Any = self.transport
        transport.write(data)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cert", required=True, help="PEM certificate")
    p.add_argument("--key", required=True, help="PEM private key")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Twisted logs nothing per connection, only start/stop and errors.
    log.startLogging(sys.stderr, setStdout=False)
    pem = Path(args.cert).read_bytes() + Path(args.key).read_bytes()
    options = tssl.PrivateCertificate.loadPEM(pem).options()
    port = reactor.listenSSL(args.port, protocol.Factory.forProtocol(Echo), options,
                             backlog=BACKLOG, interface=args.host)
    print(f"twisted+pyopenssl echo server listening on {args.host}:{port.getHost().port} "
          f"({type(reactor).__module__}.{type(reactor).__name__})", flush=True)
    reactor.run()  # stops on SIGINT/SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
