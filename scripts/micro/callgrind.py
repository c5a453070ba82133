#!/usr/bin/env python3
"""Instructions the echo server executes per message, counted exactly by callgrind.

Why: timings on a shared two-core machine move by 10-20 % from run to run,
and the virtual machine exposes no hardware counters to ``perf``.  Valgrind's
callgrind counts every user-space instruction the server executes, the same
number on every run, so two versions of the hot path compare to the percent
and the dump says which C functions (OpenSSL, libuv, pyuv, the interpreter)
they went to.  Kernel work (the system calls themselves) is not counted: it
is the same for every server here.  A development tool, not part of
``make bench``.

Method: the server runs under callgrind; a ping-pong client does ``--small``
messages, the counters are dumped, then ``--large`` more on fresh connections
and another dump.  Both phases have the same set-up (connections,
handshakes, closes), so ``(large phase - small phase) / (large - small)`` is
the cost of one message alone.

    PYTHONPATH=scripts .venv/bin/python scripts/micro/callgrind.py --server tlsuv --conns 64
    PYTHONPATH=scripts .venv/bin/python scripts/micro/callgrind.py --server tlsuv --handshake \
        --conns 8 --small 200 --large 1200
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import loadgen, run, servers, workers


def _dump(pid: int, out: Path, before: set[Path]) -> Path:
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    for _ in range(600):
        new = set(out.parent.glob(out.name + "*")) - before
        if new:
            time.sleep(0.5)  # let valgrind finish writing it
            return max(new, key=lambda p: p.stat().st_mtime)
        time.sleep(0.1)
    raise RuntimeError("callgrind wrote no dump")


def _total(dump: Path) -> int:
    m = re.search(r"^(?:summary|totals): (\d+)", dump.read_text(errors="replace"), re.M)
    if m is None:
        raise RuntimeError(f"no totals in {dump}")
    return int(m.group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", default="tlsuv", choices=[s.name for s in servers.SERVERS])
    p.add_argument("--conns", type=int, default=64)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--stream", action="store_true",
                   help="the streaming load (--conns connections writing --size bytes at a time); "
                        "--small and --large count MB instead of messages")
    p.add_argument("--handshake", action="store_true",
                   help="full TLS 1.3 handshakes (the bench's lean client, --conns at once) instead of "
                        "messages; --small and --large count handshakes")
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--large", type=int, default=12000)
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for the server (repeatable), e.g. --server-arg=--metrics "
                        "--server-arg=127.0.0.1:0 to count the server with its metrics on")
    p.add_argument("--keep", type=Path,
                   help="copy both dumps to KEEP.small and KEEP.large (for callgrind_annotate)")
    args = p.parse_args()
    spec = {s.name: s for s in servers.SERVERS}[args.server]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cert, key = run.bench_files(d)
        port = servers.free_port()
        out = d / "callgrind.out"
        env = {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"} | servers.STEADY_MALLOC
        env |= dict(spec.env)
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
                *spec.argv(port, cert, key), *args.server_arg]
        log = open(d / "server.log", "wb")  # noqa: SIM115 - closed below, after the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while b"listening on" not in (d / "server.log").read_bytes():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((d / "server.log").read_text(errors="replace")[-2000:])
                time.sleep(0.2)
            target = loadgen.Target(servers.HOST, port, tls=spec.tls,
                                    expect_cipher=loadgen.EXPECTED_CIPHER if spec.tls else None)
            subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
            totals = []
            for count in (args.small, args.large):
                before = set(d.glob("callgrind.out*"))
                # A spawned process: its OpenSSL reads OPENSSL_CONF when it starts.
                if args.handshake:
                    res = workers.run_job("handshake", {
                        "target": target, "concurrency": args.conns, "warmup": 0, "duration": 3600,
                        "max_handshakes": count, "engine": "tls13"}, cpu=None, timeout=3600)
                elif args.stream:
                    res = workers.run_job("stream", {
                        "target": target, "conns": args.conns, "chunk": args.size, "warmup": 0,
                        "duration": 3600, "max_bytes": count * 10**6}, cpu=None, timeout=3600)
                    res.count = res.nbytes // 10**6
                else:
                    res = workers.run_job("pingpong", {
                        "target": target, "conns": args.conns, "size": args.size, "warmup": 0,
                        "duration": 3600, "max_messages": count}, cpu=None, timeout=3600)
                time.sleep(1.0)  # the server finishes closing those connections
                dump = _dump(proc.pid, out, before)
                totals.append((res.count, _total(dump)))
                if args.keep is not None:
                    phase = "small" if count == args.small else "large"
                    Path(f"{args.keep}.{phase}").write_bytes(dump.read_bytes())
        finally:
            proc.terminate()
            proc.wait(60)
            log.close()
    (n1, i1), (n2, i2) = totals
    per = (i2 - i1) / (n2 - n1)
    unit = "handshake" if args.handshake else "MB" if args.stream else "message"
    print(f"{args.server}: {per:,.0f} instructions per {unit} ({args.conns} conns, {args.size} B"
          f"{' writes' if args.stream else ''}; {n1} and {n2} {unit}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
