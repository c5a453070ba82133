"""The handler interface: what the application implements (the seed's ``connection_handler_t``).

The seed passes a table of function pointers; here it is a class with one
instance per connection, made by a *handler factory* (the seed's
``create_connection``), so per-connection state lives on ``self``.

Reading is inverted, as in the seed: the application never asks for data,
:meth:`Handler.read` is called whenever plaintext arrives.  Writing is
asynchronous: :meth:`~tlsuv.Connection.write` never blocks and never fails
because of the network; errors arrive later through :meth:`Handler.closed`.

Order of calls for one connection, each at most once unless noted::

    factory(conn) -> handler
    handler.established(conn)          # TCP accepted; writes are deferred until TLS is up
    handler.handshake_complete(conn)   # TLS is up: version, cipher, ALPN, peer cert known
    handler.read(conn, data)           # any number of times
    handler.pause_writing(conn) / handler.resume_writing(conn)   # alternate, any number
    handler.closed(conn, reason)       # exactly once, always last

``closed`` is called even when the connection never got past the handshake,
so a handler can always release what it holds there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .connection import Connection


class Handler:
    """Base class with do-nothing callbacks; override what you need."""

    # No __dict__ of its own: a subclass that declares __slots__ (tlsuv.echo's
    # does) then costs ~50 bytes less per connection; one that does not gets
    # its __dict__ as before.
    __slots__ = ()

    def established(self, conn: Connection) -> None:
        """The connection exists and may be written to (the TLS handshake has not run yet)."""

    def handshake_complete(self, conn: Connection) -> None:
        """The first TLS handshake finished; deferred writes are being sent now."""

    def read(self, conn: Connection, data: bytes) -> None:
        """Plaintext from the peer, in the order it was sent (chunk sizes are arbitrary)."""

    def closed(self, conn: Connection, reason: BaseException | None) -> None:
        """The connection is gone.  ``reason`` is None for a clean TLS close, else why."""

    def pause_writing(self, conn: Connection) -> None:
        """More than the high-water mark is queued for this peer: stop producing."""

    def resume_writing(self, conn: Connection) -> None:
        """The queue drained below the low-water mark: producing may go on."""


class HandlerFactory(Protocol):
    """Makes the handler of a new connection (the seed's ``create_connection``)."""

    def __call__(self, conn: Connection, /) -> Handler: ...
