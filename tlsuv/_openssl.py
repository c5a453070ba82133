"""The few OpenSSL calls tlsuv needs that pyOpenSSL does not expose publicly.

pyOpenSSL 26 has no API for host-name checking during the handshake, for the
reason a certificate failed verification, or for "was this session resumed".
OpenSSL has all three, and pyOpenSSL's cffi binding (``OpenSSL._util.lib``)
carries them.  That binding is private, so every use is funnelled through
this module: each function checks that the symbol exists, and
:data:`HAVE_HOST_CHECK` tells callers whether host names can be checked at
all (the client refuses to verify without it rather than skip the check).

Why OpenSSL's own host-name check rather than comparing names ourselves after
the handshake: OpenSSL checks during certificate verification, so a mismatch
fails the handshake with the standard ``bad_certificate`` alert before any
application data flows, and it implements RFC 6125 wildcard rules for us.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import threading
from collections.abc import Mapping
from typing import Any, Final

from OpenSSL import SSL

try:
    from OpenSSL._util import ffi as _ffi
    from OpenSSL._util import lib as _lib
except ImportError:  # pragma: no cover - depends on pyOpenSSL internals
    _ffi = None
    _lib = None


def _has(*names: str) -> bool:
    return _lib is not None and all(hasattr(_lib, n) for n in names)


HAVE_HOST_CHECK: Final = _has(
    "SSL_get0_param", "X509_VERIFY_PARAM_set1_host", "X509_VERIFY_PARAM_set1_ip",
    "X509_VERIFY_PARAM_set_hostflags", "X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS")
_HAVE_VERIFY_RESULT: Final = _has("SSL_get_verify_result", "X509_verify_cert_error_string")
_HAVE_SESSION_REUSED: Final = _has("SSL_session_reused")

# X509_V_OK from x509_vfy.h: verification succeeded (or has not run yet).
X509_V_OK: Final = 0


def _ssl_ptr(conn: SSL.Connection) -> Any:
    return conn._ssl


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def expect_peer_name(conn: SSL.Connection, name: str) -> None:
    """Make OpenSSL's certificate verification also require ``name`` (a DNS name or an IP).

    Only has an effect when the context verifies the peer (``VERIFY_PEER``).
    Partial wildcards such as ``w*.example.com`` are refused, as Python's
    ``ssl`` does.
    """
    if not HAVE_HOST_CHECK:
        raise RuntimeError("this pyOpenSSL build cannot check host names (X509_VERIFY_PARAM_set1_host)")
    param = _lib.SSL_get0_param(_ssl_ptr(conn))
    try:
        packed = ipaddress.ip_address(name).packed
    except ValueError:
        raw = name.encode("idna")
        ok = _lib.X509_VERIFY_PARAM_set1_host(param, raw, len(raw))
        _lib.X509_VERIFY_PARAM_set_hostflags(param, _lib.X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS)
    else:
        ok = _lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    if ok != 1:
        raise ValueError(f"OpenSSL refused {name!r} as the name to verify")


def verify_failure(conn: SSL.Connection) -> tuple[int, str] | None:
    """Why the peer's certificate failed verification: ``(X509_V_ERR code, text)``, or None."""
    if not _HAVE_VERIFY_RESULT:
        return None
    code = int(_lib.SSL_get_verify_result(_ssl_ptr(conn)))
    if code == X509_V_OK:
        return None
    text = _ffi.string(_lib.X509_verify_cert_error_string(code)).decode("ascii", "replace")
    return code, text


def session_reused(conn: SSL.Connection) -> bool:
    """The handshake resumed an earlier session (TLS 1.2 session ID or ticket, TLS 1.3 PSK)."""
    if not _HAVE_SESSION_REUSED:
        return False
    return bool(_lib.SSL_session_reused(_ssl_ptr(conn)))


_HAVE_NEGOTIATED: Final = _has("SSL_version", "SSL_get_version", "SSL_get_current_cipher",
                               "SSL_CIPHER_get_name", "SSL_get0_alpn_selected", "SSL_session_reused")
