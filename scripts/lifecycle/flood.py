#!/usr/bin/env python3
"""Push bytes at the echo server without ever reading the echo; report its memory growth.

Why: an echo server that keeps reading from a peer which does not read its
echoes must buffer everything somewhere.  tlsuv's flow control pauses the
handler at the high-water mark, the echo handler stops reading, TCP's window
closes, and the sender blocks: the server's memory stays flat however much
the client *tries* to send.  This script tries to send ``--total`` bytes
(default 1 GiB) within ``--seconds`` and prints how much the server took and
how much its resident memory grew.  Loopback only; it stops by itself.

    .venv/bin/python scripts/lifecycle/flood.py --total 1G --seconds 60
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lifecycle.common import EchoProcess, start_echo

CHUNK = 256 * 1024  # big writes: the client, not Python overhead, should be the pressure


@dataclass
class FloodResult:
    attempted_seconds: float
    sent: int
    rss_before: int
    rss_peak: int

    @property
    def growth(self) -> int:
        return self.rss_peak - self.rss_before


def flood(server: EchoProcess, total: int, seconds: float) -> FloodResult:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the throw-away certificate; we test memory, not trust
    raw = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    try:
        assert s.recv(4) == b"OK\r\n"
        time.sleep(0.2)
        before = server.rss_bytes()
        peak = before
        s.setblocking(False)
        chunk = os.urandom(CHUNK)
        sent = 0
        start = time.monotonic()
        last_sample = start
        while sent < total and time.monotonic() - start < seconds:
            try:
                sent += s.send(chunk[: min(CHUNK, total - sent)])
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                time.sleep(0.005)
            now = time.monotonic()
            if now - last_sample > 0.1:
                peak = max(peak, server.rss_bytes())
                last_sample = now
        peak = max(peak, server.rss_bytes())
        return FloodResult(time.monotonic() - start, sent, before, peak)
    finally:
        raw.close()


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--total", type=parse_size, default=1 << 30, help="bytes to try to send (default 1G)")
    p.add_argument("--seconds", type=float, default=60.0, help="give up trying after this long")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_echo(Path(tmp))
        try:
            r = flood(server, args.total, args.seconds)
        finally:
            server.stop()
    mib = 1 << 20
    print(f"tried {args.total / mib:.0f} MiB for {r.attempted_seconds:.1f} s; server accepted "
          f"{r.sent / mib:.1f} MiB (then stopped reading)")
    print(f"server RSS {r.rss_before / mib:.1f} MiB before, peak {r.rss_peak / mib:.1f} MiB: "
          f"growth {r.growth / mib:.1f} MiB (bound: 64 MiB)")
    return 0 if r.growth < 64 * mib else 1


if __name__ == "__main__":
    sys.exit(main())
