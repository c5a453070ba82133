"""Proof that a restart drops nothing: clients that keep connecting, and connections that stay.

Reusable for every restart-like event (an upgrade, a socket-activated
restart, a certificate reload): start a :class:`ServerProcess`, open
:class:`LongLived` connections, start a :class:`Hammer`, do the event, stop
the hammer and look at its :class:`HammerResult`.

* :class:`Hammer` -- several client threads, each in a tight loop of whole
  sessions: TCP connect, TLS handshake (Python's ssl, certificate verified),
  the echo server's greeting, an exact echo of random bytes, and a clean
  close (our close_notify answered by the server's).  Every session ends in
  exactly one outcome, counted: ``ok``, ``refused`` (nobody listening),
  ``reset`` (ECONNRESET/EPIPE at any stage), ``handshake_failed`` (TLS
  failed or the peer left during the handshake), ``broken`` (wrong or
  missing greeting or echo), ``unclean_close`` (no close_notify at the end),
  ``timeout``, ``check_failed`` (the caller's own per-session check).  The
  loops are bounded: they stop when told, or after ``max_seconds``.
* :class:`LongLived` -- connections opened before the event, which must
  keep being served through it and end with the server's close_notify
  (a clean ``b""`` from ``recv``, not an exception).
* :class:`ServerProcess` -- a server command in its own session, with its
  stdout and stderr lines collected for :meth:`ServerProcess.wait_for`, and
  the whole process group killed at the end (an upgrade leaves the new tree
  in the same group after the old parent exits).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

GREETING = b"OK\r\n"

OUTCOMES = ("ok", "refused", "reset", "handshake_failed", "broken", "unclean_close", "timeout",
            "check_failed")


def recv_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


class _Outcome(Exception):
    """How one session ended, when not with "ok"."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass
class HammerResult:
    counts: dict[str, int]
    # (monotonic end time, outcome) of every session, in order of ending.
    timeline: list[tuple[float, str]]
    # The first few failures, for the assertion message.
    failures: list[str]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def ok_between(self, start: float, end: float) -> int:
        return sum(1 for t, kind in self.timeline if kind == "ok" and start <= t <= end)

    def summary(self) -> str:
        return " ".join(f"{k}={self.counts.get(k, 0)}" for k in OUTCOMES)

    def assert_clean(self) -> None:
        """Every session succeeded: nothing refused, reset, failed or cut."""
        bad = {k: v for k, v in self.counts.items() if k != "ok" and v}
        assert not bad, f"{self.summary()}; first failures:\n" + "\n".join(self.failures)
        assert self.counts.get("ok", 0) > 0, "the hammer never completed a session"


