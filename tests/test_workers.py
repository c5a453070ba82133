"""``--workers``: real worker processes on one SO_REUSEPORT port, supervised, drained, counted.

Every test runs the supervisor in a subprocess of its own session: it forks,
and signals sent to it (or to its whole process group, as a terminal's Ctrl-C
does) must not reach the test runner.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from clients import echo_once, tls_client
from conftest import Certs, recv_exactly
from helpers import GREETING, wait_until

from tlsuv.proxy import V2_SIGNATURE
from tlsuv.workers import available_cpus, worker_count

ECHO = [sys.executable, "-m", "tlsuv.echo"]


class Supervised:
    """A running ``python -m tlsuv.echo --workers ...`` (or any script) and its log lines."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.out: list[str] = []
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(s, dest), daemon=True)
                         for s, dest in ((self.proc.stderr, self.lines), (self.proc.stdout, self.out))]
        for t in self._readers:
            t.start()
        try:
            m = self.wait_for(r"listening on .*:(\d+)$", stream=self.out)
        except BaseException:
            self.stop()  # never leave a forking server behind a failed start
            raise
        self.port = int(m.group(1))

    def _read(self, stream: object, dest: list[str]) -> None:
        assert hasattr(stream, "readline")
        for line in iter(stream.readline, ""):
            with self._cond:
                dest.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 15.0, stream: list[str] | None = None,
                 start: int = 0, accept: Callable[[re.Match[str]], bool] | None = None) -> re.Match[str]:
        """The first line from ``start`` on that matches ``pattern`` (and that ``accept`` takes),
        waiting for the process to print it."""
        lines = self.lines if stream is None else stream
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in lines[start:]:
                    m = regex.search(line)
                    if m and (accept is None or accept(m)):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._readers_alive()):
                    break
                self._cond.wait(min(left, 0.2))
        raise AssertionError(f"no line matching {pattern!r}; stderr:\n" + "\n".join(self.lines[-40:]))

    def _readers_alive(self) -> bool:
        return any(t.is_alive() for t in self._readers)

    def worker_pids(self, n: int) -> dict[int, int]:
        pids: dict[int, int] = {}
        for number in range(1, n + 1):
            m = self.wait_for(rf"worker {number} listening \(pid (\d+)\)")
            pids[number] = int(m.group(1))
        return pids

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def wait(self, timeout: float = 20.0) -> int:
        rc = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return rc

    def stop(self) -> None:
        # The whole group, even when the supervisor is already gone: no worker may outlive a test.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


@contextlib.contextmanager
def echo_workers(certs: Certs, *args: str) -> Iterator[Supervised]:
    sup = Supervised([*ECHO, "--port", "0", "--cert", str(certs.cert_file), "--key",
                      str(certs.key_file), *args])
    try:
        yield sup
    finally:
        sup.stop()
        assert not any("Traceback" in line for line in sup.lines), "\n".join(sup.lines)


def serving_worker(sup: Supervised, local_port: int) -> int:
    m = sup.wait_for(rf"worker (\d+): 127\.0\.0\.1:{local_port}: accepted")
    return int(m.group(1))


def spread(sup: Supervised, certs: Certs, wanted: set[int], tries: int = 80) -> dict[int, int]:
    """Connect until every worker in ``wanted`` served one; returns worker -> connections."""
    seen: dict[int, int] = {}
    for _ in range(tries):
        worker = serving_worker(sup, echo_once(certs, sup.port))
        seen[worker] = seen.get(worker, 0) + 1
        if wanted <= set(seen):
            break
    return seen


def test_connections_spread_over_all_workers(certs: Certs) -> None:
    with echo_workers(certs, "--workers", "3", "--log-level", "debug") as sup:
        pids = sup.worker_pids(3)
        assert len(set(pids.values())) == 3 and sup.proc.pid not in pids.values()
        seen = spread(sup, certs, {1, 2, 3})
        # The kernel hashes each connection to a socket: with 3 workers the
        # chance that 80 connections miss one is 3 * (2/3)**80, about 1e-14.
        assert set(seen) == {1, 2, 3}, seen
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0


