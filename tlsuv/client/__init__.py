"""Outgoing TLS connections with the same handler interface as the server.

::

    conn = tlsuv.client.connect(loop, "example.com", 443, MyHandler, alpn=["http/1.1"])
    loop.run()

:func:`connect` returns the :class:`~tlsuv.Connection` at once; the handler
sees ``established`` when TCP is up, ``handshake_complete`` when TLS is, and
``closed(conn, reason)`` exactly once however it ends -- a name that does not
resolve, a refused or timed-out TCP connect (:class:`~tlsuv.TransportError`,
:class:`~tlsuv.TimeoutError` with ``phase="connect"``), a certificate that
does not verify (:class:`~tlsuv.CertificateVerifyError`), any TLS error.
``write()`` may be called right away: the bytes wait for the handshake.

Security defaults: the server certificate is verified against the system CA
store (or ``cafile``) and must name the host (OpenSSL's own RFC 6125 check,
IP addresses included); SNI is sent for host names, never for IP literals
(RFC 6066 section 3).  ``verify=False`` turns both checks off.  What the
client offers follows the same Server Side TLS profile as the server,
intermediate unless ``profile`` names another (:mod:`tlsuv.profiles`).

Where the pending list lives
============================

Every connection needs the ``after_io`` pending list of its loop
(:mod:`tlsuv.pending`).  A :class:`~tlsuv.Server` owns one; clients have no
such owner, so tlsuv keeps **one pending list per loop, shared by every
client connection on it** and reference-counted: made by the first client
connection on a loop, closed (its Prepare and Idle handles with it) when the
last one is gone.  ``loop.run()`` therefore returns once the connections are
closed, and nothing needs an explicit ``close()``.

:class:`Client` is the reusable form: one Context (loading the system CA
store takes milliseconds, so build it once), one set of options, and a cache
of TLS sessions so that the next connection to the same server resumes.
:func:`connect` is a one-off ``Client``.

The TCP handle before the connect completes
===========================================

The Connection exists before its socket is connected (name resolution and
``connect`` are asynchronous), and a name may resolve to several addresses
tried in turn, each needing a fresh pyuv handle.  :class:`_ClientConnection`
therefore holds back the two things that touch the socket -- the ``after_io``
flush and starting to read -- until the connect succeeds; writes made
meanwhile wait inside OpenSSL as deferred writes, exactly as writes before a
server handshake do.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pyuv
from OpenSSL import SSL

from .. import _openssl, _sockopt
from .._uv import format_address, socket_address, uv_error_text
from ..connection import Connection, ConnectionOptions, Phase
from ..errors import TimeoutError, TransportError
from ..pending import PendingList
from ..policy import build_client_context
from ..profiles import DEFAULT_PROFILE
from ..tls import State

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..handler import HandlerFactory

log = logging.getLogger("tlsuv")

# Covers every address a name resolves to.  The kernel retries a SYN for
# about two minutes; a minute of silence already means nobody is there, and
# a slow or lossy path connects well within it (SYN retries at 1, 3, 7, 15 s).
DEFAULT_CONNECT_TIMEOUT: Final = 30.0

# One resumable session per server is what browsers keep too; bounding the
# number of servers keeps a long-lived Client from growing without limit.
MAX_CACHED_SESSIONS: Final = 256


# -- the shared pending list of each loop ------------------------------------------


class _LoopShare:
    __slots__ = ("pending", "users")

    def __init__(self, loop: pyuv.Loop) -> None:
        self.pending = PendingList(loop)
        self.users = 0


_shared: dict[pyuv.Loop, _LoopShare] = {}
# Loops run on different threads; only this dict is shared between them.
_shared_lock = threading.Lock()


def _acquire_pending(loop: pyuv.Loop) -> PendingList:
    with _shared_lock:
        share = _shared.get(loop)
        if share is None:
            share = _shared[loop] = _LoopShare(loop)
        share.users += 1
        return share.pending


def _release_pending(loop: pyuv.Loop) -> None:
    with _shared_lock:
        share = _shared.get(loop)
        if share is None:  # pragma: no cover - a release without an acquire is a bug
            return
        share.users -= 1
        if share.users > 0:
            return
        del _shared[loop]
    share.pending.close()


def pending_list_users(loop: pyuv.Loop) -> int:
    """Client connections currently sharing ``loop``'s pending list (0 when it is closed)."""
    with _shared_lock:
        share = _shared.get(loop)
        return share.users if share is not None else 0


# -- the connection before its socket is connected ------------------------------------


