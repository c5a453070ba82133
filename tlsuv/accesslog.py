"""The TLS access log: one JSON line per connection, written when it ends.

Why this module exists
======================

Metrics (tlsuv.metrics) say how many; the access log says who and how: for
every connection, the client's address (the real one behind a PROXY
header, and the balancer's), the SNI name it asked for, the negotiated TLS
version, cipher and ALPN protocol, whether it resumed a session, its client
certificate, how long the handshake and the whole connection took, the
bytes each way, and why it ended, in the words of :mod:`tlsuv.errors`.  A
failed handshake is a line too: that is where a client that cannot connect
is found.  Fields are documented in docs/observability.md and stay stable;
each line is a JSON object, so ``jq`` reads the file as it is.

The traps, and how each is handled
==================================

* **Never block the loop.**  A line is formatted when the connection ends
  (the SSL object still holds its parameters then) and appended to a
  buffer; the buffer is written with one ``write(2)`` per loop iteration,
  however many connections ended in it, by a libuv Prepare handle started
  only while lines wait.  Prepare, not Check: connections end in libuv's
  close callbacks, which run after the Check phase, and the next Check
  would come only after the next poll -- which may block until some other
  connection does something.  Prepare runs before that poll.  A regular file's write goes to the page
  cache; a pipe that is full (``-`` with a slow reader) keeps lines, up to
  :data:`PENDING_MAX` bytes, for the next iteration.

* **Never lose the server.**  A full disk, a file system gone read-only, a
  pipe with no reader: the lines are dropped, *one* error line says so, and
  once writing works again one more line says how many were lost.  Nothing
  is raised into the server.

* **Rotation.**  ``SIGUSR1`` reopens the file at its path (logrotate's
  ``postrotate`` convention); lines written before it went to the renamed
  file.  A log file deleted under the server is noticed (its link count is
  checked at most once a second) and created again, with one warning.

* **Workers append, they do not interleave.**  With ``--workers`` every
  worker opens the file itself with ``O_APPEND``; one ``write(2)`` of whole
  lines lands in one piece at the end of the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import sys
import time
import weakref
from typing import TYPE_CHECKING, Any, Final

import pyuv

from . import workers
from .errors import TLSError
from .stats import close_reason, handshake_failure

if TYPE_CHECKING:
    from .connection import Connection

log = logging.getLogger("tlsuv.accesslog")

# Lines waiting for a pipe that does not take them (``-`` with a slow reader).
# 1 MiB is a few thousand lines: a reader stalled that long is not coming back
# soon, and the server's memory matters more than its log.
PENDING_MAX: Final = 1024 * 1024

# How often (milliseconds of loop time) a flush checks that the file still
# has a name: one fstat(2) per second at most, not one per flush.
LINK_CHECK_MS: Final = 1000

# Readable by the service's group (log shippers), never by everyone: the log
# holds client addresses and certificate subjects.
FILE_MODE: Final = 0o640

_open_logs: weakref.WeakSet[AccessLog] = weakref.WeakSet()


def reopen_all() -> None:
    """Reopen every access log of this process (``SIGUSR1``, after logrotate renamed the files)."""
    for access_log in list(_open_logs):
        access_log.reopen()


def _iso(t: float) -> str:
    ms = int(t * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{ms:03d}Z"


def record(conn: Connection, now_ms: int, wall: float) -> dict[str, Any]:
    """The access-log fields of a connection that has ended (see docs/observability.md)."""
    reason = conn.reason
    completed = conn.handshake_completed
    ssl = conn.ssl
    peer = conn.peer
    balancer = conn.proxy_peer
    local = conn.sockname
    sni = ssl.get_servername()
    proto = ssl.get_alpn_proto_negotiated() if completed else None
    subject = None
    if completed:
        cert = ssl.get_peer_certificate(as_cryptography=True)
        subject = cert.subject.rfc4514_string() if cert is not None else None
    hs = conn.handshake_seconds
    return {
        "time": _iso(wall),
        "client": peer[0] if peer else None,
        "client_port": peer[1] if peer else None,
        "balancer": balancer[0] if balancer else None,
        "balancer_port": balancer[1] if balancer else None,
        "server": local[0] if local else None,
        "server_port": local[1] if local else None,
        "worker": workers.worker_number(),
        "sni": sni.decode("ascii", "replace") if sni else None,
        "alpn": proto.decode("ascii", "replace") if proto else None,
        "tls_version": ssl.get_protocol_version_name() if completed else None,
        "cipher": ssl.get_cipher_name() if completed else None,
        "resumed": conn.session_reused if completed else False,
        "client_subject": subject,
        "handshake_seconds": hs,
        "duration_seconds": max(0, now_ms - conn.created_at) / 1000,
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
        "close": close_reason(reason),
        "handshake_failure": None if completed else handshake_failure(reason),
        "error": type(reason).__name__ if reason is not None else None,
        "message": str(reason) if reason is not None else None,
        "alert": reason.alert if isinstance(reason, TLSError) else None,
    }


class AccessLog:
    """Write one JSON line per ended connection to ``path`` (``-``: stderr), on ``loop``.

    Attach it to a server with ``server.access_log = AccessLog(loop, path)``.
    Raises ``OSError`` if the file cannot be opened (at start-up, so a typo
    fails at once); later failures are logged, never raised.
    """

    def __init__(self, loop: pyuv.Loop, path: str) -> None:
        self.loop = loop
        self.path = path
        self._fd = self._open()
        self._lines: list[bytes] = []
        self._pending = 0  # bytes in _lines
        self._prepare: pyuv.Prepare | None = pyuv.Prepare(loop)
        self._failing = False
        self.lost = 0  # lines dropped since writing last failed
        self.written = 0  # lines written, for tests and curiosity
        self._link_checked = 0
        _open_logs.add(self)

    def _open(self) -> int:
        if self.path == "-":
            return sys.stderr.fileno()
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)

    @property
    def closed(self) -> bool:
        return self._prepare is None

    def connection_ended(self, conn: Connection) -> None:
        """Queue ``conn``'s line; it is written at the end of this loop iteration."""
        if self._prepare is None:
            return
        try:
            line = json.dumps(record(conn, self.loop.now(), time.time()), separators=(",", ":"),
                              ensure_ascii=False)
        except Exception:  # a bug here must not take a connection's ending down with it
            log.exception("access log: cannot format a line")
            return
        data = line.encode("utf-8", "replace") + b"\n"
        if self._pending + len(data) > PENDING_MAX:
            self._lost(1, "too many lines waiting to be written")
            return
        self._lines.append(data)
        self._pending += len(data)
        if len(self._lines) == 1:
            self._prepare.start(self._on_prepare)

    def _on_prepare(self, handle: pyuv.Prepare) -> None:
        self.flush()

    def flush(self) -> None:
        """Write what waits, now.  Never raises."""
        if self._prepare is not None and self._prepare.active:
            self._prepare.stop()
        if not self._lines:
            return
        self._check_link()
        data = b"".join(self._lines)
        count = len(self._lines)
        self._lines.clear()
        self._pending = 0
        try:
            n = os.write(self._fd, data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._lost(count, os.strerror(exc.errno) if exc.errno else str(exc))
            return
        if n < len(data):
            # A pipe took part of it: keep the rest, whole, for the next iteration.
            rest = data[n:]
            self._lines.append(rest)
            self._pending = len(rest)
            self.written += data[:n].count(b"\n")
            if self._prepare is not None:
                self._prepare.start(self._on_prepare)
            return
        self.written += count
        if self._failing:
            self._failing = False
            log.warning("access log %s: writing again; %d line(s) were lost", self.path, self.lost)
            self.lost = 0

    def _lost(self, count: int, why: str) -> None:
        self.lost += count
        if not self._failing:
            self._failing = True
            log.error("access log %s: %s; dropping lines until it can be written again", self.path, why)

    def _check_link(self) -> None:
        if self.path == "-":
            return
        now = self.loop.now()
        if now - self._link_checked < LINK_CHECK_MS:
            return
        self._link_checked = now
        try:
            st = os.fstat(self._fd)
        except OSError:
            return
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 0:
            log.warning("access log %s was deleted; creating it again", self.path)
            self.reopen()

    def reopen(self) -> None:
        """Open the path again (after a rotation); on failure keep the old file and say so."""
        if self._prepare is None or self.path == "-":
            return
        try:
            fd = self._open()
        except OSError as exc:
            log.error("access log %s: cannot reopen (%s); still writing to the old file", self.path,
                      os.strerror(exc.errno) if exc.errno else exc)
            return
        self.flush()  # what is waiting belongs to the old file
        old, self._fd = self._fd, fd
        with contextlib.suppress(OSError):
            os.close(old)
        log.info("access log %s reopened", self.path)

    def close(self) -> None:
        """Write what waits and close the file and the handle.  Idempotent."""
        if self._prepare is None:
            return
        self.flush()
        check, self._prepare = self._prepare, None
        check.close()
        _open_logs.discard(self)
        if self.path != "-":
            with contextlib.suppress(OSError):
                os.close(self._fd)


__all__ = ["AccessLog", "record", "reopen_all"]
