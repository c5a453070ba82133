"""The exceptions tlsuv raises and reports.

A connection that ends for any reason other than a clean TLS close is handed
one of these as the *reason* of ``Handler.closed``.  The hierarchy is small on
purpose: callers usually care whether the close was clean (``None``), whether
the peer misbehaved at the TLS level (:class:`TLSError`), whether the
transport failed under us (:class:`TransportError`), or whether we gave up
waiting (:class:`TimeoutError`).  Every one raised from a lower-level error is
raised ``from`` it, so the OpenSSL or libuv detail stays on ``__cause__``.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from OpenSSL import SSL


class TLSUVError(Exception):
    """Base class of every tlsuv error."""


class TLSError(TLSUVError):
    """OpenSSL refused the peer's bytes or our request.

    ``reason`` is OpenSSL's short reason string (e.g. ``"wrong version number"``),
    ``alert`` the TLS alert description we sent the peer when known.
    """

    def __init__(self, message: str, *, reason: str | None = None, alert: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.alert = alert


class HandshakeError(TLSError):
    """The TLS handshake failed or the peer went away before finishing it."""


class CertificateVerifyError(HandshakeError):
    """The peer's certificate did not verify: untrusted, expired, wrong host name...

    ``verify_code`` is OpenSSL's ``X509_V_ERR_*`` number and ``verify_message``
    its text (e.g. ``"hostname mismatch"``, ``"unable to get local issuer
    certificate"``).
    """

    def __init__(self, message: str, *, verify_code: int, verify_message: str,
                 reason: str | None = None, alert: str | None = None):
        super().__init__(message, reason=reason, alert=alert)
        self.verify_code = verify_code
        self.verify_message = verify_message


class TruncationError(TLSUVError):
    """The peer closed TCP without sending close_notify (RFC 8446 section 6.1).

    The data received before it was delivered, but it may be incomplete: an
    attacker can cut a stream short, and only close_notify proves the end.
    """


class TransportError(TLSUVError):
    """libuv reported a socket error (reset, broken pipe, ...)."""

    def __init__(self, message: str, *, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class TimeoutError(TLSUVError, builtins.TimeoutError):
    """A deadline passed.  ``phase`` names which.

    ``connect``, ``proxy header``, ``handshake``, ``idle`` and ``close`` are
    the connection's phase deadlines; ``send`` means data queued for the peer
    made no progress for the send timeout (tlsuv's timer, or the kernel's
    TCP_USER_TIMEOUT), ``keepalive`` that the peer answered none of TCP's
    keepalive probes.  The kernel's verdicts keep libuv's error
    (a :class:`TransportError`, ``connection timed out``) as ``__cause__``.
    """

    def __init__(self, message: str, *, phase: str):
        super().__init__(message)
        self.phase = phase


class ConnectionClosedError(TLSUVError):
    """An operation was asked of a connection that is closing or closed."""


class HandlerError(TLSUVError):
    """A handler callback raised; the connection was aborted because of it."""


class ProtocolError(TLSUVError):
    """The peer broke a framing rule outside TLS itself (e.g. a PROXY header)."""


def describe_openssl_error(exc: SSL.Error) -> str:
    """OpenSSL's reason string(s) from a pyOpenSSL error, e.g. ``wrong version number``."""
    parts: list[str] = []
    for entry in exc.args[0] if exc.args and isinstance(exc.args[0], list) else ():
        if isinstance(entry, tuple) and len(entry) == 3:
            parts.append(str(entry[2]))
    if parts:
        return "; ".join(parts)
    return str(exc) or type(exc).__name__


class RefusedError(TLSUVError):
    """The server refused the connection: one of its limits (connections per client) was reached."""