class _ClientConnection(Connection):
    """A Connection whose TCP handle connects after construction, trying each address in turn.

    It starts in :attr:`Phase.CONNECTING <tlsuv.connection.Phase>`, where the
    connection neither flushes nor reads; :meth:`Connection._start` moves it
    to the handshake once a connect succeeds.
    """

    __slots__ = ("_addresses", "_connect_error", "_session_key", "_target")

    def __init__(self, tcp: pyuv.TCP, context: SSL.Context, factory: HandlerFactory, *,
                 target: tuple[str, int], **kwargs: Any) -> None:
        # Set before Connection.__init__: it calls the handler factory, which may write.
        self._target = target
        self._addresses: list[tuple[Any, ...]] = []
        self._connect_error: str | None = None
        self._session_key: tuple[str, int] | None = None  # where Client files this session
        super().__init__(tcp, context, factory, server_side=False, **kwargs)

    def _begin(self, timeout: float | None) -> None:
        if self.closed:
            return
        if timeout is not None:
            # libuv's clock is cached per loop iteration; connect() may come
            # long after the last one (before loop.run()), which would cut the
            # timeout short.
            self._tcp.loop.update_time()
            self._arm_timer(timeout)  # the CONNECTING phase's deadline
        host, port = self._target
        if _openssl.is_ip_address(host):
            self._addresses = [(host, port)]
            self._try_next()
            return
        try:
            pyuv.dns.getaddrinfo(self._tcp.loop, host, port, socktype=socket.SOCK_STREAM,
                                 callback=self._on_resolved)
        except (pyuv.error.UVError, TypeError, ValueError, OverflowError) as exc:
            self._fail_connect(f"cannot resolve {host}: {uv_error_text(exc)}", exc)

    def _on_resolved(self, result: list[Any] | None, error: int | None) -> None:
        if self.closed:
            return
        host = self._target[0]
        if error is not None or not result:
            text = uv_error_text(error) if error is not None else "no address"
            self._fail_connect(f"cannot resolve {host}: {text}", errno=error)
            return
        self._addresses = [tuple(r.sockaddr) for r in result]
        self._try_next()

    def _try_next(self) -> None:
        while self._addresses:
            addr = self._addresses.pop(0)
            self.peer = (str(addr[0]), int(addr[1]))  # for log lines until connected
            if self._connect_error is not None:
                # A handle that tried once is spent; a fresh one per address.
                self._tcp.close()
                self._tcp = pyuv.TCP(self._tcp.loop)
            try:
                self._tcp.connect(addr, self._on_connect)
                return
            except pyuv.error.UVError as exc:
                self._connect_error = uv_error_text(exc)
        self._fail_connect(f"cannot connect to {format_address(self._target)}: {self._connect_error}")

    def _on_connect(self, tcp: pyuv.TCP, error: int | None) -> None:
        if self.closed or tcp is not self._tcp:
            return
        if error is not None:
            self._connect_error = uv_error_text(error)
            log.debug("connect to %s failed: %s", format_address(self.peer), self._connect_error)
            if self._addresses:
                self._try_next()
            else:
                self._fail_connect(f"cannot connect to {format_address(self._target)}: "
                                   f"{self._connect_error}", errno=error)
            return
        tcp.nodelay(True)  # TLS records are already batched per loop iteration
        try:
            _sockopt.configure(tcp, self._options.keepalive, self._options.send_timeout)
        except (OSError, pyuv.error.UVError) as exc:  # gone already: its first read will say so
            log.debug("cannot set keepalive/TCP_USER_TIMEOUT: %s", exc)
        self.peer = socket_address(tcp, "getpeername") or self.peer
        self.sockname = socket_address(tcp, "getsockname")
        log.debug("%s: connected", format_address(self.peer))
        self._start()

    def _fail_connect(self, message: str, cause: BaseException | None = None,
                      errno: int | None = None) -> None:
        self._abort(TransportError(message, errno=errno), cause=cause)

    def _timeout_error(self, phase: Phase) -> TimeoutError:
        if phase is Phase.CONNECTING:
            return TimeoutError(f"connect to {format_address(self._target)} timed out", phase="connect")
        return super()._timeout_error(phase)


# -- the public API ---------------------------------------------------------------


