"""The listening side: accept TCP connections on a pyuv loop and give each one TLS.

The seed's ``on_new_connection``: accept, build the TLS engine with its two
memory BIOs, call ``established`` and start reading -- no explicit
``SSL_accept``; the handshake happens as reads and writes flow.  Added here:
IPv4 and IPv6 (port 0 picks a free port and :attr:`Server.address` reports
it), a connection limit, and an orderly :meth:`Server.close` that stops
accepting, closes every connection gracefully and aborts what is left after a
grace period.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from typing import Final

import pyuv
from OpenSSL import SSL

from ._uv import format_address, socket_address, uv_error_text
from .connection import Connection, ConnectionOptions
from .errors import TLSUVError
from .handler import HandlerFactory
from .pending import PendingList

log = logging.getLogger("tlsuv")

# Linux caps listen() at net.core.somaxconn (4096 on current kernels); asking
# for more is harmless and lets a burst of handshakes queue instead of failing.
DEFAULT_BACKLOG: Final = 4096


class ServerError(TLSUVError):
    """The server could not bind or listen (address in use, bad host, ...)."""


class Server:
    """A TLS server on a pyuv loop.

    ``context`` is a ready :class:`OpenSSL.SSL.Context` (certificate loaded);
    ``handler_factory`` is called with each new :class:`Connection` and
    returns its :class:`~tlsuv.Handler`.  Run the loop yourself
    (``loop.run()``); :meth:`close` lets it return.
    """

    def __init__(
        self,
        loop: pyuv.Loop,
        context: SSL.Context,
        handler_factory: HandlerFactory,
        *,
        options: ConnectionOptions | None = None,
        max_connections: int | None = None,
    ) -> None:
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.loop = loop
        self.context = context
        self.handler_factory = handler_factory
        self.options = options or ConnectionOptions()
        self.max_connections = max_connections
        self.connections: set[Connection] = set()
        self.pending = PendingList(loop)
        # Shared by every connection: a bound method made per accept would
        # cost each one ~64 bytes for its whole life.
        self._gone = self._connection_gone
        # Connections accepted on one listener share their local address;
        # one tuple for all of them instead of one each (~150 bytes).
        self._sockname: tuple[str, int] | None = None
        self._listener: pyuv.TCP | None = None
        self._address: tuple[str, int] | None = None
        self._closing = False
        self._grace_timer: pyuv.Timer | None = None
        self._on_closed: Callable[[], None] | None = None
        # Counters for logs and stats.
        self.accepted = 0
        self.refused = 0
        self.handshakes_failed = 0
        # Ciphertext bytes of connections that are gone; add the open ones' for a total.
        self.ended_bytes_in = 0
        self.ended_bytes_out = 0

    # -- listening -----------------------------------------------------------

    def listen(
        self, host: str = "127.0.0.1", port: int = 0, backlog: int = DEFAULT_BACKLOG
    ) -> tuple[str, int]:
        """Bind and listen; return the bound ``(host, port)``."""
        if self._listener is not None:
            raise ServerError("server is already listening")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        tcp = pyuv.TCP(self.loop)
        try:
            tcp.bind((host, port))
            tcp.listen(self._on_connection, backlog)
        except pyuv.error.UVError as exc:
            tcp.close()
            raise ServerError(f"cannot listen on {format_address((host, port))}: {uv_error_text(exc)}") \
                from exc
        except (OverflowError, ValueError, TypeError) as exc:  # pyuv's own argument checks
            tcp.close()
            raise ServerError(f"cannot listen on {format_address((host, port))}: {exc}") from exc
        name = tcp.getsockname()
        self._listener = tcp
        self._address = (str(name[0]), int(name[1]))
        log.info("listening on %s (%s)", format_address(self._address),
                 "IPv6" if family == socket.AF_INET6 else "IPv4")
        return self._address

    def listen_socket(self, sock: socket.socket, backlog: int = DEFAULT_BACKLOG) -> tuple[str, int]:
        """Adopt a bound socket made in Python (e.g. with SO_REUSEPORT) and listen on it."""
        if self._listener is not None:
            raise ServerError("server is already listening")
        tcp = pyuv.TCP(self.loop)
        sock.setblocking(False)
        try:
            tcp.open(sock.fileno())
        except pyuv.error.UVError as exc:
            tcp.close()
            raise ServerError(f"cannot adopt socket: {uv_error_text(exc)}") from exc
        sock.detach()  # the handle owns the descriptor now; closing it closes the socket
        try:
            tcp.listen(self._on_connection, backlog)
        except pyuv.error.UVError as exc:
            tcp.close()
            raise ServerError(f"cannot listen: {uv_error_text(exc)}") from exc
        name = tcp.getsockname()
        self._listener = tcp
        self._address = (str(name[0]), int(name[1]))
        log.info("listening on %s (adopted socket)", format_address(self._address))
        return self._address

    @property
    def closing(self) -> bool:
        """:meth:`close` or :meth:`abort` was called: no new connections are accepted."""
        return self._closing

    @property
    def address(self) -> tuple[str, int]:
        if self._address is None:
            raise ServerError("server is not listening")
        return self._address

    def _on_connection(self, listener: pyuv.TCP, error: int | None) -> None:
        if error is not None:
            log.warning("accept failed: %s", uv_error_text(error))
            return
        tcp = pyuv.TCP(self.loop)
        try:
            listener.accept(tcp)
        except pyuv.error.UVError as exc:
            # EMFILE and friends: the connection stays in the backlog; say so
            # once per failure and carry on serving the others.
            log.warning("accept failed: %s", uv_error_text(exc))
            tcp.close()
            return
        if self._closing or (
            self.max_connections is not None and len(self.connections) >= self.max_connections
        ):
            self.refused += 1
            log.info("refusing connection: %s", "server closing" if self._closing else
                     f"limit of {self.max_connections} connections reached")
            tcp.close()
            return
        source = socket_address(tcp, "getpeername") if self.options.proxy is not None else None
        if self.options.proxy is not None and not self.options.proxy.allows(source):
            # Only trusted balancers may claim a client address (tlsuv.proxy).
            self.refused += 1
            log.warning("refusing connection from %s: not allowed to send a PROXY header",
                        format_address(source))
            tcp.close()
            return
        self.accepted += 1
        tcp.nodelay(True)  # TLS records are already batched per loop iteration
        conn = Connection(tcp, self.context, self.handler_factory, pending=self.pending,
                          options=self.options, on_gone=self._gone)
        if conn.sockname == self._sockname:
            conn.sockname = self._sockname
        else:
            self._sockname = conn.sockname
        if log.isEnabledFor(logging.DEBUG):  # skip formatting per connection when nobody looks
            log.debug("%s: accepted", format_address(conn.peer))
        self.connections.add(conn)
        conn._start()

    def _connection_gone(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self.ended_bytes_in += conn.bytes_in
        self.ended_bytes_out += conn.bytes_out
        if not conn.handshake_completed:
            self.handshakes_failed += 1
        if self._closing and not self.connections:
            self._all_closed()

    # -- shutdown ------------------------------------------------------------

    def stop_listening(self) -> None:
        if self._listener is not None and not self._listener.closed:
            self._listener.close()

    def close(self, grace: float | None = 5.0, callback: Callable[[], None] | None = None) -> None:
        """Stop accepting, close every connection gracefully, abort the rest after ``grace``.

        ``callback`` runs once every connection is gone and every handle the
        server owns is closed, so ``loop.run()`` can return.  Idempotent.
        """
        if self._closing:
            return
        self._closing = True
        self._on_closed = callback
        self.stop_listening()
        for conn in list(self.connections):
            conn.close()
        if not self.connections:
            self._all_closed()
            return
        if grace is not None:
            self._grace_timer = pyuv.Timer(self.loop)
            self._grace_timer.start(self._grace_expired, grace, 0.0)

    def abort(self) -> None:
        """Close every connection at once and stop (a second Ctrl-C)."""
        self._closing = True
        self.stop_listening()
        for conn in list(self.connections):
            conn.abort()
        if not self.connections:
            self._all_closed()

    def _grace_expired(self, timer: pyuv.Timer) -> None:
        if self.connections:
            log.info("grace period over: aborting %d connection(s)", len(self.connections))
        for conn in list(self.connections):
            conn.abort()

    def _all_closed(self) -> None:
        if self._grace_timer is not None and not self._grace_timer.closed:
            self._grace_timer.close()
        self.pending.close()
        callback, self._on_closed = self._on_closed, None
        if callback is not None:
            callback()
