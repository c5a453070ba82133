"""One TLS connection over one pyuv TCP handle: the seed's ``tls_uv_connection_state_t``.

This is where the I/O-free :class:`~tlsuv.tls.TLSEngine` meets libuv.  The
data path is the seed's:

* ``start_read`` once; every chunk libuv reads goes to ``bio_write`` and
  ``recv`` is drained, each plaintext chunk pushed to ``Handler.read``
  (:meth:`Connection._on_read`, the seed's ``handle_read``);
* :meth:`Connection.write` encrypts at once, or keeps a *deferred write* when
  OpenSSL must read first (the seed's ``connection_write``);
* either way the connection goes on the pending list, and the ``after_io``
  pass (:meth:`Connection._after_io`, the seed's ``try_flush_ssl_state``)
  retries deferred writes and sends what the outgoing BIO holds
  (:meth:`Connection._flush`, the seed's ``flush_ssl_buffer``).  One
  shortcut: what a handler writes while handling a read (an echo, a
  response) is flushed as the read callback returns -- still one write(2)
  for all of it, without the trip through the pending list.  Deferred
  writes, closes and paused writers always take the after_io pass.

The lifecycle
=============

A connection moves forward through these phases and never back
(:class:`Phase`; ``_set_phase`` is the one guard, ``_NEXT`` the one table).
The TLS engine has its own, finer states (:class:`~tlsuv.tls.State`); a phase
is what the *connection* is doing with its socket, its timer and its handler::

    CONNECTING ---(connected)----+                       (client only)
    PROXY_HEADER -(header read)--+--> HANDSHAKING --(handshake done)--> OPEN
                                       |                                  |
            close() with writes queued +--> CLOSING <--- close(), or the -+
                                              |         peer's close_notify
                         close_notify queued  v
                                           SHUTDOWN --(on the wire; TCP FIN sent)--> HALF_CLOSED
    any phase --(EOF, an error, a timeout, abort(), the end of a graceful close)--> FINISHED

=============  =======================================  ==========================  ==============
phase          what moves it on                          handler callbacks that run  deadline
=============  =======================================  ==========================  ==============
CONNECTING     the connect succeeds (tlsuv.client)      none (``closed`` on failure) ``connect``
PROXY_HEADER   the PROXY header is complete             ``established`` as it ends   ``proxy header``
HANDSHAKING    OpenSSL finishes the handshake           ``established`` (first),     ``handshake``
                                                        ``handshake_complete`` (last),
                                                        ``pause_writing``
OPEN           ``close()``, the peer's close_notify     ``read``, ``pause_writing``, ``idle``
                                                        ``resume_writing``
CLOSING        deferred writes done, close_notify       ``read``, ``resume_writing``, ``close``
               queued                                   ``handshake_complete``
SHUTDOWN       close_notify reached the kernel          ``read`` only after          ``close``
                                                        ``write_eof()``
HALF_CLOSED    the peer's close_notify or EOF           as SHUTDOWN                  ``close``
FINISHED       --                                       ``closed``, exactly once,   none
                                                        from libuv's close callback
(every phase   --                                       --                          also ``send`` (a second
but FINISHED)                                                                       timer, while libuv holds
                                                                                    data) and the kernel's
                                                                                    ``keepalive`` (below)
=============  =======================================  ==========================  ==============

The deadline column is the connection's one timer: entering a phase arms
that phase's deadline (if the options set one) or stops the timer, so the
timer's meaning is always the current phase.  Its name is the ``phase`` of
the :class:`~tlsuv.errors.TimeoutError` when it passes.  ``close()`` before
the handshake can run (CONNECTING, PROXY_HEADER) with writes queued is kept
as a request and applied when the handshake starts.

Flow is a second, independent dimension, not a phase, in any phase before
FINISHED: the writer may be paused (``writing_paused``: more than the
high-water mark queued), the handler may pause reading, and the **send
deadline** runs while libuv's write queue holds data::

    libuv's write queue   the send timer (``_send_timer``)      on expiry
    -------------------   ------------------------------------  ------------------------------
    empty                 none: not even made (the common case:  --
                          write(2) took everything)
    data goes to          made and started, ``send_timeout``     the kernel took bytes since it
    ``tcp.write``         from now                               was armed: re-armed; else
                                                                 TimeoutError(phase="send"),
    a write callback,     restarted (a request reached the       closed with a reset
    queue still non-empty kernel: progress)
    drained; FINISHED     closed                                 --

So it can overlap the idle and close deadlines, and whichever passes first
ends the connection.  Because it is a second timer, not the phase timer, the
phase table above stays one deadline per phase.  The kernel watches the other
half, data it holds itself: TCP_USER_TIMEOUT is set to the same value
(:mod:`tlsuv._sockopt`), and when it gives up, or when keepalive probes go
unanswered, the read or write fails with ETIMEDOUT; :meth:`Connection._gave_up`
reports that as ``TimeoutError(phase="send")`` or ``"keepalive"`` (libuv's
error on ``__cause__``).

What the seed left out, and this module adds:

* **Exactly one ending.**  EOF, a libuv error, an OpenSSL error, a timeout, a
  handler exception, ``close()`` and ``abort()`` all end in :meth:`_finish`,
  which takes the connection off the pending list, stops its timer, closes
  both handles and, from libuv's close callback (so the handle really is
  gone), calls ``Handler.closed`` once with the reason.  After that nothing
  is written and ``write()`` raises :class:`ConnectionClosedError`.
* **Graceful close.**  ``close()`` lets deferred writes finish, sends
  close_notify, waits for libuv to write it, half-closes TCP and then waits
  (at most ``close_timeout``) for the peer's close_notify or EOF.  Peers that
  never answer (common with TLS 1.3) cost a timer, not a leak.
* **Alerts reach the peer.**  On a fatal TLS error the alert OpenSSL wrote is
  flushed before the socket closes.
* **Flow control.**  Everything queued for the peer (deferred plaintext, TLS
  output not yet flushed, libuv's write queue) is compared with high and low
  water marks; the handler is told to pause and resume writing, and may
  pause and resume reading.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import pyuv
from OpenSSL import SSL

from . import _openssl, _sockopt
from ._sockopt import KEEPALIVE_MAX
from ._uv import format_address, socket_address, uv_error_text
from .errors import (
    ConnectionClosedError,
    HandlerError,
    ProtocolError,
    TimeoutError,
    TLSUVError,
    TransportError,
)
from .proxy import ProxyHeader, ProxyOptions, ProxyParser
from .tls import (
    CLOSED,
    COMPACT_MIN,
    ESTABLISHED,
    HANDSHAKING,
    OUTPUT_MAX,
    PEER_CLOSED,
    SHUTDOWN_SENT,
    State,
    TLSEngine,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from cryptography import x509

    from .handler import Handler, HandlerFactory
    from .pending import PendingList

log = logging.getLogger("tlsuv")

_os_write = os.write
_EOF = pyuv.errno.UV_EOF
# How the kernel reports that it gave up on a peer (see Connection._gave_up): libuv's
# numbers from callbacks, the system's from a direct write(2).
_GAVE_UP: Final = frozenset({
    pyuv.errno.UV_ETIMEDOUT, pyuv.errno.UV_EHOSTUNREACH, pyuv.errno.UV_ENETUNREACH,
    errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH,
})


class Phase(enum.IntEnum):
    """Where a :class:`Connection` is in its life (see the table at the top of this module).

    An ``IntEnum`` because the lifecycle only moves forward: ``phase >= CLOSING``
    reads as "closing or later", and int comparison is cheap on the data path.
    """

    CONNECTING = 0
    PROXY_HEADER = 1
    HANDSHAKING = 2
    OPEN = 3
    CLOSING = 4
    SHUTDOWN = 5
    HALF_CLOSED = 6
    FINISHED = 7


# Module constants for the data path: on Python 3.11 ``Phase.X`` goes through
# EnumType.__getattr__ (~75 ns a lookup), a global is one dict lookup.
P_CONNECTING: Final = Phase.CONNECTING
P_PROXY_HEADER: Final = Phase.PROXY_HEADER
P_HANDSHAKING: Final = Phase.HANDSHAKING
P_OPEN: Final = Phase.OPEN
P_CLOSING: Final = Phase.CLOSING
P_SHUTDOWN: Final = Phase.SHUTDOWN
P_HALF_CLOSED: Final = Phase.HALF_CLOSED
P_FINISHED: Final = Phase.FINISHED

# The one table of allowed moves.  Every phase may end (FINISHED).
_NEXT: Final[dict[Phase, frozenset[Phase]]] = {
    P_CONNECTING: frozenset({P_HANDSHAKING, P_FINISHED}),
    P_PROXY_HEADER: frozenset({P_HANDSHAKING, P_FINISHED}),
    P_HANDSHAKING: frozenset({P_OPEN, P_CLOSING, P_FINISHED}),
    P_OPEN: frozenset({P_CLOSING, P_FINISHED}),
    P_CLOSING: frozenset({P_SHUTDOWN, P_FINISHED}),
    P_SHUTDOWN: frozenset({P_HALF_CLOSED, P_FINISHED}),
    P_HALF_CLOSED: frozenset({P_FINISHED}),
    P_FINISHED: frozenset(),
}

# Each phase's deadline, by the name TimeoutError.phase reports.  The three
# closing phases share one deadline: the close timer runs on across them.
DEADLINES: Final[dict[Phase, str]] = {
    P_CONNECTING: "connect",
    P_PROXY_HEADER: "proxy header",
    P_HANDSHAKING: "handshake",
    P_OPEN: "idle",
    P_CLOSING: "close",
    P_SHUTDOWN: "close",
    P_HALF_CLOSED: "close",
}


class InvalidPhaseTransition(RuntimeError):
    """A bug in tlsuv: a connection was asked to make a move its lifecycle does not have."""


@dataclass(frozen=True)
class ConnectionOptions:
    """Per-connection limits.  Times are in seconds; ``None`` turns a deadline off."""

    # A peer must finish the handshake in this time.  asyncio allows 60 s; Go
    # TLS terminators use 10 s.  A slow mobile link finishes in well under 10 s,
    # and a silent socket should not hold memory for a minute.
    handshake_timeout: float | None = 10.0
    # Off by default: an echo or proxy cannot know how long its peers think.
    idle_timeout: float | None = None
    # How long a graceful close waits for libuv to drain and the peer to
    # answer close_notify before the socket is simply closed.
    close_timeout: float | None = 5.0
    # TCP keepalive: seconds of silence from the peer before TCP probes it
    # (whole seconds, the kernel's unit; tlsuv._sockopt sets the interval and
    # count).  30 s finds a vanished idle peer in 60 s with the send timeout
    # below (120 s without it) instead of the kernel's two hours, and keeps
    # NAT and firewall state alive for a few bytes a minute per connection.
    keepalive: int | None = 30
    # Data queued for the peer that makes no progress this long ends the
    # connection (nginx's send_timeout and its 60 s default); also the
    # kernel's TCP_USER_TIMEOUT, for data it holds itself.
    send_timeout: float | None = 60.0
    # Water marks over all bytes queued for the peer.  asyncio's defaults
    # (64 KiB / 16 KiB): four full TLS records in flight keep the pipe busy,
    # and at 10,000 connections the worst case stays under a GiB.
    high_water: int = 64 * 1024
    low_water: int = 16 * 1024
    allow_client_renegotiation: bool = False
    # Expect a PROXY protocol header before TLS (behind a load balancer); see tlsuv.proxy.
    proxy: ProxyOptions | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.low_water <= self.high_water:
            raise ValueError("water marks need 0 <= low_water <= high_water")
        for name in ("handshake_timeout", "idle_timeout", "close_timeout", "send_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None")
        keepalive = self.keepalive
        if keepalive is not None and (type(keepalive) is not int or not 1 <= keepalive <= KEEPALIVE_MAX):
            raise ValueError(f"keepalive must be whole seconds, 1-{KEEPALIVE_MAX}, or None")


class Connection:
    """A TLS connection.  Made by :class:`~tlsuv.Server` (or :mod:`tlsuv.client`); handed to the handler.

    For subclasses (the client's connecting connection) the protected
    surface is: ``_tcp`` (the handle, replaced while connecting), ``_phase``,
    ``_start()`` (the socket is connected: begin), ``_arm_timer()``,
    ``_abort()`` and ``_timeout_error()``.
    """

    __slots__ = (
        "__weakref__",
        "_close_requested",
        "_compact_queued",
        "_fd",
        "_handler",
        "_held",
        "_in_read",
        "_last_activity",
        "_on_finish",
        "_on_gone",
        "_on_proxy_header",
        "_options",
        "_pending",
        "_phase",
        "_proxy",
        "_reading",
        "_reading_paused",
        "_reason",
        "_send_mark",
        "_send_timer",
        "_tcp",
        "_timer",
        "_tls",
        "_unflushed",
        "_writing_paused",
        "bytes_in",
        "bytes_out",
        "created_at",
        "handshake_ms",
        "peer",
        "proxy_header",
        "proxy_peer",
        "sockname",
        "user_data",
    )

    def __init__(
        self,
        tcp: pyuv.TCP,
        context: SSL.Context,
        factory: HandlerFactory,
        *,
        pending: PendingList,
        options: ConnectionOptions,
        on_gone: Callable[[Connection], None] | None = None,
        server_side: bool = True,
        on_proxy_header: Callable[[Connection], BaseException | None] | None = None,
        on_finish: Callable[[Connection], None] | None = None,
        server_hostname: str | None = None,
        sockname: tuple[str, int] | None = None,
    ) -> None:
        self._tcp = tcp
        self._fd = -1  # the socket, for direct writes; looked up at the first _flush
        self._pending = pending
        self._options = options
        self._on_gone = on_gone
        self._on_proxy_header = on_proxy_header  # the server's per-client limits (tlsuv.limits)
        # Called as the connection finishes (its socket closed at once), before
        # on_gone (libuv's close callback, at the end of the loop iteration): a
        # server at its connection limit must not count a connection that ended.
        self._on_finish = on_finish
        self._tls = TLSEngine(
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            allow_client_renegotiation=options.allow_client_renegotiation,
        )
        # Behind a balancer: bytes go to this parser until the header is complete;
        # then peer/sockname become the client's and proxy_peer keeps the balancer's.
        self._proxy = ProxyParser() if options.proxy is not None and server_side else None
        if not server_side:
            self._phase = P_CONNECTING
        elif self._proxy is not None:
            self._phase = P_PROXY_HEADER
        else:
            self._phase = P_HANDSHAKING
        self._timer: pyuv.Timer | None = None  # the current phase's deadline (DEADLINES)
        # The send deadline: exists only while libuv's write queue holds data (_arm_send_timer).
        self._send_timer: pyuv.Timer | None = None
        self._send_mark = 0  # bytes the kernel had taken when the send deadline was last armed
        self._last_activity = 0.0  # loop time of the last byte in or out, for the idle deadline
        self._close_requested = False  # close() before the handshake could start
        self._reason: BaseException | None = None
        self._unflushed = 0  # plaintext handed to OpenSSL since the last flush
        self._writing_paused = False
        self._reading_paused = False  # the handler asked us to stop reading
        self._reading = False
        self._compact_queued = False  # on the pending list's compaction sweep
        self._in_read = False  # inside _on_read: writes are flushed when it returns
        # Plaintext read while the handler paused reading; made when first needed.
        self._held: list[bytes] | None = None
        self.peer = socket_address(tcp, "getpeername")
        # The server passes its listener's address when every connection has it.
        self.sockname = sockname if sockname is not None else socket_address(tcp, "getsockname")
        self.proxy_header: ProxyHeader | None = None
        self.proxy_peer: tuple[str, int] | None = None
        self.user_data: Any = None
        self.bytes_in = 0  # ciphertext bytes read from the socket
        self.bytes_out = 0  # ciphertext bytes handed to libuv
        # For monitoring (tlsuv.stats, tlsuv.accesslog), in the loop's cached
        # clock (milliseconds; no system call): when the connection was made (the
        # accept), and how long its handshake took once it completed.
        self.created_at: int = tcp.loop.now()
        self.handshake_ms: int | None = None
        self._handler: Handler | None = None
        self._handler = self._call_factory(factory)

    # -- the lifecycle -----------------------------------------------------

    def _set_phase(self, new: Phase) -> None:
        """The one guard: refuse a move the lifecycle does not have, and arm the new deadline."""
        old = self._phase
        if new not in _NEXT[old]:
            raise InvalidPhaseTransition(f"connection cannot go from {old.name} to {new.name}")
        self._phase = new
        if new is P_FINISHED:
            self._stop_timer()
        elif DEADLINES[new] != DEADLINES[old]:
            seconds = self._deadline(new)
            if seconds is None:
                self._stop_timer()
            else:
                if new is P_OPEN:
                    self._last_activity = self._tcp.loop.now()
                self._arm_timer(seconds)

    def _deadline(self, phase: Phase) -> float | None:
        options = self._options
        if phase is P_HANDSHAKING:
            return options.handshake_timeout
        if phase is P_OPEN:
            return options.idle_timeout
        if phase is P_PROXY_HEADER:
            # Without a header deadline of its own, the handshake's bounds the wait.
            timeout = options.proxy.timeout if options.proxy is not None else None
            return timeout if timeout is not None else options.handshake_timeout
        if phase is P_CONNECTING:
            return None  # the client arms its own connect timeout (tlsuv.client)
        return options.close_timeout

    def _call_factory(self, factory: HandlerFactory) -> Handler | None:
        try:
            return factory(self)
        except Exception as exc:  # the handler's bug must not take the server down
            log.error("handler factory failed for %s", format_address(self.peer), exc_info=True)
            self._abort(HandlerError(f"handler factory raised {exc!r}"), cause=exc)
            return None

    def _start(self) -> None:
        """The socket is connected: arm the first deadline, call ``established``, start reading."""
        phase = self._phase
        if phase is P_FINISHED:
            return
        if phase is P_CONNECTING:
            self._set_phase(P_HANDSHAKING)
        else:
            seconds = self._deadline(phase)
            if seconds is not None:
                self._arm_timer(seconds)
        self._reading = True
        self._tcp.start_read(self._on_read)
        if self._phase is not P_PROXY_HEADER:  # else once the header names the real peer
            self._begin_handshake()
        if not self._tls.server_side and self._phase is not P_FINISHED:
            # A client speaks first: queue the ClientHello.
            self._tls.receive(b"")
            self._pending.add(self)

    def _begin_handshake(self) -> None:
        self._callback("established")
        if self._close_requested and self._phase is P_HANDSHAKING:
            self._close_requested = False
            self.close()

    # -- public API --------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """Where the connection is in its lifecycle (:class:`Phase`)."""
        return self._phase

    @property
    def handler(self) -> Handler | None:
        return self._handler

    @property
    def state(self) -> State:
        """The TLS engine's state (:class:`~tlsuv.tls.State`), finer than :attr:`phase`."""
        return self._tls.state

    @property
    def handshake_completed(self) -> bool:
        """The TLS handshake completed (and stays True if the connection failed later)."""
        return self._tls.handshake_completed

    @property
    def handshake_seconds(self) -> float | None:
        """How long the handshake took (from the accept), or None until it completes."""
        ms = self.handshake_ms
        return None if ms is None else ms / 1000

    @property
    def closed(self) -> bool:
        """The connection has ended: nothing more is sent or read; ``Handler.closed`` runs or ran."""
        return self._phase is P_FINISHED

    @property
    def reason(self) -> BaseException | None:
        """Why the connection ended, as ``Handler.closed`` is told; None while open or after a clean end."""
        return self._reason

    @property
    def closing(self) -> bool:
        """A close has begun (or the connection has ended): ``write()`` would raise."""
        return self._phase >= P_CLOSING

    @property
    def tls_version(self) -> str | None:
        return self._tls.version

    @property
    def cipher(self) -> str | None:
        return self._tls.cipher

    @property
    def ssl(self) -> SSL.Connection:
        """The underlying pyOpenSSL connection, for inspection (peer certificate, ALPN...)."""
        return self._tls.ssl

    @property
    def tls(self) -> TLSEngine:
        """The TLS engine, for inspection (deferred writes, BIO state); do not drive it yourself."""
        return self._tls

    @property
    def renegotiations(self) -> int:
        return self._tls.renegotiations

    # Negotiated parameters (tlsuv.policy / tlsuv.client); None until the handshake says.

    @property
    def alpn_protocol(self) -> str | None:
        """The protocol ALPN settled on (e.g. ``"h2"``), or None when none was negotiated."""
        proto = self._tls.ssl.get_alpn_proto_negotiated()
        return proto.decode("ascii", "replace") if proto else None

    @property
    def server_name(self) -> str | None:
        """The SNI host name: the one the client sent (server side) or that we sent (client)."""
        name = self._tls.ssl.get_servername()
        return name.decode("ascii", "replace") if name else None

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's certificate: the server's, or a client certificate if one was sent."""
        return self._tls.ssl.get_peer_certificate(as_cryptography=True)

    @property
    def peer_subject(self) -> str | None:
        """The peer certificate's subject as an RFC 4514 string (``CN=alice,O=Example``)."""
        cert = self.peer_certificate
        return cert.subject.rfc4514_string() if cert is not None else None

    @property
    def session_reused(self) -> bool:
        """The handshake resumed an earlier TLS session instead of a full key exchange."""
        return _openssl.session_reused(self._tls.ssl)

    @property
    def buffered(self) -> int:
        """Bytes queued for the peer: deferred plaintext, unflushed TLS output, libuv's queue."""
        if self._phase is P_FINISHED:
            return 0
        return self._tls.deferred_bytes + self._unflushed + int(self._tcp.write_queue_size)

    @property
    def activity(self) -> int:
        """Grows with every byte in or out: how the compaction sweep tells idle from busy."""
        return self.bytes_in + self.bytes_out

    def _compact(self) -> None:
        self._compact_queued = False
        if self._phase < P_CLOSING:
            self._tls.compact()

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue plaintext for the peer.  Never blocks; errors arrive via ``closed``."""
        if self._phase >= P_CLOSING:
            raise ConnectionClosedError("write() on a connection that is closing or closed")
        if type(data) is not bytes:
            data = bytes(data)  # the caller may reuse its buffer once we return
        tls = self._tls
        pipe = tls.fast
        try:
            if pipe is not None and data:
                # TLSEngine.write's compiled case without the engine's frame:
                # ``fast`` is set only while this one call is all write() does.
                n = pipe.write(data)
                if n != len(data):
                    tls.settle_write(data, n)
            else:
                tls.write(data)
        except TLSUVError as exc:
            self._fail(exc)
            return
        unflushed = self._unflushed = self._unflushed + len(data)
        # Inside a read callback, _on_read flushes as it returns.  Before the
        # first handshake completes the engine only kept the data (nothing to
        # flush, nothing to retry yet); _on_handshake_complete queues it.
        if not self._in_read and tls.state is not HANDSHAKING:
            self._pending.add(self)
        if not self._writing_paused and (
            unflushed + self._tcp.write_queue_size + tls.deferred_bytes > self._options.high_water
        ):
            self._writing_paused = True
            self._callback("pause_writing")

    def close(self) -> None:
        """Graceful close: deliver what was written, send close_notify, then close.  Idempotent."""
        phase = self._phase
        if phase >= P_CLOSING:
            return
        if not self._tls.deferred:
            if phase is not P_OPEN:
                # Nothing was promised to the peer and close_notify is impossible
                # before the handshake: just go.
                self._finish(None)
                return
        elif phase < P_HANDSHAKING:
            # Writes wait for a handshake that cannot start yet (not connected,
            # no PROXY header): close once it starts (_begin_handshake).
            self._close_requested = True
            return
        self._set_phase(P_CLOSING)
        self._reading_paused = False
        self._update_reading()  # the peer's close_notify or EOF must still reach us
        self._pending.add(self)

    def write_eof(self) -> None:
        """Half-close: like :meth:`close`, but keep delivering what the peer still sends.

        close_notify goes out after everything written; ``read`` keeps being
        called until the peer's close_notify (then ``closed(None)``), its EOF,
        or the close timeout.  TLS 1.3 defines close_notify as closing only
        the sender's direction; a TLS 1.2 peer may discard what it had not
        sent yet.  Used by ``python -m tlsuv.client`` at the end of stdin.
        """
        self._tls.read_after_shutdown = True
        self.close()

    def abort(self, reason: BaseException | None = None) -> None:
        """Close at once, dropping anything unsent.  Idempotent."""
        if self._phase is P_FINISHED:
            return
        self._abort(reason or ConnectionClosedError("connection aborted locally"))

    def pause_reading(self) -> None:
        """Stop delivering ``read`` calls until :meth:`resume_reading`."""
        if self._phase is P_FINISHED or self._reading_paused:
            return
        self._reading_paused = True
        self._update_reading()

    def resume_reading(self) -> None:
        if self._phase is P_FINISHED or not self._reading_paused:
            return
        self._reading_paused = False
        held, self._held = self._held, None
        if held:
            for i, chunk in enumerate(held):
                if self.closed:  # (a property: the handler may have closed us meanwhile)
                    return
                if self._reading_paused:  # the handler paused again from inside read()
                    self._held = held[i:] + (self._held or [])
                    break
                self._deliver(chunk)
        self._update_reading()

    def _deliver_held(self) -> None:
        held, self._held = self._held, None
        for chunk in held or ():
            if self._phase is P_FINISHED:
                return
            self._deliver(chunk)

    def renegotiate(self) -> bool:
        """Start a TLS 1.2 renegotiation from the server side.

        False if one is already in progress.  Raises TLSError on TLS 1.3.
        """
        if self._phase >= P_CLOSING:
            raise ConnectionClosedError("renegotiate() on a connection that is closing or closed")
        started = self._tls.renegotiate()
        self._pending.add(self)
        return started

    # -- libuv callbacks ---------------------------------------------------

    def _on_read(self, tcp: pyuv.TCP, data: bytes | None, error: int | None) -> None:
        phase = self._phase
        if phase is P_FINISHED:
            return
        if error is not None:
            if error == _EOF:
                self._on_eof()
            else:
                self._abort(self._gave_up(TransportError(f"read failed: {uv_error_text(error)}",
                                                         errno=error)))
            return
        if not data:  # libuv's EAGAIN/EINTR arrive as empty reads
            return
        self.bytes_in += len(data)
        if phase is P_OPEN and self._timer is not None:  # the idle deadline counts from here
            self._last_activity = self._tcp.loop.now()
        if phase is P_PROXY_HEADER:
            data = self._on_proxy_data(data)
            if not data:
                return
        self._in_read = True
        try:
            self._process(data)
        finally:
            self._in_read = False
        if self._phase is P_FINISHED:
            return
        # What this read made the handler write (an echo, a response) is
        # flushed now, in one write(2), instead of by a trip through the
        # pending list: the same coalescing (every write of this callback
        # goes out together), a few hundred nanoseconds less per message.
        # Everything that needs the full after_io pass takes it.
        # Deferred writes count only once the first handshake is done: before
        # that nothing can be retried (see _after_io), and the handshake's
        # own flight goes out here like any other output.
        tls = self._tls
        if (tls.deferred and tls.state is not HANDSHAKING) or self._phase >= P_CLOSING \
                or self._writing_paused:
            self._pending.add(self)
        elif self._unflushed or tls.pending_output():
            self._flush()
        elif tls.wants_compaction and not self._compact_queued:  # a big read, nothing to answer
            self._compact_queued = True
            self._pending.compact_later(self)

    def _process(self, data: bytes) -> None:
        """Feed ciphertext to TLS (``b""``: just drain) and deliver the plaintext that comes out."""
        tls = self._tls
        pipe = tls.fast
        if pipe is not None:
            # TLSEngine.receive's compiled case without the engine's frame
            # (TLSEngine.fast): the engine settles anything but plain success.
            chunks: list[bytes] = []
            status = pipe.receive(data, chunks)
            if status != 1 or len(data) > COMPACT_MIN:
                try:
                    tls.settle_receive(len(data), status)
                except TLSUVError as exc:
                    self._fail(exc)
                    return
        else:
            was_handshaking = tls.state is HANDSHAKING
            try:
                chunks = tls.receive(data)
            except TLSUVError as exc:
                self._fail(exc)
                return
            if was_handshaking and tls.state is not HANDSHAKING:
                self._on_handshake_complete()
                if self._phase is P_FINISHED:
                    return
        handler = self._handler
        for chunk in chunks:
            if self._reading_paused:
                if self._held is None:
                    self._held = []
                self._held.append(chunk)
            elif handler is not None:
                # _deliver, inlined: one Python call less per message (the
                # 64-connection ping-pong counts it); tests/test_lifecycle.py's
                # handler-error tests cover both.
                try:
                    handler.read(self, chunk)
                except Exception as exc:
                    self._handler_failed("read", exc)
            if self._phase is P_FINISHED:
                return
        state = tls.state
        if state is not ESTABLISHED and (state is PEER_CLOSED or state is CLOSED):
            self._on_peer_closed()
            return
        # A read can leave TLS output (handshake, tickets, alerts) or make
        # deferred writes possible: the caller flushes or queues (_on_read),
        # or is the after_io pass itself.
        if self._reading_paused:
            self._update_reading()

    def _on_proxy_data(self, data: bytes) -> bytes:
        """Feed the PROXY parser; return what follows the header (for TLS) once it is complete."""
        assert self._proxy is not None
        try:
            result = self._proxy.feed(data)
        except ProtocolError as exc:
            log.info("%s: %s", format_address(self.peer), exc)
            self._finish(exc)  # nothing was sent yet, and TLS has nothing to say
            return b""
        if result is None:
            return b""
        self._proxy = None
        header = self.proxy_header = result.header
        self.proxy_peer = self.peer
        if header.source is not None:
            self.peer, self.sockname = header.source, header.destination
        log.debug("%s: PROXY v%d header from %s%s", format_address(self.peer), header.version,
                  format_address(self.proxy_peer), " (LOCAL)" if header.local else "")
        # -- per-client limits: the real client is known only now; the server may refuse it.
        refusal = self._on_proxy_header(self) if self._on_proxy_header is not None else None
        if refusal is not None:
            self._finish(refusal)  # nothing was sent yet, and TLS has nothing to say
            return b""
        # --
        self._set_phase(P_HANDSHAKING)
        self._begin_handshake()
        return b"" if self._phase is P_FINISHED else result.leftover

    def _on_handshake_complete(self) -> None:
        self.handshake_ms = self._tcp.loop.now() - self.created_at
        if self._phase is P_HANDSHAKING:  # not if close() came first: that close goes on
            self._set_phase(P_OPEN)
        if log.isEnabledFor(logging.DEBUG):  # version and cipher are two pyOpenSSL calls
            log.debug("%s: handshake complete (%s, %s)", format_address(self.peer),
                      self.tls_version, self.cipher)
        self._callback("handshake_complete")
        # TLS 1.3 servers send session tickets right after the handshake, and
        # the handler may have written: flush now, or a client that waits to
        # read would wait for us forever.
        self._pending.add(self)

    def _on_eof(self) -> None:
        if self._phase is P_PROXY_HEADER:
            self._finish(ProtocolError("peer closed the connection before the PROXY header ended"))
            return
        self._deliver_held()  # the end of the stream outranks a pause: nothing read is lost
        if self._phase is P_FINISHED:
            return
        try:
            self._tls.eof_received()
        except TLSUVError as exc:
            self._finish(exc)
            return
        self._finish(None)

    def _on_peer_closed(self) -> None:
        """The peer's close_notify arrived: answer with ours, flush, then close."""
        self._deliver_held()  # the end of the stream outranks a pause: nothing read is lost
        phase = self._phase
        if phase is P_FINISHED:
            return
        if phase < P_CLOSING:
            self._set_phase(P_CLOSING)
        self._pending.add(self)

    def _on_write(self, tcp: pyuv.TCP, error: int | None) -> None:
        if self._phase is P_FINISHED:
            return
        if error is not None:
            self._abort(self._gave_up(TransportError(f"write failed: {uv_error_text(error)}",
                                                     errno=error)))
            return
        if self._tcp.write_queue_size == 0:
            if self._send_timer is not None:
                self._stop_send_timer()
            self._after_drain()
        elif self._send_timer is not None:  # a request went to the kernel: progress
            self._arm_send_timer()

    def _on_shutdown(self, tcp: pyuv.TCP, error: int | None) -> None:
        if self._phase is P_FINISHED:
            return
        if self._tls.state is CLOSED:
            # Both close_notify done (the peer's came first): nothing left to wait for.
            self._finish(None)

    def _on_timer(self, timer: pyuv.Timer) -> None:
        phase = self._phase
        if phase is P_FINISHED:
            return
        if phase is P_OPEN:
            assert self._options.idle_timeout is not None
            elapsed = self._tcp.loop.now() - self._last_activity
            remaining = self._options.idle_timeout * 1000 - elapsed
            if remaining > 1:
                self._arm_timer(remaining / 1000)
                return
        if phase >= P_CLOSING:
            if phase >= P_SHUTDOWN and self._tcp.write_queue_size == 0 \
                    and not self._tls.read_after_shutdown:
                # Everything we owed the peer, close_notify included, is on
                # the wire; it just never answered.  Many TLS 1.3 stacks do
                # not, so this is a normal ending, not an error.
                log.debug("%s: no close_notify from the peer in time; closing",
                          format_address(self.peer))
                self._finish(None)
            else:
                # Either our data is still queued, or (after write_eof) we
                # were waiting for the peer's answer: both mean lost bytes.
                self._abort(TimeoutError(
                    "graceful close timed out with data still undelivered", phase="close"))
            return
        self._abort(self._timeout_error(phase))

    def _timeout_error(self, phase: Phase) -> TimeoutError:
        name = DEADLINES[phase]
        return TimeoutError(f"{name} timeout", phase=name)

    # -- the send deadline (not a phase: see the module docstring) --------------

    def _arm_send_timer(self) -> None:
        """(Re)start the send deadline: ``send_timeout`` from now, counting progress from here."""
        timer = self._send_timer
        if timer is None:
            timer = self._send_timer = pyuv.Timer(self._tcp.loop)
        tcp = self._tcp
        self._send_mark = self.bytes_out - tcp.write_queue_size
        timer.start(self._on_send_timer, self._options.send_timeout, 0.0)

    def _stop_send_timer(self) -> None:
        # Closed, not stopped: a connection whose writes all went straight to
        # the kernel (the common case) should carry no timer at all.
        timer, self._send_timer = self._send_timer, None
        if timer is not None and not timer.closed:
            timer.close()

    def _on_send_timer(self, timer: pyuv.Timer) -> None:
        if self._phase is P_FINISHED:
            return
        tcp = self._tcp
        queued = tcp.write_queue_size
        if not queued:  # drained; _on_write has yet to run and will find it so
            self._stop_send_timer()
            return
        if self.bytes_out - queued > self._send_mark:
            # The kernel took part of a large request: progress that no
            # write callback reports (callbacks come per whole request).
            self._arm_send_timer()
            return
        # Reset rather than FIN: the kernel would otherwise keep the socket and
        # its send buffer as an orphan retransmitting to a peer that is not there.
        with contextlib.suppress(pyuv.error.UVError):
            _sockopt.reset_on_close(tcp.fileno())
        self._abort(TimeoutError(
            f"send timeout: none of the {queued} bytes queued for the peer left in "
            f"{self._options.send_timeout:g} s", phase="send"))

    def _gave_up(self, error: TransportError) -> TLSUVError:
        """A socket error, or the kernel giving up on a silent peer: then the timeout it is.

        The kernel ends a connection with ETIMEDOUT (or the last ICMP error
        it saw, such as EHOSTUNREACH) when keepalive probes or retransmissions
        go unanswered.  Which of the two it was shows in what the socket still
        holds unacknowledged: nothing (keepalive probes carry no data) or
        our data (TCP_USER_TIMEOUT, the kernel's half of the send timeout).
        """
        if error.errno not in _GAVE_UP:
            return error
        outstanding = -1
        with contextlib.suppress(pyuv.error.UVError):
            outstanding = _sockopt.unacknowledged(self._tcp.fileno())
        if outstanding > 0 or self._tcp.write_queue_size:
            reason = TimeoutError(f"send timeout: the peer stopped acknowledging data ({error})",
                                  phase="send")
        elif outstanding == 0:
            reason = TimeoutError(f"keepalive timeout: the peer answered no keepalive probe ({error})",
                                  phase="keepalive")
        else:
            return error
        reason.__cause__ = error
        return reason

    # -- the after_io pass (the seed's try_flush_ssl_state) --------------------

    def _after_io(self) -> None:
        phase = self._phase
        if phase is P_FINISHED or phase is P_CONNECTING:  # nothing touches an unconnected socket
            return
        tls = self._tls
        if tls.deferred or phase >= P_CLOSING:
            try:
                if tls.deferred and tls.state is not HANDSHAKING:
                    # (Before the first handshake completes nothing can be
                    # retried, and SSL_read has already seen every byte.)
                    tls.retry_deferred()
                    # SSL_write during a renegotiation reads handshake records
                    # itself, and OpenSSL may park application data that came
                    # with them.  No new bytes may ever arrive to make us call
                    # SSL_read for it (the peer waits for our answer): drain now.
                    self._process(b"")
                    if self._phase is P_FINISHED:
                        return
                if self._phase is P_CLOSING:
                    self._start_tls_shutdown()
            except TLSUVError as exc:
                self._fail(exc)
                return
        self._flush()
        if self._phase is P_FINISHED:
            return
        if (self._writing_paused or self._phase >= P_SHUTDOWN) and self._tcp.write_queue_size == 0:
            self._after_drain()

    def _flush(self) -> None:
        """Send what the outgoing BIO holds (the seed's ``flush_ssl_buffer``).

        Directly with write(2) when libuv has nothing queued, else by libuv.
        Why not ``try_write``: libuv 1.13 builds it from uv_write and then
        re-arms the socket's epoll registration, an extra epoll_ctl system
        call on every flush (a tenth of the server's time in the ping-pong
        benchmark).  With libuv's write queue empty, a plain non-blocking
        write(2) keeps the byte order and costs one system call; whatever
        the kernel does not take goes to uv_write as before.
        """
        tls = self._tls
        pipe = tls.pipe
        if pipe is not None:
            # Compiled (tlsuv._speedups): the drain and the write(2) in one call.
            # More than COMPACT_MIN bytes go through the engine, which notes
            # that the BIO grew (wants_compaction); the rest needs nothing else.
            tcp = self._tcp
            fd = self._fd
            if fd < 0:
                with contextlib.suppress(pyuv.error.UVError):
                    fd = self._fd = tcp.fileno()
            if tcp.write_queue_size:
                fd = -1
            result = pipe.flush(fd, COMPACT_MIN)
            if result is None:
                result = tls.output_to(fd)
            self._unflushed = 0
            if tls.wants_compaction and not self._compact_queued:
                self._compact_queued = True
                self._pending.compact_later(self)
            if isinstance(result, int):
                if result:
                    self.bytes_out += result
                    if self._phase is P_OPEN and self._timer is not None:  # the idle deadline
                        self._last_activity = tcp.loop.now()
                return
            self._flush_rest(*result)
            return
        # Straight from the scratch buffer to the socket: bytes are made only
        # for what the kernel does not take now (libuv keeps those).
        view = tls.output_view()
        self._unflushed = 0
        if tls.wants_compaction and not self._compact_queued:
            self._compact_queued = True
            self._pending.compact_later(self)
        size = len(view)
        if not size:
            return
        data: memoryview | bytes = view
        if size >= OUTPUT_MAX:  # more may wait in the BIO: one buffer for all of it
            data = view.tobytes() + tls.data_to_send()
            size = len(data)
        self.bytes_out += size
        tcp = self._tcp
        if self._phase is P_OPEN and self._timer is not None:  # the idle deadline counts from here
            self._last_activity = tcp.loop.now()
        fd = self._fd
        if fd < 0:
            # Connected by now (a client's handle has no socket before connect).
            with contextlib.suppress(pyuv.error.UVError):
                fd = self._fd = tcp.fileno()
        if fd >= 0 and tcp.write_queue_size == 0:
            try:
                n = _os_write(fd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                error = TransportError(f"write failed: {exc.strerror}", errno=exc.errno)
                error.__cause__ = exc
                self._abort(self._gave_up(error))
                return
            if n == size:
                return
            rest = bytes(data[n:])
        else:
            rest = bytes(data)
        self._queue_write(rest)

    def _flush_rest(self, size: int, rest: bytes | int) -> None:
        """The compiled flush drained ``size`` bytes; the kernel did not take ``rest`` (or failed: errno)."""
        self.bytes_out += size
        if self._phase is P_OPEN and self._timer is not None:
            self._last_activity = self._tcp.loop.now()
        if isinstance(rest, int):  # write(2) failed: as the pure path reports an OSError
            exc = OSError(rest, os.strerror(rest))
            error = TransportError(f"write failed: {exc.strerror}", errno=rest)
            error.__cause__ = exc
            self._abort(self._gave_up(error))
            return
        self._queue_write(rest)

    def _queue_write(self, rest: bytes) -> None:
        """What the kernel did not take goes to libuv, which keeps the order."""
        try:
            self._tcp.write(rest, self._on_write)
        except pyuv.error.UVError as exc:
            self._abort(TransportError(f"write failed: {uv_error_text(exc)}"), cause=exc)
            return
        # libuv holds data now (unless its own write took everything): the send
        # deadline runs from here until the queue drains (_on_write).
        if self._send_timer is None and self._options.send_timeout is not None and self._tcp.write_queue_size:
            self._arm_send_timer()

    def _start_tls_shutdown(self) -> None:
        tls = self._tls
        if tls.state is HANDSHAKING:
            return  # deferred writes still wait for the handshake; the close timer bounds it
        tls.shutdown()
        if tls.state is SHUTDOWN_SENT or tls.state is CLOSED:
            self._set_phase(P_SHUTDOWN)

    def _after_drain(self) -> None:
        """libuv's queue is empty: resume a paused writer, or move the close along."""
        if self._writing_paused and self.buffered <= self._options.low_water:
            self._writing_paused = False
            self._callback("resume_writing")
            if self._phase is P_FINISHED:
                return
        phase = self._phase
        if phase < P_SHUTDOWN or self._tls.pending_output() != 0 or self._tls.deferred:
            return
        # close_notify is on the wire.
        if self._tls.state is CLOSED:  # and the peer's came (before or after our FIN)
            self._finish(None)
            return
        if phase is P_HALF_CLOSED:
            return
        # Half-close so a peer waiting for EOF sees it; keep reading for its close_notify.
        self._set_phase(P_HALF_CLOSED)
        try:
            self._tcp.shutdown(self._on_shutdown)
        except pyuv.error.UVError:
            self._finish(None)

    # -- endings -----------------------------------------------------------

    def _fail(self, exc: TLSUVError) -> None:
        """A fatal TLS error: send OpenSSL's alert if we can, then close."""
        if self._phase is P_FINISHED:
            return
        log.info("%s: %s", format_address(self.peer), exc)
        alert = self._tls.data_to_send()
        if alert:
            # Best effort: a few bytes, and the queue is usually empty.  If the
            # peer is gone or slow the error we report is still the TLS one.
            with contextlib.suppress(pyuv.error.UVError):
                self.bytes_out += self._tcp.try_write(alert)
        self._finish(exc)

    def _abort(self, reason: BaseException, cause: BaseException | None = None) -> None:
        if cause is not None and reason.__cause__ is None:
            reason.__cause__ = cause
        if isinstance(reason, (TimeoutError, TransportError)) and log.isEnabledFor(logging.INFO):
            log.info("%s: %s", format_address(self.peer), reason)
        self._finish(reason)

    def _finish(self, reason: BaseException | None) -> None:
        if self._phase is P_FINISHED:
            return
        self._set_phase(P_FINISHED)
        self._reason = reason
        on_finish, self._on_finish = self._on_finish, None
        if on_finish is not None:
            on_finish(self)
        self._pending.forget(self)
        if self._send_timer is not None:
            self._stop_send_timer()
        self._held = None
        if self._reading and not self._tcp.closed:
            # The handle's read callback is a bound method of this connection,
            # and closing does not drop it: the pair would be a reference cycle
            # that only the cyclic GC frees (with everything hanging off the
            # connection).  stop_read drops it.
            self._reading = False
            self._tcp.stop_read()
        if not self._tcp.closed:
            self._tcp.close(self._on_tcp_closed)
        else:  # pragma: no cover - only if someone closed our handle under us
            self._on_tcp_closed(self._tcp)

    def _on_tcp_closed(self, tcp: pyuv.TCP) -> None:
        if log.isEnabledFor(logging.DEBUG):  # formatting is not free, and this runs per connection
            log.debug("%s: closed (%s)", format_address(self.peer), self._reason or "clean")
        handler = self._handler
        if handler is not None:
            try:
                handler.closed(self, self._reason)
            except Exception:  # nothing left to abort; keep the loop alive
                log.error("%s: handler.closed raised", format_address(self.peer), exc_info=True)
        on_gone, self._on_gone = self._on_gone, None
        if on_gone is not None:
            on_gone(self)

    # -- helpers -----------------------------------------------------------

    def _deliver(self, chunk: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            handler.read(self, chunk)
        except Exception as exc:
            self._handler_failed("read", exc)

    def _callback(self, name: str) -> None:
        handler = self._handler
        if handler is None or self._phase is P_FINISHED:
            return
        try:
            getattr(handler, name)(self)
        except Exception as exc:
            self._handler_failed(name, exc)

    def _handler_failed(self, name: str, exc: Exception) -> None:
        log.error("%s: handler.%s raised; aborting this connection", format_address(self.peer), name,
                  exc_info=exc)
        self._abort(HandlerError(f"handler.{name} raised {exc!r}"), cause=exc)

    def _update_reading(self) -> None:
        """Read from TCP unless the handler paused us and TLS needs no input to progress."""
        phase = self._phase
        if phase is P_FINISHED or phase is P_CONNECTING:
            return
        want = not self._reading_paused or bool(self._tls.deferred) or phase >= P_CLOSING
        if want and not self._reading:
            self._reading = True
            self._tcp.start_read(self._on_read)
        elif not want and self._reading:
            self._reading = False
            self._tcp.stop_read()

    def _arm_timer(self, seconds: float) -> None:
        """(Re)start the deadline of the current phase, ``seconds`` from now."""
        timer = self._timer
        if timer is None:
            timer = self._timer = pyuv.Timer(self._tcp.loop)
        timer.start(self._on_timer, seconds, 0.0)  # pyuv timers take seconds

    def _stop_timer(self) -> None:
        # Closed, not just stopped: an idle connection should not carry a
        # handle it does not use (memory at 10,000 connections).
        timer, self._timer = self._timer, None
        if timer is not None and not timer.closed:
            timer.close()

    def __repr__(self) -> str:
        return f"<tlsuv.Connection {format_address(self.peer)} {self._phase.name.lower()}>"
