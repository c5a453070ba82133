"""Prometheus metrics and health checks: a collector over a server's counts, and a small HTTP endpoint.

Why this module exists
======================

``--metrics HOST:PORT`` serves ``/metrics`` in the Prometheus text format
(OpenMetrics when the scraper asks for it), and ``/-/healthy``,
``/-/ready`` and ``/healthz`` for balancers and orchestrators.  The format,
the metric types and the label escaping are ``prometheus_client``'s: this
module only says what the numbers are.

Nothing is counted here.  A server counts in plain integers on its
connections and in :class:`tlsuv.stats.Stats`, once per connection; at
scrape time :class:`ServerCollector` takes a :class:`~tlsuv.stats.Snapshot`
and turns it into metric families.  So the data path pays nothing for
metrics, and a scrape costs one pass over the open connections.

An application that embeds :class:`tlsuv.Server` and has its own registry
registers the collector itself::

    from prometheus_client import REGISTRY
    REGISTRY.register(tlsuv.metrics.ServerCollector(server))

The HTTP endpoint
=================

Two transports share one I/O-free request handler (:func:`respond`):
:class:`MetricsServer` listens on the server's own pyuv loop (one process),
and :class:`SelectorEndpoint` on the ``selectors`` loop of the ``--workers``
supervisor, which never runs a pyuv loop (tlsuv.workers explains why).
Each request is answered and its connection closed (``Connection: close``):
a scraper makes one request every few seconds, and keeping nothing open is
the simplest way to stay bounded.  A client gets :data:`REQUEST_TIMEOUT`
seconds and :data:`REQUEST_MAX` bytes for its request, no more.

Readiness (``/-/ready``, ``/healthz``) is 200 while the server accepts
connections and 503 once it drains (after SIGTERM), so a balancer stops
sending traffic before the listener goes away.  Health (``/-/healthy``) is
200 as long as the process answers at all.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Final

import pyuv
from prometheus_client import CollectorRegistry, PlatformCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from ._uv import format_address, uv_error_text
from .server import ServerError
from .stats import CLOSE_REASONS, HANDSHAKE_BUCKETS, HANDSHAKE_FAILURES, REFUSAL_REASONS, Snapshot

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("tlsuv.metrics")

# A scrape request is a request line and a few headers; Prometheus sends
# about 300 bytes.  Anything longer than this is not a scraper.
REQUEST_MAX: Final = 8192
# A scraper on the same network sends its request at once; a client that
# trickles it costs a socket, so it gets this long.
REQUEST_TIMEOUT: Final = 5.0

PREFIX: Final = "tlsuv"


# -- the collector ----------------------------------------------------------------


def families(snap: Snapshot, prefix: str = PREFIX) -> list[Metric]:
    """The metric families of one snapshot.  Every label set of a fixed reason list is
    always present (at 0 until it happens), so ``rate()`` has a series to work on."""
    p = prefix

    def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
        return CounterMetricFamily(f"{p}_{name}", doc, value=value)

    def by(name: str, doc: str, label: str, counts: dict[str, int],
           known: Sequence[str] = ()) -> CounterMetricFamily:
        fam = CounterMetricFamily(f"{p}_{name}", doc, labels=[label])
        for key in [*known, *sorted(k for k in counts if k not in known)]:
            fam.add_metric([key], counts.get(key, 0))
        return fam

    out: list[Metric] = [
        counter("connections_accepted", "Connections accepted (TCP), PROXY header errors included.",
                snap.accepted),
        by("connections_refused", "Connections turned away, by reason; all but proxy_header at accept.",
           "reason", snap.refused, REFUSAL_REASONS),
        GaugeMetricFamily(f"{p}_connections_open", "Connections open now.", value=snap.open),
        by("connections_closed", "Connections ended, by how (tlsuv.errors: clean, truncated, timeout_PHASE, "
           "transport, ...).", "reason", snap.closed, CLOSE_REASONS),
        counter("handshakes_completed", "TLS handshakes completed.", snap.handshakes),
        by("handshakes_failed", "Connections that ended before their TLS handshake completed, by reason.",
           "reason", snap.handshake_failures, HANDSHAKE_FAILURES),
    ]
    cumulative = 0
    buckets: list[tuple[str, float]] = []
    for bound, count in zip([*HANDSHAKE_BUCKETS, float("inf")], snap.handshake_buckets, strict=True):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    out.append(HistogramMetricFamily(f"{p}_handshake_duration_seconds",
                                     "Time from accept to handshake completed.",
                                     buckets=buckets, sum_value=snap.handshake_seconds))
    out += [
        counter("received_bytes", "TLS bytes read from clients (PROXY headers included).", snap.bytes_in),
        counter("sent_bytes", "TLS bytes written to clients.", snap.bytes_out),
        counter("session_resumptions", "Handshakes that resumed a TLS session.", snap.resumed),
        counter("renegotiations", "TLS 1.2 renegotiations the server started, counted when the "
                "connection ends.", snap.renegotiations),
        by("tls_versions", "Completed handshakes by negotiated protocol version.", "version", snap.versions),
        by("tls_ciphers", "Completed handshakes by negotiated cipher.", "cipher", snap.ciphers),
        by("alpn_protocols", "Completed handshakes by negotiated ALPN protocol (none: not counted).",
           "protocol", snap.alpn),
    ]
    expiry = GaugeMetricFamily(f"{p}_certificate_expiry_timestamp_seconds",
                               "Not-after time of each served certificate (name: default, or the SNI "
                               "name as configured).", labels=["name"])
    for name in sorted(snap.certificates):
        expiry.add_metric([name], snap.certificates[name])
    reloads = CounterMetricFamily(f"{p}_certificate_reloads", "Certificate reloads, by result.",
                                  labels=["result"])
    reloads.add_metric(["ok"], snap.reloads_ok)
    reloads.add_metric(["failed"], snap.reloads_failed)
    out += [
        expiry,
        reloads,
        GaugeMetricFamily(f"{p}_certificate_last_reload_timestamp_seconds",
                          "When certificates were last reloaded successfully (0: never).",
                          value=snap.last_reload_time),
        GaugeMetricFamily(f"{p}_accepting", "1 while the server accepts connections, 0 while it drains.",
                          value=1 if snap.accepting else 0),
    ]
    return out


class ServerCollector(Collector):
    """A ``prometheus_client`` collector for one :class:`~tlsuv.Server` (or any snapshot source).

    ``source`` is a server, or a callable returning a :class:`~tlsuv.stats.Snapshot`
    (the ``--workers`` supervisor passes its sum over workers).  ``extra``
    returns more families to add (the supervisor's worker counts).
    """

    def __init__(self, source: Server | Callable[[], Snapshot], *, prefix: str = PREFIX,
                 extra: Callable[[], Sequence[Metric]] | None = None) -> None:
        self._snapshot: Callable[[], Snapshot] = source if callable(source) else source.snapshot
        self._prefix = prefix
        self._extra = extra

    def collect(self) -> Iterator[Metric]:
        yield from families(self._snapshot(), self._prefix)
        if self._extra is not None:
            yield from self._extra()

    def describe(self) -> Iterator[Metric]:
        # Names only, for the registry's duplicate check: no snapshot needed.
        yield from families(Snapshot(), self._prefix)


def registry_for(server: Server) -> CollectorRegistry:
    """A registry with ``server``'s metrics and ``python_info``.

    Not prometheus_client's ProcessCollector: its ``process_open_fds`` lists
    /proc/self/fd on every scrape, about 5 us per descriptor -- 50 ms of
    stalled loop per scrape at 10,000 connections.  ``tlsuv_connections_open``
    says the same for the descriptors that matter; CPU and memory are a
    node or cgroup exporter's job.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server))
    PlatformCollector(registry=registry)
    return registry


# -- HTTP: the I/O-free part ------------------------------------------------------------

_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   408: "Request Timeout", 431: "Request Header Fields Too Large",
                   500: "Internal Server Error", 503: "Service Unavailable"}