# OpenSSL's version and cipher names are static strings: one Python str each,
# kept, so counting a connection does not make new ones -- and, looked up by
# the version number and the cipher's address, it does not ask OpenSSL for
# the name again either.
_names: dict[bytes, str] = {}
_versions: dict[int, str] = {}
# SSL_CIPHER* -> name: cffi pointers hash by address, and OpenSSL's ciphers
# live in its static tables for the life of the process.
_ciphers: dict[Any, str] = {}


def _name(raw: bytes) -> str:
    name = _names.get(raw)
    if name is None:
        name = _names[raw] = raw.decode("ascii", "replace")
    return name


class _AlpnOut(threading.local):
    """SSL_get0_alpn_selected's two out-parameters, made once per thread (cffi lets go of the GIL)."""

    def __init__(self) -> None:
        self.data = _ffi.new("unsigned char **")
        self.length = _ffi.new("unsigned int *")


_alpn_out = _AlpnOut() if _HAVE_NEGOTIATED else None


def negotiated(conn: SSL.Connection) -> tuple[str, str | None, str | None, bool]:
    """Version, cipher, ALPN protocol and "resumed" of a completed handshake, in five OpenSSL calls.

    Once per connection, for tlsuv.stats: through pyOpenSSL's methods the
    same four answers cost several times as much (each call re-checks and
    re-wraps), which a server that accepts thousands of connections a
    second notices.
    """
    if not _HAVE_NEGOTIATED or _alpn_out is None:  # pragma: no cover - depends on pyOpenSSL internals
        proto = conn.get_alpn_proto_negotiated()
        return (conn.get_protocol_version_name(), conn.get_cipher_name(),
                proto.decode("ascii", "replace") if proto else None, session_reused(conn))
    ptr = conn._ssl
    number = _lib.SSL_version(ptr)
    version = _versions.get(number)
    if version is None:
        version = _versions[number] = _name(_ffi.string(_lib.SSL_get_version(ptr)))
    current = _lib.SSL_get_current_cipher(ptr)
    if current == _ffi.NULL:
        cipher = None
    else:
        cipher = _ciphers.get(current)
        if cipher is None:
            cipher = _ciphers[current] = _name(_ffi.string(_lib.SSL_CIPHER_get_name(current)))
    out = _alpn_out
    _lib.SSL_get0_alpn_selected(ptr, out.data, out.length)
    length = out.length[0]
    alpn = _name(_ffi.buffer(out.data[0], length)[:]) if length else None
    return version, cipher, alpn, bool(_lib.SSL_session_reused(ptr))


# -- The hot path ---------------------------------------------------------------
#
# Per message the echo server calls SSL_read twice (data, then WANT_READ),
# SSL_write once and drains the outgoing BIO once.  Through pyOpenSSL's public
# methods each call also checks three callback helpers, wraps buffers, and
# the final WANT_READ is a raised exception: together more time than the AES
# work itself for small messages.  tlsuv.tls calls these symbols directly
# instead and asks the BIOs how much they hold, so the common case raises
# nothing; on any error it hands back to pyOpenSSL's own error mapping, so
# the exceptions are exactly pyOpenSSL's.  FAST_IO is False if a future
# pyOpenSSL drops any of them, and tlsuv.tls then uses the public methods.

FAST_IO: Final = _has(
    "SSL_read", "SSL_write", "SSL_get_error", "SSL_pending", "BIO_read", "BIO_write",
    "BIO_get_mem_data", "SSL_ERROR_WANT_READ", "SSL_ERROR_ZERO_RETURN",
) and all(hasattr(SSL.Connection, a) for a in ("_raise_ssl_error",))

