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
* **Deadlines.**  One timer per connection serves the handshake, idle and
  close deadlines in turn; it is closed with the connection.
* **Flow control.**  Everything queued for the peer (deferred plaintext, TLS
  output not yet flushed, libuv's write queue) is compared with high and low
  water marks; the handler is told to pause and resume writing, and may
  pause and resume reading.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyuv
from OpenSSL import SSL

from . import _openssl
from .errors import (
    ConnectionClosedError,
    HandlerError,
    ProtocolError,
    TimeoutError,
    TLSUVError,
    TransportError,
)
from .proxy import ProxyHeader, ProxyOptions, ProxyParser
from .tls import CLOSED, ESTABLISHED, HANDSHAKING, OUTPUT_MAX, PEER_CLOSED, SHUTDOWN_SENT, State, TLSEngine

if TYPE_CHECKING:
    from collections.abc import Callable

    from cryptography import x509

    from .handler import Handler, HandlerFactory
    from .pending import PendingList

log = logging.getLogger("tlsuv")

_os_write = os.write
_EOF = pyuv.errno.UV_EOF


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
        for name in ("handshake_timeout", "idle_timeout", "close_timeout"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None")


class Connection:
    """A TLS connection.  Made by :class:`~tlsuv.Server`; handed to the handler."""

    __slots__ = (
        "__weakref__",
        "_closing",
        "_compact_queued",
        "_fd",
        "_finished",
        "_handler",
        "_held",
        "_in_read",
        "_last_activity",
        "_on_gone",
        "_on_proxy_header",
        "_options",
        "_pending",
        "_proxy",
        "_reading",
        "_reading_paused",
        "_reason",
        "_tcp",
        "_tcp_shutdown_started",
        "_timer",
        "_timer_phase",
        "_tls",
        "_tls_shutdown_done",
        "_unflushed",
        "_writing_paused",
        "bytes_in",
        "bytes_out",
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
        server_hostname: str | None = None,
    ) -> None:
        self._tcp = tcp
        self._fd = -1  # the socket, for direct writes; looked up at the first _flush
        self._pending = pending
        self._options = options
        self._on_gone = on_gone
        self._on_proxy_header = on_proxy_header  # the server's per-client limits (tlsuv.limits)
        self._tls = TLSEngine(
            context,
            server_side=server_side,
            server_hostname=server_hostname,
            allow_client_renegotiation=options.allow_client_renegotiation,
        )
        self._timer: pyuv.Timer | None = None
        self._timer_phase = ""
        self._last_activity = 0.0
        self._closing = False  # close() was called: finish writes, then close_notify
        self._finished = False  # _finish ran: handles are closing, nothing more happens
        self._reason: BaseException | None = None
        self._unflushed = 0  # plaintext handed to OpenSSL since the last flush
        self._writing_paused = False
        self._reading_paused = False  # the handler asked us to stop reading
        self._reading = False
        self._compact_queued = False  # on the pending list's compaction sweep
        self._in_read = False  # inside _on_read: writes are flushed when it returns
        # Plaintext read while the handler paused reading; made when first needed.
        self._held: list[bytes] | None = None
        self._tls_shutdown_done = False
        self._tcp_shutdown_started = False
        self.peer = _address(tcp, "getpeername")
        self.sockname = _address(tcp, "getsockname")
        # Behind a balancer: bytes go to this parser until the header is complete;
        # then peer/sockname become the client's and proxy_peer keeps the balancer's.
        self._proxy = ProxyParser() if options.proxy is not None and server_side else None
        self.proxy_header: ProxyHeader | None = None
        self.proxy_peer: tuple[str, int] | None = None
        self.user_data: Any = None
        self.bytes_in = 0  # ciphertext bytes read from the socket
        self.bytes_out = 0  # ciphertext bytes handed to libuv
        self._handler: Handler | None = None
        self._handler = self._call_factory(factory)

    # -- start -------------------------------------------------------------

    def _call_factory(self, factory: HandlerFactory) -> Handler | None:
        try:
            return factory(self)
        except Exception as exc:  # the handler's bug must not take the server down
            log.error("handler factory failed for %s", _fmt(self.peer), exc_info=True)
            self._abort(HandlerError(f"handler factory raised {exc!r}"), cause=exc)
            return None

    def _start(self) -> None:
        """Begin: arm the handshake deadline, call ``established``, start reading."""
        if self._finished:
            return
        if self._options.handshake_timeout is not None:
            self._arm_timer("handshake", self._options.handshake_timeout)
        proxy = self._options.proxy
        if self._proxy is not None and proxy is not None and proxy.timeout is not None:
            self._arm_timer("proxy header", proxy.timeout)  # the handshake's turn comes after
        self._reading = True
        self._tcp.start_read(self._on_read)
        if self._proxy is None:  # else once the header names the real peer (_on_proxy_data)
            self._callback("established")
        if not self._tls.server_side and not self._finished:
            # A client speaks first: queue the ClientHello.
            self._tls.receive(b"")
            self._pending.add(self)

    # -- public API --------------------------------------------------------

    @property
    def handler(self) -> Handler | None:
        return self._handler

    @property
    def state(self) -> State:
        return self._tls.state

    @property
    def established(self) -> bool:
        """The TLS handshake has completed."""
        return self._tls.established

    @property
    def handshake_completed(self) -> bool:
        """The handshake completed at some point (even if the connection failed later)."""
        return self._tls.handshake_completed

    @property
    def closed(self) -> bool:
        return self._finished

    @property
    def closing(self) -> bool:
        return self._closing or self._finished

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
        if self._finished:
            return 0
        return self._tls.deferred_bytes + self._unflushed + int(self._tcp.write_queue_size)

    @property
    def activity(self) -> int:
        """Grows with every byte in or out: how the compaction sweep tells idle from busy."""
        return self.bytes_in + self.bytes_out

    def _compact(self) -> None:
        self._compact_queued = False
        if not self._finished and not self._closing:
            self._tls.compact()

    @property
    def writing_paused(self) -> bool:
        return self._writing_paused

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue plaintext for the peer.  Never blocks; errors arrive via ``closed``."""
        if self._closing:  # also set once finished
            raise ConnectionClosedError("write() on a connection that is closing or closed")
        if type(data) is not bytes:
            data = bytes(data)  # the caller may reuse its buffer once we return
        tls = self._tls
        try:
            tls.write(data)
        except TLSUVError as exc:
            self._fail(exc)
            return
        unflushed = self._unflushed = self._unflushed + len(data)
        if not self._in_read:  # else _on_read flushes as it returns
            self._pending.add(self)
        if not self._writing_paused and (
            unflushed + self._tcp.write_queue_size + tls._deferred_bytes > self._options.high_water
        ):
            self._writing_paused = True
            self._callback("pause_writing")

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def close(self) -> None:
        """Graceful close: deliver what was written, send close_notify, then close.  Idempotent."""
        if self._closing or self._finished:
            return
        self._closing = True
        self._reading_paused = False
        self._update_reading()  # the peer's close_notify or EOF must still reach us
        if self._tls.state is HANDSHAKING and not self._tls.has_deferred:
            # Nothing was promised to the peer and close_notify is impossible
            # before the handshake: just go.
            self._finish(None)
            return
        if self._options.close_timeout is not None:
            self._arm_timer("close", self._options.close_timeout)
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
        if self._finished:
            return
        self._abort(reason or ConnectionClosedError("connection aborted locally"))

    def pause_reading(self) -> None:
        """Stop delivering ``read`` calls until :meth:`resume_reading`."""
        if self._finished or self._reading_paused:
            return
        self._reading_paused = True
        self._update_reading()

    def resume_reading(self) -> None:
        if self._finished or not self._reading_paused:
            return
        self._reading_paused = False
        held, self._held = self._held, None
        if held:
            for i, chunk in enumerate(held):
                if self._finished:
                    return
                if self._reading_paused:  # the handler paused again from inside read()
                    self._held = held[i:] + (self._held or [])
                    break
                self._deliver(chunk)
        self._update_reading()

    def _deliver_held(self) -> None:
        held, self._held = self._held, None
        for chunk in held or ():
            if self._finished:
                return
            self._deliver(chunk)

    def renegotiate(self) -> bool:
        """Start a TLS 1.2 renegotiation from the server side.

        False if one is already in progress.  Raises TLSError on TLS 1.3.
        """
        if self._closing or self._finished:
            raise ConnectionClosedError("renegotiate() on a connection that is closing or closed")
        started = self._tls.renegotiate()
        self._pending.add(self)
        return started

    # -- libuv callbacks ---------------------------------------------------

    def _on_read(self, tcp: pyuv.TCP, data: bytes | None, error: int | None) -> None:
        if self._finished:
            return
        if error is not None:
            if error == _EOF:
                self._on_eof()
            else:
                self._abort(TransportError(
                    f"read failed: {pyuv.errno.strerror(error)}", errno=error))
            return
        if not data:  # libuv's EAGAIN/EINTR arrive as empty reads
            return
        self.bytes_in += len(data)
        if self._timer_phase == "idle":
            self._last_activity = self._tcp.loop.now()
        if self._proxy is not None:
            data = self._on_proxy_data(data)
            if not data:
                return
        self._in_read = True
        try:
            self._process(data)
        finally:
            self._in_read = False
        if self._finished:
            return
        # What this read made the handler write (an echo, a response) is
        # flushed now, in one write(2), instead of by a trip through the
        # pending list: the same coalescing (every write of this callback
        # goes out together), a few hundred nanoseconds less per message.
        # Everything that needs the full after_io pass takes it.
        tls = self._tls
        if tls._deferred or self._closing or self._writing_paused:
            self._pending.add(self)
        elif self._unflushed or tls.pending_output():
            self._flush()
        elif tls._bio_high and not self._compact_queued:  # a big read and nothing to answer (an upload)
            self._compact_queued = True
            self._pending.compact_later(self)

    def _process(self, data: bytes) -> None:
        """Feed ciphertext to TLS (``b""``: just drain) and deliver the plaintext that comes out."""
        tls = self._tls
        was_handshaking = tls.state is HANDSHAKING
        try:
            chunks = tls.receive(data)
        except TLSUVError as exc:
            self._fail(exc)
            return
        if was_handshaking and tls.state is not HANDSHAKING:
            self._on_handshake_complete()
            if self._finished:
                return
        handler = self._handler
        for chunk in chunks:
            if self._reading_paused:
                if self._held is None:
                    self._held = []
                self._held.append(chunk)
            elif handler is not None:
                try:
                    handler.read(self, chunk)
                except Exception as exc:
                    self._handler_failed("read", exc)
            if self._finished:
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
            log.info("%s: %s", _fmt(self.peer), exc)
            self._finish(exc)  # nothing was sent yet, and TLS has nothing to say
            return b""
        if result is None:
            return b""
        self._proxy = None
        header = self.proxy_header = result.header
        self.proxy_peer = self.peer
        if header.source is not None:
            self.peer, self.sockname = header.source, header.destination
        log.debug("%s: PROXY v%d header from %s%s", _fmt(self.peer), header.version,
                  _fmt(self.proxy_peer), " (LOCAL)" if header.local else "")
        # -- per-client limits: the real client is known only now; the server may refuse it.
        refusal = self._on_proxy_header(self) if self._on_proxy_header is not None else None
        if refusal is not None:
            self._finish(refusal)  # nothing was sent yet, and TLS has nothing to say
            return b""
        # --
        if self._timer_phase == "proxy header":
            if self._options.handshake_timeout is not None:
                self._arm_timer("handshake", self._options.handshake_timeout)
            else:
                self._stop_timer()
        self._callback("established")
        return b"" if self._finished else result.leftover

    def _on_handshake_complete(self) -> None:
        if self._timer_phase == "handshake":
            self._stop_timer()
        if self._options.idle_timeout is not None and not self._closing:
            self._last_activity = self._tcp.loop.now()
            self._arm_timer("idle", self._options.idle_timeout)
        if log.isEnabledFor(logging.DEBUG):  # version and cipher are two pyOpenSSL calls
            log.debug("%s: handshake complete (%s, %s)", _fmt(self.peer), self.tls_version, self.cipher)
        self._callback("handshake_complete")
        # TLS 1.3 servers send session tickets right after the handshake, and
        # the handler may have written: flush now, or a client that waits to
        # read would wait for us forever.
        self._pending.add(self)

    def _on_eof(self) -> None:
        if self._proxy is not None:
            self._finish(ProtocolError("peer closed the connection before the PROXY header ended"))
            return
        self._deliver_held()  # the end of the stream outranks a pause: nothing read is lost
        if self._finished:
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
        if self._finished:
            return
        self._closing = True
        if self._options.close_timeout is not None and self._timer_phase != "close":
            self._arm_timer("close", self._options.close_timeout)
        self._pending.add(self)

    def _on_write(self, tcp: pyuv.TCP, error: int | None) -> None:
        if self._finished:
            return
        if error is not None:
            self._abort(TransportError(
                f"write failed: {pyuv.errno.strerror(error)}", errno=error))
            return
        if self._tcp.write_queue_size == 0:
            self._after_drain()

    def _on_shutdown(self, tcp: pyuv.TCP, error: int | None) -> None:
        if self._finished:
            return
        if self._tls.state is CLOSED:
            # Both close_notify done (the peer's came first): nothing left to wait for.
            self._finish(None)

    def _on_timer(self, timer: pyuv.Timer) -> None:
        if self._finished:
            return
        phase = self._timer_phase
        if phase == "idle":
            assert self._options.idle_timeout is not None
            elapsed = self._tcp.loop.now() - self._last_activity
            remaining = self._options.idle_timeout * 1000 - elapsed
            if remaining > 1:
                self._arm_timer("idle", remaining / 1000)
                return
        self._timer_phase = ""
        if phase == "close":
            if self._tls_shutdown_done and self._tcp.write_queue_size == 0 \
                    and not self._tls.read_after_shutdown:
                # Everything we owed the peer, close_notify included, is on
                # the wire; it just never answered.  Many TLS 1.3 stacks do
                # not, so this is a normal ending, not an error.
                log.debug("%s: no close_notify from the peer in time; closing", _fmt(self.peer))
                self._finish(None)
            else:
                # Either our data is still queued, or (after write_eof) we
                # were waiting for the peer's answer: both mean lost bytes.
                self._abort(TimeoutError(
                    "graceful close timed out with data still undelivered", phase="close"))
            return
        self._abort(TimeoutError(f"{phase} timeout", phase=phase))

    # -- the after_io pass (the seed's try_flush_ssl_state) --------------------

    def _after_io(self) -> None:
        if self._finished:
            return
        tls = self._tls
        if tls._deferred or self._closing:
            try:
                if tls._deferred and tls.state is not HANDSHAKING:
                    # (Before the first handshake completes nothing can be
                    # retried, and SSL_read has already seen every byte.)
                    tls.retry_deferred()
                    # SSL_write during a renegotiation reads handshake records
                    # itself, and OpenSSL may park application data that came
                    # with them.  No new bytes may ever arrive to make us call
                    # SSL_read for it (the peer waits for our answer): drain now.
                    self._process(b"")
                    if self._finished:
                        return
                if self._closing and not self._tls_shutdown_done:
                    self._start_tls_shutdown()
            except TLSUVError as exc:
                self._fail(exc)
                return
        self._flush()
        if self._finished:
            return
        if (self._writing_paused or self._tls_shutdown_done) and self._tcp.write_queue_size == 0:
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
        # Straight from the scratch buffer to the socket: bytes are made only
        # for what the kernel does not take now (libuv keeps those).
        view = tls.output_view()
        self._unflushed = 0
        if tls._bio_high and not self._compact_queued:
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
        if self._timer_phase == "idle":
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
                self._abort(TransportError(f"write failed: {exc.strerror}", errno=exc.errno), cause=exc)
                return
            if n == size:
                return
            rest = bytes(data[n:])
        else:
            rest = bytes(data)
        try:
            tcp.write(rest, self._on_write)
        except pyuv.error.UVError as exc:
            self._abort(TransportError(f"write failed: {exc.args[-1]}"), cause=exc)

    def _start_tls_shutdown(self) -> None:
        tls = self._tls
        if tls.state is HANDSHAKING:
            return  # deferred writes still wait for the handshake; the close timer bounds it
        tls.shutdown()
        if tls.state in (SHUTDOWN_SENT, CLOSED):
            self._tls_shutdown_done = True

    def _after_drain(self) -> None:
        """libuv's queue is empty: resume a paused writer, or move the close along."""
        if self._writing_paused and self.buffered <= self._options.low_water:
            self._writing_paused = False
            self._callback("resume_writing")
            if self._finished:
                return
        if not self._tls_shutdown_done or self._tls.pending_output() != 0 or self._tls.has_deferred:
            return
        # close_notify is on the wire.
        if self._tls.state is CLOSED:
            self._finish(None)
        elif not self._tcp_shutdown_started:
            # Half-close so a peer waiting for EOF sees it; keep reading for its close_notify.
            self._tcp_shutdown_started = True
            try:
                self._tcp.shutdown(self._on_shutdown)
            except pyuv.error.UVError:
                self._finish(None)

    # -- endings -----------------------------------------------------------

    def _fail(self, exc: TLSUVError) -> None:
        """A fatal TLS error: send OpenSSL's alert if we can, then close."""
        if self._finished:
            return
        log.info("%s: %s", _fmt(self.peer), exc)
        alert = self._tls.data_to_send()
        if alert:
            # Best effort: a few bytes, and the queue is usually empty.  If the
            # peer is gone or slow the error we report is still the TLS one.
            with contextlib.suppress(pyuv.error.UVError):
                self._tcp.try_write(alert)
        self._finish(exc)

    def _abort(self, reason: BaseException, cause: BaseException | None = None) -> None:
        if cause is not None and reason.__cause__ is None:
            reason.__cause__ = cause
        if isinstance(reason, (TimeoutError, TransportError)) and log.isEnabledFor(logging.INFO):
            log.info("%s: %s", _fmt(self.peer), reason)
        self._finish(reason)

    def _finish(self, reason: BaseException | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._closing = True
        self._reason = reason
        self._pending.forget(self)
        self._held = None
        self._stop_timer()
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
        if log.isEnabledFor(logging.DEBUG):  # _fmt is not free, and this runs per connection
            log.debug("%s: closed (%s)", _fmt(self.peer), self._reason or "clean")
        handler = self._handler
        if handler is not None:
            try:
                handler.closed(self, self._reason)
            except Exception:  # nothing left to abort; keep the loop alive
                log.error("%s: handler.closed raised", _fmt(self.peer), exc_info=True)
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
        if handler is None or self._finished:
            return
        try:
            getattr(handler, name)(self)
        except Exception as exc:
            self._handler_failed(name, exc)

    def _handler_failed(self, name: str, exc: Exception) -> None:
        log.error("%s: handler.%s raised; aborting this connection", _fmt(self.peer), name,
                  exc_info=exc)
        self._abort(HandlerError(f"handler.{name} raised {exc!r}"), cause=exc)

    def _update_reading(self) -> None:
        """Read from TCP unless the handler paused us and TLS needs no input to progress."""
        if self._finished:
            return
        want = not self._reading_paused or self._tls.has_deferred or self._closing
        if want and not self._reading:
            self._reading = True
            self._tcp.start_read(self._on_read)
        elif not want and self._reading:
            self._reading = False
            self._tcp.stop_read()

    def _arm_timer(self, phase: str, seconds: float) -> None:
        timer = self._timer
        if timer is None:
            timer = self._timer = pyuv.Timer(self._tcp.loop)
        self._timer_phase = phase
        timer.start(self._on_timer, seconds, 0.0)  # pyuv timers take seconds

    def _stop_timer(self) -> None:
        # Closed, not just stopped: an idle connection should not carry a
        # handle it does not use (memory at 10,000 connections).
        self._timer_phase = ""
        timer, self._timer = self._timer, None
        if timer is not None and not timer.closed:
            timer.close()

    def __repr__(self) -> str:
        closed = " closed" if self._finished else ""
        return f"<tlsuv.Connection {_fmt(self.peer)} {self._tls.state.value}{closed}>"


def _address(tcp: pyuv.TCP, method: str) -> tuple[str, int] | None:
    try:
        addr = getattr(tcp, method)()
    except pyuv.error.UVError:
        return None  # the peer reset before we asked; the read will report it
    # Interned: behind a balancer, NAT or a proxy many connections share a
    # peer address, and each would otherwise keep its own copy of the string.
    return (sys.intern(str(addr[0])), int(addr[1]))


def _fmt(addr: tuple[str, int] | None) -> str:
    if addr is None:
        return "<unknown peer>"
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
