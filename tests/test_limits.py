"""The limits of a real host, against real processes: the open file limit, running out of
descriptors (with a lowered RLIMIT_NOFILE), and the per-client connection cap.

CPU is measured from the kernel's account of the server process (``/proc/PID/stat``)
over a window of wall time: a loop spinning on accept() uses about all of it, an idle
one almost none.  The threshold is loose on purpose (a shared machine is noisy).
"""

from __future__ import annotations

import contextlib
import os
import resource
import select
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import Certs, Recorder, recv_exactly, server_thread
from helpers import GREETING
from test_workers import ECHO, Supervised

from tlsuv.errors import RefusedError
from tlsuv.limits import ClientCounts, Throttle, client_key, raise_open_file_limit
from tlsuv.proxy import V2_SIGNATURE

# How much of a measuring window an idle server may use: a spinning one uses nearly 100 %.
IDLE_CPU_SHARE = 0.2
WINDOW = 2.0


def limited(soft: int, hard: int, argv: list[str]) -> list[str]:
    """``argv`` run with RLIMIT_NOFILE set to (soft, hard) first, as a service manager would."""
    setter = ("import os, resource, sys; "
              f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
              "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")
    return [sys.executable, "-c", setter, *argv[1:]]


@contextlib.contextmanager
def running(argv: list[str]) -> Iterator[Supervised]:
    sup = Supervised(argv)
    try:
        yield sup
    finally:
        sup.stop()
        assert not any("Traceback" in line for line in sup.lines), "\n".join(sup.lines)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def assert_idle(pid: int) -> None:
    before, started = cpu_seconds(pid), time.monotonic()
    time.sleep(WINDOW)  # the measuring window itself, not a wait for something
    used, wall = cpu_seconds(pid) - before, time.monotonic() - started
    assert used < IDLE_CPU_SHARE * wall, f"the server used {used:.2f}s of CPU in {wall:.2f}s"