if FAST_IO:
    SSL_read = _lib.SSL_read
    SSL_write = _lib.SSL_write
    SSL_get_error = _lib.SSL_get_error
    SSL_pending = _lib.SSL_pending
    BIO_read = _lib.BIO_read
    BIO_write = _lib.BIO_write
    BIO_get_mem_data = _lib.BIO_get_mem_data
    ERROR_WANT_READ: int = _lib.SSL_ERROR_WANT_READ
    ERROR_ZERO_RETURN: int = _lib.SSL_ERROR_ZERO_RETURN
    NULL = _ffi.NULL
    # Uninitialised buffers: OpenSSL overwrites what it returns, and zeroing
    # 16 KiB per read would be pure waste (pyOpenSSL does the same).
    new_buffer = _ffi.new_allocator(should_clear_after_alloc=False)
    unpack = _ffi.unpack  # char* and a length to bytes, in one call
    buffer = _ffi.buffer  # a Python buffer over C memory, no copy
    from_buffer = _ffi.from_buffer


def fast_handles(conn: SSL.Connection) -> tuple[Any, Any, Any] | None:
    """``(SSL*, incoming BIO, outgoing BIO)`` of a memory-BIO connection, or None."""
    if not FAST_IO:
        return None
    ssl = getattr(conn, "_ssl", None)
    rbio = getattr(conn, "_into_ssl", None)
    wbio = getattr(conn, "_from_ssl", None)
    if ssl is None or rbio is None or wbio is None:
        return None
    return ssl, rbio, wbio


_HAVE_SET_MODE: Final = _has("SSL_set_mode", "SSL_MODE_RELEASE_BUFFERS")
_HAVE_CLEAR_MODE: Final = _has("SSL_clear_mode", "SSL_MODE_ENABLE_PARTIAL_WRITE")


def tune(conn: SSL.Connection) -> None:
    """Set the two modes tlsuv wants on every connection, once, as it is made.

    Per connection, because pyOpenSSL forbids changing a Context in use; in
    one call, because it is made once per accepted connection.

    * ``SSL_MODE_RELEASE_BUFFERS``: OpenSSL frees a connection's record
      buffers (~34 KiB) whenever they are empty, so an idle connection holds
      only its keys and state.  The price is a malloc/free pair per record on
      busy connections, far below the AES work.
    * No ``SSL_MODE_ENABLE_PARTIAL_WRITE`` (whole writes): pyOpenSSL sets it
      on every Context, so SSL_write returned after each 16 KiB record and a
      64 KiB write took four calls, three of them through the slow path.  A
      memory BIO never refuses bytes, so without the mode SSL_write either
      writes every record or fails (WANT_READ, in a renegotiation) -- and is
      then retried with the same buffer, as deferred writes always are.
    """
    ptr = conn._ssl
    if _HAVE_SET_MODE:
        _lib.SSL_set_mode(ptr, _lib.SSL_MODE_RELEASE_BUFFERS)
    if _HAVE_CLEAR_MODE:
        _lib.SSL_clear_mode(ptr, _lib.SSL_MODE_ENABLE_PARTIAL_WRITE)


_HAVE_STATE_STRING: Final = _has("SSL_state_string_long")
# What SSL_state_string_long says once a handshake is done (pyOpenSSL's
# get_state_string reads the same string, one Python call further away).
HANDSHAKE_DONE_STATE: Final = b"SSL negotiation finished successfully"


def handshake_done(conn: SSL.Connection) -> bool:
    """OpenSSL's state machine finished the handshake (the first, or a renegotiation)."""
    if not _HAVE_STATE_STRING:  # pragma: no cover - depends on pyOpenSSL internals
        return conn.get_state_string() == HANDSHAKE_DONE_STATE
    return bool(_ffi.string(_lib.SSL_state_string_long(conn._ssl)) == HANDSHAKE_DONE_STATE)


_HAVE_SET_BIO: Final = _has("SSL_set_bio", "BIO_new", "BIO_s_mem")


def _memory_bio_connection(conn: SSL.Connection) -> bool:
    # pyOpenSSL made memory BIOs (no socket); tlsuv.tls only ever makes those.
    return _HAVE_SET_BIO and hasattr(conn, "_into_ssl") and getattr(conn, "_socket", None) is None


