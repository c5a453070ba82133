#!/usr/bin/env python3
"""Server CPU per unit of work under the bench's load, split into user and system time.

Why: the kernel's share of a small-message echo (one read(2), one write(2)
that delivers to the peer) is the same for every server; what tlsuv can
change is the user-space share.  ``make bench`` shows the total and the
user-space part for every server; this development tool measures one
scenario in seconds and prints the system part too, so a change to the hot
path is judged by the part it can move.  It reads the server's utime and
stime from /proc (``bench.loadgen.proc_cpu_times``) over the load
generator's window (after the warm-up).

    PYTHONPATH=scripts .venv/bin/python scripts/micro/split.py --scenario pp64 --repeat 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench import loadgen, run, servers, workers

SCENARIOS: dict[str, tuple[str, dict[str, Any], str]] = {
    # name: (job, job arguments, unit)
    "pp1": ("pingpong", {"conns": 1, "size": 64}, "message"),
    "pp64": ("pingpong", {"conns": 64, "size": 64}, "message"),
    "pp64big": ("pingpong", {"conns": 64, "size": 16384}, "message"),
    "stream": ("stream", {"conns": 8, "chunk": 65536}, "MB"),
    "handshake": ("handshake", {"concurrency": 8, "engine": "tls13"}, "handshake"),
}


def _window(pid: int, delay: float, seconds: float, out: dict[str, float]) -> None:
    # Started after the warm-up so the window roughly matches the load generator's.
    threading.Event().wait(delay)
    u0, s0 = loadgen.proc_cpu_times(pid)
    threading.Event().wait(seconds)
    u1, s1 = loadgen.proc_cpu_times(pid)
    out.update(user=u1 - u0, system=s1 - s0)


def measure(spec: servers.ServerSpec, scenario: str, *, cert: Path, key: Path, logs: Path,
            warmup: float, duration: float) -> dict[str, float]:
    job, kwargs, unit = SCENARIOS[scenario]
    with servers.RunningServer(spec, cert=cert, key=key, log=logs / f"{spec.name}.log", cpu=0) as srv:
        target = loadgen.Target(servers.HOST, srv.port, tls=spec.tls,
                                expect_cipher=loadgen.EXPECTED_CIPHER if spec.tls else None,
                                server_pid=srv.pid, server_core=0, pinned_cert=str(cert))
        counts: dict[str, float] = {}
        t = threading.Thread(target=_window, args=(srv.pid, warmup + 0.1, duration - 0.2, counts))
        t.start()
        res = workers.run_job(job, dict(kwargs, target=target, warmup=warmup, duration=duration),
                              cpu=1, timeout=warmup + duration + 120)
        t.join()
        srv.stop()
    units = res.count if unit != "MB" else res.nbytes / 1e6
    per = units / res.elapsed * (duration - 0.2)  # units inside the slightly shorter /proc window
    return {
        "rate": units / res.elapsed,
        "user_us": counts["user"] / per * 1e6,
        "system_us": counts["system"] / per * 1e6,
        "cpu_us": (res.server_cpu or 0.0) / units * 1e6,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default="tlsuv,uvloop")
    p.add_argument("--scenario", default="pp64", choices=sorted(SCENARIOS))
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    loadgen.raise_nofile_limit()
    specs = {s.name: s for s in servers.SERVERS}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cert, key = run.bench_files(d)  # the clients' cipher choice too, as in make bench
        for _ in range(args.repeat):
            for name in args.servers.split(","):
                r = measure(specs[name], args.scenario, cert=cert, key=key, logs=d,
                            warmup=args.warmup, duration=args.duration)
                unit = SCENARIOS[args.scenario][2]
                print(f"{name:8} {args.scenario}: {r['rate']:10,.0f} {unit}/s  "
                      f"user {r['user_us']:7.2f} us  system {r['system_us']:7.2f} us  "
                      f"cpu {r['cpu_us']:7.2f} us per {unit}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
