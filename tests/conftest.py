"""Shared test machinery: certificates, checked loops, and a server on a thread.

Loop tests follow pyuv's own test suite: an exception raised inside a libuv
callback does not propagate out of ``loop.run()`` (pyuv hands it to
``loop.excepthook`` and carries on), so a test that did not catch it would
pass while the code is broken.  :class:`CheckedLoop` records them and every
fixture fails the test if any was raised, or if a handle was left open.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import pyuv
import trustme
from helpers import wait_until
from OpenSSL import SSL

import tlsuv
from tlsuv import _openssl
from tlsuv.echo import echo_factory

# -- the two data paths ------------------------------------------------------------
#
# tlsuv's data path runs compiled (tlsuv._speedups) when the extension is built, or
# in Python.  The core tests run on both (tests/test_tls_core.py's io_path); so do
# the in-process loopback tests of these modules, through the data_path fixture.
# TLSUV_NO_EXTENSIONS=1 puts the whole suite, subprocesses included, on the pure
# path (make test-pure).
BOTH_DATA_PATHS = frozenset({"test_server", "test_lifecycle", "test_bad_peers", "test_phases",
                             "test_proxy_server"})


def require_speedups() -> None:
    """Skip a compiled-path test where tlsuv._speedups is not in use; fail instead in CI."""
    if _openssl.SPEEDUPS is not None:
        return
    if os.environ.get("TLSUV_NO_EXTENSIONS", "") not in ("", "0"):
        pytest.skip("TLSUV_NO_EXTENSIONS is set")
    if os.environ.get("TLSUV_REQUIRE_SPEEDUPS") == "1":
        pytest.fail(f"TLSUV_REQUIRE_SPEEDUPS=1, but the data path is {_openssl.data_path()}")
    pytest.skip(f"the compiled data path is not in use: {_openssl.data_path()}")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__ in BOTH_DATA_PATHS and "data_path" in metafunc.fixturenames:
        metafunc.parametrize("data_path", ["compiled", "pure"], indirect=True)


@pytest.fixture(autouse=True)
def data_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which data path new connections take: as installed, or the one the test was parametrized for."""
    path = getattr(request, "param", None)
    if path == "pure":
        monkeypatch.setattr(_openssl, "SPEEDUPS", None)
    elif path == "compiled":
        require_speedups()
    return "compiled" if _openssl.SPEEDUPS is not None else "pure"


class CheckedLoop(pyuv.Loop):  # type: ignore[misc]  # pyuv ships no type information
    """A pyuv loop that remembers exceptions raised in callbacks instead of printing them."""

    def __init__(self) -> None:
        super().__init__()
        self.errors: list[BaseException] = []

    def excepthook(self, typ: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        self.errors.append(value)

    def open_handles(self) -> list[Any]:
        return [h for h in self.handles if not h.closed]

    def check(self) -> None:
        """Fail on callback exceptions or open handles (after letting closes finish)."""
        self.run(pyuv.UV_RUN_NOWAIT)
        if self.errors:
            raise AssertionError(
                f"exception(s) raised inside loop callbacks: {self.errors!r}") from self.errors[0]
        leaked = self.open_handles()
        assert not leaked, f"handles left open: {leaked!r}"


@dataclass
class Certs:
    ca: trustme.CA
    server: trustme.LeafCert
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self, **kwargs: Any) -> SSL.Context:
        ctx = tlsuv.certs.new_context()
        for opt, value in kwargs.items():
            if opt == "max_version":
                ctx.set_max_proto_version(value)
            elif opt == "min_version":
                ctx.set_min_proto_version(value)
            else:
                raise TypeError(opt)
        bundle = tlsuv.CertificateBundle(self.server.cert_chain_pems[0].bytes(),
                                          self.server.private_key_pem.bytes())
        return tlsuv.server_context(bundle, ctx)

    def client_ssl_context(self, **kwargs: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        for k, v in kwargs.items():
            setattr(ctx, k, v)
        return ctx

    def client_pyopenssl_context(self, max_version: int | None = None) -> SSL.Context:
        ctx = SSL.Context(SSL.TLS_METHOD)
        if max_version is not None:
            ctx.set_max_proto_version(max_version)
        ctx.load_verify_locations(str(self.ca_file))
        ctx.set_verify(SSL.VERIFY_PEER, lambda *a: bool(a[-1]))
        return ctx


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")
    d = tmp_path_factory.mktemp("certs")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(d / "server.pem"))
    leaf.private_key_pem.write_to_path(str(d / "server.key"))
    return Certs(ca, leaf, d / "ca.pem", d / "server.pem", d / "server.key")


