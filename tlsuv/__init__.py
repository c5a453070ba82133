"""tlsuv: TLS over libuv (pyuv) with pyOpenSSL memory BIOs.

The public surface::

    Server, Connection, ConnectionOptions, Handler, TLSEngine,
    self_signed, server_context, load_bundle, ServerPolicy, build_server_context,
    ContextSet, build_context_set,
    ProxyOptions, and the errors;
    speedups_active() and data_path(): whether the compiled data path
    (tlsuv._speedups) runs, or the pure-Python one, and why.

The client lives in :mod:`tlsuv.client` (``tlsuv.client.connect``), a package
so that ``python -m tlsuv.client`` runs its ``__main__.py`` without executing
the library twice; it is not imported here, to keep ``import tlsuv`` to what
a server needs.
"""

from ._openssl import data_path, speedups_active
from .certs import CertificateBundle, CertificateError, load_bundle, self_signed, server_context
from .connection import Connection, ConnectionOptions
from .errors import (
    CertificateVerifyError,
    ConnectionClosedError,
    HandlerError,
    HandshakeError,
    ProtocolError,
    RefusedError,
    TimeoutError,
    TLSError,
    TLSUVError,
    TransportError,
    TruncationError,
)
from .handler import Handler, HandlerFactory
from .policy import ContextSet, PolicyError, ServerPolicy, build_context_set, build_server_context
from .proxy import ProxyOptions
from .server import Server, ServerError
from .tls import OP_ALLOW_CLIENT_RENEGOTIATION, State, TLSEngine

__version__ = "0.1.0"

__all__ = [
    "OP_ALLOW_CLIENT_RENEGOTIATION",
    "CertificateBundle",
    "CertificateError",
    "CertificateVerifyError",
    "Connection",
    "ConnectionClosedError",
    "ConnectionOptions",
    "ContextSet",
    "Handler",
    "HandlerError",
    "HandlerFactory",
    "HandshakeError",
    "PolicyError",
    "ProtocolError",
    "ProxyOptions",
    "RefusedError",
    "Server",
    "ServerError",
    "ServerPolicy",
    "State",
    "TLSEngine",
    "TLSError",
    "TLSUVError",
    "TimeoutError",
    "TransportError",
    "TruncationError",
    "build_context_set",
    "build_server_context",
    "data_path",
    "load_bundle",
    "self_signed",
    "server_context",
    "speedups_active",
]
