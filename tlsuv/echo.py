"""``python -m tlsuv.echo``: the seed's TLS echo server, made production-worthy.

Every connection gets ``OK\\r\\n`` the moment it is accepted -- before the TLS
handshake, so that write takes the deferred path, as in the seed -- and then
every byte it sends comes back.  A peer that does not read its echoes is
paused (flow control) instead of growing our memory.  ``SIGHUP`` reloads the
certificate files (:mod:`tlsuv.reload`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import pyuv

from . import _cli, accesslog, activation, limits, policy, reload, upgrade, workers
from ._openssl import data_path
from ._uv import format_address
from .certs import CertificateError, load_bundle, self_signed
from .connection import Connection, ConnectionOptions
from .handler import Handler
from .server import Server, ServerError

if TYPE_CHECKING:
    from .metrics import MetricsServer

log = logging.getLogger("tlsuv.echo")

GREETING = b"OK\r\n"

# "tlsuv-echo" when started by that console script, else "python -m tlsuv.echo".
PROG = _cli.program_name("tlsuv-echo", "tlsuv.echo")


class EchoHandler(Handler):
    """Greets, then echoes; stops reading while the peer is not reading our echoes."""

    __slots__ = ()

    def established(self, conn: Connection) -> None:
        conn.write(GREETING)

    def read(self, conn: Connection, data: bytes) -> None:
        conn.write(data)

    def pause_writing(self, conn: Connection) -> None:
        conn.pause_reading()

    def resume_writing(self, conn: Connection) -> None:
        conn.resume_reading()


def echo_factory(conn: Connection) -> Handler:
    return EchoHandler()


def build_parser() -> _cli.ArgumentParser:
    p = _cli.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; ::1 for IPv6)")
    p.add_argument("--port", type=_cli.port_number, default=4433, help="TCP port (default 4433; 0 picks one)")
    p.add_argument("--cert", help="PEM certificate (chain) file")
    p.add_argument("--key", help="PEM private key file")
    p.add_argument("--allow-client-renegotiation", action="store_true",
                   help="let clients start TLS 1.2 renegotiation (off: it is a CPU-exhaustion vector)")
    p.add_argument("--handshake-timeout", type=_cli.positive_float, default=10.0, metavar="SECONDS",
                   help="drop peers that have not finished the handshake by then (default 10)")
    p.add_argument("--idle-timeout", type=_cli.positive_float, default=None, metavar="SECONDS",
                   help="close connections with no traffic for this long (default: off)")
    p.add_argument("--close-timeout", type=_cli.positive_float, default=5.0, metavar="SECONDS",
                   help="how long a graceful close waits for the peer (default 5)")
    _cli.add_dead_peer_arguments(p)  # --keepalive, --send-timeout
    p.add_argument("--max-connections", type=_cli.positive_int, default=None, metavar="N",
                   help="refuse new connections beyond N open ones (default: no limit)")
    p.add_argument("--max-connections-per-ip", type=_cli.positive_int, default=None, metavar="N",
                   help="refuse a client address's connections beyond N open ones (after the PROXY "
                        "header, the client's own address; default: no limit)")
    p.add_argument("--grace", type=_cli.positive_float, default=5.0, metavar="SECONDS",
                   help="on SIGINT/SIGTERM, keep serving open connections this long, then close them "
                        "with close_notify (default 5)")
    p.add_argument("--log-level", choices=_cli.LOG_LEVELS, default="info")
    policy.add_arguments(p)  # --alpn, --client-ca, --sni, --tls-min/max, --ciphers, --keylog...
    reload.add_arguments(p)  # --reload-interval
    workers.add_arguments(p)  # --workers, --stats-interval
    _cli.add_proxy_arguments(p)
    activation.add_arguments(p)  # --listen-fd, --pid-file
    _cli.add_observability_arguments(p)  # --metrics, --access-log
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.cert is None) != (args.key is None):
        _cli.fail(f"{PROG}: error: --cert and --key go together")
    files = reload.files_from_args(args)
    if args.reload_interval is not None and not files.paths():
        _cli.fail(f"{PROG}: error: --reload-interval needs files to watch "
                  "(--cert/--key, --sni or --client-ca)")
    _cli.setup_logging(args.log_level)
    try:  # LISTEN_FDS is read (and cleared) before anything else could inherit it
        inherited = activation.inherited_sockets(args.listen_fd)
    except activation.ActivationError as exc:
        _cli.fail(f"{PROG}: error: {exc}")
    log.debug("data path: %s", data_path())
    try:
        bundle = load_bundle(args.cert, args.key) if args.cert is not None else self_signed()
        # Built from the files as the reloader reads them, so that what it
        # serves is what it compares when polling (tlsuv.reload).
        reloader = reload.Reloader(files, policy.policy_from_args(args, bundle),
                                   interval=args.reload_interval)
    except (CertificateError, policy.PolicyError) as exc:
        _cli.fail(f"{PROG}: error: {exc}")
    context = reloader.context
    if args.access_log is not None and args.access_log != "-":
        try:  # here, once, so a bad path is one line and exit 2, not a crash in every worker
            os.close(os.open(args.access_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, accesslog.FILE_MODE))
        except OSError as exc:
            _cli.fail(f"{PROG}: error: --access-log {args.access_log}: {exc.strerror}")
    options = ConnectionOptions(
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout,
        close_timeout=args.close_timeout,
        keepalive=args.keepalive,
        send_timeout=args.send_timeout,
        allow_client_renegotiation=args.allow_client_renegotiation,
        proxy=_cli.proxy_options(args, PROG),
    )
    open_files = limits.raise_open_file_limit()  # before forking: workers inherit it

    announced: list[tuple[str, int]] = []

    def announce(host: str, port: int) -> None:
        if not announced:
            # Once serving (so a bad argument or address stays a single line): what, with which limit.
            reloader.log_certificates()
            _log_open_file_limit(open_files, args.max_connections)
        if args.cert is None and not announced:
            print(f"self-signed certificate for localhost, 127.0.0.1, ::1; "
                  f"SHA-256 fingerprint {bundle.fingerprint}", flush=True)
        announced.append((host, port))
        print(f"tlsuv echo server listening on {format_address((host, port))}", flush=True)

    def make_server(lp: pyuv.Loop) -> Server:
        server = Server(lp, context, echo_factory, options=options, max_connections=args.max_connections,
                        max_connections_per_ip=args.max_connections_per_ip)
        reloader.watch(server.stats)  # reload counts and certificate expiry, for --metrics
        reloader.start(lp)  # SIGHUP and --reload-interval, in each worker
        if args.access_log is not None:
            server.access_log = accesslog.AccessLog(lp, args.access_log)
        return server

    if args.workers > 1:  # forks, so before this process makes any loop (tlsuv.workers)
        return workers.run_cli(args, make_server, announce, PROG, sockets=inherited)
    ready_fd = upgrade.take_ready_fd()  # started by an upgrading tree (auto workers, now one CPU)
    loop = pyuv.Loop()
    server = make_server(loop)
    endpoint: MetricsServer | None = None
    try:
        if args.metrics is not None:  # first: its error is then the only line
            # Imported only when asked for: prometheus_client and what it imports
            # are thousands of objects every cyclic-GC pass would walk.
            from . import metrics  # noqa: PLC0415

            endpoint = metrics.MetricsServer(loop, metrics.registry_for(server), lambda: server.accepting)
            metrics_address = endpoint.listen(*args.metrics)
        if inherited:
            for sock, _ in inherited:
                server.listen_socket(sock)
        else:
            server.listen(args.host, args.port)
    except ServerError as exc:
        _cli.fail(f"{PROG}: error: {exc}")
    workers.log_stats_every(loop, server, args.stats_interval)

    signals: list[pyuv.Signal] = []

    def done() -> None:
        reloader.close()
        for h in signals:
            h.close()
        if endpoint is not None:
            endpoint.close()
        if server.access_log is not None:
            server.access_log.close()

    def on_signal(handle: pyuv.Signal, signum: int) -> None:
        if signum == signal.SIGUSR2:  # its default action would kill us, and every connection
            log.warning("SIGUSR2: upgrades need a supervising parent (--workers 2 or more); ignored")
            return
        if server.closing:
            log.info("second signal: aborting all connections")
            server.abort()
            return
        log.info("%s: draining %d connection(s), grace %.1fs",
                 signal.Signals(signum).name, len(server.connections), args.grace)
        server.drain(args.grace, done)

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        h = pyuv.Signal(loop)
        h.start(on_signal, signum)
        signals.append(h)
    reopen = pyuv.Signal(loop)  # logrotate's convention
    reopen.start(lambda h, signum: accesslog.reopen_all(), signal.SIGUSR1)
    signals.append(reopen)
    # Handlers first, announcement after: whoever reads the announcement may signal at once
    # (SIGUSR2's default action would end the process).
    if args.pid_file is not None:
        try:
            activation.write_pid_file(args.pid_file)
        except OSError as exc:
            _cli.fail(f"{PROG}: error: cannot write --pid-file {args.pid_file}: {exc.strerror}")
    for host, port in server.addresses:
        announce(host, port)
    if endpoint is not None:
        print(f"tlsuv metrics on http://{format_address(metrics_address)}/metrics", flush=True)
    if ready_fd is not None:
        upgrade.report_ready(ready_fd)
    else:
        activation.notify("READY=1")
    try:
        loop.run()
    finally:
        if args.pid_file is not None:
            activation.remove_pid_file(args.pid_file)
    return 0


# Descriptors a server needs besides its connections: the interpreter's own
# (about a dozen), libuv's (epoll, signal pipes, its spare), the listener,
# log and key-log files, tlsuv's spare (tlsuv.limits) -- with room to spare.
FD_OVERHEAD: Final = 64


def _log_open_file_limit(limit: tuple[int, int], max_connections: int | None) -> None:
    before, after = limit
    if after != before:
        log.info("open file limit raised from %d to %d (the hard limit)", before, after)
    else:
        log.info("open file limit: %d", after)
    if max_connections is not None and max_connections + FD_OVERHEAD > after:
        log.warning("--max-connections %d needs about %d file descriptors, above the limit of %d: "
                    "raise the hard limit (ulimit -Hn, systemd's LimitNOFILE=)",
                    max_connections, max_connections + FD_OVERHEAD, after)


if __name__ == "__main__":
    sys.exit(main())
