"""The TCP options that find a peer which vanished without a word: keepalive, user timeout, reset.

On the internet a peer often disappears with no FIN and no reset (a phone
out of coverage, a NAT that forgot the flow, a machine without power).  TCP
notices only if it has something to send: with nothing queued it waits
forever, with data unacknowledged it retransmits for about 15 minutes
(``net.ipv4.tcp_retries2``).  Three socket options bound both:

* **Keepalive** (``SO_KEEPALIVE``, ``TCP_KEEPIDLE``, ``TCP_KEEPINTVL``,
  ``TCP_KEEPCNT``): after ``keepalive`` seconds in which the peer sent
  nothing, probe it every :func:`keepalive_interval` seconds; a peer that
  answers none of :data:`KEEPALIVE_PROBES` probes is gone.  The kernel's own
  defaults (two hours idle, 75 s apart) find a vanished peer after more than
  two hours; libuv's ``uv_tcp_keepalive`` (pyuv's ``TCP.keepalive``) sets
  only the idle time, so the other two are set here.
* **TCP_USER_TIMEOUT** (Linux): how long sent data may stay unacknowledged
  before the kernel gives up, set to the send timeout so that the kernel's
  retransmissions and tlsuv's own send timer (which watches libuv's write
  queue, :mod:`tlsuv.connection`) agree.  The trap: when it is set, Linux
  uses it for keepalive too and *ignores the probe count* (tcp(7)): an idle
  peer is then dropped at the first probe tick at which it has been silent
  for the user timeout, after at least one probe.  Hence the interval (a
  third of the idle time): at the defaults, 30 s idle and a 60 s send
  timeout, three probes go unanswered before the verdict at 60 s.
* **SO_LINGER 0** on a connection we give up on with data still queued: the
  close sends a reset and the kernel frees its send buffer at once, instead
  of keeping an orphan socket that retransmits to nobody (nginx's
  ``reset_timedout_connection``).

How the options reach the socket: through libc's ``setsockopt`` on the
handle's descriptor, with ctypes.  The alternatives each touch the
descriptor libuv owns: ``socket.socket(fileno=fd)`` wraps it in a Python
socket that closes it when collected unless detached first (and asks the
kernel for its family, type and protocol), ``socket.fromfd`` duplicates it
(two more system calls, and a second descriptor to close).  A direct
``setsockopt`` neither duplicates nor closes anything.  What is read back
(:func:`configured`, once per server; :func:`unacknowledged`, on the error
path) is read the same way, with ``getsockopt`` and ``ioctl``.

Where: on the listening socket, once (Linux copies these options to every
socket ``accept`` returns, so an accepted connection costs no system call),
and on each outgoing connection once it is connected.  A server's TCP_NODELAY
(TLS records are already batched per loop iteration) travels the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import socket
import struct
import termios
from typing import Final

import pyuv

# Linux's own default, kept explicit so a tuned sysctl does not change tlsuv.
# It only counts without a send timeout (see above): 30 s + 9 x 10 s = 120 s.
KEEPALIVE_PROBES: Final = 9
# The kernel's limits for TCP_KEEPIDLE and TCP_KEEPINTVL (MAX_TCP_KEEPIDLE).
KEEPALIVE_MAX: Final = 32767
# TCP_USER_TIMEOUT is an int of milliseconds.
USER_TIMEOUT_MAX: Final = (1 << 31) - 1

_TCP_KEEPINTVL: Final = getattr(socket, "TCP_KEEPINTVL", None)
_TCP_KEEPCNT: Final = getattr(socket, "TCP_KEEPCNT", None)
_TCP_USER_TIMEOUT: Final = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux only
# SIOCOUTQ: bytes in the send queue not yet acknowledged (tcp(7)); the same number as TIOCOUTQ.
_SIOCOUTQ: Final = termios.TIOCOUTQ

_libc = ctypes.CDLL(None, use_errno=True)
_setsockopt = _libc.setsockopt
_setsockopt.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint)
_setsockopt.restype = ctypes.c_int
_getsockopt = _libc.getsockopt
_getsockopt.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_getsockopt.restype = ctypes.c_int


def _set(fd: int, level: int, name: int, value: bytes) -> None:
    if _setsockopt(fd, level, name, value, len(value)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _set_int(fd: int, level: int, name: int, value: int) -> None:
    _set(fd, level, name, struct.pack("i", value))


def keepalive_interval(idle: int) -> int:
    """Seconds between probes for ``idle`` seconds of keepalive: a third of it, at least 1."""
    return max(1, idle // 3)


def configure(tcp: pyuv.TCP, keepalive: int | None, send_timeout: float | None,
              *, nodelay: bool = False) -> None:
    """Turn on keepalive and TCP_USER_TIMEOUT (and TCP_NODELAY) on a handle, as the options ask.

    On a listening socket this costs nothing per connection: Linux copies
    these options (as it does TCP_NODELAY) to every socket ``accept`` makes.
    :class:`~tlsuv.Server` sets them there once and checks the first
    accepted socket with :func:`configured`, setting them per connection
    only where they were not inherited.

    ``None`` leaves that option as the socket has it.  Raises OSError or
    ``pyuv.error.UVError`` if the socket refuses (a peer that reset already).
    """
    if nodelay:
        tcp.nodelay(True)
    if keepalive is None and send_timeout is None:
        return
    fd = tcp.fileno()
    if keepalive is not None:
        tcp.keepalive(True, keepalive)  # SO_KEEPALIVE and TCP_KEEPIDLE
        if _TCP_KEEPINTVL is not None:
            _set_int(fd, socket.IPPROTO_TCP, _TCP_KEEPINTVL, keepalive_interval(keepalive))
        if _TCP_KEEPCNT is not None:
            _set_int(fd, socket.IPPROTO_TCP, _TCP_KEEPCNT, KEEPALIVE_PROBES)
    if send_timeout is not None and _TCP_USER_TIMEOUT is not None:
        _set_int(fd, socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, _user_timeout_ms(send_timeout))


def _user_timeout_ms(send_timeout: float) -> int:
    return min(USER_TIMEOUT_MAX, max(1, round(send_timeout * 1000)))


def _get_int(fd: int, level: int, name: int) -> int:
    value = ctypes.c_int(0)
    size = ctypes.c_uint(ctypes.sizeof(value))
    if _getsockopt(fd, level, name, ctypes.byref(value), ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return value.value


def configured(tcp: pyuv.TCP, keepalive: int | None, send_timeout: float | None,
               *, nodelay: bool = False) -> bool:
    """Whether ``tcp`` already has what :func:`configure` would set (e.g. inherited at accept)."""
    fd = tcp.fileno()
    tcp_level = socket.IPPROTO_TCP
    if nodelay and _get_int(fd, tcp_level, socket.TCP_NODELAY) == 0:
        return False
    if keepalive is not None and (
            _get_int(fd, socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
            or _get_int(fd, tcp_level, socket.TCP_KEEPIDLE) != keepalive
            or (_TCP_KEEPINTVL is not None
                and _get_int(fd, tcp_level, _TCP_KEEPINTVL) != keepalive_interval(keepalive))
            or (_TCP_KEEPCNT is not None and _get_int(fd, tcp_level, _TCP_KEEPCNT) != KEEPALIVE_PROBES)):
        return False
    return not (send_timeout is not None and _TCP_USER_TIMEOUT is not None
                and _get_int(fd, tcp_level, _TCP_USER_TIMEOUT) != _user_timeout_ms(send_timeout))


# IP_TRANSPARENT (linux/in.h) and IPV6_TRANSPARENT (linux/in6.h), by number
# where the socket module does not name them (it has no IPV6_TRANSPARENT in 3.11-3.13).
_IP_TRANSPARENT: Final = getattr(socket, "IP_TRANSPARENT", 19)
_IPV6_TRANSPARENT: Final = getattr(socket, "IPV6_TRANSPARENT", 75)


def transparent(tcp: pyuv.TCP, ipv6: bool) -> bool:
    """Whether a listener may accept connections for addresses other than its own (TPROXY).

    Such a socket (systemd's ``Transparent=yes``) hands out connections
    whose local address is the one the client dialled, not the listener's.
    True when it cannot be told (another system, a socket that refuses).
    """
    try:
        fd = tcp.fileno()
        return bool(_get_int(fd, socket.IPPROTO_IP, _IP_TRANSPARENT)
                    or (ipv6 and _get_int(fd, socket.IPPROTO_IPV6, _IPV6_TRANSPARENT)))
    except (OSError, pyuv.error.UVError):
        return True


def reset_on_close(fd: int) -> None:
    """Make the next close() send a reset and drop the send buffer (SO_LINGER, zero seconds)."""
    with contextlib.suppress(OSError):  # best effort: a plain close still frees the descriptor
        _set(fd, socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def unacknowledged(fd: int) -> int:
    """Bytes the socket sent or holds that the peer has not acknowledged; -1 if unknown.

    Still answers after the kernel gave up on the connection, which is what
    tells a keepalive failure (nothing outstanding) from a send that made no
    progress.
    """
    try:
        raw = fcntl.ioctl(fd, _SIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return -1
    value: int = struct.unpack("i", raw)[0]
    return value