def fresh_bios(conn: SSL.Connection) -> bool:
    """Give a memory-BIO connection two new, empty BIOs.  False if it has none or memory ran out.

    SSL_set_bio frees the old pair, if any (the SSL owns its BIOs), and tells
    the record layer; pyOpenSSL's own references are updated so its methods
    keep working.  The caller guarantees the old BIOs are empty: whatever
    they held is lost.
    """
    if not _memory_bio_connection(conn):
        return False
    rbio = _lib.BIO_new(_lib.BIO_s_mem())
    wbio = _lib.BIO_new(_lib.BIO_s_mem())
    if _ffi.NULL in (rbio, wbio):  # pragma: no cover - out of memory
        for b in (rbio, wbio):
            if b != _ffi.NULL:
                _lib.BIO_free(b)
        return False
    _lib.SSL_set_bio(_ssl_ptr(conn), rbio, wbio)
    conn._into_ssl = rbio
    conn._from_ssl = wbio
    return True


def drop_bios(conn: SSL.Connection) -> bool:
    """Free a memory-BIO connection's two BIOs and leave it with none, until :func:`fresh_bios`.

    OpenSSL only touches its BIOs inside calls that read or write (SSL_read,
    SSL_write, SSL_shutdown, SSL_do_handshake); keys, session and record
    layer state stay.  pyOpenSSL's references are cleared, so one of its BIO
    methods called meanwhile raises instead of using freed memory.  The
    caller guarantees both BIOs are empty.
    """
    if not _memory_bio_connection(conn) or conn._into_ssl is None:
        return False
    _lib.SSL_set_bio(_ssl_ptr(conn), _ffi.NULL, _ffi.NULL)
    conn._into_ssl = None
    conn._from_ssl = None
    return True


def raise_ssl_error(conn: SSL.Connection, result: int) -> None:
    """Raise exactly what pyOpenSSL would for this SSL_read/SSL_write result."""
    conn._raise_ssl_error(conn._ssl, result)


# -- Key-exchange groups (tlsuv.profiles) -----------------------------------------
#
# pyOpenSSL's public Context.set_tmp_ecdh sets one single curve; a profile
# needs a list.  SSL_CTX_set1_curves_list is OpenSSL's older name for
# SSL_CTX_set1_groups_list (same call, same syntax).

_HAVE_GROUPS: Final = _has("SSL_CTX_set1_curves_list", "ERR_clear_error")
_HAVE_GROUP_NAME: Final = _has("SSL_get0_group_name")


def set_groups(ctx: SSL.Context, groups: str) -> bool:
    """Set ``ctx``'s key-exchange groups (``"X25519:prime256v1"``); False if OpenSSL refused the list.

    OpenSSL refuses the whole list if it does not know one name.  The refusal
    leaves an entry on OpenSSL's error queue, which is cleared here: pyOpenSSL
    would otherwise report it from the next unrelated call.
    """
    if not _HAVE_GROUPS:
        return False
    ok = bool(_lib.SSL_CTX_set1_curves_list(ctx._context, groups.encode("ascii")) == 1)
    if not ok:
        _lib.ERR_clear_error()
    return ok


def group_name(conn: SSL.Connection) -> str | None:
    """The key-exchange group the handshake used (``"X25519MLKEM768"``, ``"x25519"``...), or None."""
    if not _HAVE_GROUP_NAME:
        return None
    name = _lib.SSL_get0_group_name(_ssl_ptr(conn))
    return None if name == _ffi.NULL else _ffi.string(name).decode("ascii", "replace")

# -- The compiled data path ------------------------------------------------------
#
# tlsuv._speedups (tlsuv/_speedups.c) does the per-message steps of the hot path
# above -- BIO_write and the SSL_read loop, SSL_write, draining the outgoing BIO
# and the write(2) -- in one C call each, on the same SSL* and BIO* pyOpenSSL
# made.  The OpenSSL that cryptography bundles exports no symbols, so the
# module cannot link against it: it calls the functions through the addresses
# of the very ones pyOpenSSL's cffi binding calls, taken here once.  Each one
# must exist with the C prototype the module was written for, or nothing is
# bound and tlsuv runs its pure-Python path as a whole: never half of each.

