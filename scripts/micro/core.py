#!/usr/bin/env python3
"""Per-message cost of the I/O-free TLS core, with no sockets and no event loop.

Why: socket benchmarks on a shared two-core machine are noisy, and most of
tlsuv's own time per message is spent between libuv and OpenSSL in Python.
This drives ``TLSEngine`` against an in-memory pyOpenSSL peer exactly as the
echo server does (receive a record, write the echo back, drain the output)
and reports microseconds per message of the engine's side only, measured
with the process CPU clock.  Use it before and after changing the hot path.

    .venv/bin/python scripts/micro/core.py --messages 200000 --size 64
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

from OpenSSL import SSL

import tlsuv
from tlsuv.tls import TLSEngine


def pair() -> tuple[TLSEngine, SSL.Connection]:
    bundle = tlsuv.self_signed()
    engine = TLSEngine(tlsuv.server_context(bundle))
    cctx = SSL.Context(SSL.TLS_METHOD)
    peer = SSL.Connection(cctx, None)
    peer.set_connect_state()
    for _ in range(10):
        with contextlib.suppress(SSL.WantReadError):
            peer.do_handshake()
        out = _drain(peer)
        if out:
            engine.receive(out)
        back = engine.data_to_send()
        if back:
            peer.bio_write(back)
    assert engine.handshake_completed
    return engine, peer


def _drain(c: SSL.Connection) -> bytes:
    out = b""
    with contextlib.suppress(SSL.WantReadError):
        while True:
            out += c.bio_read(65536)
    return out


def run(messages: int, size: int) -> float:
    engine, peer = pair()
    msg = b"m" * size
    # Pre-encrypt the client's records so only the engine's work is timed.
    records = []
    for _ in range(messages):
        peer.send(msg)
        records.append(_drain(peer))
    cpu = time.process_time
    start = cpu()
    for rec in records:
        for plain in engine.receive(rec):
            engine.write(plain)
        engine.data_to_send()
    elapsed = cpu() - start
    return elapsed / messages * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    runs = [run(args.messages, args.size) for _ in range(args.repeat)]
    print(f"TLSEngine echo, {args.size} B messages: {statistics.median(runs):.2f} us/message CPU "
          f"(median of {args.repeat}; runs {', '.join(f'{r:.2f}' for r in runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
