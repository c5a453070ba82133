#!/usr/bin/env python3
"""Soak: thousands of bad-peer cycles against one server; connections, handles, timers and memory.

Why: a leak of one handle or one timer per failed handshake is invisible in a
unit test and fatal after a week in production.  This runs ``--cycles``
(default 10,000) connections that misbehave in turn -- plain HTTP, garbage,
a truncated ClientHello, a reset mid-handshake, a reset mid-record, an EOF
without close_notify, and a well-behaved echo -- against a server in a child
process, and asks the child for its counts every ``--every`` cycles:
open connections, open libuv handles by type, and resident memory.  At the
end the counts must be back to the idle baseline and memory flat (growth
under ``--max-growth-mib`` after the first sample, which absorbs warm-up).

    .venv/bin/python scripts/lifecycle/soak.py --cycles 10000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyuv
from OpenSSL import SSL

import tlsuv
from tlsuv.echo import echo_factory


def serve() -> int:
    """The child: a tlsuv echo server that reports its counts on SIGUSR1."""
    loop = pyuv.Loop()
    ctx = tlsuv.server_context(tlsuv.self_signed())
    options = tlsuv.ConnectionOptions(handshake_timeout=1.0, close_timeout=1.0)
    server = tlsuv.Server(loop, ctx, echo_factory, options=options)
    _, port = server.listen("127.0.0.1", 0)
    print(json.dumps({"port": port}), flush=True)

    def report(handle: pyuv.Signal, signum: int) -> None:
        handles: dict[str, int] = {}
        for h in loop.handles:
            if not h.closed:
                handles[type(h).__name__] = handles.get(type(h).__name__, 0) + 1
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        print(json.dumps({"connections": len(server.connections), "handles": handles, "rss": rss,
                          "accepted": server.accepted}), flush=True)

    def close_signals() -> None:
        for h in signals:
            h.close()

    def stop(handle: pyuv.Signal, signum: int) -> None:
        server.close(1.0, close_signals)

    signals = [pyuv.Signal(loop), pyuv.Signal(loop)]
    signals[0].start(report, signal.SIGUSR1)
    signals[1].start(stop, signal.SIGTERM)
    loop.run()
    return 0


# -- the misbehaving clients ----------------------------------------------------


def _client_ctx() -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_verify(SSL.VERIFY_NONE, lambda *a: True)
    return ctx


CLIENT_CTX = _client_ctx()


def _hello() -> bytes:
    c = SSL.Connection(CLIENT_CTX, None)
    c.set_connect_state()
    with contextlib.suppress(SSL.WantReadError):
        c.do_handshake()
    return c.bio_read(65536)


HELLO = _hello()


def _rst(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _drain(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while s.recv(65536):
            pass


def plain_http(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with contextlib.suppress(OSError):
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        _drain(s)


def garbage(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with contextlib.suppress(OSError):
            s.sendall(os.urandom(random.choice((1, 50, 3000))))
            s.shutdown(socket.SHUT_WR)
        _drain(s)


def truncated_hello(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        with contextlib.suppress(OSError):
            s.sendall(HELLO[: len(HELLO) // 3])
            s.shutdown(socket.SHUT_WR)
        _drain(s)


def reset_mid_handshake(port: int) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(HELLO)
    _rst(s)


def _established(port: int) -> ssl.SSLSocket:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10))
    assert s.recv(4) == b"OK\r\n"
    return s


def eof_without_close_notify(port: int) -> None:
    s = _established(port)
    s.sendall(b"bye")
    s.recv(3)
    _plain_close(s)


def _plain_close(s: ssl.SSLSocket) -> None:
    # Close the TCP socket under TLS without unwrap(): no close_notify.
    sock = socket.socket(fileno=s.detach())
    sock.close()


def reset_mid_record(port: int) -> None:
    s = _established(port)
    sock = socket.socket(fileno=s.detach())
    sock.sendall(b"\x17\x03\x03\x40\x00" + os.urandom(100))  # a record header promising 16 KiB
    _rst(sock)


def good_echo(port: int) -> None:
    s = _established(port)
    data = os.urandom(random.randint(1, 20000))
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        assert chunk, "EOF before the echo completed"
        got += chunk
    assert got == data, "echo mismatch"
    with contextlib.suppress(OSError, ssl.SSLError):
        s.unwrap()
    s.close()


CASES: list[Callable[[int], None]] = [
    plain_http, garbage, truncated_hello, reset_mid_handshake, eof_without_close_notify,
    reset_mid_record, good_echo,
]


# -- the parent -------------------------------------------------------------------


Stats = dict[str, Any]  # one JSON report of the child's


def ask(proc: subprocess.Popen[str]) -> Stats:
    assert proc.stdout is not None
    proc.send_signal(signal.SIGUSR1)
    return dict(json.loads(proc.stdout.readline()))


def settle(proc: subprocess.Popen[str], timeout: float = 10.0) -> Stats:
    """Wait for the server to finish closing what the clients left behind."""
    deadline = time.monotonic() + timeout
    while True:
        stats = ask(proc)
        if stats["connections"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cycles", type=int, default=10_000)
    p.add_argument("--every", type=int, default=1000, help="sample the server every N cycles")
    p.add_argument("--max-growth-mib", type=float, default=8.0)
    p.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        return serve()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(json.loads(proc.stdout.readline())["port"])
    rnd = random.Random(1)
    samples: list[Stats] = []
    failures = 0
    try:
        baseline = settle(proc)
        start = time.monotonic()
        for i in range(1, args.cycles + 1):
            try:
                rnd.choice(CASES)(port)
            except (OSError, ssl.SSLError):
                failures += 1  # the client side may see resets; the server is what is judged
            if i % args.every == 0:
                stats = settle(proc)
                samples.append(stats)
                print(f"{i:>6} cycles  {time.monotonic() - start:6.1f} s  connections={stats['connections']}"
                      f"  handles={stats['handles']}  rss={int(stats['rss']) / 2**20:.1f} MiB", flush=True)
        good_echo(port)  # still serving
        final = settle(proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    growth = (int(final["rss"]) - int(samples[0]["rss"])) / 2**20 if samples else 0.0
    ok = final["connections"] == 0 and final["handles"] == baseline["handles"] and code == 0
    ok = ok and growth < args.max_growth_mib
    print(f"baseline handles {baseline['handles']}, final {final['handles']}; "
          f"connections {final['connections']}; memory growth after warm-up {growth:.1f} MiB; "
          f"client-side errors {failures}; server exit {code}")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
