"""The far end of tests/test_dead_peers.py, run inside the test's own network namespace.

    ip netns exec NS python tests/netns_client.py --ca CA.pem HOST PORT MODE [SIZE]

Modes (each prints one line when it is ready for the test's next step):

* ``idle``: handshake, read the greeting, print ``ready``, then stay silent.
* ``trickle``: as idle, then read slowly for ever (a slow download that the
  test cuts off by taking the link down).
* ``echo SIZE``: send SIZE random bytes while reading the echo; print
  ``ok SIZE`` and exit 0 if every byte came back in order, else exit 1.
* ``serve``: the other way round, for tlsuv's client: listen on HOST (port
  0), print ``port N``, accept one TLS connection (``--cert``/``--key``),
  greet it, then stay silent.

The process never exits by itself in the silent modes: the test kills it
(a peer whose link went down cannot say goodbye anyway).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import socket
import ssl
import sys
import time

from clients import echo_session
from helpers import GREETING

# A slow reader: this much every TRICKLE_PAUSE seconds (~800 KB/s at most),
# so the server always has data queued while the link is up.
TRICKLE_READ = 16384
TRICKLE_PAUSE = 0.02


def say(line: str) -> None:
    print(line, flush=True)


def stay_silent() -> None:
    # Block until the test kills us (or closes our stdin).
    sys.stdin.buffer.read()


def client(args: argparse.Namespace) -> int:
    ctx = ssl.create_default_context(cafile=args.ca)
    raw = socket.create_connection((args.host, args.port), timeout=30)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    got = b""
    while len(got) < len(GREETING):
        got += s.recv(len(GREETING) - len(got))
    assert got == GREETING, got
    say("ready")
    if args.mode == "trickle":
        s.settimeout(None)
        while s.recv(TRICKLE_READ):
            time.sleep(TRICKLE_PAUSE)
    stay_silent()
    return 0


def echo(args: argparse.Namespace) -> int:
    payload = os.urandom(args.size)
    ctx = ssl.create_default_context(cafile=args.ca)
    started = time.monotonic()
    echoed = asyncio.run(echo_session(args.host, args.port, ctx, payload))
    seconds = time.monotonic() - started
    if hashlib.sha256(echoed).digest() != hashlib.sha256(payload).digest():
        say(f"mismatch: {len(echoed)} bytes back of {len(payload)}")
        return 1
    say(f"ok {len(payload)} in {seconds:.1f} s")
    return 0


def serve(args: argparse.Namespace) -> int:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(args.cert, args.key)
    with socket.create_server((args.host, 0)) as listener:
        say(f"port {listener.getsockname()[1]}")
        conn, _ = listener.accept()
        tls = ctx.wrap_socket(conn, server_side=True)
        tls.sendall(GREETING)
        stay_silent()
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("mode", choices=("idle", "trickle", "echo", "serve"))
    p.add_argument("size", type=int, nargs="?", default=0)
    args = p.parse_args()
    if args.mode == "echo":
        return echo(args)
    if args.mode == "serve":
        return serve(args)
    return client(args)


if __name__ == "__main__":
    sys.exit(main())