class Client:
    """Makes outgoing TLS connections on ``loop`` with one Context and one set of options.

    Pass a ready ``context``, or the options to build one
    (:func:`tlsuv.policy.build_client_context`).  Sessions are remembered per
    server name and port, so a later connection to the same server resumes
    (``conn.session_reused``) unless ``resume_sessions=False``.
    """

    def __init__(
        self,
        loop: pyuv.Loop,
        context: SSL.Context | None = None,
        *,
        cafile: str | Path | None = None,
        verify: bool = True,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        alpn: Sequence[str] | str | None = None,
        profile: str | None = None,
        min_version: str | None = None,
        max_version: str | None = None,
        ciphers: str | None = None,
        ciphersuites: str | None = None,
        keylog: str | Path | None = None,
        options: ConnectionOptions | None = None,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        resume_sessions: bool = True,
    ) -> None:
        if connect_timeout is not None and connect_timeout <= 0:
            raise ValueError("connect_timeout must be positive or None")
        builds_context = not verify or any(v is not None for v in (
            cafile, cert, key, alpn, keylog, profile, min_version, max_version, ciphers, ciphersuites))
        if context is not None and builds_context:
            raise ValueError("pass either a ready context or the options to build one, not both")
        if context is None:
            # The same Server Side TLS profile as the server's default (tlsuv.profiles).
            context = build_client_context(
                cafile=cafile, verify=verify, cert=cert, key=key, alpn=alpn,
                profile=profile or DEFAULT_PROFILE, min_version=min_version, max_version=max_version,
                ciphers=ciphers, ciphersuites=ciphersuites, keylog=keylog)
        if not _openssl.HAVE_HOST_CHECK and context.get_verify_mode() & SSL.VERIFY_PEER:
            # Verifying the chain but not the name would accept any valid
            # certificate for any site: refuse rather than pretend.
            raise RuntimeError("this pyOpenSSL cannot check host names; upgrade it or pass verify=False")
        self.loop = loop
        self.context = context
        self.options = options or ConnectionOptions()
        self.connect_timeout = connect_timeout
        self.resume_sessions = resume_sessions
        self.connections: set[Connection] = set()
        self._sessions: dict[tuple[str, int], SSL.Session] = {}

    def connect(self, host: str, port: int, handler_factory: HandlerFactory, *,
                server_hostname: str | None = None) -> Connection:
        """Start a connection to ``host:port``; return its :class:`Connection` at once.

        ``server_hostname`` is the name sent as SNI and required in the
        certificate (default: ``host``).  An IP address there is checked
        against the certificate's IP entries and sends no SNI.
        """
        if not isinstance(port, int) or not 0 < port <= 65535:
            raise ValueError(f"port must be 1-65535, not {port!r}")
        host = host.strip("[]")  # "[::1]" as written in URLs
        name = server_hostname if server_hostname is not None else host
        is_ip = _openssl.is_ip_address(name)
        if not is_ip:
            name = name.rstrip(".")
            try:
                if not name or not name.encode("idna"):
                    raise UnicodeError("empty")
            except UnicodeError as exc:
                raise ValueError(f"not a valid host name: {name!r}") from exc
        pending = _acquire_pending(self.loop)
        tcp = pyuv.TCP(self.loop)
        try:
            conn = _ClientConnection(tcp, self.context, handler_factory, target=(host, port),
                                     pending=pending, options=self.options, on_gone=self._gone,
                                     server_hostname=None if is_ip else name)
        except BaseException:
            tcp.close()
            _release_pending(self.loop)
            raise
        self.connections.add(conn)
        ssl = conn.ssl
        if self.context.get_verify_mode() & SSL.VERIFY_PEER:
            _openssl.expect_peer_name(ssl, name)
        session = self._sessions.get((name.lower(), port)) if self.resume_sessions else None
        if session is not None and ssl.get_state_string() == b"before SSL initialization":
            ssl.set_session(session)
        conn._session_key = (name.lower(), port)
        conn._begin(self.connect_timeout)
        return conn

    def _gone(self, conn: Connection) -> None:
        self.connections.discard(conn)
        _release_pending(self.loop)
        key = conn._session_key if isinstance(conn, _ClientConnection) else None
        # Only a session whose handshake completed and whose TLS never failed is worth resuming.
        if not self.resume_sessions or key is None or not conn.handshake_completed \
                or conn.state is State.FAILED:
            return
        session = conn.ssl.get_session()
        if session is None:
            return
        self._sessions.pop(key, None)  # re-insert: the dict's order is least recently used first
        self._sessions[key] = session
        while len(self._sessions) > MAX_CACHED_SESSIONS:
            del self._sessions[next(iter(self._sessions))]

    def forget_sessions(self) -> None:
        self._sessions.clear()

    def close(self) -> None:
        """Close every connection gracefully (each one ends with its own ``closed``)."""
        for conn in list(self.connections):
            conn.close()


def connect(
    loop: pyuv.Loop,
    host: str,
    port: int,
    handler_factory: HandlerFactory,
    *,
    context: SSL.Context | None = None,
    server_hostname: str | None = None,
    cafile: str | Path | None = None,
    verify: bool = True,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    alpn: Sequence[str] | str | None = None,
    profile: str | None = None,
    min_version: str | None = None,
    max_version: str | None = None,
    keylog: str | Path | None = None,
    options: ConnectionOptions | None = None,
    connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
) -> Connection:
    """Connect to ``host:port`` over TLS; see the module docstring.  A one-off :class:`Client`."""
    client = Client(loop, context, cafile=cafile, verify=verify, cert=cert, key=key, alpn=alpn,
                    profile=profile, min_version=min_version, max_version=max_version, keylog=keylog,
                    options=options, connect_timeout=connect_timeout, resume_sessions=False)
    return client.connect(host, port, handler_factory, server_hostname=server_hostname)