class Hammer:
    """``clients`` threads opening full echo sessions to ``host:port`` until :meth:`stop`."""

    def __init__(
        self,
        host: str,
        port: int,
        ctx: ssl.SSLContext,
        *,
        clients: int = 4,
        server_hostname: str = "localhost",
        greeting: bytes = GREETING,
        max_payload: int = 4096,
        timeout: float = 30.0,
        max_seconds: float = 120.0,
        check: Callable[[ssl.SSLSocket], None] | None = None,
    ) -> None:
        self.address = (host, port)
        self.ctx = ctx
        self.server_hostname = server_hostname
        self.greeting = greeting
        self.max_payload = max_payload
        # Generous: during a restart a connection may wait in the kernel's
        # queue until the next process starts (a Python start on a busy host).
        self.timeout = timeout
        self.max_seconds = max_seconds
        self.check = check
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._counts: collections.Counter[str] = collections.Counter()
        self._timeline: list[tuple[float, str]] = []
        self._failures: list[str] = []
        self._threads = [threading.Thread(target=self._client, args=(i,), name=f"hammer-{i}", daemon=True)
                         for i in range(clients)]
        self._started = self._deadline = 0.0

    def __enter__(self) -> Hammer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._started = time.monotonic()
        self._deadline = self._started + self.max_seconds
        for t in self._threads:
            t.start()

    def stop(self) -> HammerResult:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 10)
            assert not t.is_alive(), f"{t.name} did not stop"
        with self._lock:
            return HammerResult(dict(self._counts), list(self._timeline), list(self._failures))

    def wait_ok(self, n: int, timeout: float = 60.0) -> None:
        """Wait until ``n`` more sessions have succeeded (the hammer is really running)."""
        with self._lock:
            target = self._counts["ok"] + n
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._counts["ok"] >= target:
                    return
                summary = dict(self._counts)
            assert time.monotonic() < deadline, f"the hammer stalled: {summary}"
            time.sleep(0.02)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def _client(self, index: int) -> None:
        rng = random.Random(index)
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            started = time.monotonic()
            try:
                self._session(rng)
                kind = "ok"
            except _Outcome as out:
                kind = out.kind
                with self._lock:
                    if len(self._failures) < 10:
                        self._failures.append(f"+{started - self._started:.3f}s client {index}: "
                                              f"{kind}: {out}")
            with self._lock:
                self._counts[kind] += 1
                self._timeline.append((time.monotonic(), kind))

    def _session(self, rng: random.Random) -> None:
        try:
            raw = socket.create_connection(self.address, timeout=self.timeout)
        except ConnectionRefusedError as exc:
            raise _Outcome("refused", repr(exc)) from exc
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise _Outcome("reset", f"connect: {exc!r}") from exc
        except TimeoutError as exc:
            raise _Outcome("timeout", f"connect: {exc!r}") from exc
        with contextlib.ExitStack() as stack:
            stack.callback(raw.close)
            try:
                # suppress_ragged_eofs=False: a TCP close without close_notify is an
                # error here, never a quiet end of the echo.
                s = self.ctx.wrap_socket(raw, server_hostname=self.server_hostname,
                                         suppress_ragged_eofs=False)
            except (ConnectionResetError, BrokenPipeError) as exc:
                raise _Outcome("reset", f"handshake: {exc!r}") from exc
            except TimeoutError as exc:
                raise _Outcome("timeout", f"handshake: {exc!r}") from exc
            except (ssl.SSLError, OSError) as exc:
                raise _Outcome("handshake_failed", repr(exc)) from exc
            stack.callback(s.close)
            self._exchange(s, rng)

    def _exchange(self, s: ssl.SSLSocket, rng: random.Random) -> None:
        stage = "greeting"
        try:
            if self.greeting:
                got = recv_exactly(s, len(self.greeting))
                if got != self.greeting:
                    raise _Outcome("broken", f"greeting {got!r}")
            if self.check is not None:
                stage = "check"
                try:
                    self.check(s)
                except AssertionError as exc:
                    raise _Outcome("check_failed", str(exc)) from exc
            stage = "echo"
            payload = rng.randbytes(rng.randint(1, self.max_payload))
            s.sendall(payload)
            echo = recv_exactly(s, len(payload))
            if echo != payload:
                raise _Outcome("broken", f"echo of {len(payload)} bytes differs")
            stage = "close"
            s.unwrap()  # our close_notify, then the server's
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise _Outcome("reset", f"{stage}: {exc!r}") from exc
        except TimeoutError as exc:
            raise _Outcome("timeout", f"{stage}: {exc!r}") from exc
        except (EOFError, ssl.SSLError, OSError) as exc:
            raise _Outcome("unclean_close" if stage == "close" else "broken", f"{stage}: {exc!r}") from exc


class LongLived:
    """``n`` connections opened now and held: served through an event, then closed by the server."""

    def __init__(self, host: str, port: int, ctx: ssl.SSLContext, n: int, *,
                 server_hostname: str = "localhost", greeting: bytes = GREETING,
                 timeout: float = 30.0) -> None:
        self.socks: list[ssl.SSLSocket] = []
        for _ in range(n):
            raw = socket.create_connection((host, port), timeout=timeout)
            s = ctx.wrap_socket(raw, server_hostname=server_hostname, suppress_ragged_eofs=False)
            self.socks.append(s)
            if greeting:
                assert recv_exactly(s, len(greeting)) == greeting

    def echo(self, tag: str) -> None:
        """Each connection still echoes (fails the test otherwise)."""
        for i, s in enumerate(self.socks):
            payload = f"{tag} {i}".encode()
            s.sendall(payload)
            assert recv_exactly(s, len(payload)) == payload, f"connection {i}: wrong echo"

    def expect_close_notify(self) -> None:
        """Each connection ends with the server's close_notify: ``recv`` gives b"", then unwrap works."""
        for i, s in enumerate(self.socks):
            try:
                data = s.recv(100)
            except (ssl.SSLError, OSError) as exc:
                raise AssertionError(f"connection {i} did not end cleanly: {exc!r}") from exc
            assert data == b"", f"connection {i}: {data!r} instead of close_notify"
            s.unwrap()
            s.close()

    def close(self) -> None:
        for s in self.socks:
            s.close()