def test_a_killed_worker_is_restarted_and_service_goes_on(certs: Certs) -> None:
    with echo_workers(certs, "--workers", "2", "--log-level", "debug") as sup:
        pids = sup.worker_pids(2)
        os.kill(pids[2], signal.SIGKILL)
        # Once the parent reaped it, its socket has left the SO_REUSEPORT group.
        sup.wait_for(rf"worker 2 \(pid {pids[2]}\) was killed by SIGKILL after [\d.]+s; restarting in 0\.1s")
        for _ in range(10):
            echo_once(certs, sup.port)  # all on worker 1 until worker 2 is back
        m = sup.wait_for(rf"worker 2 listening \(pid (?!{pids[2]}\))(\d+)\)")
        new_pid = int(m.group(1))
        assert new_pid != pids[2]
        seen = spread(sup, certs, {2})
        assert 2 in seen, f"the restarted worker never served: {seen}"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pids[2], 0)
            pytest.fail("the killed worker's pid still exists")  # pragma: no cover
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0


def test_a_session_from_one_worker_resumes_on_another(certs: Certs) -> None:
    """Forked after the SSL context was made, every worker holds the same ticket keys."""
    with echo_workers(certs, "--workers", "2", "--log-level", "debug") as sup:
        sup.worker_pids(2)
        ctx = certs.client_ssl_context()

        def connect(session: ssl.SSLSession | None) -> tuple[int, ssl.SSLSession | None, bool]:
            raw = socket.create_connection(("127.0.0.1", sup.port), timeout=10)
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
                local = s.getsockname()[1]
                assert recv_exactly(s, len(GREETING)) == GREETING  # TLS 1.3 tickets arrive with it
                reused = bool(s.session_reused)
                new_session = s.session
                s.unwrap()
            return serving_worker(sup, local), new_session, reused

        first, session, reused = connect(None)
        assert not reused and session is not None
        for _ in range(80):
            worker, _, reused = connect(session)
            if worker != first:
                assert reused, "a ticket from one worker was refused by another"
                break
        else:  # pragma: no cover - 2**-80
            pytest.fail("every connection landed on the same worker")
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0


def test_quick_deaths_back_off(certs: Certs) -> None:
    with echo_workers(certs, "--workers", "2") as sup:
        pid = sup.worker_pids(2)[1]
        delays = []
        for _ in range(3):
            mark = len(sup.lines)
            os.kill(pid, signal.SIGKILL)
            m = sup.wait_for(rf"worker 1 \(pid {pid}\) was killed by SIGKILL after [\d.]+s; "
                             r"restarting in ([\d.]+)s", start=mark)
            delays.append(float(m.group(1)))
            pid = int(sup.wait_for(r"worker 1 listening \(pid (\d+)\)", start=mark).group(1))
        assert delays == [0.1, 0.2, 0.4]
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0


def _hold_open(certs: Certs, port: int, n: int) -> list[ssl.SSLSocket]:
    clients = []
    for _ in range(n):
        s = tls_client(certs, port)
        assert recv_exactly(s, len(GREETING)) == GREETING
        clients.append(s)
    return clients


@pytest.mark.parametrize("how", ["SIGTERM to the parent", "Ctrl-C to the process group"])
def test_signal_drains_every_worker_with_close_notify(certs: Certs, how: str) -> None:
    """A drain refuses new connections, serves the open ones to the end of --grace, then close_notify."""
    with echo_workers(certs, "--workers", "2", "--grace", "2") as sup:
        sup.worker_pids(2)
        clients = _hold_open(certs, sup.port, 6)
        mark = len(sup.lines)
        if how.startswith("SIGTERM"):
            sup.signal(signal.SIGTERM)
        else:
            # A terminal signals every process of the group at once: workers
            # must treat that as one drain, not as drain + abort.
            os.killpg(sup.proc.pid, signal.SIGINT)
        for number in (1, 2):
            sup.wait_for(rf"worker {number}: draining \d+ connection\(s\)", start=mark)
        # Nobody listens any more (the parent closed its copies of the sockets too).
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", sup.port), timeout=5).close()
        for i, s in enumerate(clients):  # still served during the grace period
            payload = f"still here {i}".encode()
            s.sendall(payload)
            assert recv_exactly(s, len(payload)) == payload
        for s in clients:
            with s:
                # close_notify arrives: a clean end (a bare TCP close would raise SSLEOFError).
                assert s.recv(10) == b""
                s.unwrap()
        assert sup.wait() == 0
        sup.wait_for(r"grace period over: closing \d+ connection\(s\)", start=mark)
        assert len([line for line in sup.lines if "drained and exited" in line]) == 2
        assert not any("aborting" in line for line in sup.lines)


