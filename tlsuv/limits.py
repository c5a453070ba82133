"""The limits of a real host: file descriptors, and connections per client.

Why this module exists
======================

Every connection is a file descriptor, and the soft ``RLIMIT_NOFILE`` most
hosts start a service with is 1024 -- far below what one loop can serve.
:func:`raise_open_file_limit` lifts it to the hard limit, as Go's runtime
and most servers do at start; ``--max-connections`` stays the way to ask for
less.  Running out anyway (a lower hard limit, descriptors used by something
else) must neither spin nor stop the server, which is what
:class:`DescriptorReserve` is for; and one client must not take every slot,
which is what :class:`ClientCounts` is for (``--max-connections-per-ip``).
Like the other cores, this module never imports pyuv: :class:`tlsuv.Server`
does the looping.

What libuv 1.13 (pyuv 1.4.0) does when accept() fails with EMFILE
=================================================================

``uv__server_io`` accepts in a loop until ``EAGAIN``.  On ``EMFILE`` or
``ENFILE`` it plays a trick: it closes a spare descriptor it opened when the
loop's first stream was made, accepts every queued connection and closes each
at once, then reopens the spare.  The server never hears of it: clients see
their connection closed right after it was accepted, and nothing is logged.
If the spare is gone -- it could not be reopened, because another thread or
process took the slot, or the system-wide table (``ENFILE``) was full -- the
trick returns ``EMFILE`` and libuv calls the connection callback with it and
then *immediately tries again*, forever, inside one callback: the loop never
polls again and a core spins at 100 %.  libuv has no way to stop watching a
listening socket short of closing it (``uv_read_stop`` ignores listeners).

How tlsuv handles it: delay, do not drop
========================================

libuv does have one pause: when the connection callback does *not* call
``accept()``, libuv keeps the accepted descriptor, stops watching the
listener, and starts again when the server finally accepts.  tlsuv uses it:

* After every accept the server asks :meth:`DescriptorReserve.headroom`
  whether one more descriptor is free besides its own spare (a ``dup`` and a
  ``close``, two cheap system calls per connection).  If not, it leaves the
  connection with libuv: the listener is no longer watched, new connections
  wait in the kernel's listen queue (clients see a slow handshake, not a
  reset), a warning is logged at most every :data:`LOG_EVERY` seconds, and a
  timer retries with back-off (:data:`RETRY_MIN` doubling to
  :data:`RETRY_MAX`), and at once when one of the server's own connections
  closes.  When the probe succeeds it accepts the waiting connection and
  libuv watches the listener again: recovery needs nobody.  Because the
  server pauses while a descriptor is still free, libuv's own trick (which
  would close clients silently) does not run -- unless something else takes
  that descriptor first (libuv itself does, once, when it re-opens a lost
  spare as the next connection's handle is made).

* If ``EMFILE`` reaches the callback anyway (libuv's spare is gone), the
  server closes its own spare: libuv's immediate retry then succeeds, the
  next callback sees no headroom and pauses as above, and the spare is
  reopened before accepting resumes.  Should both spares be gone, the server
  aborts one of its connections that has not finished its handshake (or,
  failing that, any) -- losing one connection instead of the whole loop.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import resource
import weakref
from typing import Final

# What a lost descriptor race looks like: EMFILE for the process, ENFILE for the system.
_OUT_OF_DESCRIPTORS: Final = frozenset({errno.EMFILE, errno.ENFILE})

# Retry accepting after running out of descriptors: quickly at first (a burst
# of short connections frees descriptors within milliseconds), backing off to
# once a second so a server that stays full costs nothing.
RETRY_MIN: Final = 0.05
RETRY_MAX: Final = 1.0

# One warning per this many seconds while refusing or delaying connections:
# enough to see that it goes on, not enough to fill a disk.
LOG_EVERY: Final = 10.0

# Linux's default fs.nr_open: the most RLIMIT_NOFILE can be when the hard
# limit reads as "unlimited" (setrlimit refuses RLIM_INFINITY there).
_NR_OPEN_DEFAULT: Final = 1 << 20


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return ``(before, after)``.

    Never lowers it and never fails: if the kernel refuses, the limit stays.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _NR_OPEN_DEFAULT
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, target
    return soft, soft


def open_file_limit() -> int:
    """The soft ``RLIMIT_NOFILE`` now."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class DescriptorReserve:
    """One descriptor held back for a bad moment, and a probe for headroom (module docstring)."""

    def __init__(self) -> None:
        # A one-item list shared with the finalizer, which closes whatever is
        # held when the owner is collected without close() (a server never closed).
        self._fd = [-1]
        weakref.finalize(self, _close_held, self._fd)
        self.open()

    @property
    def fd(self) -> int:
        """The spare descriptor, or -1 while released."""
        return self._fd[0]

    def open(self) -> bool:
        """Hold the spare descriptor again (if not held); False if none is free."""
        if self._fd[0] >= 0:
            return True
        try:
            self._fd[0] = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return False
        return True

    def release(self) -> bool:
        """Close the spare so that the next accept() can take its slot; False if none was held."""
        fd, self._fd[0] = self._fd[0], -1
        if fd < 0:
            return False
        os.close(fd)
        return True

    def headroom(self) -> bool:
        """The spare is held (reopened if it was released) and one more descriptor is free."""
        if not self.open():
            return False
        try:
            os.close(os.dup(self._fd[0]))
        except OSError as exc:
            if exc.errno in _OUT_OF_DESCRIPTORS:
                return False
            raise
        return True

    def close(self) -> None:
        self.release()