READY_PATHS: Final = ("/-/ready", "/healthz")
INDEX: Final = b"tlsuv: /metrics, /-/healthy, /-/ready, /healthz\n"


def request_complete(data: bytes | bytearray) -> bool:
    """The request's headers have all arrived (its end of headers is in ``data``)."""
    return b"\r\n\r\n" in data or b"\n\n" in data


def response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8", *,
             head: bool = False) -> bytes:
    header = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
              f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
              f"Cache-Control: no-store\r\nConnection: close\r\n\r\n").encode("ascii")
    return header if head else header + body


def respond(request: bytes | bytearray, registry: CollectorRegistry, ready: Callable[[], bool]) -> bytes:
    """The whole HTTP response to one request (its request line and headers)."""
    head_end = max(request.find(b"\r\n\r\n"), 0) or len(request)
    try:
        lines = bytes(request[:head_end]).decode("latin-1").split("\n")
        method, target, version = lines[0].strip().split(" ")
    except ValueError:
        return response(400, b"bad request\n")
    if not version.startswith("HTTP/1."):
        return response(400, b"HTTP/1.x only\n")
    head = method == "HEAD"
    if method not in ("GET", "HEAD"):
        return response(405, b"GET or HEAD\n")
    path = target.split("?", 1)[0]
    if path == "/metrics":
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        encoder, content_type = choose_encoder(accept)
        try:
            body = encoder(registry)
        except Exception:  # a bug in a collector: the scrape fails, the server does not
            log.exception("metrics collection failed")
            return response(500, b"metrics collection failed\n", head=head)
        return response(200, body, content_type, head=head)
    if path == "/-/healthy":
        return response(200, b"healthy\n", head=head)
    if path in READY_PATHS:
        if ready():
            return response(200, b"ready\n", head=head)
        return response(503, b"draining\n", head=head)
    if path == "/":
        return response(200, INDEX, head=head)
    return response(404, b"not found\n", head=head)