def test_second_signal_aborts(certs: Certs) -> None:
    with echo_workers(certs, "--workers", "2", "--grace", "30", "--close-timeout", "30") as sup:
        sup.worker_pids(2)
        clients = _hold_open(certs, sup.port, 2)
        sup.signal(signal.SIGTERM)
        sup.wait_for(r"SIGTERM: draining 2 worker\(s\)")
        for s in clients:  # the drain would serve them for 30 s
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"ping"
        sup.signal(signal.SIGINT)
        assert sup.wait() == 0  # sup.wait's own timeout is far below the 30 s grace
        sup.wait_for(r"SIGINT again: aborting all connections")
        for s in clients:
            with s, pytest.raises((ssl.SSLEOFError, ConnectionResetError)):
                s.recv(10)  # aborted: TCP closes without close_notify


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie no longer runs; our init may be slow to reap it


def test_workers_drain_when_the_supervisor_dies(certs: Certs) -> None:
    with echo_workers(certs, "--workers", "2") as sup:
        pids = sup.worker_pids(2)
        sup.signal(signal.SIGKILL)
        wait_until(lambda: all(_dead(p) for p in pids.values()), what="the orphaned workers to exit")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", sup.port), timeout=5).close()


def _stats(sup: Supervised, **want: int) -> dict[str, int]:
    """Wait for a stats line, printed from now on, whose counters match ``want``; return them all.

    Only new lines count: a line from before what the test just did would prove nothing.
    """

    def counters(m: re.Match[str]) -> dict[str, int]:
        return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}

    m = sup.wait_for(r"stats: (.*)$", start=len(sup.lines),
                     accept=lambda m: all(counters(m).get(k) == v for k, v in want.items()))
    return counters(m)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_stats_interval_sums_over_workers(certs: Certs, workers: str) -> None:
    with echo_workers(certs, "--workers", workers, "--stats-interval", "0.2") as sup:
        payload = b"x" * 5000
        for _ in range(6):
            echo_once(certs, sup.port, payload)
        with socket.create_connection(("127.0.0.1", sup.port), timeout=10) as bad, \
                contextlib.suppress(ConnectionResetError):
            bad.sendall(b"this is not TLS\r\n\r\n")
            while bad.recv(100):  # an alert maybe, then the close
                pass
        values = _stats(sup, workers=int(workers), open=0, accepted=7, handshakes_failed=1)
        # Ciphertext both ways: at least the payloads and the greeting, plus TLS overhead.
        assert values["bytes_in"] > 6 * len(payload)
        assert values["bytes_out"] > 6 * (len(payload) + len(GREETING))
        assert values["refused"] == 0
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0


def test_stats_survive_worker_restarts(certs: Certs) -> None:
    with echo_workers(certs, "--workers", "2", "--stats-interval", "0.2", "--log-level", "debug") as sup:
        pids = sup.worker_pids(2)
        seen = spread(sup, certs, {1, 2})  # both workers have counted something
        total = sum(seen.values())
        _stats(sup, accepted=total)
        for number in (1, 2):  # one after the other: what the first counted must survive the second
            mark = len(sup.lines)
            os.kill(pids[number], signal.SIGKILL)
            sup.wait_for(rf"worker {number} listening", start=mark)
            # The dead worker's counts are kept: accepted never goes back.
            _stats(sup, accepted=total, open=0)
        echo_once(certs, sup.port)
        _stats(sup, accepted=total + 1)
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0


