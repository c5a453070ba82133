"""Small helpers shared by everything that holds a pyuv handle: addresses and libuv error text.

One home for two things that were written out in several places: how an
address is shown in a log line or an error (IPv6 in brackets, as in a URL),
and how a libuv error number becomes words.
"""

from __future__ import annotations

import sys

import pyuv


def socket_address(tcp: pyuv.TCP, which: str) -> tuple[str, int] | None:
    """``tcp.getpeername()`` or ``tcp.getsockname()`` (``which``), or None if the socket is gone."""
    try:
        addr = getattr(tcp, which)()
    except pyuv.error.UVError:
        return None  # the peer reset before we asked; the read will report it
    # Interned: behind a balancer, NAT or a proxy many connections share a
    # peer address, and each would otherwise keep its own copy of the string.
    return (sys.intern(str(addr[0])), int(addr[1]))


def format_host(host: str) -> str:
    """A host as it is written before ``:port``: IPv6 literals in brackets."""
    return f"[{host}]" if ":" in host else host


def format_address(addr: tuple[str, int] | None) -> str:
    """``host:port`` (``[::1]:443`` for IPv6); ``<unknown peer>`` when there is none."""
    if addr is None:
        return "<unknown peer>"
    return f"{format_host(addr[0])}:{addr[1]}"


def uv_error_text(error: int | BaseException | None) -> str:
    """libuv's words for an error number, or for the number a ``pyuv.error.UVError`` carries."""
    if isinstance(error, BaseException):
        errno = error.args[0] if error.args else None
        if not isinstance(errno, int):
            return str(error.args[-1]) if error.args else type(error).__name__
        error = errno
    if error is None:
        return "unknown error"
    return str(pyuv.errno.strerror(error))