# Scrapers and health checkers connect one at a time, a few times a minute.
BACKLOG: Final = 128


def _listening_socket(host: str, port: int) -> socket.socket:
    """The endpoint's socket, bound and listening, non-blocking.

    SO_REUSEPORT: during an upgrade (tlsuv.upgrade) the new process tree
    binds the same metrics address while the old one still serves it; for
    that moment the kernel spreads scrapes over both.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ServerError(f"cannot serve metrics on {format_address((host, port))}: "
                          f"{exc.strerror or exc}") from exc
    sock.setblocking(False)
    return sock


# -- HTTP on a pyuv loop ------------------------------------------------------------------


class MetricsServer:
    """``/metrics`` and the health checks on a pyuv loop (the one the TLS server runs on).

    ``ready()`` says whether the server accepts connections.  :meth:`close`
    closes the listener and every client, so the loop can end.
    """

    def __init__(self, loop: pyuv.Loop, registry: CollectorRegistry, ready: Callable[[], bool]) -> None:
        self.loop = loop
        self.registry = registry
        self.ready = ready
        self._listener: pyuv.TCP | None = None
        self._clients: dict[pyuv.TCP, tuple[bytearray, pyuv.Timer]] = {}
        self.address: tuple[str, int] | None = None

    def listen(self, host: str, port: int) -> tuple[str, int]:
        sock = _listening_socket(host, port)
        tcp = pyuv.TCP(self.loop)
        try:
            tcp.open(sock.fileno())
            sock.detach()  # the handle owns the descriptor now
            tcp.listen(self._on_connection, BACKLOG)
        except pyuv.error.UVError as exc:
            tcp.close()
            sock.close()
            raise ServerError(f"cannot serve metrics on {format_address((host, port))}: "
                              f"{uv_error_text(exc)}") from exc
        name = tcp.getsockname()
        self._listener = tcp
        self.address = (str(name[0]), int(name[1]))
        return self.address

    def _on_connection(self, listener: pyuv.TCP, error: int | None) -> None:
        if error is not None:
            return
        tcp = pyuv.TCP(self.loop)
        try:
            listener.accept(tcp)
        except pyuv.error.UVError:
            tcp.close()
            return
        timer = pyuv.Timer(self.loop)
        timer.start(lambda t: self._finish(tcp, response(408, b"request timeout\n")), REQUEST_TIMEOUT, 0.0)
        self._clients[tcp] = (bytearray(), timer)
        tcp.start_read(self._on_read)

    def _on_read(self, tcp: pyuv.TCP, data: bytes | None, error: int | None) -> None:
        entry = self._clients.get(tcp)
        if entry is None:
            return
        if error is not None:
            self._drop(tcp)
            return
        buf = entry[0]
        buf += data or b""
        if request_complete(buf):
            self._finish(tcp, respond(buf, self.registry, self.ready))
        elif len(buf) > REQUEST_MAX:
            self._finish(tcp, response(431, b"request too large\n"))

    def _finish(self, tcp: pyuv.TCP, answer: bytes) -> None:
        entry = self._clients.pop(tcp, None)
        if entry is None:
            return
        entry[1].close()
        tcp.stop_read()
        try:
            tcp.write(answer, lambda h, err: h.close() if not h.closed else None)
        except pyuv.error.UVError:
            tcp.close()

    def _drop(self, tcp: pyuv.TCP) -> None:
        entry = self._clients.pop(tcp, None)
        if entry is not None:
            entry[1].close()
        if not tcp.closed:
            tcp.close()

    def close(self) -> None:
        if self._listener is not None and not self._listener.closed:
            self._listener.close()
        for tcp in list(self._clients):
            self._drop(tcp)


# -- HTTP on a selectors loop (the --workers supervisor) -----------------------------------


class SelectorEndpoint:
    """The same endpoint on a ``selectors`` loop, for the ``--workers`` supervisor.

    Register with :meth:`attach`; the supervisor's loop calls :meth:`handle`
    for every key whose ``data`` is this object, and :meth:`expire` now and
    then to drop clients past their deadline.
    """

    def __init__(self, registry: CollectorRegistry, ready: Callable[[], bool]) -> None:
        self.registry = registry
        self.ready = ready
        self.sock: socket.socket | None = None
        self.address: tuple[str, int] | None = None
        self._selector: selectors.BaseSelector | None = None
        # socket -> (request so far, response left to send, deadline)
        self._clients: dict[socket.socket, tuple[bytearray, bytes | None, float]] = {}

    def bind(self, host: str, port: int) -> tuple[str, int]:
        sock = _listening_socket(host, port)
        self.sock = sock
        name = sock.getsockname()
        self.address = (str(name[0]), int(name[1]))
        return self.address

    def attach(self, selector: selectors.BaseSelector) -> None:
        assert self.sock is not None
        self._selector = selector
        selector.register(self.sock, selectors.EVENT_READ, self)

    def handle(self, key: selectors.SelectorKey, mask: int) -> None:
        sock = key.fileobj
        assert isinstance(sock, socket.socket)
        if sock is self.sock:
            self._accept()
        elif mask & selectors.EVENT_WRITE:
            self._send(sock)
        else:
            self._read(sock)

    def _accept(self) -> None:
        assert self.sock is not None and self._selector is not None
        while True:
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, or the like: the next scrape tries again
                return
            client.setblocking(False)
            self._clients[client] = (bytearray(), None, time.monotonic() + REQUEST_TIMEOUT)
            self._selector.register(client, selectors.EVENT_READ, self)

    def _read(self, sock: socket.socket) -> None:
        entry = self._clients.get(sock)
        if entry is None:
            return
        try:
            data = sock.recv(REQUEST_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
            return
        buf = entry[0]
        buf += data
        if request_complete(buf):
            self._answer(sock, respond(buf, self.registry, self.ready))
        elif len(buf) > REQUEST_MAX:
            self._answer(sock, response(431, b"request too large\n"))

    def _answer(self, sock: socket.socket, answer: bytes) -> None:
        assert self._selector is not None
        buf, _, deadline = self._clients[sock]
        self._clients[sock] = (buf, answer, deadline)
        self._selector.modify(sock, selectors.EVENT_WRITE, self)
        self._send(sock)

    def _send(self, sock: socket.socket) -> None:
        entry = self._clients.get(sock)
        if entry is None or entry[1] is None:
            return
        try:
            n = sock.send(entry[1])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(sock)
            return
        rest = entry[1][n:]
        if rest:
            self._clients[sock] = (entry[0], rest, entry[2])
        else:
            self._drop(sock)

    def expire(self, now: float) -> None:
        for sock, (_, _, deadline) in list(self._clients.items()):
            if now >= deadline:
                self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        self._clients.pop(sock, None)
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
        sock.close()

    def close_after_fork(self) -> None:
        """In a forked child: close the sockets, and leave the selector alone.

        The selector's epoll instance is shared with the parent across the
        fork: unregistering here would remove the parent's registrations.
        """
        for sock in self._clients:
            sock.close()
        self._clients.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        """Close the listener and every client."""
        for sock in list(self._clients):
            self._drop(sock)
        if self.sock is not None:
            if self._selector is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(self.sock)
            self.sock.close()
            self.sock = None


__all__ = [
    "MetricsServer",
    "SelectorEndpoint",
    "ServerCollector",
    "families",
    "registry_for",
    "respond",
]