@pytest.fixture
def loop() -> Iterator[CheckedLoop]:
    lp = CheckedLoop()
    yield lp
    lp.check()


class Recorder(tlsuv.Handler):
    """A handler that records every callback, and echoes if asked."""

    def __init__(self, echo: bool = False, greeting: bytes | None = None) -> None:
        self.echo = echo
        self.greeting = greeting
        self.events: list[str] = []
        self.data = bytearray()
        self.reason: BaseException | None = None
        self.closed_count = 0

    def established(self, conn: tlsuv.Connection) -> None:
        self.events.append("established")
        if self.greeting:
            conn.write(self.greeting)

    def handshake_complete(self, conn: tlsuv.Connection) -> None:
        self.events.append("handshake_complete")

    def read(self, conn: tlsuv.Connection, data: bytes) -> None:
        self.data += data
        if self.echo:
            conn.write(data)

    def closed(self, conn: tlsuv.Connection, reason: BaseException | None) -> None:
        self.events.append("closed")
        self.closed_count += 1
        self.reason = reason

    def pause_writing(self, conn: tlsuv.Connection) -> None:
        self.events.append("pause_writing")
        if self.echo:
            conn.pause_reading()

    def resume_writing(self, conn: tlsuv.Connection) -> None:
        self.events.append("resume_writing")
        if self.echo:
            conn.resume_reading()


