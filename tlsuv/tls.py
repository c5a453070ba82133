"""The I/O-free TLS core: one OpenSSL connection between two memory BIOs.

Why this module exists
======================

The seed post's key idea is that TLS need not own the socket.  OpenSSL's
*memory BIOs* let us hand it ciphertext we read ourselves (``bio_write``) and
collect the ciphertext it wants sent (``bio_read``), while the application
talks plaintext through ``recv`` and ``send``.  Whoever owns the socket --
libuv in :mod:`tlsuv.server`, a list of bytes in the tests -- just moves
bytes between the two.  This module is that TLS half, and it never imports
pyuv: everything here can be driven byte by byte against a second in-memory
peer.

The traps, and how each is handled
==================================

* **Reads can write and writes can read.**  A handshake, a TLS 1.2
  renegotiation, a TLS 1.3 KeyUpdate or session ticket: OpenSSL may need to
  *send* while we asked it to read, and may need to *receive* before it can
  encrypt what we asked it to write.  With memory BIOs the first case is
  free: output simply accumulates in the outgoing BIO and the owner flushes
  it (:meth:`TLSEngine.data_to_send`) after every call.  The second case is
  the seed's *deferred writes*: ``send`` raises ``WantReadError``, we keep the
  buffer, and retry it (:meth:`TLSEngine.retry_deferred`) after more input
  arrived.  There is no explicit accept or handshake call: reads drive the
  handshake, as in the seed (a server's first :meth:`TLSEngine.receive`, a
  client's ``receive(b"")`` for its ClientHello).  Unlike the seed, a write
  before the first handshake completes is deferred at once instead of being
  tried: it could only fail with WANT_READ.

* **A retried write must be the same buffer, same length.**  OpenSSL remembers
  a partially written record; retrying with a shorter buffer fails with "bad
  write retry".  The deferred list keeps the failed buffer first and it is
  always retried before anything newer, never split or merged.

* **``WantWriteError`` cannot happen.**  A memory BIO never refuses bytes (it
  grows), so the seed's WANT_WRITE branches are dead code; memory is bounded
  instead by the owner's flow control, which looks at :attr:`buffered`.

* **End of stream is not close_notify.**  Only :class:`~OpenSSL.SSL.ZeroReturnError`
  (the peer's close_notify) is a clean end; a TCP EOF before it is
  truncation (RFC 8446 section 6.1).  The engine only sees TLS: the owner
  reports EOF with :meth:`TLSEngine.eof_received`, which tells the two apart.

* **Fatal errors leave an alert behind.**  When OpenSSL rejects the peer's
  bytes it writes an alert into the outgoing BIO.  The engine goes to
  ``FAILED`` but keeps that output available, so the owner can send it before
  closing the socket and the peer learns why.

* **Nothing is silently swallowed.**  Every OpenSSL error becomes a
  :class:`~tlsuv.errors.TLSError` (or :class:`~tlsuv.errors.HandshakeError`)
  raised ``from`` the original, with OpenSSL's reason string.

States
======

::

    HANDSHAKING --(handshake done)--> ESTABLISHED --(we send close_notify)--> SHUTDOWN_SENT
         |                              |                                      |
         |                              +--(peer's close_notify)--> PEER_CLOSED |
         +------------ any fatal error ----> FAILED  <--------------------------+
                                    PEER_CLOSED / SHUTDOWN_SENT --(both done)--> CLOSED

``_set_state`` refuses any other move, so a logic error shows up as an
exception at the point it happens rather than as a corrupted stream later.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from OpenSSL import SSL

from . import _openssl as _o
from ._openssl import verify_failure
from .errors import CertificateVerifyError, HandshakeError, TLSError, TruncationError, describe_openssl_error

# The hot-path symbols as module globals: one dict lookup per use instead of two.
_SSL_read: Any = getattr(_o, "SSL_read", None)
_SSL_write: Any = getattr(_o, "SSL_write", None)
_SSL_pending: Any = getattr(_o, "SSL_pending", None)
_SSL_get_error: Any = getattr(_o, "SSL_get_error", None)
_BIO_write: Any = getattr(_o, "BIO_write", None)
_BIO_read: Any = getattr(_o, "BIO_read", None)
_BIO_get_mem_data: Any = getattr(_o, "BIO_get_mem_data", None)  # with NULL: bytes pending
_NULL: Any = getattr(_o, "NULL", None)
_new_buffer: Any = getattr(_o, "new_buffer", None)


def _no_direct_path(ptr: Any, size: int) -> bytes:  # pragma: no cover - only without FAST_IO
    raise RuntimeError("the direct OpenSSL path is not available")


_unpack: Callable[[Any, int], bytes] = getattr(_o, "unpack", None) or _no_direct_path
_WANT_READ: Any = getattr(_o, "ERROR_WANT_READ", None)
_ZERO_RETURN: Any = getattr(_o, "ERROR_ZERO_RETURN", None)

# OpenSSL hands back at most one TLS record per SSL_read, and a record carries
# at most 2**14 bytes of plaintext (RFC 8446 section 5.1): asking for more
# only allocates memory that is never filled.
RECV_SIZE: Final = 16384

# Drained in pieces this large when the BIO size cannot be asked: big enough
# for a full handshake flight or several records in one call, small enough to
# stay below glibc's mmap threshold (128 KiB) so the buffer is cheap.
BIO_READ_SIZE: Final = 65536

# Memory BIOs keep the largest size they ever held.  Past this many bytes in
# one go (a handshake flight, a 64 KiB read, a bulk write) the engine asks to
# be compacted once idle: about the size of the TLS 1.3 handshake flights, so
# small echo traffic never triggers it and anything bigger is given back.
COMPACT_MIN: Final = 4096

# SSL_OP_ALLOW_CLIENT_RENEGOTIATION from OpenSSL 3's ssl.h.  pyOpenSSL does not
# export it by name; without it OpenSSL 3+ refuses a renegotiation the client
# starts, which is the safe default (renegotiation is a cheap way for a client
# to make a server burn CPU).
OP_ALLOW_CLIENT_RENEGOTIATION: Final = 0x100

# TLS alert descriptions (RFC 8446 section 6, plus the TLS 1.2-only ones), so
# a failure can say which alert the peer was sent.
ALERT_NAMES: Final[dict[int, str]] = {
    0: "close_notify", 10: "unexpected_message", 20: "bad_record_mac", 22: "record_overflow",
    40: "handshake_failure", 42: "bad_certificate", 43: "unsupported_certificate",
    44: "certificate_revoked", 45: "certificate_expired", 46: "certificate_unknown",
    47: "illegal_parameter", 48: "unknown_ca", 49: "access_denied", 50: "decode_error",
    51: "decrypt_error", 70: "protocol_version", 71: "insufficient_security", 80: "internal_error",
    86: "inappropriate_fallback", 90: "user_canceled", 100: "no_renegotiation",
    109: "missing_extension", 110: "unsupported_extension", 112: "unrecognized_name",
    113: "bad_certificate_status_response", 115: "unknown_psk_identity",
    116: "certificate_required", 120: "no_application_protocol",
}
_ALERT_RECORD: Final = 21  # TLS record content type of a plaintext alert


# The size of the per-thread scratch buffer, and so the most ciphertext one
# flush takes from the outgoing BIO through it (TLSEngine.output_view) and the
# most plaintext one receive() hands over as a single chunk.  A 64 KiB
# application write becomes a little more than 64 KiB of records and a 64 KiB
# socket read a little less than 64 KiB of plaintext: both fit with room to
# spare, so the bulk path is one write(2) per flush and one Handler.read per
# read.  Bigger flushes (bulk writes) are joined into one bytes object.
OUTPUT_MAX: Final = 256 * 1024


class _Scratch(threading.local):
    """One buffer per thread for SSL_read (several records in a row), BIO_read and the flush.

    Allocating one per call cost more than decrypting a small record.  It
    cannot be one module-wide buffer: cffi releases the GIL around every
    OpenSSL call, so engines in two threads would read into it at once.
    Whatever lands in it is copied out (or written to the socket) before any
    other engine call can run in this thread.  Pages are only touched as far
    as they are used, so small-message servers pay a few KiB for it.
    """

    def __init__(self) -> None:
        self.buf: Any = None
        self.view = memoryview(b"")
        if _new_buffer is not None:
            self.buf = _new_buffer("char[]", OUTPUT_MAX)
            self.view = memoryview(_o.buffer(self.buf))


_scratch = _Scratch()
_EMPTY: Final = memoryview(b"")


class State(enum.Enum):
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    SHUTDOWN_SENT = "shutdown sent"  # our close_notify is out; still reading
    PEER_CLOSED = "peer closed"  # the peer's close_notify arrived
    CLOSED = "closed"  # both close_notify sent and received, or EOF after ours
    FAILED = "failed"  # a fatal TLS error or truncation; only the alert is left

    # Members are singletons and compare by identity: hash them the same way,
    # in C, instead of Enum's Python-level hash of the name (the transition
    # table is looked up on every change of state).
    __hash__ = object.__hash__


# Python 3.11's EnumType defines __getattr__, which sends every ``State.X``
# lookup down CPython's slow attribute path: ~75 ns each, several times per
# message (8 % of the server's instructions in the 64-connection ping-pong,
# counted with scripts/micro/callgrind.py).  Code on the data path compares
# against these module constants instead; they are the same objects.
HANDSHAKING: Final = State.HANDSHAKING
ESTABLISHED: Final = State.ESTABLISHED
SHUTDOWN_SENT: Final = State.SHUTDOWN_SENT
PEER_CLOSED: Final = State.PEER_CLOSED
CLOSED: Final = State.CLOSED
FAILED: Final = State.FAILED


_TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    HANDSHAKING: frozenset({ESTABLISHED, FAILED}),
    ESTABLISHED: frozenset({SHUTDOWN_SENT, PEER_CLOSED, FAILED}),
    SHUTDOWN_SENT: frozenset({CLOSED, FAILED}),
    PEER_CLOSED: frozenset({CLOSED, FAILED}),
    CLOSED: frozenset(),
    FAILED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A bug in tlsuv: the engine was asked to move between two states it cannot."""


