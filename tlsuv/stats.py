"""What a server counts, and how an ended connection is classified: the I/O-free half of observability.

Why this module exists
======================

An operator asks what is failing and why, and which clients and protocols
are out there.  The answers come from two places, and neither may cost
anything per message:

* **Per connection, once, when it ends.**  :meth:`Stats.connection_ended`
  runs from ``Server._connection_gone`` (libuv's close callback, exactly once
  per connection) and classifies the connection from its ``closed`` reason
  (the :mod:`tlsuv.errors` hierarchy) and its state: how it closed, why its
  handshake failed if it did, which TLS version, cipher and ALPN protocol it
  used, whether it resumed a session, how long its handshake took.
* **Per scrape, for the connections still open.**  :meth:`Stats.snapshot`
  adds the open connections' share (bytes so far, completed handshakes and
  their parameters) to the ended ones, so a long-lived connection shows up
  at once, not when it ends.  When it ends, its share moves from the open
  part to the ended part unchanged, so every counter only goes up.

The data path keeps its plain integer counters (``Connection.bytes_in``,
``bytes_out``) and nothing else: no registry, no lock, no label lookup per
message.  A :class:`Snapshot` is plain data (JSON in and out, and ``+``), so
``--workers`` adds the workers' snapshots up in the parent (tlsuv.workers),
and :mod:`tlsuv.metrics` turns one into Prometheus metric families.

Labels stay bounded
===================

Every label value here comes from a fixed set (the reasons below), from
OpenSSL's own short lists (protocol versions, the ciphers the server was
configured with), from the server's configured ALPN protocols (a server only
ever selects one of its own), or from the configured certificate names.
Nothing a client can invent -- its address, the SNI name it sends -- becomes
a label; those go to the access log (tlsuv.accesslog) instead.

The traps
=========

* **Read version and cipher from the SSL object, not the engine.**
  ``TLSEngine.version`` is None once the engine has FAILED, which is also
  how a truncated connection ends; a connection whose handshake completed
  still has its SSL object (and its negotiated parameters) when it is gone.
* **A peer that closes during the handshake is not a protocol error.**  The
  engine raises :class:`~tlsuv.errors.HandshakeError` without an OpenSSL
  reason for it (EOF or close_notify before the handshake finished): that
  is ``peer_closed``, the commonest failure there is (port scanners, health
  checks that only connect).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Final

from OpenSSL import SSL

from . import _openssl
from .errors import (
    CertificateVerifyError,
    HandlerError,
    HandshakeError,
    ProtocolError,
    TimeoutError,
    TLSError,
    TransportError,
    TruncationError,
)

if TYPE_CHECKING:
    from .connection import Connection
    from .policy import ServerPolicy

# Upper bounds (seconds) of the handshake-duration histogram's buckets.  A
# handshake costs about a millisecond of CPU, so on loopback or a LAN it lands
# in the first buckets; across the internet it takes one or two round trips
# (10-300 ms); past a second the client or the server is overloaded; and the
# default handshake timeout (10 s) ends the rest, which fail instead.
HANDSHAKE_BUCKETS: Final[tuple[float, ...]] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)

# Why a connection was refused.  All but PROXY_HEADER happen at accept, before
# the connection exists (it is not in ``accepted``); a PROXY header error ends a
# connection that was accepted (it is in ``accepted`` too, and its close reason
# is ``proxy_header`` or ``timeout_proxy_header``).
REFUSED_MAX_CONNECTIONS: Final = "max_connections"
REFUSED_PER_IP: Final = "per_ip_limit"
REFUSED_NOT_ALLOWED: Final = "proxy_not_allowed"
REFUSED_CLOSING: Final = "server_closing"
REFUSED_PROXY_HEADER: Final = "proxy_header"
REFUSAL_REASONS: Final = (REFUSED_MAX_CONNECTIONS, REFUSED_PER_IP, REFUSED_NOT_ALLOWED, REFUSED_CLOSING,
                          REFUSED_PROXY_HEADER)

# How a connection ended: one value per connection, from its ``closed`` reason.
CLOSE_REASONS: Final = (
    "clean",  # None: close_notify both ways, or ours and the peer's EOF
    "truncated",  # TruncationError: EOF without close_notify after the handshake
    "timeout_proxy_header", "timeout_handshake", "timeout_idle", "timeout_close", "timeout_connect",
    "timeout_send",  # queued data made no progress for --send-timeout (or TCP_USER_TIMEOUT)
    "timeout_keepalive",  # the peer stopped answering TCP keepalive probes
    "timeout",  # a TimeoutError with a phase of an application's own
    "transport",  # TransportError: reset, broken pipe, ...
    "handler_error",  # HandlerError: a handler callback raised
    "handshake_failed",  # HandshakeError (CertificateVerifyError included)
    "tls_error",  # another TLSError, after the handshake
    "proxy_header",  # ProtocolError: a malformed, missing or cut PROXY header
    "aborted",  # ConnectionClosedError (abort(), the end of a grace period) or an application's reason
)

# Why a handshake did not complete: one value per connection that ended before it did.
HANDSHAKE_FAILURES: Final = (
    "timeout",  # the handshake deadline passed
    "proxy_header",  # the PROXY header before TLS was bad or late: TLS never started
    "protocol",  # OpenSSL refused the peer's bytes: not TLS, no common version/cipher/ALPN, ...
    "peer_alert",  # the peer refused ours with a fatal alert (other than about our certificate)
    "certificate_rejected",  # the peer's alert says it does not accept our certificate
    "client_certificate",  # the client's certificate did not verify, or a required one was missing
    "peer_closed",  # EOF or close_notify before the handshake finished
    "transport",  # a socket error (reset) during the handshake
    "handler_error",  # a handler callback raised before the handshake finished
    "aborted",  # aborted locally (server shutdown, abort())
    "closed",  # closed locally before the handshake could finish (a graceful shutdown)
)

_TIMEOUT_PHASES: Final = {"proxy header": "timeout_proxy_header", "handshake": "timeout_handshake",
                          "idle": "timeout_idle", "close": "timeout_close", "connect": "timeout_connect",
                          "send": "timeout_send", "keepalive": "timeout_keepalive"}


def close_reason(reason: BaseException | None) -> str:
    """The ``closed`` reason of a connection as one of :data:`CLOSE_REASONS`."""
    if reason is None:
        return "clean"
    if isinstance(reason, TruncationError):
        return "truncated"
    if isinstance(reason, TimeoutError):
        return _TIMEOUT_PHASES.get(reason.phase, "timeout")
    if isinstance(reason, TransportError):
        return "transport"
    if isinstance(reason, HandlerError):
        return "handler_error"
    if isinstance(reason, HandshakeError):
        return "handshake_failed"
    if isinstance(reason, TLSError):
        return "tls_error"
    if isinstance(reason, ProtocolError):
        return "proxy_header"
    return "aborted"


def handshake_failure(reason: BaseException | None) -> str:
    """Why a connection ended before its handshake completed: one of :data:`HANDSHAKE_FAILURES`."""
    if reason is None:
        return "closed"
    if isinstance(reason, ProtocolError):
        return "proxy_header"
    if isinstance(reason, TimeoutError):
        if reason.phase == "proxy header":
            return "proxy_header"
        return "closed" if reason.phase == "close" else "timeout"
    if isinstance(reason, CertificateVerifyError):
        return "client_certificate"
    if isinstance(reason, TLSError):
        return _tls_failure(reason)
    if isinstance(reason, TransportError):
        return "transport"
    if isinstance(reason, HandlerError):
        return "handler_error"
    return "aborted"


def _tls_failure(reason: TLSError) -> str:
    if isinstance(reason.__cause__, SSL.SysCallError):
        return "transport"
    text = (reason.reason or "").lower()
    if not text:
        return "peer_closed"  # the engine's own: EOF or close_notify mid-handshake
    if "did not return a certificate" in text or "certificate required" in text:
        return "client_certificate"
    if "alert" in text and not text.startswith("no "):
        # OpenSSL names a received alert "tlsv1 alert unknown ca", "ssl/tls alert
        # bad certificate", ...; the alerts we send are in reason.alert instead.
        return "certificate_rejected" if ("certificate" in text or "unknown ca" in text) else "peer_alert"
    return "protocol"


def _add_counts(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return out


@dataclass
class Snapshot:
    """Everything a server counted, at one moment: plain data, JSON in and out, added with ``+``."""

    accepted: int = 0
    open: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    handshakes: int = 0  # completed (open and ended connections)
    handshake_failures: dict[str, int] = field(default_factory=dict)
    # Per bucket of HANDSHAKE_BUCKETS, not cumulative; the last one is +Inf.
    handshake_buckets: list[int] = field(default_factory=lambda: [0] * (len(HANDSHAKE_BUCKETS) + 1))
    handshake_seconds: float = 0.0  # the histogram's sum
    closed: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    resumed: int = 0
    renegotiations: int = 0
    versions: dict[str, int] = field(default_factory=dict)
    ciphers: dict[str, int] = field(default_factory=dict)
    alpn: dict[str, int] = field(default_factory=dict)
    # Served certificate name ("default", or an SNI name as configured) -> not-after, epoch seconds.
    certificates: dict[str, float] = field(default_factory=dict)
    reloads_ok: int = 0
    reloads_failed: int = 0
    last_reload_time: float = 0.0  # epoch seconds of the last good reload; 0: none yet
    accepting: bool = False

    def __add__(self, other: Snapshot) -> Snapshot:
        certs = dict(self.certificates)
        for name, t in other.certificates.items():
            # Workers should serve the same certificates; the oldest one still
            # served anywhere is the one an expiry alert must see.
            certs[name] = min(t, certs.get(name, t))
        return Snapshot(
            accepted=self.accepted + other.accepted,
            open=self.open + other.open,
            refused=_add_counts(self.refused, other.refused),
            handshakes=self.handshakes + other.handshakes,
            handshake_failures=_add_counts(self.handshake_failures, other.handshake_failures),
            handshake_buckets=[a + b for a, b in zip(self.handshake_buckets, other.handshake_buckets,
                                                     strict=True)],
            handshake_seconds=self.handshake_seconds + other.handshake_seconds,
            closed=_add_counts(self.closed, other.closed),
            bytes_in=self.bytes_in + other.bytes_in,
            bytes_out=self.bytes_out + other.bytes_out,
            resumed=self.resumed + other.resumed,
            renegotiations=self.renegotiations + other.renegotiations,
            versions=_add_counts(self.versions, other.versions),
            ciphers=_add_counts(self.ciphers, other.ciphers),
            alpn=_add_counts(self.alpn, other.alpn),
            certificates=certs,
            reloads_ok=self.reloads_ok + other.reloads_ok,
            reloads_failed=self.reloads_failed + other.reloads_failed,
            last_reload_time=max(self.last_reload_time, other.last_reload_time),
            accepting=self.accepting or other.accepting,
        )

    def retired(self) -> Snapshot:
        """What stays of a process that is gone: its counts, none of its open connections."""
        out = self + Snapshot()
        out.open = 0
        out.accepting = False
        return out

    def to_message(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> Snapshot:
        """Rebuild from :meth:`to_message`; anything malformed is dropped, never trusted."""
        out = cls()
        for f in fields(cls):
            value = message.get(f.name)
            default = getattr(out, f.name)
            if isinstance(default, bool):
                if isinstance(value, bool):
                    setattr(out, f.name, value)
            elif isinstance(default, int):
                if isinstance(value, int) and not isinstance(value, bool):
                    setattr(out, f.name, value)
            elif isinstance(default, float):
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    setattr(out, f.name, float(value))
            elif isinstance(default, list):
                if isinstance(value, list) and len(value) == len(default) \
                        and all(isinstance(v, int) for v in value):
                    setattr(out, f.name, list(value))
            elif isinstance(default, dict) and isinstance(value, dict):
                kind = float if f.name == "certificates" else int
                setattr(out, f.name, {str(k): kind(v) for k, v in value.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return out


# What a completed handshake negotiated, read from OpenSSL once per connection:
# (handshake seconds or None, version, cipher, ALPN protocol or None, resumed).
_Params = tuple[float | None, str, str | None, str | None, bool]


def _params(conn: Connection) -> _Params:
    return (conn.handshake_seconds, *_openssl.negotiated(conn.ssl))


class _Handshakes:
    """Counts of completed handshakes: a number, a histogram, and what they negotiated."""

    def __init__(self) -> None:
        self.count = 0
        self.buckets = [0] * (len(HANDSHAKE_BUCKETS) + 1)
        self.seconds = 0.0
        self.versions: dict[str, int] = {}
        self.ciphers: dict[str, int] = {}
        self.alpn: dict[str, int] = {}
        self.resumed = 0

    def add(self, p: _Params, n: int = 1) -> None:
        """Count one handshake (``n=-1``: take one back, when an open one moves to the ended)."""
        seconds, version, cipher, alpn, resumed = p
        self.count += n
        if seconds is not None:
            # len(HANDSHAKE_BUCKETS), past the last bound: the +Inf bucket.
            self.buckets[bisect_left(HANDSHAKE_BUCKETS, seconds)] += n
            self.seconds += n * seconds
        self.versions[version] = self.versions.get(version, 0) + n
        if cipher is not None:
            self.ciphers[cipher] = self.ciphers.get(cipher, 0) + n
        if alpn is not None:
            self.alpn[alpn] = self.alpn.get(alpn, 0) + n
        self.resumed += n * resumed


class Stats:
    """A server's counts of ended connections, and the snapshot that adds the open ones.

    ``Server`` owns one (``server.stats``) and calls :meth:`connection_ended`
    once per connection.  The reload counters and the certificate expiry are
    set by whoever loads certificates (the echo server, a reloader).

    A scrape reads an open connection's negotiated parameters from OpenSSL
    once, the first time it sees the handshake completed, and keeps them
    (``_seen``, a few dozen bytes per open connection) until the connection
    ends: so a scrape costs a pass over the open connections, not five
    OpenSSL calls for each of them every time.
    """

    def __init__(self) -> None:
        self.handshake_failures: dict[str, int] = {}
        self.closed: dict[str, int] = {}
        self.renegotiations = 0
        self._ended = _Handshakes()
        self._open = _Handshakes()  # what the connections in _seen add
        self._seen: dict[Connection, _Params] = {}
        # Set by the code that loads and reloads certificates.
        self.certificates: dict[str, float] = {}
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.last_reload_time = 0.0

    @property
    def handshakes(self) -> int:
        """Completed handshakes of the connections that have ended (a snapshot adds the open ones)."""
        return self._ended.count

    def connection_ended(self, conn: Connection) -> None:
        """Classify ``conn`` (gone: ``Handler.closed`` has run) and count it."""
        reason = conn.reason
        closed = close_reason(reason)
        self.closed[closed] = self.closed.get(closed, 0) + 1
        if conn.handshake_completed:
            p = self._seen.pop(conn, None)
            if p is not None:
                self._open.add(p, -1)
            else:
                p = _params(conn)
            self._ended.add(p)
            self.renegotiations += int(conn.ssl.total_renegotiations())
        else:
            failure = handshake_failure(reason)
            self.handshake_failures[failure] = self.handshake_failures.get(failure, 0) + 1

    def snapshot(self, *, accepted: int, refused: Mapping[str, int], ended_bytes_in: int,
                 ended_bytes_out: int, live: Iterable[Connection], accepting: bool) -> Snapshot:
        """The ended connections' counts plus the open connections' share, now.

        Renegotiations count when a connection ends.
        """
        seen = self._seen
        opened = self._open
        count = 0
        bytes_in = ended_bytes_in
        bytes_out = ended_bytes_out
        for conn in live:
            count += 1
            bytes_in += conn.bytes_in
            bytes_out += conn.bytes_out
            if conn not in seen and conn.handshake_completed:
                p = seen[conn] = _params(conn)
                opened.add(p)
        ended = self._ended
        return Snapshot(
            accepted=accepted,
            open=count,
            refused={k: v for k, v in refused.items() if v},
            handshakes=ended.count + opened.count,
            handshake_failures=dict(self.handshake_failures),
            handshake_buckets=[a + b for a, b in zip(ended.buckets, opened.buckets, strict=True)],
            handshake_seconds=ended.seconds + opened.seconds,
            closed=dict(self.closed),
            bytes_in=bytes_in,
            bytes_out=bytes_out,
            resumed=ended.resumed + opened.resumed,
            renegotiations=self.renegotiations,
            versions={k: v for k, v in _add_counts(ended.versions, opened.versions).items() if v},
            ciphers={k: v for k, v in _add_counts(ended.ciphers, opened.ciphers).items() if v},
            alpn={k: v for k, v in _add_counts(ended.alpn, opened.alpn).items() if v},
            certificates=dict(self.certificates),
            reloads_ok=self.reloads_ok,
            reloads_failed=self.reloads_failed,
            last_reload_time=self.last_reload_time,
            accepting=accepting,
        )


def certificate_expiry(policy: ServerPolicy) -> dict[str, float]:
    """Not-after (epoch seconds) of each certificate ``policy`` serves: ``default`` and each SNI name.

    For :attr:`Stats.certificates`; whoever loads or reloads certificates sets it.
    """
    from cryptography import x509  # noqa: PLC0415 - only at start-up and reload

    bundles = {"default": policy.certificate, **policy.sni}
    out: dict[str, float] = {}
    for name, bundle in bundles.items():
        if bundle is not None:
            cert = x509.load_pem_x509_certificate(bundle.cert_pem)
            out[name] = cert.not_valid_after_utc.timestamp()
    return out
