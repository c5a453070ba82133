"""tlsuv: TLS over libuv (pyuv) with pyOpenSSL memory BIOs.

The public surface::

    Server, Connection, ConnectionOptions, Handler, TLSEngine,
    self_signed, server_context, load_bundle, and the errors.
"""

from .certs import CertificateBundle, CertificateError, load_bundle, self_signed, server_context
from .connection import Connection, ConnectionOptions
from .errors import (
    ConnectionClosedError,
    HandlerError,
    HandshakeError,
    ProtocolError,
    TimeoutError,
    TLSError,
    TLSUVError,
    TransportError,
    TruncationError,
)
from .handler import Handler, HandlerFactory
from .server import Server, ServerError
from .tls import OP_ALLOW_CLIENT_RENEGOTIATION, State, TLSEngine

__version__ = "0.1.0"

__all__ = [
    "OP_ALLOW_CLIENT_RENEGOTIATION",
    "CertificateBundle",
    "CertificateError",
    "Connection",
    "ConnectionClosedError",
    "ConnectionOptions",
    "Handler",
    "HandlerError",
    "HandlerFactory",
    "HandshakeError",
    "ProtocolError",
    "Server",
    "ServerError",
    "State",
    "TLSEngine",
    "TLSError",
    "TLSUVError",
    "TimeoutError",
    "TransportError",
    "TruncationError",
    "load_bundle",
    "self_signed",
    "server_context",
]
