"""The listening side: accept TCP connections on a pyuv loop and give each one TLS.

The seed's ``on_new_connection``: accept, build the TLS engine with its two
memory BIOs, call ``established`` and start reading -- no explicit
``SSL_accept``; the handshake happens as reads and writes flow.  Added here:
IPv4 and IPv6 (port 0 picks a free port and :attr:`Server.address` reports
it), a connection limit, and two orderly endings: :meth:`Server.close` stops
accepting, closes every connection gracefully at once and aborts what is left
after a grace period; :meth:`Server.drain` stops accepting but keeps serving
the open connections until they end by themselves or the grace period does,
and only then closes them gracefully -- what a restart or an upgrade wants,
since the client of a connection closed early sees its answer cut short.

A server may listen on several sockets (an IPv4 and an IPv6 address, or the
sockets systemd hands over); they share one connection limit, one set of
counters and one shutdown.

The limits of a real host (:mod:`tlsuv.limits`): a per-client connection cap
(checked at accept, or when the PROXY header names the client), and running
out of file descriptors, which delays new connections instead of spinning or
dropping them -- the libuv behaviour behind that, and the way around it, are
in that module's docstring.  :meth:`Server.set_context` swaps the Context
new connections are made from; :class:`tlsuv.policy.ContextSet` swaps
certificates while keeping sessions resumable.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import pyuv
from OpenSSL import SSL

from . import _sockopt
from ._uv import format_address, socket_address, uv_error_text
from .connection import Connection, ConnectionOptions
from .errors import RefusedError, TimeoutError, TLSUVError
from .handler import HandlerFactory
from .limits import (
    RETRY_MAX,
    RETRY_MIN,
    ClientCounts,
    DescriptorReserve,
    Throttle,
    client_key,
    open_file_limit,
)
from .pending import PendingList
from .stats import (
    REFUSED_CLOSING,
    REFUSED_MAX_CONNECTIONS,
    REFUSED_NOT_ALLOWED,
    REFUSED_PER_IP,
    Snapshot,
    Stats,
)

if TYPE_CHECKING:
    from .accesslog import AccessLog

log = logging.getLogger("tlsuv")

# Linux caps listen() at net.core.somaxconn (4096 on current kernels); asking
# for more is harmless and lets a burst of handshakes queue instead of failing.
DEFAULT_BACKLOG: Final = 4096

# drain(): once the grace period is over, connections get close_notify and this
# long to answer it before they are aborted.  A peer that is still there answers
# within a round trip; the bound keeps a whole drain inside the grace period plus
# the 5 s after which tlsuv.workers kills a worker that has not finished.
DRAIN_CLOSE_WAIT: Final = 2.0


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
        max_connections_per_ip: int | None = None,
    ) -> None:
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        if max_connections_per_ip is not None and max_connections_per_ip < 1:
            raise ValueError("max_connections_per_ip must be at least 1")
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
        self._finished = self._connection_finished
        # Connections that finished (socket closed) but whose close callback has
        # not run yet: they are still in ``connections`` until the end of this
        # loop iteration, but no longer count against the limits.
        self._ending = 0
        # Connections accepted on a wildcard listener share their local address
        # while it repeats: one tuple for all of them instead of one each (~150 bytes).
        self._sockname: tuple[str, int] | None = None
        # A listener bound to one address hands every connection that address:
        # no getsockname per accept.  Wildcard (and transparent) listeners are
        # not in here; their connections ask.
        self._local: dict[pyuv.TCP, tuple[str, int]] = {}
        self._listeners: list[pyuv.TCP] = []
        self._address: tuple[str, int] | None = None  # the first listener's
        self._addresses: list[tuple[str, int]] = []
        self._closing = False
        # Keepalive and TCP_USER_TIMEOUT are set on the listener; whether accepted
        # sockets inherit them is checked once, at the first accept (_configure).
        self._inherits: bool | None = None
        self._grace_timer: pyuv.Timer | None = None
        self._on_closed: Callable[[], None] | None = None
        # Open connections per client address; the key each one was counted under.
        self._clients = ClientCounts(max_connections_per_ip) if max_connections_per_ip else None
        self._client_of: dict[Connection, str] = {}
        self._refusal_log = Throttle()
        # Out of file descriptors: the listeners whose connection libuv keeps
        # until we accept it, and the retry (tlsuv.limits).
        self._reserve: DescriptorReserve | None = None
        self._paused: list[pyuv.TCP] = []
        self._accept_timer: pyuv.Timer | None = None
        self._accept_paused_at: float | None = None
        self._accept_retry = RETRY_MIN
        self._exhausted_log = Throttle()
        self._accept_error_log = Throttle()
        # Counters for logs and stats.
        self.accepted = 0
        self.refused = 0  # every refusal, the per-client ones included
        self.accept_pauses = 0  # times accepting stopped for want of file descriptors
        self.handshakes_failed = 0
        # Connections ended by a deadline, by TimeoutError.phase: "handshake",
        # "idle", "close", "send", "keepalive", "proxy header".
        self.timeouts: dict[str, int] = {}
        # Ciphertext bytes of connections that are gone; add the open ones' for a total.
        self.ended_bytes_in = 0
        self.ended_bytes_out = 0
        # Monitoring (tlsuv.stats, tlsuv.metrics): refusals by reason (they add up
        # to ``refused``), each ended connection classified once, and an optional
        # access log (tlsuv.accesslog) that gets every ended connection.
        self.refused_by: dict[str, int] = dict.fromkeys(
            (REFUSED_MAX_CONNECTIONS, REFUSED_PER_IP, REFUSED_NOT_ALLOWED, REFUSED_CLOSING), 0)
        self.stats = Stats()
        self.access_log: AccessLog | None = None

    # -- listening -----------------------------------------------------------

    def listen(
        self, host: str = "127.0.0.1", port: int = 0, backlog: int = DEFAULT_BACKLOG
    ) -> tuple[str, int]:
        """Bind and listen; return the bound ``(host, port)``.  May be called again for more addresses."""
        if self._closing:
            raise ServerError("server is closing")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._hold_reserve()
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
        address = self._add_listener(tcp)
        log.info("listening on %s (%s)", format_address(address),
                 "IPv6" if family == socket.AF_INET6 else "IPv4")
        return address

    def listen_socket(self, sock: socket.socket, backlog: int = DEFAULT_BACKLOG) -> tuple[str, int]:
        """Adopt a bound socket made in Python (e.g. with SO_REUSEPORT) and listen on it.

        The socket may already be listening (one inherited from systemd or
        from the previous process during an upgrade): connections the kernel
        has queued on it are kept, and ``backlog`` replaces its queue length.
        The server owns the descriptor afterwards.
        """
        if self._closing:
            raise ServerError("server is closing")
        self._hold_reserve()
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
        address = self._add_listener(tcp)
        log.info("listening on %s (adopted socket)", format_address(address))
        return address

    def _add_listener(self, tcp: pyuv.TCP) -> tuple[str, int]:
        name = tcp.getsockname()
        address = (str(name[0]), int(name[1]))
        if not ipaddress.ip_address(address[0]).is_unspecified \
                and not _sockopt.transparent(tcp, ":" in address[0]):
            self._local[tcp] = (sys.intern(address[0]), address[1])
        self._configure_listener(tcp)
        self._listeners.append(tcp)
        self._addresses.append(address)
        if self._address is None:
            self._address = address
        return address

    @property
    def closing(self) -> bool:
        """:meth:`close`, :meth:`drain` or :meth:`abort` was called: no new connections are accepted."""
        return self._closing

    @property
    def accepting(self) -> bool:
        """Listening and not closing: what a readiness check asks."""
        return not self._closing and any(not listener.closed for listener in self._listeners)

    def snapshot(self) -> Snapshot:
        """Everything counted so far, open connections included (:mod:`tlsuv.stats`)."""
        refused = dict(self.refused_by)
        # A PROXY header error ends an accepted connection: it is counted when that ends.
        refused["proxy_header"] = self.stats.handshake_failures.get("proxy_header", 0)
        return self.stats.snapshot(accepted=self.accepted, refused=refused,
                                   ended_bytes_in=self.ended_bytes_in, ended_bytes_out=self.ended_bytes_out,
                                   live=self.connections, accepting=self.accepting)

    @property
    def address(self) -> tuple[str, int]:
        """The first address listened on."""
        if self._address is None:
            raise ServerError("server is not listening")
        return self._address

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every address listened on, in order."""
        return list(self._addresses)

    @property
    def accepting_paused(self) -> bool:
        """Accepting stopped for want of file descriptors; it resumes by itself."""
        return self._accept_paused_at is not None

    def set_context(self, context: SSL.Context) -> None:
        """Make connections accepted from now on with ``context``; open ones keep theirs.

        One assignment, so atomic for the loop.  Sessions (tickets and the
        session cache) belong to a Context: clients of the old one do a full
        handshake.  To swap certificates and keep sessions, build the first
        Context with :func:`tlsuv.policy.build_context_set` and use its
        :meth:`~tlsuv.policy.ContextSet.reload` or ``swap`` instead.
        """
        self.context = context

    def _hold_reserve(self) -> None:
        # Before the listening handle: libuv opens its own spare with the
        # loop's first stream, and ours must not depend on that one.
        if self._reserve is None:
            self._reserve = DescriptorReserve()

    def _on_connection(self, listener: pyuv.TCP, error: int | None) -> None:
        if error is not None:
            if error in (pyuv.errno.UV_EMFILE, pyuv.errno.UV_ENFILE):
                self._out_of_descriptors()
            elif (held := self._accept_error_log.ready(self.loop.now() / 1000)) is not None:
                # libuv tries again at once: an error that persists (ENOBUFS) comes back
                # at every try, and one line per try would fill the disk.
                more = f" ({held} more since the last report)" if held else ""
                log.warning("accept failed: %s%s", uv_error_text(error), more)
            return
        if self._reserve is not None and not self._reserve.headroom():
            # Leave this connection with libuv, which stops watching the
            # listener until we accept it (tlsuv.limits).
            self._pause_accepting(listener)
            return
        self._accept(listener)

    def _accept(self, listener: pyuv.TCP) -> None:
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
            self.max_connections is not None
            and len(self.connections) - self._ending >= self.max_connections
        ):
            self.refused += 1
            self.refused_by[REFUSED_CLOSING if self._closing else REFUSED_MAX_CONNECTIONS] += 1
            log.info("refusing connection: %s", "server closing" if self._closing else
                     f"limit of {self.max_connections} connections reached")
            tcp.close()
            return
        proxied = self.options.proxy is not None
        source = socket_address(tcp, "getpeername") if proxied or self._clients is not None else None
        if self.options.proxy is not None and not self.options.proxy.allows(source):
            # Only trusted balancers may claim a client address (tlsuv.proxy).
            self.refused += 1
            self.refused_by[REFUSED_NOT_ALLOWED] += 1
            log.warning("refusing connection from %s: not allowed to send a PROXY header",
                        format_address(source))
            tcp.close()
            return
        client = None
        if self._clients is not None and not proxied and source is not None:
            client = client_key(source[0])
            if not self._clients.admit(client):
                self._refuse_client(client)
                tcp.close()
                return
        self.accepted += 1
        if not self._inherits:  # TCP_NODELAY, keepalive and TCP_USER_TIMEOUT, where not inherited
            self._configure(tcp)
        per_client = proxied and self._clients is not None  # counted once the header names the client
        local = self._local.get(listener)
        conn = Connection(tcp, self.context, self.handler_factory, pending=self.pending,
                          options=self.options, on_gone=self._gone, on_finish=self._finished,
                          on_proxy_header=self._admit_proxied if per_client else None,
                          sockname=local)
        if client is not None:
            if conn.closed:  # its handler factory failed: it finished before we could file it
                assert self._clients is not None
                self._clients.release(client)
            else:
                self._client_of[conn] = client
        if local is None:  # a wildcard listener: share the tuple while the address repeats
            if conn.sockname == self._sockname:
                conn.sockname = self._sockname
            else:
                self._sockname = conn.sockname
        if log.isEnabledFor(logging.DEBUG):  # skip formatting per connection when nobody looks
            log.debug("%s: accepted", format_address(conn.peer))
        self.connections.add(conn)
        conn._start()

    # -- per-client limit -----------------------------------------------------

    def _admit_proxied(self, conn: Connection) -> BaseException | None:
        """The PROXY header named the client: count it, or refuse it (Connection calls this)."""
        assert self._clients is not None
        if conn.peer is None:
            return None
        client = client_key(conn.peer[0])
        if not self._clients.admit(client):
            self._refuse_client(client)
            return RefusedError(f"refused: {self._clients.limit} connection(s) from {client} "
                                f"already open")
        self._client_of[conn] = client
        return None

    def _refuse_client(self, client: str) -> None:
        assert self._clients is not None
        self.refused += 1
        self.refused_by[REFUSED_PER_IP] += 1
        held = self._refusal_log.ready(self.loop.now() / 1000)
        if held is not None:
            more = f" ({held} more refused since the last report)" if held else ""
            log.warning("refusing a connection from %s: %d already open from that address "
                        "(the per-client limit)%s", client, self._clients.limit, more)

    # -- out of file descriptors -------------------------------------------------

    def _pause_accepting(self, listener: pyuv.TCP | None) -> None:
        """``listener``'s connection stays with libuv, which stops watching it until we accept."""
        if listener is not None and listener not in self._paused:
            self._paused.append(listener)
        now = self.loop.now() / 1000
        if self._accept_paused_at is None:
            self._accept_paused_at = now
            self._accept_retry = RETRY_MIN
            self.accept_pauses += 1
        held = self._exhausted_log.ready(now)
        if held is not None:
            log.warning("out of file descriptors (limit %d, %d connection(s) open): new connections "
                        "wait in the listen queue until descriptors free up", open_file_limit(),
                        len(self.connections))
        self._retry_accept_in(self._accept_retry)
        self._accept_retry = min(self._accept_retry * 2, RETRY_MAX)

    def _retry_accept_in(self, seconds: float) -> None:
        if self._accept_timer is None:
            self._accept_timer = pyuv.Timer(self.loop)
        self._accept_timer.start(self._retry_accept, seconds, 0.0)

    def _retry_accept(self, timer: pyuv.Timer) -> None:
        if self._accept_paused_at is None or self._closing:
            return
        assert self._reserve is not None
        while self._paused:
            listener = self._paused[0]
            if listener.closed:
                self._paused.pop(0)
                continue
            if not self._reserve.headroom():
                self._pause_accepting(None)
                return
            self._paused.pop(0)
            self._accept(listener)  # the connection libuv kept; it then watches the listener again
        waited = self.loop.now() / 1000 - self._accept_paused_at
        self._accept_paused_at = None
        log.info("file descriptors free again: accepting after %.1fs", waited)

    def _out_of_descriptors(self) -> None:
        """EMFILE reached us: libuv's spare is gone and it will retry accept() at once, forever."""
        if self._reserve is not None and self._reserve.release():
            # The retry takes the freed slot; the next callback pauses (tlsuv.limits).
            log.warning("accept() failed: out of file descriptors; releasing the spare descriptor "
                        "so that libuv's retry succeeds")
            return
        # Both spares are gone: free a descriptor by losing one connection
        # rather than the whole loop to libuv's retry loop.
        victims = [c for c in self.connections if not c.handshake_completed] or list(self.connections)
        if victims:
            log.error("out of file descriptors with no spare left: aborting %s to keep accepting",
                      format_address(victims[-1].peer))
            victims[-1].abort(RefusedError("aborted: the server ran out of file descriptors"))
            return
        log.error("out of file descriptors and nothing of ours to free: no longer listening")
        self.stop_listening()

    def _configure_listener(self, tcp: pyuv.TCP) -> None:
        try:
            # TCP_NODELAY: TLS records are already batched per loop iteration.
            _sockopt.configure(tcp, self.options.keepalive, self.options.send_timeout, nodelay=True)
        except (OSError, pyuv.error.UVError) as exc:
            self._inherits = False  # set them on each connection instead
            log.debug("cannot set TCP_NODELAY/keepalive/TCP_USER_TIMEOUT on the listener: %s", exc)

    def _configure(self, tcp: pyuv.TCP) -> None:
        """TCP_NODELAY, keepalive and TCP_USER_TIMEOUT for an accepted socket that did not inherit them."""
        keepalive, send_timeout = self.options.keepalive, self.options.send_timeout
        try:
            if self._inherits is None:
                # Once per server: Linux copies them from the listener, other systems may not.
                self._inherits = _sockopt.configured(tcp, keepalive, send_timeout, nodelay=True)
                if self._inherits:
                    return
            _sockopt.configure(tcp, keepalive, send_timeout, nodelay=True)
        except (OSError, pyuv.error.UVError) as exc:  # gone already: its first read will say so
            log.debug("cannot set TCP_NODELAY/keepalive/TCP_USER_TIMEOUT: %s", exc)

    def _connection_finished(self, conn: Connection) -> None:
        self._ending += 1
        if self._client_of:
            client = self._client_of.pop(conn, None)
            if client is not None and self._clients is not None:
                self._clients.release(client)

    def _connection_gone(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self._ending -= 1
        if self._accept_paused_at is not None and not self._closing:
            self._retry_accept_in(0.0)  # its descriptor is free now
        self.ended_bytes_in += conn.bytes_in
        self.ended_bytes_out += conn.bytes_out
        if not conn.handshake_completed:
            self.handshakes_failed += 1
        reason = conn.reason
        if isinstance(reason, TimeoutError):
            self.timeouts[reason.phase] = self.timeouts.get(reason.phase, 0) + 1
        self.stats.connection_ended(conn)
        if self.access_log is not None:
            self.access_log.connection_ended(conn)
        if self._closing and not self.connections:
            self._all_closed()

    # -- shutdown ------------------------------------------------------------

    def stop_listening(self) -> None:
        for listener in self._listeners:
            if not listener.closed:
                listener.close()

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

    def drain(self, grace: float | None = 5.0, callback: Callable[[], None] | None = None) -> None:
        """Stop accepting; serve open connections until they end or ``grace`` runs out; then close them.

        What a restart or an upgrade wants: a connection that was mid-way
        through an exchange finishes it.  When ``grace`` seconds are over,
        what is still open gets close_notify (a graceful close), and
        :data:`DRAIN_CLOSE_WAIT` seconds later whatever has not finished is
        aborted.  ``grace=None`` waits for the peers however long they take.
        ``callback`` runs once everything is closed, as for :meth:`close`;
        :meth:`abort` cuts a drain short.  Idempotent, and a no-op after :meth:`close`.
        """
        if self._closing:
            return
        self._closing = True
        self._on_closed = callback
        self.stop_listening()
        if not self.connections:
            self._all_closed()
            return
        if grace is not None:
            self._grace_timer = pyuv.Timer(self.loop)
            self._grace_timer.start(self._drain_expired, grace, 0.0)

    def _drain_expired(self, timer: pyuv.Timer) -> None:
        log.info("grace period over: closing %d connection(s)", len(self.connections))
        for conn in list(self.connections):
            conn.close()
        if self.connections:
            timer.start(self._grace_expired, DRAIN_CLOSE_WAIT, 0.0)

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
        if self._accept_timer is not None and not self._accept_timer.closed:
            self._accept_timer.close()
        if self._reserve is not None:
            self._reserve.close()
        self.pending.close()
        callback, self._on_closed = self._on_closed, None
        if callback is not None:
            callback()