# The prototypes tlsuv/_speedups.c calls, as pyOpenSSL's cffi binding declares them.
SPEEDUPS_PROTOTYPES: Final = {
    "SSL_read": "int(*)(SSL *, void *, int)",
    "SSL_write": "int(*)(SSL *, void *, int)",
    "SSL_get_error": "int(*)(SSL *, int)",
    "SSL_pending": "int(*)(SSL *)",
    "BIO_read": "int(*)(BIO *, void *, int)",
    "BIO_write": "int(*)(BIO *, void *, int)",
    "BIO_get_mem_data": "long(*)(BIO *, char * *)",
}


def load_speedups(lib: Any = _lib, environ: Mapping[str, str] = os.environ) -> tuple[Any, str]:
    """The compiled data path, bound to ``lib``'s OpenSSL, or None; and which path runs, and why.

    ``TLSUV_NO_EXTENSIONS`` set to anything but "" or "0" forces the pure path
    (aiohttp's convention), as does a tlsuv installed without a C compiler.
    ``lib`` is a parameter so the tests can offer a binding with a function
    missing or of the wrong type.
    """
    if environ.get("TLSUV_NO_EXTENSIONS", "") not in ("", "0"):
        return None, "pure Python (TLSUV_NO_EXTENSIONS is set)"
    if not FAST_IO or lib is None or _ffi is None:
        return None, "pure Python (pyOpenSSL's binding lacks the direct OpenSSL calls)"
    try:
        # Built by setup.py when a C compiler was there; absent otherwise.
        _speedups: Any = importlib.import_module("._speedups", __package__)
    except ImportError as exc:
        return None, f"pure Python (tlsuv._speedups is not built: {exc})"
    addresses: dict[str, int] = {}
    for name in _speedups.SYMBOLS:
        fn = getattr(lib, name, None)
        prototype = SPEEDUPS_PROTOTYPES.get(name)
        try:
            matches = fn is not None and prototype is not None and _ffi.typeof(fn) is _ffi.typeof(prototype)
        except (TypeError, _ffi.error):  # not a cffi function at all
            matches = False
        if not matches:
            return None, f"pure Python (pyOpenSSL's binding has no {name} of type {prototype})"
        addresses[name] = int(_ffi.cast("uintptr_t", fn))
    want_read = getattr(lib, "SSL_ERROR_WANT_READ", None)
    if not isinstance(want_read, int):
        return None, "pure Python (pyOpenSSL's binding has no SSL_ERROR_WANT_READ)"
    try:
        _speedups.bind(addresses, want_read)
    except (LookupError, TypeError, ValueError, OverflowError) as exc:
        return None, f"pure Python (tlsuv._speedups refused the binding: {exc})"
    return _speedups, f"compiled (tlsuv._speedups, {os.path.basename(_speedups.__file__)})"


SPEEDUPS, SPEEDUPS_STATUS = load_speedups()


def speedups_active() -> bool:
    """True when tlsuv's data path runs compiled (tlsuv._speedups), False on the pure-Python path."""
    return SPEEDUPS is not None


def data_path() -> str:
    """Which data path runs, and why, in a few words (logged at start with ``--log-level debug``)."""
    return str(SPEEDUPS_STATUS)


def new_pipe(conn: SSL.Connection, handles: tuple[Any, Any, Any]) -> Any:
    """A tlsuv._speedups.Pipe over ``conn``'s SSL* and memory BIOs (:func:`fast_handles`), or None.

    The Pipe keeps ``conn`` alive, so its SSL* too.  The BIOs are the
    caller's to watch: close the Pipe before :func:`drop_bios` or
    :func:`fresh_bios` replaces them.
    """
    speedups = SPEEDUPS
    if speedups is None:
        return None
    ssl, rbio, wbio = handles
    cast = _ffi.cast
    return speedups.Pipe(conn, int(cast("uintptr_t", ssl)), int(cast("uintptr_t", rbio)),
                         int(cast("uintptr_t", wbio)))