def start_handshake(certs: Certs, port: int) -> ssl.SSLSocket:
    """Connect and send the ClientHello without waiting for the answer."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    s = certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost",
                                                do_handshake_on_connect=False)
    s.setblocking(False)
    with contextlib.suppress(ssl.SSLWantReadError):
        s.do_handshake()
    return s


def finish_handshake(s: ssl.SSLSocket, until: float) -> bool:
    """Drive the handshake and read the greeting; False if ``until`` (monotonic) passes first."""
    s.setblocking(False)
    while True:
        try:
            s.do_handshake()
            break
        except ssl.SSLWantReadError:
            left = until - time.monotonic()
            if left <= 0:
                return False
            select.select([s], [], [], min(left, 0.05))
    s.settimeout(10)
    assert recv_exactly(s, len(GREETING)) == GREETING
    return True


def echoes(s: ssl.SSLSocket, payload: bytes = b"still served") -> None:
    s.sendall(payload)
    assert recv_exactly(s, len(payload)) == payload


def lines_matching(sup: Supervised, text: str) -> list[str]:
    return [line for line in sup.lines if text in line]


# -- the open file limit ------------------------------------------------------------------


def test_the_soft_open_file_limit_is_raised_to_the_hard_one(certs: Certs) -> None:
    argv = limited(256, 4096, [*ECHO, "--port", "0", "--cert", str(certs.cert_file),
                               "--key", str(certs.key_file), "--max-connections", "10000"])
    with running(argv) as sup:
        sup.wait_for(r"INFO tlsuv.echo: open file limit raised from 256 to 4096 \(the hard limit\)")
        sup.wait_for(r"WARNING tlsuv.echo: --max-connections 10000 needs about 10064 file descriptors, "
                     r"above the limit of 4096")
        limits = Path(f"/proc/{sup.proc.pid}/limits").read_text()
        assert any(line.split()[-3:] == ["4096", "4096", "files"] for line in limits.splitlines()
                   if line.startswith("Max open files")), limits


# -- out of descriptors ---------------------------------------------------------------------


def test_out_of_descriptors_delays_new_connections_without_spinning_and_recovers(certs: Certs) -> None:
    limit = 48
    argv = limited(limit, limit, [*ECHO, "--port", "0", "--cert", str(certs.cert_file),
                                  "--key", str(certs.key_file)])
    with running(argv) as sup:
        sup.wait_for(rf"open file limit: {limit}$")
        served: list[ssl.SSLSocket] = []
        waiting: list[ssl.SSLSocket] = []
        try:
            # Open connections one by one until the server stops answering for want of descriptors.
            for _ in range(limit):
                s = start_handshake(certs, sup.port)
                deadline = time.monotonic() + 15
                while not finish_handshake(s, time.monotonic() + 0.05):
                    if lines_matching(sup, "out of file descriptors"):
                        waiting.append(s)
                        break
                    assert time.monotonic() < deadline, "neither served nor paused"
                else:
                    served.append(s)
                    continue
                break
            assert waiting, f"{len(served)} connections and the server never ran out"
            assert 20 < len(served) < limit
            sup.wait_for(r"WARNING tlsuv: out of file descriptors \(limit 48, \d+ connection\(s\) open\): "
                         r"new connections wait in the listen queue")
            waiting += [start_handshake(certs, sup.port) for _ in range(3)]  # more in the queue
            assert_idle(sup.proc.pid)
            for s in served:  # the connections it has are served as before
                echoes(s)
            assert not any(finish_handshake(s, time.monotonic()) for s in waiting)
            assert len(lines_matching(sup, "out of file descriptors")) == 1  # rate-limited
            # Descriptors free up: the waiting clients are served, nobody intervenes.
            for s in served[:6]:
                s.settimeout(10)
                s.unwrap()
                s.close()
            del served[:6]
            for s in waiting:
                assert finish_handshake(s, time.monotonic() + 15), "a delayed client was never served"
                echoes(s)
            sup.wait_for(r"INFO tlsuv: file descriptors free again: accepting after [\d.]+s")
            assert not lines_matching(sup, "accept failed")
        finally:
            for s in served + waiting:
                s.close()


SERVE_AT_THE_LIMIT = """
import logging, os, resource, signal, socket, sys
import pyuv, tlsuv
from tlsuv.echo import echo_factory

logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
loop = pyuv.Loop()
server = tlsuv.Server(loop, tlsuv.server_context(tlsuv.load_bundle(CERT, KEY)), echo_factory)
sock = socket.socket()
sock.bind(("127.0.0.1", 0))
filler = []

def fill():
    while True:
        try:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            return

def free(handle, signum):
    for _ in range(8):
        os.close(filler.pop())
    print("freed", flush=True)

