"""The pending list and the ``after_io`` Prepare handle (the seed's ``pending_writes`` queue).

A write never sends ciphertext itself.  It puts its connection on the
pending list; once per loop iteration, just before libuv polls for I/O, the
``after_io`` Prepare handle walks the list and lets each connection retry
its deferred writes and flush its outgoing BIO.  Batching there means one
socket write per connection per iteration however many ``write()`` calls the
handler made, and it gives the read-needs-write / write-needs-read dance of
OpenSSL one orderly place to happen.  One exception, for speed: what a
handler writes from inside ``read`` is flushed as the read callback returns
(still one write(2) for all of it), unless the connection has deferred
writes, is closing or has a paused writer -- those always come here.

Two departures from the seed:

* The Prepare handle runs only while the list is non-empty (as uvloop does
  with its queued writes).  A started Prepare handle keeps the loop alive, so
  an always-on one would stop ``loop.run()`` from ever returning.
* The list is drained by swapping it for an empty one, and drained again if
  flushing queued more work (a handler callback that writes, a close that
  follows a flush).  libuv computes its poll timeout *after* the Prepare
  callbacks, so work left on the list here would wait for unrelated I/O.

The same per-loop object also runs the *compaction* sweep: a connection
whose memory BIOs grew (a handshake, a bulk transfer) asks to be compacted;
every ``COMPACT_INTERVAL`` seconds the ones that stayed idle since they asked
have both BIOs freed (``TLSEngine.compact``; new ones are made when the
connection is next used), so idle connections give that memory back.  Its
timer is unreferenced (it never keeps the loop alive) and is closed whenever
no connection is waiting.
"""

from __future__ import annotations

from typing import Protocol

import pyuv

# After this many passes in one iteration something keeps re-queueing itself
# (a handler writing from resume_writing as fast as the kernel takes it).  We
# stop there so timers and reads still get their turn, and an Idle handle
# makes the coming poll return at once so the rest is not delayed.
MAX_PASSES = 16

# Idle this long before a connection's BIOs are replaced: long enough that a
# connection between two bursts is left alone (it would regrow them at once),
# short enough that a burst of new handshakes is compacted within seconds.
COMPACT_INTERVAL = 1.0


class Flushable(Protocol):
    def _after_io(self) -> None: ...


class Compactable(Protocol):
    @property
    def activity(self) -> int: ...

    def _compact(self) -> None: ...


class PendingList:
    """Connections with ciphertext to send or deferred writes to retry."""

    __slots__ = ("_active", "_compact", "_compact_timer", "_idle", "_loop", "_pending", "_prepare")

    def __init__(self, loop: pyuv.Loop) -> None:
        self._loop = loop
        self._prepare = pyuv.Prepare(loop)
        self._idle = pyuv.Idle(loop)
        # A dict used as an ordered set: O(1) add, remove and membership, and
        # connections are flushed in the order they asked.
        self._pending: dict[Flushable, None] = {}
        self._active = False
        # Connections waiting to be compacted, with their activity when they asked.
        self._compact: dict[Compactable, int] = {}
        self._compact_timer: pyuv.Timer | None = None

    def add(self, conn: Flushable) -> None:
        self._pending[conn] = None
        if not self._active:
            self._active = True
            self._prepare.start(self._after_io)

    def _after_io(self, handle: pyuv.Prepare) -> None:
        for _ in range(MAX_PASSES):
            batch = self._pending
            if not batch:
                break
            self._pending = {}
            for conn in batch:
                conn._after_io()
        if self._pending:
            if not self._idle.active:
                self._idle.start(_no_op)
            return
        if self._idle.active:
            self._idle.stop()
        self._active = False
        self._prepare.stop()

    # -- compaction ---------------------------------------------------------

    def compact_later(self, conn: Compactable) -> None:
        if conn in self._compact:
            return
        self._compact[conn] = conn.activity
        if self._compact_timer is None:
            timer = self._compact_timer = pyuv.Timer(self._loop)
            timer.ref = False
            timer.start(self._sweep, COMPACT_INTERVAL, COMPACT_INTERVAL)

    def forget(self, conn: Compactable) -> None:
        """The connection is gone: no flush, no compaction."""
        self._pending.pop(conn, None)  # type: ignore[call-overload]  # also a Flushable
        if self._compact.pop(conn, None) is not None and not self._compact:
            self._stop_sweeping()

    def _sweep(self, timer: pyuv.Timer) -> None:
        waiting = self._compact
        for conn, seen in list(waiting.items()):
            now = conn.activity
            if now == seen:
                del waiting[conn]
                conn._compact()
            else:
                waiting[conn] = now  # busy: look again next time
        if not waiting:
            self._stop_sweeping()

    def _stop_sweeping(self) -> None:
        timer, self._compact_timer = self._compact_timer, None
        if timer is not None and not timer.closed:
            timer.close()

    def close(self) -> None:
        self._pending.clear()
        self._compact.clear()
        self._stop_sweeping()
        self._active = False
        for h in (self._prepare, self._idle):
            if not h.closed:
                h.close()


def _no_op(handle: pyuv.Idle) -> None:
    pass
