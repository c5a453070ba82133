"""Load generator processes: one measurement per fresh process, pinned to the client core.

A fresh process per job keeps one measurement's garbage, sockets and CPU
accounting out of the next.  ``spawn`` (not ``fork``) so the child's OpenSSL
reads OPENSSL_CONF at start-up: that file is how the clients offer only
TLS_AES_128_GCM_SHA256.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import ssl
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from . import loadgen, tls13
from .loadgen import BenchError, Target

_SPAWN = multiprocessing.get_context("spawn")


def _prepare(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    loadgen.raise_nofile_limit()


def _job_main(job: str, kwargs: dict[str, Any], cpu: int | None, conn: Connection) -> None:
    try:
        _prepare(cpu)
        if job == "pingpong":
            result = loadgen.run_pingpong(**kwargs)
        elif job == "stream":
            result = loadgen.run_stream(**kwargs)
        elif job == "handshake":
            result = loadgen.run_handshakes(**kwargs)
        else:
            raise ValueError(f"unknown job {job!r}")
        conn.send(("ok", result))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


def run_job(job: str, kwargs: dict[str, Any], *, cpu: int | None, timeout: float) -> loadgen.Result:
    """Run one load generator job in a fresh process and return its result."""
    parent, child = _SPAWN.Pipe(duplex=False)
    proc = _SPAWN.Process(target=_job_main, args=(job, kwargs, cpu, child), name=f"loadgen-{job}")
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            raise BenchError(f"load generator job {job} did not finish in {timeout:.0f} s")
        try:
            status, payload = parent.recv()
        except EOFError:
            raise BenchError(f"load generator job {job} died (exit code {proc.exitcode})") from None
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        parent.close()
    if status != "ok":
        raise BenchError(str(payload))
    assert isinstance(payload, loadgen.Result)
    return payload


# -- idle connections ---------------------------------------------------------


@dataclass
class IdleInfo:
    count: int
    setup_seconds: float
    tls_version: str | None
    cipher: str | None


def _idle_main(target: Target, count: int, concurrency: int, max_hold: float, *, engine: str,
               cpu: int | None, conn: Connection) -> None:
    socks: list[socket.socket] = []
    try:
        _prepare(cpu)
        t0 = time.monotonic()
        socks = loadgen.open_connections(target, count, concurrency=concurrency, timeout=max_hold,
                                         engine=engine)
        version: str | None
        cipher: str | None
        if engine == "tls13" and target.tls:
            version, cipher = "TLSv1.3", tls13.CIPHER_NAME
        else:
            version, cipher, _ = loadgen.describe(socks)
        conn.send(("ready", IdleInfo(len(socks), time.monotonic() - t0, version, cipher)))
        conn.poll(max_hold)  # the parent says when; never longer than max_hold
        alive = sum(_still_open(s) for s in socks)
        conn.send(("closed", alive))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        for s in socks:
            s.close()
        conn.close()


def _still_open(sock: socket.socket) -> bool:
    """True if the server neither closed this connection nor sent anything on it."""
    sock.setblocking(False)
    try:
        sock.recv(1)
    except (ssl.SSLWantReadError, BlockingIOError):
        return True
    except OSError:
        return False
    return False  # EOF, or bytes nobody sent: neither is a healthy idle echo connection


class IdleHolder:
    """A process holding ``count`` established, silent connections until :meth:`stop`."""

    def __init__(self, target: Target, count: int, *, concurrency: int, max_hold: float,
                 cpu: int | None, engine: str = "ssl") -> None:
        self.count = count
        self._parent, child = _SPAWN.Pipe(duplex=True)
        self._proc = _SPAWN.Process(target=_idle_main, name="loadgen-idle",
                                    args=(target, count, concurrency, max_hold),
                                    kwargs={"engine": engine, "cpu": cpu, "conn": child})
        self._proc.start()
        child.close()

    def wait_ready(self, timeout: float) -> IdleInfo:
        status, payload = self._recv(timeout, "open its idle connections")
        if status != "ready":
            raise BenchError(str(payload))
        assert isinstance(payload, IdleInfo)
        return payload

    def stop(self, timeout: float = 60.0) -> int:
        """Close the connections; return how many were still open (as they should all be)."""
        try:
            self._parent.send("stop")
            status, payload = self._recv(timeout, "close its idle connections")
            if status != "closed":
                raise BenchError(str(payload))
            return int(payload)
        finally:
            self.kill()

    def kill(self) -> None:
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._parent.close()

    def _recv(self, timeout: float, what: str) -> tuple[str, Any]:
        if not self._parent.poll(timeout):
            raise BenchError(f"idle connection holder did not {what} in {timeout:.0f} s")
        try:
            msg = self._parent.recv()
        except EOFError:
            raise BenchError(f"idle connection holder died (exit code {self._proc.exitcode})") from None
        assert isinstance(msg, tuple)
        return msg
