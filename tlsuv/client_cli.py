"""``tlsuv-client HOST:PORT`` (or ``python -m tlsuv.client``): stdin to a TLS server, its bytes to stdout.

Like ``openssl s_client -quiet``, with two differences that make it usable
in pipes: the certificate is verified (and a failure stops it), and the end
of stdin is a TLS half-close -- close_notify goes out after the last byte,
and everything the server still sends is printed until it closes too.

Exit codes: 0 success, 2 bad arguments or files, 3 the connection failed
(name resolution, TCP connect, reset, connect timeout, a server that stopped
answering: keepalive or send timeout), 4 TLS failed
(handshake, certificate verification, a protocol error, or a server that
closed without close_notify so the output may be truncated), 128+N when
stopped by signal N.

Why a thread reads stdin: libuv can poll pipes and terminals but not regular
files (``< file`` makes epoll fail with EPERM), so stdin is read with plain
blocking ``os.read`` on a thread and handed to the loop through a
``pyuv.Async``.  The thread stops reading while the connection is paused
(the server is slower than stdin), so memory stays bounded by the water marks.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

import pyuv

from . import _cli, policy
from .certs import CertificateError
from .client import DEFAULT_CONNECT_TIMEOUT, Client
from .connection import Connection, ConnectionOptions
from .errors import ConnectionClosedError, TimeoutError, TLSError, TransportError, TruncationError
from .handler import Handler

log = logging.getLogger("tlsuv.client")

PROG: Final = _cli.program_name("tlsuv-client", "tlsuv.client")

EXIT_OK: Final = 0
EXIT_USAGE: Final = _cli.EXIT_USAGE
EXIT_CONNECT: Final = 3
EXIT_TLS: Final = 4
EXIT_OTHER: Final = 1

# One read of stdin: a pipe's default capacity on Linux, so one read
# usually empties it; four full TLS records.
STDIN_CHUNK: Final = 65536


def _target(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]:")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected [IPv6]:PORT, got {text!r}")
    else:
        host, sep, rest = text.rpartition(":")
        if not sep or ":" in host:
            raise argparse.ArgumentTypeError(
                f"expected HOST:PORT (IPv6 as [::1]:PORT), got {text!r}")
    port = _cli.port_number(rest)
    if not host or port == 0:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT with a port 1-65535, got {text!r}")
    return host, port


def build_parser() -> _cli.ArgumentParser:
    p = _cli.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("target", type=_target, metavar="HOST:PORT", help="server to connect to")
    p.add_argument("--cafile", metavar="FILE",
                   help="trust these PEM CA certificates instead of the system store")
    p.add_argument("--insecure", action="store_true",
                   help="do not verify the server certificate or its name (testing only)")
    p.add_argument("--servername", metavar="NAME",
                   help="name sent as SNI and required in the certificate (default: HOST)")
    p.add_argument("--alpn", type=policy.alpn_argument, metavar="PROTO[,PROTO...]",
                   help="offer these ALPN protocols")
    p.add_argument("--cert", metavar="FILE", help="client certificate (PEM, chain allowed)")
    p.add_argument("--key", metavar="FILE", help="client certificate's private key (PEM)")
    policy.add_arguments(p, server=False)
    p.add_argument("--connect-timeout", type=_cli.positive_float, default=DEFAULT_CONNECT_TIMEOUT,
                   metavar="SECONDS",
                   help=f"give up connecting after this (default {DEFAULT_CONNECT_TIMEOUT:g})")
    p.add_argument("--handshake-timeout", type=_cli.positive_float, default=10.0, metavar="SECONDS",
                   help="give up on the TLS handshake after this (default 10)")
    _cli.add_dead_peer_arguments(p)  # --keepalive, --send-timeout
    p.add_argument("--log-level", choices=_cli.LOG_LEVELS, default="warning",
                   help="info shows the negotiated parameters on stderr (default warning)")
    return p


class StdinPump:
    """Reads a file descriptor on a thread and hands the chunks to the loop (see the module doc)."""

    def __init__(self, loop: pyuv.Loop, fd: int, on_data: Callable[[bytes], None],
                 on_eof: Callable[[], None]) -> None:
        self._fd = fd
        self._on_data = on_data
        self._on_eof = on_eof
        self._queue: deque[bytes] = deque()  # b"" marks the end
        self._lock = threading.Lock()  # orders send() against close() across threads
        self._go = threading.Event()
        self._go.set()
        self._closed = False
        self._async = pyuv.Async(loop, self._drain)
        self._thread = threading.Thread(target=self._run, name="tlsuv-stdin", daemon=True)

    def start(self) -> None:
        if not self._closed and not self._thread.is_alive():
            self._thread.start()

    def pause(self) -> None:
        self._go.clear()

    def resume(self) -> None:
        self._go.set()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._async.close()
        self._go.set()  # let a paused thread see it is over

    def _run(self) -> None:
        while True:
            self._go.wait()
            try:
                data = os.read(self._fd, STDIN_CHUNK)
            except OSError as exc:
                log.warning("cannot read stdin: %s", exc.strerror)
                data = b""
            with self._lock:
                if self._closed:
                    return
                self._queue.append(data)
                self._async.send()
            if not data:
                return

    def _drain(self, handle: pyuv.Async) -> None:
        with self._lock:
            chunks = list(self._queue)
            self._queue.clear()
        for chunk in chunks:
            if self._closed:
                return
            if chunk:
                self._on_data(chunk)
            else:
                self._on_eof()


class StdioHandler(Handler):
    """The one connection: stdin to it once TLS is up, its bytes to stdout."""

    def __init__(self, loop: pyuv.Loop, out: Callable[[bytes], None]) -> None:
        self.out = out
        self.reason: BaseException | None = None
        self.stdout_gone = False
        self.signal: int | None = None
        self.conn: Connection | None = None
        self.pump = StdinPump(loop, sys.stdin.fileno(), self._stdin_data, self._stdin_eof)
        self.signals: list[pyuv.Signal] = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            h = pyuv.Signal(loop)
            h.start(self._on_signal, signum)
            self.signals.append(h)

    def handshake_complete(self, conn: Connection) -> None:
        subject = conn.peer_subject or "no certificate"
        log.info("connected to %s:%d (%s, %s, ALPN %s, server %s%s)", *(conn.peer or ("?", 0)),
                 conn.tls_version, conn.cipher, conn.alpn_protocol or "none", subject,
                 ", session resumed" if conn.session_reused else "")
        self.pump.start()

    def read(self, conn: Connection, data: bytes) -> None:
        try:
            self.out(data)
        except BrokenPipeError:
            # Whoever read our stdout is gone (``| head``): stop quietly.
            self.stdout_gone = True
            _silence_stdout()
            conn.abort()

    def pause_writing(self, conn: Connection) -> None:
        self.pump.pause()

    def resume_writing(self, conn: Connection) -> None:
        self.pump.resume()

    def closed(self, conn: Connection, reason: BaseException | None) -> None:
        self.reason = reason
        self.release()

    def release(self) -> None:
        """Close our handles so that ``loop.run()`` can return."""
        self.pump.close()
        for h in self.signals:
            if not h.closed:
                h.close()

    def _stdin_data(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None and not conn.closing:
            conn.write(data)

    def _stdin_eof(self) -> None:
        conn = self.conn
        if conn is not None and not conn.closing:
            conn.write_eof()

    def _on_signal(self, handle: pyuv.Signal, signum: int) -> None:
        self.signal = signum
        if self.conn is not None:
            self.conn.abort()


def _silence_stdout() -> None:
    # Python flushes stdout at exit and would print a second BrokenPipeError.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _write_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def exit_code(reason: BaseException | None) -> int:
    """The exit code for how the connection ended (see the module docstring)."""
    if reason is None:
        return EXIT_OK
    if isinstance(reason, TimeoutError):
        # The connection itself failed (nobody answers), not TLS.
        return EXIT_CONNECT if reason.phase in ("connect", "keepalive", "send") else EXIT_TLS
    if isinstance(reason, TransportError):
        return EXIT_CONNECT
    if isinstance(reason, (TLSError, TruncationError)):
        return EXIT_TLS
    return EXIT_OTHER


def describe(reason: BaseException) -> str:
    if isinstance(reason, TruncationError):
        return "the server closed the connection without close_notify: the output may be truncated"
    return str(reason)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.cert is None) != (args.key is None):
        _cli.fail(f"{PROG}: error: --cert and --key go together")
    if args.insecure and args.cafile is not None:
        _cli.fail(f"{PROG}: error: --cafile and --insecure contradict each other")
    if args.servername is not None and not args.servername.strip(".[]"):
        _cli.fail(f"{PROG}: error: --servername cannot be empty")
    _cli.setup_logging(args.log_level)
    host, port = args.target
    options = ConnectionOptions(
        handshake_timeout=args.handshake_timeout,
        # After stdin ends we wait for the server to finish, however long its
        # answer takes, as s_client does; a silent server is the user's Ctrl-C.
        close_timeout=None,
        keepalive=args.keepalive,
        send_timeout=args.send_timeout,
    )
    loop = pyuv.Loop()
    try:
        client = Client(
            loop, cafile=args.cafile, verify=not args.insecure, cert=args.cert, key=args.key,
            alpn=args.alpn, profile=args.tls_profile, min_version=args.tls_min, max_version=args.tls_max,
            ciphers=args.ciphers, ciphersuites=args.ciphersuites, keylog=args.keylog, options=options,
            connect_timeout=args.connect_timeout, resume_sessions=False)
    except (CertificateError, policy.PolicyError) as exc:
        _cli.fail(f"{PROG}: error: {exc}")
    session = StdioHandler(loop, _write_stdout)
    try:
        session.conn = client.connect(host, port, lambda conn: session, server_hostname=args.servername)
    except ValueError as exc:  # a name that cannot be a host name
        session.release()
        _cli.fail(f"{PROG}: error: {exc}")
    loop.run()
    if session.signal is not None:
        return 128 + session.signal
    if session.stdout_gone and isinstance(session.reason, ConnectionClosedError):
        return EXIT_OK
    reason = session.reason
    if reason is not None:
        print(f"{PROG}: error: {describe(reason)}", file=sys.stderr)
    return exit_code(reason)


if __name__ == "__main__":
    sys.exit(main())