class ServedBy:
    """A hammer check: counts sessions by the digest of the certificate they were served with."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.order: list[str] = []

    def __call__(self, s: ssl.SSLSocket) -> None:
        der = s.getpeercert(binary_form=True)
        assert der is not None, "no certificate"
        digest = hashlib.sha256(der).hexdigest()
        with self.lock:
            self.counts[digest] += 1
            self.order.append(digest)


class ServerProcess:
    """A server command in its own session; its output lines collected as they come."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None,
                 pass_fds: Sequence[int] = (), cwd: Path | None = None) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True, env=env, pass_fds=tuple(pass_fds), cwd=cwd)
        self.pgid = self.proc.pid
        self.err: list[str] = []
        self.out: list[str] = []
        self._cond = threading.Condition()
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [threading.Thread(target=self._read, args=(stream, dest), daemon=True)
                         for stream, dest in ((self.proc.stderr, self.err), (self.proc.stdout, self.out))]
        for t in self._readers:
            t.start()

    def _read(self, stream: IO[str], dest: list[str]) -> None:
        for line in iter(stream.readline, ""):
            with self._cond:
                dest.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, pattern: str, *, stream: str = "err", start: int = 0,
                 timeout: float = 30.0) -> re.Match[str]:
        """The first line (from index ``start``) of stderr/stdout matching ``pattern``."""
        lines = self.err if stream == "err" else self.out
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in lines[start:]:
                    m = regex.search(line)
                    if m:
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or not any(t.is_alive() for t in self._readers):
                    break
                self._cond.wait(min(left, 0.2))
        raise AssertionError(f"no {stream} line matching {pattern!r}; stderr:\n" + "\n".join(self.err[-60:])
                             + "\nstdout:\n" + "\n".join(self.out[-10:]))

    def port(self, start: int = 0) -> int:
        return int(self.wait_for(r"listening on .*:(\d+)$", stream="out", start=start).group(1))

    def mark(self) -> int:
        with self._cond:
            return len(self.err)

    def signal(self, signum: int, pid: int | None = None) -> None:
        os.kill(self.proc.pid if pid is None else pid, signum)

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def group_alive(self) -> list[int]:
        """Pids of the session's processes that still run (zombies do not count)."""
        alive = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                state, pgrp = fields[0], int(fields[2])
                if pgrp == self.pgid and state not in ("Z", "X"):
                    alive.append(int(entry.name))
        return alive

    def wait_group_gone(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.group_alive():
            assert time.monotonic() < deadline, f"still running: {self.group_alive()}"
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill whatever is left of the process group (never leave a server behind a test)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        for t in self._readers:  # the pipes end once every process of the group is gone
            t.join(10)

    def tracebacks(self) -> list[str]:
        return [line for line in self.err if "Traceback" in line]



# -- playing systemd -------------------------------------------------------------------

# What a service manager does between fork and exec, as a program: put the
# listening sockets at descriptors 3.., set LISTEN_FDS, LISTEN_PID (this very
# process's pid, which exec keeps) and LISTEN_FDNAMES, then exec the server.
# Arguments: N, the N descriptors as this process has them, the names
# (":"-joined, or "-" for none), then the command.
_EXEC_STEP = r"""
import fcntl, os, sys
n = int(sys.argv[1])
fds = [int(x) for x in sys.argv[2:2 + n]]
names, argv = sys.argv[2 + n], sys.argv[3 + n:]
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + n) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)
for fd in fds:
    if fd >= 3 + n:
        os.close(fd)
os.environ.update(LISTEN_FDS=str(n), LISTEN_PID=str(os.getpid()))
if names != "-":
    os.environ["LISTEN_FDNAMES"] = names
os.execvp(argv[0], argv)
"""


def activated(argv: Sequence[str], fds: Sequence[int], names: Sequence[str] | None = None) -> list[str]:
    """A command line that starts ``argv`` socket-activated with ``fds`` (pass them with pass_fds)."""
    return [sys.executable, "-c", _EXEC_STEP, str(len(fds)), *map(str, fds),
            ":".join(names) if names is not None else "-", *argv]


class NotifySocket:
    """systemd's end of sd_notify: a datagram socket that records each message and its sender's pid."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)

    def env(self) -> dict[str, str]:
        return {**os.environ, "NOTIFY_SOCKET": self.path}

    def receive(self, timeout: float = 30.0) -> tuple[int, str]:
        """The next message: (sender pid, text)."""
        self.sock.settimeout(timeout)
        data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
        pid = 0
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("3i", payload[:struct.calcsize("3i")])[0]
        return pid, data.decode()

    def close(self) -> None:
        self.sock.close()