def test_proxy_protocol_with_workers_logs_the_client_address(certs: Certs) -> None:
    with echo_workers(certs, "--workers", "2", "--proxy-protocol", "--log-level", "debug") as sup:
        sup.worker_pids(2)
        raw = socket.create_connection(("127.0.0.1", sup.port), timeout=10)
        balancer_port = raw.getsockname()[1]
        raw.sendall(b"PROXY TCP4 203.0.113.9 198.51.100.2 6000 443\r\n")
        with certs.client_ssl_context().wrap_socket(raw, server_hostname="localhost") as s:
            assert recv_exactly(s, len(GREETING)) == GREETING
            s.sendall(b"hi")
            assert recv_exactly(s, 2) == b"hi"
        sup.wait_for(rf"worker [12]: 203\.0\.113\.9:6000: PROXY v1 header from 127\.0\.0\.1:{balancer_port}")
        # A client that skips the balancer's header is dropped with the reason.
        with socket.create_connection(("127.0.0.1", sup.port), timeout=10) as direct:
            direct.sendall(V2_SIGNATURE[:4] + b"X")
            assert direct.recv(10) == b""
        sup.wait_for(r"no PROXY header: the connection starts with")
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0


def test_the_library_call_runs_the_handler_in_every_worker(tmp_path: Path, certs: Certs) -> None:
    """``tlsuv.workers.run`` with a handler of our own that tells each client its worker."""
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(f"""
        import logging, os, sys
        import tlsuv
        from tlsuv import workers

        class WhoAmI(tlsuv.Handler):
            def established(self, conn):
                conn.write(f"{{workers.worker_number()}} {{os.getpid()}}\\n".encode())
                conn.close()

        def setup(loop):
            bundle = tlsuv.load_bundle({str(certs.cert_file)!r}, {str(certs.key_file)!r})
            return tlsuv.Server(loop, tlsuv.server_context(bundle), lambda conn: WhoAmI())

        logging.basicConfig(level=logging.INFO)
        sys.exit(workers.run(setup, workers=3,
                             on_listening=lambda h, p: print("listening on", f"{{h}}:{{p}}", flush=True)))
    """))
    sup = Supervised([sys.executable, str(script)])
    try:
        pids = sup.worker_pids(3)
        seen: dict[int, int] = {}
        for _ in range(80):
            with tls_client(certs, sup.port) as s:
                number, pid = (int(x) for x in s.recv(100).split())
                s.unwrap()
            seen[number] = pid
            if len(seen) == 3:
                break
        assert seen == pids  # each worker number answered from its own process
        sup.signal(signal.SIGTERM)
        assert sup.wait() == 0
    finally:
        sup.stop()


def _one_line_error(args: list[str], fragment: str) -> None:
    proc = subprocess.run([*ECHO, *args], capture_output=True, text=True, timeout=20, check=False)
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(("args", "fragment"), [
    (["--workers", "0"], "must be 1-1024 or 'auto'"),
    (["--workers", "2000"], "must be 1-1024"),
    (["--workers", "many"], "not a whole number or 'auto'"),
    (["--stats-interval", "0"], "positive"),
    (["--stats-interval", "soon"], "not a number"),
    (["--proxy-protocol", "--proxy-from", "10.0.0.1/8"], "has host bits set"),
    (["--proxy-protocol", "--proxy-from", "10.0.0.0/8,"], "empty network"),
    (["--proxy-protocol", "--proxy-from", "haproxy.local"], "not a network"),
    (["--proxy-protocol", "--proxy-timeout", "-3"], "positive"),
    (["--proxy-from", "10.0.0.0/8"], "--proxy-from needs --proxy-protocol"),
    (["--proxy-timeout", "3"], "--proxy-timeout needs --proxy-protocol"),
])
def test_bad_scale_out_arguments(args: list[str], fragment: str) -> None:
    _one_line_error(args, fragment)


def test_workers_port_in_use_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        _one_line_error(["--workers", "2", "--port", str(s.getsockname()[1])], "Address already in use")


def test_workers_auto_uses_the_cpus_we_may_run_on() -> None:
    assert worker_count("auto") == available_cpus() == len(os.sched_getaffinity(0))
