"""The servers under test, and starting and stopping them pinned to the server core.

Each measurement gets a fresh server process: its memory baseline, its CPU
counters and anything it leaked belong to that measurement alone.  A server
is ready when its log shows ``listening on``; its output goes to a log file
under the results directory, checked for tracebacks when it stops.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from .loadgen import BenchError

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"


@dataclass(frozen=True)
class ServerSpec:
    name: str  # short key, used in JSON and on the command line
    label: str  # table heading
    tls: bool
    needs: tuple[str, ...]  # modules the server imports: the bench extra's, for the peers
    env: tuple[tuple[str, str], ...] = ()  # set in the server's environment

    def argv(self, port: int, cert: Path, key: Path) -> list[str]:
        tls = ["--cert", str(cert), "--key", str(key)]
        common = ["--host", HOST, "--port", str(port)]
        if self.name in ("tlsuv", "tlsuv-pure"):
            return [sys.executable, "-m", "tlsuv.echo", *common, *tls, "--log-level", "warning"]
        if self.name == "twisted":
            return [sys.executable, str(HERE / "echo_twisted.py"), *common, *tls]
        script = [sys.executable, str(HERE / "echo_asyncio.py"), *common]
        if self.name == "asyncio":
            return [*script, *tls]
        if self.name == "uvloop":
            return [*script, *tls, "--loop", "uvloop"]
        if self.name == "plain":
            return [*script, "--plain"]
        if self.name == "floor":
            return [sys.executable, str(HERE / "echo_floor.py"), *common, *tls]
        if self.name == "pyuv":
            return [sys.executable, str(HERE / "echo_pyuv.py"), *common]
        raise ValueError(self.name)

    def available(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.needs)


SERVERS: tuple[ServerSpec, ...] = (
    ServerSpec("tlsuv", "tlsuv", True, ("pyuv", "OpenSSL")),
    # The same server on its pure-Python data path (tlsuv._speedups not used).
    ServerSpec("tlsuv-pure", "tlsuv, pure Python", True, ("pyuv", "OpenSSL"),
               (("TLSUV_NO_EXTENSIONS", "1"),)),
    ServerSpec("asyncio", "asyncio+ssl", True, ()),
    ServerSpec("uvloop", "uvloop+ssl", True, ("uvloop",)),
    ServerSpec("twisted", "Twisted TLS", True, ("twisted", "service_identity")),
    ServerSpec("plain", "plain TCP", False, ()),
    # Not measured by default: the floors under tlsuv.  pyuv and Python with no
    # TLS; and tlsuv's parts with none of tlsuv (echo_floor.py's docstring).
    ServerSpec("pyuv", "pyuv plain TCP", False, ("pyuv",)),
    ServerSpec("floor", "pyuv+OpenSSL floor", True, ("pyuv", "OpenSSL")),
)
DEFAULT_SERVERS: tuple[str, ...] = ("tlsuv", "tlsuv-pure", "asyncio", "uvloop", "twisted", "plain")
BASELINE = "uvloop"  # every figure is also shown as a ratio to this server's

# asyncio's and uvloop's TLS transports hand a plain Protocol each read as
# SSLObject.read(256 KiB): a 256 KiB allocation, shrunk and freed.  With
# glibc's default (adaptive) thresholds that memory goes back to the kernel
# and is faulted in again, read after read: uvloop then spends ~40 µs per
# 64 B message instead of ~13.  Fixed thresholds, the same for every server,
# measure the servers rather than that interaction (--default-malloc keeps
# glibc's defaults).
STEADY_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(64 << 20), "MALLOC_MMAP_THRESHOLD_": str(64 << 20)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


class RunningServer:
    """A server process for one measurement: ``with RunningServer(...) as srv: ... srv.pid``."""

    def __init__(self, spec: ServerSpec, *, cert: Path, key: Path, log: Path, cpu: int | None,
                 steady_malloc: bool = True, ready_timeout: float = 30.0) -> None:
        self.spec = spec
        self.port = free_port()
        self.log = log
        env = dict(os.environ)
        # The clients' OpenSSL configuration is not the servers' business.
        env.pop("OPENSSL_CONF", None)
        if steady_malloc:
            env.update(STEADY_MALLOC)
        env.update(spec.env)
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                spec.argv(self.port, cert, key), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=env)
        self.pid = self.proc.pid
        # Pinned before the interpreter has started any thread (later ones
        # inherit it); the open-files limit is inherited from our own, which
        # run.py raised to the hard limit.
        if cpu is not None:
            os.sched_setaffinity(self.pid, {cpu})
        try:
            self._wait_listening(ready_timeout)
        except BaseException:
            self._kill()
            raise

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "listening on" in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise BenchError(f"{self.spec.label} exited with {self.proc.returncode} before "
                                 f"listening:\n{self.tail()}")
            time.sleep(0.02)
        raise BenchError(f"{self.spec.label} did not listen within {timeout:.0f} s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> list[str]:
        """SIGTERM, then SIGKILL after ``timeout``; return problems seen in the log."""
        problems: list[str] = []
        if self.proc.poll() is not None:
            problems.append(f"exited by itself with code {self.proc.returncode}")
        else:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                problems.append(f"did not stop within {timeout:.0f} s of SIGTERM; killed")
                self._kill()
        text = self.log.read_text(errors="replace")
        n = len(re.findall(r"^Traceback", text, re.MULTILINE))
        if n:
            problems.append(f"{n} traceback(s) in {self.log}")
        return problems

    def _kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.proc.poll() is None:
            self._kill()