def _close_held(fd: list[int]) -> None:
    if fd[0] >= 0:
        os.close(fd[0])
        fd[0] = -1


def client_key(host: str) -> str:
    """The address a per-client limit counts: IPv4 clients of a dual-stack socket as IPv4."""
    # ::ffff:192.0.2.1, which Python < 3.13 spells ::ffff:c000:201; a prefix
    # test would miss the long forms (0:0:0:0:0:ffff:...).
    if ":" in host:
        try:
            mapped = ipaddress.IPv6Address(host).ipv4_mapped
        except ValueError:
            return host
        if mapped is not None:
            return str(mapped)
    return host


class ClientCounts:
    """Open connections per client address, capped at ``limit`` each.

    Counts one address, not a network: an IPv6 client that spreads over its
    /64 is several clients here.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the per-client limit must be at least 1")
        self.limit = limit
        self._open: dict[str, int] = {}

    def admit(self, key: str) -> bool:
        """Count one more connection from ``key``; False (and nothing counted) if it has ``limit``."""
        n = self._open.get(key, 0)
        if n >= self.limit:
            return False
        self._open[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self._open.get(key, 0) - 1
        if n > 0:
            self._open[key] = n
        else:
            self._open.pop(key, None)

    def open(self, key: str) -> int:
        return self._open.get(key, 0)

    def clients(self) -> int:
        """How many clients have connections open (a method, not ``len``: a server tests
        ``if counts is not None``, and an empty ``__len__`` would read as false)."""
        return len(self._open)


class Throttle:
    """At most one log line per ``every`` seconds; counts what it held back."""

    def __init__(self, every: float = LOG_EVERY) -> None:
        self.every = every
        self._last: float | None = None
        self.held = 0

    def ready(self, now: float) -> int | None:
        """None: stay quiet.  Else log now; the number is how many were held back since the last."""
        if self._last is not None and now - self._last < self.every:
            self.held += 1
            return None
        self._last = now
        held, self.held = self.held, 0
        return held


__all__ = [
    "LOG_EVERY",
    "RETRY_MAX",
    "RETRY_MIN",
    "ClientCounts",
    "DescriptorReserve",
    "Throttle",
    "client_key",
    "open_file_limit",
    "raise_open_file_limit",
]