freeing = pyuv.Signal(loop)
freeing.start(free, signal.SIGUSR1)
# Leave exactly one descriptor: the server's spare takes it, and libuv's own
# spare, opened with the listening handle after it, finds none.
fill()
os.close(filler.pop())
port = server.listen_socket(sock)[1]
print(f"listening on 127.0.0.1:{port}", flush=True)
loop.run()
"""


def serve_at_the_limit(certs: Certs, tmp_path: Path) -> list[str]:
    script = tmp_path / "serve.py"
    script.write_text(f"CERT, KEY = {str(certs.cert_file)!r}, {str(certs.key_file)!r}\n" + SERVE_AT_THE_LIMIT)
    return [sys.executable, str(script)]


def test_emfile_with_libuvs_spare_gone_does_not_hang_the_loop(certs: Certs, tmp_path: Path) -> None:
    """libuv retries accept() forever when EMFILE reaches the callback; the server breaks the loop."""
    with running(serve_at_the_limit(certs, tmp_path)) as sup:
        s = start_handshake(certs, sup.port)
        sup.wait_for(r"accept\(\) failed: out of file descriptors; releasing the spare descriptor")
        sup.wait_for(r"WARNING tlsuv: out of file descriptors")
        assert_idle(sup.proc.pid)
        assert not finish_handshake(s, time.monotonic())
        mark = len(sup.out)
        sup.signal(signal.SIGUSR1)
        sup.wait_for("freed", stream=sup.out, start=mark)
        assert finish_handshake(s, time.monotonic() + 15)
        echoes(s)
        s.unwrap()
        s.close()
        sup.wait_for(r"file descriptors free again")


def test_emfile_with_both_spares_gone_sacrifices_one_connection_not_the_loop(certs: Certs) -> None:
    """The last resort, called directly: a real process cannot be made to lose both spares
    on cue (libuv reopens its own whenever a stream is made, and closes it by number)."""
    with server_thread(certs.server_context(),
                       factory=lambda conn: Recorder(echo=True, greeting=GREETING)) as st:
        victim = st.connect(certs)
        assert recv_exactly(victim, len(GREETING)) == GREETING

        def lose_both_spares() -> None:
            assert st.server._reserve is not None
            st.server._reserve.release()
            st.server._out_of_descriptors()  # what libuv's EMFILE callback runs

        st.call(lose_both_spares)
        with pytest.raises((ssl.SSLError, ConnectionResetError, EOFError)):
            victim.sendall(b"x")
            recv_exactly(victim, 1)
        st.wait_for(lambda: not st.server.connections)
        handler = st.handlers[0]
        assert isinstance(handler, Recorder) and isinstance(handler.reason, RefusedError)
        assert str(handler.reason) == "aborted: the server ran out of file descriptors"
        # The listener is still there and the spare comes back with the next connection.
        after = st.connect(certs)
        assert recv_exactly(after, len(GREETING)) == GREETING
        echoes(after)
        assert st.call(lambda: st.server._reserve is not None and st.server._reserve.fd >= 0)
        after.unwrap()
        after.close()
        victim.close()


# -- connections per client ------------------------------------------------------------------


def refused(opening: Callable[[], ssl.SSLSocket]) -> bool:
    """The server closed the connection ``opening`` makes before answering its ClientHello."""
    try:
        with opening() as s:
            return not finish_handshake(s, time.monotonic() + 15)
    except (ssl.SSLError, ConnectionResetError, EOFError):
        return True


def test_max_connections_per_ip_refuses_at_once_and_counts(certs: Certs) -> None:
    argv = [*ECHO, "--port", "0", "--cert", str(certs.cert_file), "--key", str(certs.key_file),
            "--max-connections-per-ip", "2", "--stats-interval", "0.2"]
    with running(argv) as sup:
        first, second = start_handshake(certs, sup.port), start_handshake(certs, sup.port)
        assert finish_handshake(first, time.monotonic() + 15)
        assert finish_handshake(second, time.monotonic() + 15)
        for _ in range(4):
            assert refused(lambda: start_handshake(certs, sup.port))
        sup.wait_for(r"WARNING tlsuv: refusing a connection from 127\.0\.0\.1: 2 already open from that "
                     r"address \(the per-client limit\)$")
        sup.wait_for(r"stats: workers=1 open=2 accepted=2 refused=4 ")
        assert len(lines_matching(sup, "refusing a connection")) == 1  # rate-limited
        echoes(first)
        first.settimeout(10)
        first.unwrap()
        first.close()
        sup.wait_for(r"stats: workers=1 open=1 ", start=len(sup.lines))  # the server saw it go
        third = start_handshake(certs, sup.port)  # a slot is free again
        assert finish_handshake(third, time.monotonic() + 15)
        echoes(third)
        for s in (second, third):
            s.close()


def proxied(certs: Certs, port: int, header: bytes) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    raw.sendall(header)
    s = certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost",
                                                do_handshake_on_connect=False)
    s.setblocking(False)
    with contextlib.suppress(ssl.SSLWantReadError):
        s.do_handshake()
    return s


def v2_header(source: str, port: int) -> bytes:
    packed = socket.inet_aton(source)
    body = packed + socket.inet_aton("198.51.100.2") + port.to_bytes(2, "big") + (443).to_bytes(2, "big")
    return V2_SIGNATURE + bytes([0x21, 0x11]) + len(body).to_bytes(2, "big") + body


def test_max_connections_per_ip_counts_the_client_named_by_the_proxy_header(certs: Certs) -> None:
    argv = [*ECHO, "--port", "0", "--cert", str(certs.cert_file), "--key", str(certs.key_file),
            "--proxy-protocol", "--max-connections-per-ip", "1", "--stats-interval", "0.2"]
    with running(argv) as sup:
        # Three connections from the same balancer (127.0.0.1): the limit is per client.
        a = proxied(certs, sup.port, v2_header("203.0.113.9", 5000))
        b = proxied(certs, sup.port, b"PROXY TCP4 203.0.113.10 198.51.100.2 5001 443\r\n")
        assert finish_handshake(a, time.monotonic() + 15)
        assert finish_handshake(b, time.monotonic() + 15)
        assert refused(lambda: proxied(certs, sup.port, v2_header("203.0.113.9", 5002)))
        sup.wait_for(r"refusing a connection from 203\.0\.113\.9: 1 already open")
        # The same client arriving as an IPv4-mapped IPv6 address is the same client.
        assert refused(lambda: proxied(certs, sup.port,
                                       b"PROXY TCP6 ::ffff:203.0.113.10 2001:db8::2 5003 443\r\n"))
        sup.wait_for(r"stats: workers=1 open=2 accepted=4 refused=2 ")
        for s in (a, b):
            echoes(s)
            s.close()


# -- the small parts -----------------------------------------------------------------------------


def test_client_counts() -> None:
    counts = ClientCounts(2)
    assert counts.admit("192.0.2.1") and counts.admit("192.0.2.1")
    assert not counts.admit("192.0.2.1") and counts.open("192.0.2.1") == 2
    assert counts.admit("192.0.2.2")
    counts.release("192.0.2.1")
    assert counts.admit("192.0.2.1")
    for _ in range(2):
        counts.release("192.0.2.1")
    counts.release("192.0.2.2")
    assert counts.clients() == 0  # nothing kept for clients that left
    with pytest.raises(ValueError, match="at least 1"):
        ClientCounts(0)


@pytest.mark.parametrize(("host", "key"), [
    ("192.0.2.1", "192.0.2.1"), ("::ffff:192.0.2.1", "192.0.2.1"), ("::ffff:c000:201", "192.0.2.1"),
    ("0:0:0:0:0:ffff:c000:201", "192.0.2.1"), ("2001:db8::1", "2001:db8::1"),
    ("::1", "::1"), ("64:ff9b::192.0.2.1", "64:ff9b::192.0.2.1"),  # NAT64 is not IPv4-mapped
])
def test_client_key(host: str, key: str) -> None:
    assert client_key(host) == key


def test_throttle() -> None:
    t = Throttle(every=10)
    assert t.ready(100.0) == 0
    assert t.ready(101.0) is None and t.ready(109.9) is None
    assert t.ready(110.0) == 2


def test_the_limit_is_never_lowered() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before, after = raise_open_file_limit()
    assert before == soft and after >= soft
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (after, hard)


@pytest.mark.parametrize("limit", ["max_connections", "max_connections_per_ip"])
def test_a_finished_connection_no_longer_counts_against_the_limits(certs: Certs, limit: str) -> None:
    """A client that closes and reconnects at once is not refused by its own last connection.

    The server closes the socket as a connection finishes, but libuv's close
    callback (where the connection leaves ``Server.connections``) runs only at
    the end of that loop iteration, after the poll that may already accept the
    client's next connection.
    """
    kwargs = {limit: 1}
    ctx = certs.client_ssl_context()
    with server_thread(certs.server_context(), **kwargs) as st:
        for i in range(30):
            with socket.create_connection(("127.0.0.1", st.port), timeout=10) as raw, \
                    ctx.wrap_socket(raw, server_hostname="localhost") as s:
                assert recv_exactly(s, len(GREETING)) == GREETING, f"session {i} refused"
                s.unwrap()  # the server answers our close_notify and finishes at once
        assert st.call(lambda: st.server.refused) == 0