@dataclass
class ServerThread:
    """A tlsuv server running its own CheckedLoop on a background thread.

    Blocking clients (Python's ssl, subprocesses) run in the test thread.  On
    exit the server is closed gracefully, the loop must end by itself (so no
    handle is left active), and callback exceptions fail the test.
    """

    context: SSL.Context
    factory: Callable[[tlsuv.Connection], tlsuv.Handler] = echo_factory
    options: tlsuv.ConnectionOptions = field(default_factory=tlsuv.ConnectionOptions)
    host: str = "127.0.0.1"
    max_connections: int | None = None
    max_connections_per_ip: int | None = None
    grace: float = 5.0
    handlers: list[tlsuv.Handler] = field(default_factory=list)
    connections: list[tlsuv.Connection] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.loop = CheckedLoop()
        self.server = tlsuv.Server(self.loop, self.context, self._factory, options=self.options,
                                   max_connections=self.max_connections,
                                   max_connections_per_ip=self.max_connections_per_ip)
        self.address = self.server.listen(self.host, 0)
        self.port = self.address[1]
        self._calls: list[tuple[Callable[[], Any], list[Any], threading.Event]] = []
        self._lock = threading.Lock()
        self._async = pyuv.Async(self.loop, self._run_calls)
        self._thread = threading.Thread(target=self._run, name="tlsuv-loop", daemon=True)
        self._crash: BaseException | None = None

    def _factory(self, conn: tlsuv.Connection) -> tlsuv.Handler:
        h = self.factory(conn)
        self.handlers.append(h)
        self.connections.append(conn)
        return h

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:  # surfaced in __exit__
            self._crash = exc

    def _run_calls(self, handle: pyuv.Async) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn, box, done in calls:
            try:
                box.append((True, fn()))
            except BaseException as exc:  # handed back to the calling thread
                box.append((False, exc))
            done.set()

    def call(self, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``fn`` on the loop thread and return its result."""
        box: list[Any] = []
        done = threading.Event()
        with self._lock:
            self._calls.append((fn, box, done))
        self._async.send()
        assert done.wait(timeout), "loop thread did not run the call in time"
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def wait_for(self, predicate: Callable[[], object], timeout: float = 10.0,
                 what: str = "a condition on the server's loop") -> None:
        """Poll ``predicate`` on the loop thread until it holds; fail after ``timeout``."""
        wait_until(lambda: self.call(predicate), timeout=timeout, what=what)

    def pass_time(self, seconds: float, timeout: float = 10.0) -> None:
        """Return once the loop has run every timer due within ``seconds`` from now.

        libuv runs timers in order of due time (and of starting, among equals),
        so a marker timer started now fires after every timer already due by
        then: a test that something did *not* time out waits exactly that long,
        on the server's own clock, instead of sleeping with a guessed margin.
        """
        fired = threading.Event()

        def start() -> None:
            def fire(timer: pyuv.Timer) -> None:
                timer.close()
                fired.set()

            pyuv.Timer(self.loop).start(fire, seconds, 0.0)

        self.call(start)
        assert fired.wait(seconds + timeout), f"the server's loop did not get {seconds} s further"

    def open_handles(self) -> dict[str, int]:
        """Open libuv handles by type, e.g. {"TCP": 3, "Timer": 1}."""
        def count() -> dict[str, int]:
            out: dict[str, int] = {}
            for h in self.loop.handles:
                if not h.closed:
                    out[type(h).__name__] = out.get(type(h).__name__, 0) + 1
            return out
        result: dict[str, int] = self.call(count)
        return result

    def __enter__(self) -> ServerThread:
        self._thread.start()
        return self

    def stop(self, timeout: float = 15.0) -> None:
        if not self._thread.is_alive():
            return

        def close() -> None:
            self.server.close(self.grace, self._async.close)

        if not self._async.closed:  # else the test closed it and the loop is ending by itself
            self.call(close)
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "loop did not stop: a handle stayed active"

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._crash is not None:
            raise self._crash
        self.loop.check()
        assert not self.server.connections, f"connections left: {self.server.connections}"

    def connect(self, certs: Certs, timeout: float = 10.0, **ctx_kwargs: Any) -> ssl.SSLSocket:
        ctx = certs.client_ssl_context(**ctx_kwargs)
        raw = socket.create_connection((self.host, self.port), timeout=timeout)
        return ctx.wrap_socket(raw, server_hostname="localhost")


def recv_exactly(sock: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(65536, n - len(buf)))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


@contextlib.contextmanager
def server_thread(context: SSL.Context, **kwargs: Any) -> Iterator[ServerThread]:
    with ServerThread(context, **kwargs) as st:
        yield st


# -- TLS feature fixtures (SNI, client certificates; tests/test_policy.py, test_client.py) --


@dataclass
class TLSFiles:
    """Certificates beyond ``certs``: SNI names, and client certificates from their own CA."""

    dir: Path
    sni: dict[str, tuple[Path, Path]]  # name -> (cert, key), issued by certs.ca
    client_ca_file: Path
    client_cert: Path  # CN=alice, issued by the client CA
    client_key: Path
    rogue_cert: Path  # CN=mallory, issued by a CA nobody trusts
    rogue_key: Path
    other_ca_file: Path  # a CA that did not issue any server certificate

    def bundle(self, name: str) -> tlsuv.CertificateBundle:
        cert, key = self.sni[name]
        return tlsuv.load_bundle(cert, key)


@pytest.fixture(scope="session")
def tls_files(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    d = tmp_path_factory.mktemp("tls-files")
    sni: dict[str, tuple[Path, Path]] = {}
    for name in ("alpha.test", "beta.test", "*.wild.test"):
        leaf = certs.ca.issue_cert(name, common_name=name)
        stem = name.replace("*", "star")
        leaf.cert_chain_pems[0].write_to_path(str(d / f"{stem}.pem"))
        leaf.private_key_pem.write_to_path(str(d / f"{stem}.key"))
        sni[name] = (d / f"{stem}.pem", d / f"{stem}.key")
    client_ca = trustme.CA(organization_name="tlsuv client CA")
    client_ca.cert_pem.write_to_path(str(d / "client-ca.pem"))
    alice = client_ca.issue_cert("alice@example.test", common_name="alice")
    alice.cert_chain_pems[0].write_to_path(str(d / "alice.pem"))
    alice.private_key_pem.write_to_path(str(d / "alice.key"))
    rogue_ca = trustme.CA(organization_name="rogue CA")
    rogue_ca.cert_pem.write_to_path(str(d / "rogue-ca.pem"))
    mallory = rogue_ca.issue_cert("mallory@example.test", common_name="mallory")
    mallory.cert_chain_pems[0].write_to_path(str(d / "mallory.pem"))
    mallory.private_key_pem.write_to_path(str(d / "mallory.key"))
    return TLSFiles(d, sni, d / "client-ca.pem", d / "alice.pem", d / "alice.key",
                    d / "mallory.pem", d / "mallory.key", d / "rogue-ca.pem")