class TLSEngine:
    """One TLS connection with no I/O of its own (the seed's ``SSL*`` and two BIOs).

    The owner calls :meth:`receive` with ciphertext from the network and gets
    plaintext back; calls :meth:`write` with plaintext; and after either one
    sends whatever :meth:`data_to_send` returns.  :attr:`state` says where the
    connection is.  The owner may read, never set, the public attributes:
    ``deferred`` (plaintext OpenSSL could not take yet, oldest first, or
    None) and ``deferred_bytes`` (its size), ``wants_compaction``
    (:meth:`compact` would give memory back), ``detached`` (it did, and the
    BIOs come back on the next use), ``handshake_completed`` (sticky),
    ``pipe`` (the compiled data path, tlsuv._speedups, or None: then
    :meth:`output_to` is how the owner flushes) and ``fast``.

    ``fast`` is the same Pipe while calling it directly *is* what
    :meth:`receive` and :meth:`write` would do -- established, BIOs attached,
    nothing deferred -- and None otherwise.  It lets the owner's per-message
    code skip the engine's frames (a Python call and its state checks cost
    more than the compiled call they wrap); the engine keeps it current at
    every change of state, BIOs or deferred writes (:meth:`_refresh_fast`), so
    the owner never decides when the shortcut is safe.  The owner still hands
    any result but success back to the engine: :meth:`settle_receive` and
    :meth:`settle_write`.
    """

    # Public attributes are read-only for everyone but the engine: one surface
    # for the owner and the tests, at the cost of a slot like any private one.
    __slots__ = (
        "_ptr",
        "_rbio",
        "_wbio",
        "deferred",
        "deferred_bytes",
        "detached",
        "fast",
        "handshake_completed",
        "pipe",
        "read_after_shutdown",
        "server_side",
        "ssl",
        "state",
        "wants_compaction",
    )

    def __init__(
        self,
        context: SSL.Context,
        *,
        server_side: bool = True,
        server_hostname: str | None = None,
        allow_client_renegotiation: bool = False,
    ) -> None:
        self.ssl = SSL.Connection(context, None)
        self.server_side = server_side
        if server_side:
            self.ssl.set_accept_state()
            if allow_client_renegotiation:
                # Per connection, not on the Context: pyOpenSSL forbids
                # changing a Context once a Connection was made from it.
                self.ssl.set_options(OP_ALLOW_CLIENT_RENEGOTIATION)
        else:
            if server_hostname:
                self.ssl.set_tlsext_host_name(server_hostname.encode("idna"))
            self.ssl.set_connect_state()
        self.state = HANDSHAKING
        # Stays True once set: FAILED after a completed handshake is not a failed handshake.
        self.handshake_completed = False
        # Plaintext that OpenSSL could not take yet (it needs to read first).
        # Made on first use and dropped once drained (retry_deferred): an
        # empty deque costs ~750 bytes per connection.
        self.deferred: deque[bytes | memoryview] | None = None
        self.deferred_bytes = 0
        # The raw SSL* and BIOs for the hot path (tlsuv._openssl); None means
        # "use pyOpenSSL's public methods", which behave the same, slower.
        handles = _o.fast_handles(self.ssl)
        # cffi pointers: SSL*, incoming BIO*, outgoing BIO*.  And the compiled
        # data path over the same SSL* and BIOs (a tlsuv._speedups Pipe), or
        # None: receive, write and output_to use it when it is there.
        self._ptr: Any
        self._rbio: Any
        self._wbio: Any
        self.pipe: Any
        if handles is not None:
            self._ptr, self._rbio, self._wbio = handles
            self.pipe = _o.new_pipe(self.ssl, handles)
        else:
            self._ptr = self._rbio = self._wbio = self.pipe = None
        self.fast: Any = None  # the pipe, once established (see the class docstring)
        _o.tune(self.ssl)  # record buffers freed when idle, whole writes
        # compact() would give memory back: a BIO held more than COMPACT_MIN,
        # or the handshake (or an _attach) made BIOs an idle connection can do without.
        self.wants_compaction = False
        # compact() freed both BIOs (and _ptr is None meanwhile, so every
        # call leaves the fast path and gets them back in _attach first).
        self.detached = False
        # A half-close (Connection.write_eof): after our close_notify the peer's
        # data is still wanted, up to its own close_notify (RFC 8446 section 6.1).
        self.read_after_shutdown = False

    # -- state -----------------------------------------------------------

    def _set_state(self, new: State) -> None:
        if new not in _TRANSITIONS[self.state]:
            raise InvalidTransition(f"TLS engine cannot go from {self.state.value} to {new.value}")
        self.state = new
        self._refresh_fast()

    def _refresh_fast(self) -> None:
        """Publish the Pipe as :attr:`fast` exactly while the direct call is the whole job.

        Called after every change to what decides it: the state, the BIOs
        (compact, _attach) and the deferred list (made, dropped, cleared).
        """
        pipe = self.pipe  # None while detached: compact() closes it first
        self.fast = pipe if pipe is not None and self.state is ESTABLISHED and not self.deferred else None

    @property
    def can_write(self) -> bool:
        # PEER_CLOSED too: the peer's close_notify only ends its direction, and
        # a handler answering the last bytes before it must be able to.
        state = self.state
        return state is ESTABLISHED or state is HANDSHAKING or state is PEER_CLOSED

    def pending_output(self) -> int:
        """Bytes of ciphertext waiting in the outgoing BIO (-1 if it cannot be asked)."""
        if self._wbio is None:
            return 0 if self.detached else -1
        return int(_BIO_get_mem_data(self._wbio, _NULL))

    # -- input -----------------------------------------------------------

    def receive(self, data: bytes) -> list[bytes]:
        """Feed ciphertext from the network; return the plaintext it completed.

        Raises :class:`TLSError` (or :class:`HandshakeError`) when the peer's
        bytes are fatal; the engine is then ``FAILED`` and :meth:`data_to_send`
        still returns the alert OpenSSL wrote.  After the peer's close_notify
        the state is ``PEER_CLOSED`` (or ``CLOSED``) and more input is ignored.
        """
        ptr = self._ptr
        if ptr is None or self.state is not ESTABLISHED:
            return self._receive_other(data)
        pipe = self.pipe
        if pipe is not None:
            # Compiled: the steps below and _read_records' loop in one call;
            # anything but WANT_READ comes back here to be mapped.  (Owners
            # on the hot path make the same two calls themselves, via fast.)
            chunks: list[bytes] = []
            status = pipe.receive(data, chunks)
            if status != 1 or len(data) > COMPACT_MIN:
                self.settle_receive(len(data), status)
            return chunks
        # The common case, kept to a few steps: one record in, its plaintext
        # out.  No exception: after a successful read nothing more can come
        # out of OpenSSL unless unread records wait in the incoming BIO
        # (memory BIOs give OpenSSL exactly one record at a time: read-ahead
        # is off) or the record did not fit the buffer -- which a RECV_SIZE
        # buffer rules out unless it came back full.
        rbio = self._rbio
        size = len(data)
        if size:
            if size > COMPACT_MIN:
                self.wants_compaction = True
            # cffi hands bytes to a void* parameter without a copy.
            if _BIO_write(rbio, data, size) != size:  # pragma: no cover - memory BIOs grow
                raise self._fail(SSL.Error([("BIO", "", "memory BIO refused input")]))
        buf = _scratch.buf
        n = _SSL_read(ptr, buf, RECV_SIZE)
        if 0 < n < RECV_SIZE and not _BIO_get_mem_data(rbio, _NULL):
            return [_unpack(buf, n)]
        return self._read_records(ptr, rbio, buf, n, ESTABLISHED)

    def settle_receive(self, size: int, status: int, state: State = ESTABLISHED) -> None:
        """Settle a ``fast.receive(data, chunks)`` the owner made itself: ``size`` bytes fed, its result.

        Needed only when the result was not 1 (OpenSSL's error is mapped here,
        exactly as :meth:`receive` maps it: a raise, or the peer's
        close_notify) or more than COMPACT_MIN bytes went in (the BIO grew).
        The plaintext the call appended is the caller's either way, unless
        this raises.  ``state`` is the state the call was made in: the owner's
        is always ESTABLISHED (that is when it has ``fast``); the engine's own
        handshake reads pass theirs.
        """
        if size > COMPACT_MIN:
            self.wants_compaction = True
        if status != 1:
            self._read_failed(self._ptr, status, state)

    def _receive_other(self, data: bytes) -> list[bytes]:
        """:meth:`receive` in every other case: another state, BIOs compacted, the public path."""
        state = self.state
        if state is FAILED or state is CLOSED or state is PEER_CLOSED:
            return []
        ptr = self._ptr
        if ptr is None and self.detached:  # compacted while idle: BIOs first
            self._attach()
            ptr = self._ptr
        if ptr is None:
            chunks = self._receive_public(data, state)
        elif self.pipe is not None:
            # Compiled: the handshake's reads take the same one call as the
            # data path's (the SSL_read loop drives the handshake).
            chunks = []
            self.settle_receive(len(data), self.pipe.receive(data, chunks), state)
        else:
            rbio = self._rbio
            if data:
                if len(data) > COMPACT_MIN:
                    self.wants_compaction = True
                if _BIO_write(rbio, data, len(data)) != len(data):  # pragma: no cover - as above
                    raise self._fail(SSL.Error([("BIO", "", "memory BIO refused input")]))
            buf = _scratch.buf
            chunks = self._read_records(ptr, rbio, buf, _SSL_read(ptr, buf, RECV_SIZE), state)
        if state is HANDSHAKING:
            self._check_handshake()
        elif state is SHUTDOWN_SENT and chunks and not self.read_after_shutdown:
            # Application data after our close_notify is legal (the peer had
            # not seen it yet); drain it so it cannot fill memory, drop it.
            chunks.clear()
        return chunks

    def _read_records(self, ptr: Any, rbio: Any, buf: Any, n: int, state: State) -> list[bytes]:
        """The SSL_read loop on the direct path, given the result ``n`` of a first SSL_read.

        Records are decrypted one after another into the scratch buffer and
        handed over as one chunk: a 64 KiB read is one bytes object and one
        Handler.read call, not four (record boundaries mean nothing to a
        byte stream).
        """
        chunks: list[bytes] = []
        used = 0
        while True:
            if n > 0:
                used += n
                if _BIO_get_mem_data(rbio, _NULL) == 0 and (n < RECV_SIZE or _SSL_pending(ptr) == 0):
                    break
                if used > OUTPUT_MAX - RECV_SIZE:  # no room for another record
                    chunks.append(_unpack(buf, used))
                    used = 0
            else:
                if _SSL_get_error(ptr, n) != _WANT_READ:
                    self._read_failed(ptr, n, state)
                break
            n = _SSL_read(ptr, buf + used if used else buf, RECV_SIZE)
        if used:
            chunks.append(_unpack(buf, used))
        return chunks

    def _read_failed(self, ptr: Any, n: int | None, state: State) -> None:
        """SSL_read returned ``n`` <= 0 (None: the memory BIO refused input): close_notify, or raise.

        Both paths end here, the compiled one included: SSL_get_error only
        peeks at OpenSSL's error queue, so asking it again gives the same
        answer, and pyOpenSSL's own code maps the error.
        """
        if n is None:  # pragma: no cover - memory BIOs grow
            raise self._fail(SSL.Error([("BIO", "", "memory BIO refused input")]))
        err = _SSL_get_error(ptr, n)
        if err == _WANT_READ:
            return
        if err == _ZERO_RETURN:
            self._on_zero_return(state)
            return
        try:
            _o.raise_ssl_error(self.ssl, n)
        except SSL.WantReadError:  # pragma: no cover - SSL_get_error said otherwise
            return
        except SSL.Error as exc:
            raise self._fail(exc) from exc
        raise self._fail(SSL.Error([("SSL", "", f"SSL_read failed ({err})")]))  # pragma: no cover

    def _receive_public(self, data: bytes, state: State) -> list[bytes]:
        ssl = self.ssl
        if data:
            ssl.bio_write(data)
        chunks: list[bytes] = []
        recv = ssl.recv
        try:
            while True:
                chunks.append(recv(RECV_SIZE))
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self._on_zero_return(state)
        except SSL.Error as exc:
            raise self._fail(exc) from exc
        return chunks

    def _on_zero_return(self, state: State) -> None:
        if state is HANDSHAKING:
            # A client's Finished, first data and close_notify can come in
            # one read: the handshake did complete before the close_notify.
            self._check_handshake()
        self._peer_close_notify()

    def _check_handshake(self) -> None:
        if self.state is HANDSHAKING and _o.handshake_done(self.ssl):
            self._set_state(ESTABLISHED)
            self.handshake_completed = True
            # The flights grew both BIOs, and an idle connection is better off
            # with none at all: ask to be compacted.
            self.wants_compaction = True

    def _peer_close_notify(self) -> None:
        if self.state is SHUTDOWN_SENT:
            self._set_state(CLOSED)
        elif self.state is HANDSHAKING:
            # OpenSSL reports close_notify during a handshake as ZeroReturn too.
            self._set_state(FAILED)
            raise HandshakeError("peer sent close_notify before the handshake completed")
        else:
            self._set_state(PEER_CLOSED)

    def eof_received(self) -> None:
        """The transport reached end of stream.  Raise unless that was a clean close.

        Clean means the peer's close_notify came first (``PEER_CLOSED`` or
        ``CLOSED``), or we had sent ours and the peer simply closed -- many TLS
        1.3 stacks never answer close_notify, and waiting for it helps nobody.
        """
        if self.state in (PEER_CLOSED, CLOSED, FAILED):
            return
        if self.state is SHUTDOWN_SENT and not self.read_after_shutdown:
            self._set_state(CLOSED)
            return
        # After a half-close we still wait for the peer's data: only its
        # close_notify proves we have all of it.
        was = self.state
        self._set_state(FAILED)
        if was is HANDSHAKING:
            raise HandshakeError("peer closed the connection during the handshake")
        raise TruncationError("peer closed the connection without close_notify (truncation)")

    # -- output ----------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` now, or keep it as a deferred write if OpenSSL must read first."""
        ptr = self._ptr
        if ptr is not None and self.state is ESTABLISHED and not self.deferred \
                and type(data) is bytes and data:
            # _send_or_defer's common case, inlined: one Python call less per
            # message (callgrind counts it in the 64-connection ping-pong).
            # Both go through _SSL_write, so one patched symbol reaches both.
            size = len(data)
            pipe = self.pipe
            # cffi: bytes to void*, no copy; or the compiled path, the same call.
            n = _SSL_write(ptr, data, size) if pipe is None else pipe.write(data)
            if n != size:
                self.settle_write(data, n)
            return
        if not self.can_write:
            raise TLSError(f"cannot write: TLS connection is {self.state.value}")
        if not data:
            return
        if self.detached:
            self._attach()
        deferred = self.deferred
        if deferred or self.state is HANDSHAKING:
            # During the first handshake SSL_write could only run the handshake
            # on the input SSL_read already saw and fail with WANT_READ (a
            # raised exception and an OpenSSL error entry, per try): keep the
            # data until the handshake is done.
            # bytes as they are: retried, they take SSL_write's direct case.
            kept = data if type(data) is bytes else memoryview(data).cast("B")
            if deferred is None:  # (handshaking: fast is None already)
                deferred = self.deferred = deque()
            deferred.append(kept)
            self.deferred_bytes += len(kept)
            return
        self._send_or_defer(data)

    def settle_write(self, data: bytes, n: int) -> None:
        """Settle an SSL_write of ``data`` (direct, or ``fast.write(data)`` by the owner) that returned ``n``.

        Only needed when ``n`` is not ``len(data)``: the error is mapped, or on
        WANT_READ (a renegotiation) the data becomes the first deferred write.
        """
        if n > 0:  # pragma: no cover - only if tune() could not clear partial writes
            self._send_view(memoryview(data)[n:])
        else:
            self._send_view(memoryview(data), failed=n)

    def _send_or_defer(self, data: bytes | bytearray | memoryview) -> bool:
        """Push ``data`` into OpenSSL; on WantRead keep the rest deferred.  True if all went."""
        ptr = self._ptr
        if ptr is not None and type(data) is bytes:
            # The common case: cffi passes bytes as a pointer without a copy,
            # and a memory BIO takes the whole buffer in one SSL_write.
            pipe = self.pipe
            n = _SSL_write(ptr, data, len(data)) if pipe is None else pipe.write(data)
            if n == len(data):
                return True
            if n > 0:  # pragma: no cover - only if tune() could not clear partial writes
                return self._send_view(memoryview(data)[n:])
            return self._send_view(memoryview(data), failed=n)
        return self._send_view(memoryview(data).cast("B"))

    def _send_view(self, view: memoryview, failed: int | None = None) -> bool:
        """The general loop: a buffer view, pyOpenSSL's public path, or a failed first try."""
        ptr = self._ptr
        try:
            if failed is not None:
                self._raise_write_error(failed)
            while view:
                if ptr is not None:
                    with _o.from_buffer(view) as cdata:
                        n = _SSL_write(ptr, cdata, len(view))
                    if n <= 0:
                        self._raise_write_error(n)
                else:
                    n = self.ssl.send(view)
                view = view[n:]
        except SSL.WantReadError:
            if self.deferred is None:
                self.deferred = deque()
                self.fast = None
            self.deferred.appendleft(view)
            self.deferred_bytes += len(view)
            return False
        except SSL.Error as exc:
            raise self._fail(exc) from exc
        return True

    def _raise_write_error(self, result: int) -> None:
        _o.raise_ssl_error(self.ssl, result)
        # pyOpenSSL found nothing to raise for a failed SSL_write: do not loop on it.
        raise SSL.Error([("SSL", "", f"SSL_write returned {result}")])  # pragma: no cover

    def retry_deferred(self) -> bool:
        """Retry deferred writes in order.  True when none remain.

        Nothing is tried before the first handshake completes (see :meth:`write`).
        """
        deferred = self.deferred
        if self.state is HANDSHAKING:
            return not deferred
        while deferred:
            # can_write, inlined (no way back to HANDSHAKING): once per connection at least.
            state = self.state
            if state is not ESTABLISHED and state is not PEER_CLOSED:
                break
            view = deferred.popleft()
            self.deferred_bytes -= len(view)
            if not self._send_or_defer(view):
                return False
        if deferred:
            return False
        # Dropped once drained: nearly every server connection defers its
        # greeting until the handshake, and an idle one should not keep the
        # empty deque (~750 bytes) for the rest of its life.
        self.deferred = None
        self._refresh_fast()
        return True

    def output_view(self) -> memoryview:
        """Drain up to OUTPUT_MAX bytes of ciphertext into this thread's scratch buffer.

        The zero-copy form of :meth:`data_to_send`, for an owner that writes
        to its socket at once: the view is only valid until the next call
        into any engine in this thread, so copy whatever must outlive it.
        Empty when there is nothing to send.  When it is OUTPUT_MAX bytes
        long or longer (pyOpenSSL's public path returns everything at once),
        more may wait: :meth:`data_to_send` returns the rest.
        """
        bio = self._wbio
        if bio is None:
            return memoryview(self.data_to_send())
        scratch = _scratch
        n = _BIO_read(bio, scratch.buf, OUTPUT_MAX)
        if n <= 0:
            return _EMPTY
        if n > COMPACT_MIN:
            self.wants_compaction = True
        return scratch.view[:n]

    def output_to(self, fd: int) -> int | tuple[int, bytes | int]:
        """Drain the outgoing BIO and write(2) it to ``fd`` at once, in one compiled call.

        Only while :attr:`pipe` is not None; the owner's socket must be non-blocking
        and have nothing queued before it (or pass -1 to write nothing).
        Returns how many bytes were drained when all of them went out (0:
        none waited); ``(drained, rest)`` when the kernel did not take
        ``rest`` (bytes, for the owner to queue), ``(drained, errno)`` when
        write(2) failed.  The engine itself still does no I/O: the owner
        hands it the descriptor.
        """
        result = self.pipe.flush(fd)
        if (result if type(result) is int else result[0]) > COMPACT_MIN:
            self.wants_compaction = True
        return result  # type: ignore[no-any-return]  # the C module has no type information

    def data_to_send(self) -> bytes:
        """Drain and return the ciphertext OpenSSL produced (b"" when none)."""
        bio = self._wbio
        if bio is not None:
            # One call in the common case: read straight into the scratch
            # buffer (an empty memory BIO just returns -1), and ask the size
            # only when it came back full.
            buf = _scratch.buf
            n = _BIO_read(bio, buf, RECV_SIZE)
            if n < RECV_SIZE:
                if n <= 0:
                    return b""
                if n > COMPACT_MIN:
                    self.wants_compaction = True
                return _unpack(buf, n)
            self.wants_compaction = True
            first = _unpack(buf, n)
            rest = _BIO_get_mem_data(bio, _NULL)
            if rest <= 0:
                return first
            more = _new_buffer("char[]", rest)
            got = _BIO_read(bio, more, rest)
            return first + _unpack(more, got) if got > 0 else first
        if self.detached:
            return b""  # no BIO, so nothing was written since compact()
        out: list[bytes] = []
        try:
            while True:
                chunk = self.ssl.bio_read(BIO_READ_SIZE)
                out.append(chunk)
                if len(chunk) < BIO_READ_SIZE:
                    break
        except SSL.WantReadError:
            pass
        return b"".join(out)

    # -- memory ----------------------------------------------------------

    def compact(self) -> bool:
        """Free both memory BIOs of an idle, established connection.  True if it did.

        A memory BIO keeps the largest size it ever held, and even empty the
        pair costs ~0.6 KiB of C heap and Python objects: an idle connection
        does better with none.  The next call that needs them (receive,
        write, shutdown, renegotiate) makes a fresh, empty pair first.  Only
        when both are empty and no write is deferred, so nothing is lost.
        Call when the connection is idle: a busy one would only pay for new
        BIOs at once.  The owner decides when (tlsuv.pending's compaction).
        """
        ptr = self._ptr
        if not self.wants_compaction or ptr is None or self.state is not ESTABLISHED or self.deferred:
            return False
        if _BIO_get_mem_data(self._rbio, _NULL) or _BIO_get_mem_data(self._wbio, _NULL) or _SSL_pending(ptr):
            return False
        pipe = self.pipe
        if pipe is not None:  # it must never see the BIOs drop_bios frees
            self.pipe = self.fast = None
            pipe.close()
        if not _o.drop_bios(self.ssl):
            return False
        self._ptr = self._rbio = self._wbio = None
        self.detached = True
        self.wants_compaction = False
        return True

    def _attach(self) -> None:
        """Give a compacted connection new BIOs and its fast path back."""
        if not _o.fresh_bios(self.ssl):  # pragma: no cover - out of memory
            raise MemoryError("OpenSSL could not allocate memory BIOs")
        handles = _o.fast_handles(self.ssl)
        assert handles is not None  # compact() only detaches on the fast path
        self._ptr, self._rbio, self._wbio = handles
        self.pipe = _o.new_pipe(self.ssl, handles)
        self.detached = False
        self._refresh_fast()
        # Idle again later, it should give them back again.
        self.wants_compaction = True

    # -- control ---------------------------------------------------------

    def shutdown(self) -> None:
        """Queue our close_notify (the caller flushes it).

        Deferred writes go first: a graceful close delivers everything that
        was accepted.  If they are still blocked (a renegotiation waiting for
        the peer) the caller must wait for more input and call again.  Before
        the handshake there is nothing to close_notify: OpenSSL refuses, and
        the caller simply closes the transport.
        """
        if self.state is HANDSHAKING:
            raise TLSError("cannot send close_notify before the handshake completed")
        if self.state not in (ESTABLISHED, PEER_CLOSED):
            return
        if self.deferred and not self.retry_deferred():
            return
        if self.detached:
            self._attach()
        try:
            self.ssl.shutdown()
        except SSL.Error as exc:
            raise self._fail(exc) from exc
        self._set_state(SHUTDOWN_SENT if self.state is ESTABLISHED else CLOSED)

    def renegotiate(self) -> bool:
        """Start a server-initiated renegotiation (TLS 1.2 only).

        Returns False, doing nothing, while an earlier renegotiation is still
        in flight: OpenSSL cannot stack them.  ``SSL_renegotiate`` only sets a
        flag; ``do_handshake`` makes OpenSSL write the HelloRequest now, and
        then wants the client's answer.
        """
        if self.state is not ESTABLISHED:
            raise TLSError(f"cannot renegotiate: TLS connection is {self.state.value}")
        if self.ssl.get_protocol_version_name() != "TLSv1.2":
            raise TLSError("renegotiation needs TLS 1.2 (TLS 1.3 has no renegotiation)")
        if self.ssl.renegotiate_pending():
            return False
        if self.detached:
            self._attach()
        try:
            if not self.ssl.renegotiate():
                return False
            self.ssl.do_handshake()
        except SSL.WantReadError:
            pass
        except SSL.Error as exc:
            raise self._fail(exc) from exc
        return True

    def _fail(self, exc: SSL.Error) -> TLSError:
        was = self.state
        self.state = FAILED  # from any state: the guard is for orderly moves
        self.fast = None
        self.deferred = None
        self.deferred_bytes = 0
        reason = describe_openssl_error(exc)
        cls = HandshakeError if was is HANDSHAKING else TLSError
        if isinstance(exc, SSL.SysCallError):
            return cls(f"TLS transport error: {reason}", reason=reason)
        alert = self._alert_sent()
        sent = f" (sent alert {alert})" if alert else ""
        # OpenSSL's reason only says "certificate verify failed"; the verify
        # result says why.  It is checked only for that reason: with
        # VERIFY_NONE a failed verification is recorded but not fatal, and
        # must not be blamed for a later, unrelated error.
        failure = verify_failure(self.ssl) if "certificate verify failed" in reason else None
        if failure is not None:
            code, text = failure
            return CertificateVerifyError(f"certificate verify failed: {text}{sent}", verify_code=code,
                                          verify_message=text, reason=reason, alert=alert)
        return cls(f"TLS error: {reason}{sent}", reason=reason, alert=alert)

    def _alert_sent(self) -> str | None:
        """Name the alert OpenSSL left in the outgoing BIO, when it is readable.

        Alerts before the keys are set (most handshake failures) and all of
        TLS 1.2's before encryption are plaintext records; a TLS 1.3 alert
        after the handshake is encrypted and cannot be named here.
        """
        if self._wbio is None:
            return None
        pp = _o.new_buffer("char **")
        n = int(_BIO_get_mem_data(self._wbio, pp))
        if n < 7:
            return None
        head = bytes(_o.unpack(pp[0], 7))
        if head[0] != _ALERT_RECORD:
            return None
        return ALERT_NAMES.get(head[6], f"alert {head[6]}")

    # -- introspection ---------------------------------------------------

    @property
    def _negotiated(self) -> bool:
        return self.handshake_completed and self.state is not FAILED

    @property
    def version(self) -> str | None:
        return self.ssl.get_protocol_version_name() if self._negotiated else None

    @property
    def cipher(self) -> str | None:
        return self.ssl.get_cipher_name() if self._negotiated else None

    @property
    def renegotiations(self) -> int:
        return int(self.ssl.total_renegotiations())
