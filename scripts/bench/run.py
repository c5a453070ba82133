"""``make bench``: tlsuv against the servers a user would pick instead, side by side.

What is compared
    Five servers speak the same echo contract -- ``OK\\r\\n`` on connect, then
    every byte straight back -- on one core:

    * tlsuv (``python -m tlsuv.echo``): pyuv + pyOpenSSL memory BIOs;
    * asyncio with the standard ``ssl`` module (``echo_asyncio.py``);
    * uvloop with ``ssl`` (the same script on uvloop), the baseline every
      figure is also given as a ratio to: the fastest Python TLS peer;
    * Twisted's TLS layer (``echo_twisted.py``): pyOpenSSL memory BIOs like
      tlsuv, so the same OpenSSL and the same design, other Python around it;
    * plain TCP on asyncio, no TLS (``echo_asyncio.py --plain``, a
      ``BufferedProtocol`` so it does not allocate per read): not a
      competitor but the load generator's ceiling (below).

    Every server runs with the same fixed glibc malloc thresholds
    (``servers.STEADY_MALLOC``): with the adaptive defaults, asyncio's and
    uvloop's 256 KiB allocation per TLS read is returned to the kernel and
    faulted back in on every read, which triples uvloop's cost per small
    message.  ``--default-malloc`` measures the defaults instead.

    All TLS servers use one ECDSA P-256 certificate, made for the run with
    ``tlsuv.certs.self_signed()``, and negotiate TLS 1.3 with
    TLS_AES_128_GCM_SHA256 (X25519 key exchange: the client's first key
    share).  Python's ``ssl`` cannot choose TLS 1.3 cipher suites, so the
    clients run with an OPENSSL_CONF whose ``Ciphersuites`` offers only that
    one; the asyncio servers also drop OP_CIPHER_SERVER_PREFERENCE, which would
    otherwise pick AES-256.  Every connection checks the cipher it got, and the
    report prints it per server.

Where things run
    The machine has two cores.  Each server runs pinned to CPU 0
    (``sched_setaffinity`` as soon as it is spawned), the load generator and
    this orchestrator to CPU 1.  Each measurement starts a fresh server process
    and a fresh load generator process, so no measurement inherits another's
    heap, sockets or CPU counters.  RLIMIT_NOFILE is raised to the hard limit
    in both.

The load generator (``loadgen.py``)
    One process per measurement, one epoll loop over non-blocking sockets
    (``ssl.SSLSocket`` for TLS): on one core, more client processes would only
    add context switches.  It verifies every byte: each ping-pong echo must
    equal the message sent (rotating random payloads, so a stale or misrouted
    echo fails), each streamed byte must equal a random pattern at its stream
    offset, each connection must start with ``OK\\r\\n``, negotiate the
    expected cipher and not resume a session.  Any mismatch aborts the
    measurement, which is then reported as an error, never as a number.

    Handshakes (and setting up the idle connections) use ``tls13.py``
    instead of ``ssl``: OpenSSL 3.0's client side of a handshake costs more
    CPU than the fastest server's side, so an ``ssl`` client on one core
    would measure itself.  That client reuses its X25519 key and compares
    the certificate byte for byte instead of parsing and verifying it; the
    server's work is unchanged, and every record it sends is still
    authenticated.

    It must not be what limits the servers.  Two checks say whether it was:
    plain TCP, driven by the same generator, must beat every TLS server on
    every throughput figure (printed after the table), and each measurement
    shows server and load-generator CPU % -- a server near 100 % was the limit,
    and a load generator at 90 % or more is listed after the table.

Noise
    This machine is shared.  Over each window the load generator also reads
    ``/proc/stat`` for the two cores, and reports the CPU other processes
    took on them.  A measurement where that exceeds ``--max-others`` (15 %)
    on either core is made again (``--retries``, at most twice by default),
    after waiting up to ``--quiet-wait`` (20 s) for both cores to go quiet;
    the least disturbed attempt counts.

What is measured
    After a warm-up (``--warmup``), for ``--duration`` seconds:

    * throughput: messages/s (ping-pong), MB/s echoed (1 MB = 10^6 bytes of
      payload each way; streaming), full handshakes/s;
    * latency: p50 and p99 of every ping-pong round trip in the window;
    * server CPU time per unit of work: user + system time from
      ``/proc/PID/stat`` read at both ends of the window, divided by the
      messages, MB or handshakes done.  This stays steady on a noisy machine
      where throughput does not, and it is what an operator pays for;
    * of which user space: the utime part of the same figure.  The kernel
      splits the exact total by where its timer ticks found the process.
      The system part (read, write, wake-ups) is nearly the same for every
      server, so this row is where one server's own code differs from
      another's;
    * memory per idle connection: the server's RSS (``/proc/PID/status``)
      after the idle connections are established minus before, divided by
      their number.

Scenarios
    1 connection ping-pong 64 B; 64 connections ping-pong 64 B; 64 connections
    ping-pong 16 KiB; 8 connections streaming 64 KiB writes (at most 512 KiB
    in flight each); handshakes with 8 concurrent clients (connect, full
    handshake, greeting, RST -- so no client port waits in TIME_WAIT); and
    10,000 idle connections (each has completed its handshake and read its
    greeting, held by a second client process) while 16 connections
    ping-pong, measured against the same 16 connections without them just
    before.

Repetition
    Scenario by scenario, each server is measured ``--repeat`` times (at
    least 3 for a real run); the servers are interleaved, in an order that
    rotates with each repetition, so slow drift of the machine is shared.
    Figures are medians of the repetitions; raw runs are in the JSON.

Output
    A table (every figure with its ratio to uvloop; ↑ more is better, ↓
    less), the plain-TCP ceiling check, the CPU figures repetition by
    repetition as ratios to uvloop's in the same repetition (how much one
    run's ratio can be trusted), raw JSON, the table as Markdown and a PNG
    chart, all under ``bench-results/`` (git-ignored).

Usage
    make bench                                  # the full run, 12-15 minutes
    make bench BENCH_ARGS=--quick               # a smoke run, about a minute
    PYTHONPATH=scripts .venv/bin/python -m bench --help
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from OpenSSL import SSL

from tlsuv import data_path
from tlsuv.certs import self_signed

from . import loadgen, report, servers, workers
from .loadgen import BenchError, Target
from .servers import BASELINE, DEFAULT_SERVERS, SERVERS, RunningServer, ServerSpec

ROOT = Path(__file__).resolve().parents[2]
SERVER_CPU = 0
CLIENT_CPU = 1

# Offer one TLS 1.3 suite; the rest of OpenSSL's defaults stay as they are.
OPENSSL_CONF = """\
openssl_conf = bench_conf
[bench_conf]
ssl_conf = bench_ssl
[bench_ssl]
system_default = bench_tls
[bench_tls]
MinProtocol = TLSv1.3
Ciphersuites = TLS_AES_128_GCM_SHA256
"""


def bench_files(directory: Path) -> tuple[Path, Path]:
    """Write the run's certificate and key, and point the clients at the cipher configuration.

    One fresh ECDSA P-256 certificate per run, shared by every server.
    OPENSSL_CONF is read by the load generator processes' OpenSSL when they
    start (spawn); RunningServer removes it from the servers' environment.
    Returns ``(certificate file, key file)``.
    """
    bundle = self_signed()
    cert, key, conf = directory / "cert.pem", directory / "key.pem", directory / "openssl-client.cnf"
    cert.write_bytes(bundle.cert_pem)
    key.write_bytes(bundle.key_pem)
    conf.write_text(OPENSSL_CONF)
    os.environ["OPENSSL_CONF"] = str(conf)
    return cert, key


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    kind: str  # pingpong, stream, handshake, idle
    conns: int
    size: int = 0
    rows: tuple[str, ...] = ()


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("pp1", "ping-pong, 1 conn, 64 B", "pingpong", 1, 64,
             ("msg_s", "p50_us", "p99_us", "cpu_us_msg", "user_us_msg", report.CPU_ROW, report.OTHERS_ROW)),
    Scenario("pp64", "ping-pong, 64 conns, 64 B", "pingpong", 64, 64,
             ("msg_s", "p50_us", "p99_us", "cpu_us_msg", "user_us_msg", report.CPU_ROW, report.OTHERS_ROW)),
    Scenario("pp64big", "ping-pong, 64 conns, 16 KiB", "pingpong", 64, 16384,
             ("msg_s", "mb_s", "p50_us", "p99_us", "cpu_us_msg", "user_us_msg", report.CPU_ROW,
              report.OTHERS_ROW)),
    Scenario("stream", "stream, 8 conns, 64 KiB writes", "stream", 8, 65536,
             ("mb_s", "cpu_ms_mb", "user_ms_mb", report.CPU_ROW, report.OTHERS_ROW)),
    Scenario("handshake", "handshakes, 8 concurrent", "handshake", 8, 0,
             ("hs_s", "cpu_us_hs", "user_us_hs", report.CPU_ROW, report.OTHERS_ROW)),
    Scenario("idle", "16 conns ping-pong 64 B + idle conns", "idle", 16, 64,
             ("kib_conn", "base_p50_us", "p50_us", "base_p99_us", "p99_us", "msg_s", "cpu_us_msg",
              "user_us_msg", report.CPU_ROW, report.OTHERS_ROW)),
)

# What the chart shows: throughput, then cost, then latency.
CHART = (
    ("pp1", "msg_s"), ("pp64", "msg_s"), ("pp64big", "mb_s"), ("stream", "mb_s"), ("handshake", "hs_s"),
    ("idle", "msg_s"),
    ("pp1", "cpu_us_msg"), ("pp64", "cpu_us_msg"), ("pp64big", "cpu_us_msg"), ("stream", "cpu_ms_mb"),
    ("handshake", "cpu_us_hs"), ("idle", "kib_conn"),
    ("pp1", "p50_us"), ("pp64", "p99_us"), ("pp64big", "p99_us"), ("idle", "base_p99_us"),
    ("idle", "p99_us"), ("idle", "cpu_us_msg"),
)


@dataclass
class Context:
    args: argparse.Namespace
    cert: Path
    key: Path
    logs: Path
    server_cpu: int | None
    client_cpu: int | None
    negotiated: dict[str, str]


# -- one measurement ----------------------------------------------------------


def _target(ctx: Context, spec: ServerSpec, srv: RunningServer) -> Target:
    # No certificate verification: it is the server's work we measure, and
    # verifying would cost the load generator ~100 µs per handshake, where it
    # is already the tighter side (see the handshake scenario in the docs).
    return Target(servers.HOST, srv.port, tls=spec.tls, cafile=None,
                  expect_cipher=loadgen.EXPECTED_CIPHER if spec.tls else None, server_pid=srv.pid,
                  server_core=ctx.server_cpu, pinned_cert=str(ctx.cert))


def _job(ctx: Context, job: str, **kwargs: Any) -> loadgen.Result:
    a = ctx.args
    kwargs.setdefault("warmup", a.warmup)
    kwargs.setdefault("duration", a.duration)
    return workers.run_job(job, kwargs, cpu=ctx.client_cpu, timeout=a.warmup + a.duration + 150)


def _note_cipher(ctx: Context, spec: ServerSpec, res: loadgen.Result | workers.IdleInfo) -> None:
    if res.cipher is not None and spec.name not in ctx.negotiated:
        ticket = getattr(res, "session_ticket", None)
        extra = "" if ticket is None else f", session ticket {'issued' if ticket else 'not issued'}"
        ctx.negotiated[spec.name] = f"{res.tls_version} {res.cipher}{extra}"
        print(f"      negotiated with {spec.label}: {ctx.negotiated[spec.name]}", flush=True)


def measure(ctx: Context, scenario: Scenario, spec: ServerSpec, rep: int, attempt: int = 0
            ) -> tuple[dict[str, float], dict[str, Any]]:
    """Start a fresh server, run the scenario's load against it, stop it."""
    log = ctx.logs / f"{scenario.key}-{spec.name}-{rep}{f'-retry{attempt}' if attempt else ''}.log"
    raw: dict[str, Any] = {}
    with RunningServer(spec, cert=ctx.cert, key=ctx.key, log=log, cpu=ctx.server_cpu,
                       steady_malloc=not ctx.args.default_malloc) as srv:
        target = _target(ctx, spec, srv)
        if scenario.kind == "pingpong":
            res = _job(ctx, "pingpong", target=target, conns=scenario.conns, size=scenario.size)
            figures = report.pingpong_figures(res)
        elif scenario.kind == "stream":
            res = _job(ctx, "stream", target=target, conns=scenario.conns, chunk=scenario.size)
            figures = report.stream_figures(res)
        elif scenario.kind == "handshake":
            res = _job(ctx, "handshake", target=target, concurrency=scenario.conns, engine="tls13")
            figures = report.handshake_figures(res)
        elif scenario.kind == "idle":
            figures, res = _measure_idle(ctx, scenario, srv=srv, target=target, raw=raw)
        else:
            raise ValueError(scenario.kind)
        raw["result"] = dataclasses.asdict(res)
        _note_cipher(ctx, spec, res)
        problems = srv.stop()
    if problems:
        raw["server_problems"] = problems
        print(f"      warning: {spec.label}: {'; '.join(problems)}", flush=True)
    return figures, raw


def _measure_idle(ctx: Context, scenario: Scenario, *, srv: RunningServer, target: Target,
                  raw: dict[str, Any]) -> tuple[dict[str, float], loadgen.Result]:
    a = ctx.args
    base = _job(ctx, "pingpong", target=target, conns=scenario.conns, size=scenario.size)
    raw["baseline"] = dataclasses.asdict(base)
    time.sleep(0.3)  # let the server finish closing the baseline's connections
    rss0 = loadgen.proc_rss_bytes(srv.pid)
    holder = workers.IdleHolder(target, a.idle_conns, concurrency=32, max_hold=a.duration * 4 + 600,
                                cpu=ctx.client_cpu, engine="tls13")
    try:
        info = holder.wait_ready(timeout=600)
        time.sleep(0.5)  # let the last handshakes' work and any deferred frees settle
        rss1 = loadgen.proc_rss_bytes(srv.pid)
        loaded = _job(ctx, "pingpong", target=target, conns=scenario.conns, size=scenario.size)
        alive = holder.stop()
    except BaseException:
        holder.kill()
        raise
    if alive != info.count:
        raise BenchError(f"only {alive} of {info.count} idle connections were still open at the end")
    raw.update(rss_before=rss0, rss_after=rss1, idle=dataclasses.asdict(info), idle_alive=alive)
    figures = report.pingpong_figures(loaded)
    base_fig = report.pingpong_figures(base)
    figures.update(
        kib_conn=(rss1 - rss0) / info.count / 1024,
        base_msg_s=base_fig["msg_s"],
        idle_setup_s=info.setup_seconds,
    )
    if "p50_us" in base_fig:
        figures.update(base_p50_us=base_fig["p50_us"], base_p99_us=base_fig["p99_us"])
    return figures, loaded


# -- the run ------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="make bench BENCH_ARGS=...", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="The method is described in docs/performance.md and in "
                                       "scripts/bench/run.py's docstring.")
    p.add_argument("--duration", type=float, help="seconds measured per run (default 4; --quick 1)")
    p.add_argument("--warmup", type=float, help="seconds of load before measuring (default 1; --quick 0.3)")
    p.add_argument("--repeat", type=int, help="runs per server and scenario; medians are reported "
                                               "(default 3; --quick 1)")
    p.add_argument("--idle-conns", type=int, help="idle connections in the idle scenario "
                                                   "(default 10000; --quick 1000)")
    p.add_argument("--retries", type=int,
                   help="measure again when other processes took more than --max-others %% of either "
                        "core; the least disturbed attempt counts (default 2; --quick 0)")
    p.add_argument("--max-others", type=float, default=15.0, metavar="PERCENT",
                   help="see --retries (default %(default)s)")
    p.add_argument("--quiet-wait", type=float, default=20.0, metavar="SECONDS",
                   help="before measuring again, wait up to this long for other processes to leave "
                        "both cores under 10 %% (default %(default)s)")
    p.add_argument("--default-malloc", action="store_true",
                   help="run the servers with glibc's default malloc thresholds instead of fixed ones "
                        "(see servers.STEADY_MALLOC)")
    p.add_argument("--quick", action="store_true", help="a fast smoke run: short, once, fewer idle conns")
    p.add_argument("--servers", default=",".join(DEFAULT_SERVERS),
                   help="comma-separated subset of: %(default)s; also pyuv (plain TCP on pyuv) and "
                        "floor (tlsuv's parts without tlsuv): the floors under tlsuv")
    p.add_argument("--scenarios", default=",".join(s.key for s in SCENARIOS),
                   help="comma-separated subset of: %(default)s")
    p.add_argument("--out", type=Path, default=ROOT / "bench-results", help="results directory")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = p.parse_args(argv)
    quick = args.quick
    for name, full, fast in (("duration", 4.0, 1.0), ("warmup", 1.0, 0.3), ("repeat", 3, 1),
                             ("idle_conns", 10_000, 1_000), ("retries", 2, 0)):
        if getattr(args, name) is None:
            setattr(args, name, fast if quick else full)
    if args.duration <= 0 or args.warmup < 0 or args.repeat < 1 or args.idle_conns < 1 or args.retries < 0:
        p.error("--duration and --repeat must be positive, --warmup and --retries not negative, "
                "--idle-conns >= 1")
    names = {s.name for s in SERVERS}
    args.servers = [s for s in args.servers.split(",") if s]
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    if bad := [s for s in args.servers if s not in names]:
        p.error(f"unknown server(s) {bad}; choose from {sorted(names)}")
    if bad := [s for s in args.scenarios if s not in {sc.key for sc in SCENARIOS}]:
        p.error(f"unknown scenario(s) {bad}")
    return args


def _pinning() -> tuple[int | None, int | None]:
    allowed = os.sched_getaffinity(0)
    if {SERVER_CPU, CLIENT_CPU} <= allowed:
        os.sched_setaffinity(0, {CLIENT_CPU})
        return SERVER_CPU, CLIENT_CPU
    print(f"warning: CPUs {SERVER_CPU} and {CLIENT_CPU} are not both available ({sorted(allowed)}): "
          "server and load generator are not pinned, and figures will mean less", file=sys.stderr)
    return None, None


def _versions() -> dict[str, str]:
    out = {
        "python": platform.python_version(),
        "ssl module OpenSSL (clients, asyncio, uvloop)": ssl.OPENSSL_VERSION,
        "pyOpenSSL OpenSSL (tlsuv, Twisted)": SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode(),
        "kernel": platform.release(),
    }
    for dist in ("pyuv", "pyOpenSSL", "uvloop", "Twisted"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["tlsuv tree"] = _tree_state()
    out["tlsuv data path (column tlsuv)"] = data_path()
    try:
        with open("/proc/cpuinfo") as f:
            out["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                              "?")
    except OSError:
        out["cpu"] = "?"
    return out


def _tree_state() -> str:
    """The commit measured, and whether tlsuv/ had uncommitted changes on top."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tlsuv"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{' + uncommitted changes in tlsuv/' if dirty else ''}"


def _order(specs: Sequence[ServerSpec], rep: int) -> list[ServerSpec]:
    k = rep % len(specs)
    return [*specs[k:], *specs[:k]]


def _progress(scenario: Scenario, figures: dict[str, float]) -> str:
    parts = []
    for key in scenario.rows:
        if key == report.CPU_ROW:
            parts.append(f"CPU {report.cell(key, figures, None)} %")
        elif key == report.OTHERS_ROW:
            parts.append(f"others {report.cell(key, figures, None)} %")
        elif key in figures:
            parts.append(f"{report.fmt(figures[key])} {report.METRICS[key].label}")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    specs = [s for s in SERVERS if s.name in args.servers]
    if missing := [s.label for s in specs if not s.available()]:
        print(f"error: {', '.join(missing)} not installed: `make bench` installs the bench extra "
              "(pip install -e '.[bench]')", file=sys.stderr)
        return 2
    scenarios = [s for s in SCENARIOS if s.key in args.scenarios]
    server_cpu, client_cpu = _pinning()
    nofile = loadgen.raise_nofile_limit()
    if "idle" in args.scenarios and nofile < args.idle_conns + 256:
        print(f"error: the open-files limit is {nofile}; {args.idle_conns} idle connections need "
              f"{args.idle_conns + 256}", file=sys.stderr)
        return 2

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    logs = args.out / f"logs-{stamp}"
    logs.mkdir()
    with tempfile.TemporaryDirectory(prefix="tlsuv-bench-") as tmp:
        cert, key = bench_files(Path(tmp))
        ctx = Context(args, cert, key, logs, server_cpu, client_cpu, {})
        versions = _versions()
        print("tlsuv benchmark: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
        print(f"servers on CPU {server_cpu}, load generator on CPU {client_cpu}; duration {args.duration} s "
              f"after {args.warmup} s warm-up, {args.repeat} repetition(s), up to {args.retries} retries if "
              f"others take over {args.max_others:g} % of a core; {args.idle_conns} idle conns; "
              f"open-files limit {nofile}", flush=True)
        runs, summary = _run_all(ctx, scenarios, specs)

    _finish(args, stamp, versions=versions, scenarios=scenarios, specs=specs, runs=runs, summary=summary,
            negotiated=ctx.negotiated)
    return 0


def _disturbance(figures: dict[str, float]) -> float:
    """How much of the two cores other processes took during the window, in %."""
    return max(figures.get("oth_srv_pct", 0.0), figures.get("oth_cli_pct", 0.0))


QUIET_PCT = 10.0  # both cores below this (other processes' share): time to measure again


def _wait_for_quiet(ctx: Context) -> float:
    """Before measuring again: wait (at most --quiet-wait s) until others leave both cores alone.

    Between measurements none of the benchmark's processes run, so whatever
    keeps the two cores busy is somebody else's.
    """
    cores = tuple(c for c in (ctx.server_cpu, ctx.client_cpu) if c is not None)
    start = time.monotonic()
    if not cores:
        return 0.0
    while time.monotonic() - start < ctx.args.quiet_wait:
        before = loadgen.cpu_busy_seconds(cores)
        time.sleep(0.5)
        after = loadgen.cpu_busy_seconds(cores)
        if max(after[c] - before[c] for c in cores) / 0.5 * 100 < QUIET_PCT:
            break
    return time.monotonic() - start


def _measure_with_retries(ctx: Context, scenario: Scenario, spec: ServerSpec, rep: int,
                          tag: str) -> dict[str, Any]:
    """One measurement; again (up to --retries times) if other processes disturbed it.

    The least disturbed attempt is kept; the others stay in the JSON.  An
    error is never retried: it is a finding, not noise.
    """
    entry: dict[str, Any] = {"scenario": scenario.key, "server": spec.name, "rep": rep}
    attempts: list[tuple[dict[str, float], dict[str, Any]]] = []
    for attempt in range(1 + ctx.args.retries):
        if attempt:
            waited = _wait_for_quiet(ctx)
            print(f"      (waited {waited:.1f} s for the other processes to quieten)", flush=True)
        t0 = time.monotonic()
        try:
            figures, raw = measure(ctx, scenario, spec, rep, attempt)
        except BenchError as exc:
            entry["error"] = str(exc)
            print(f"  {tag} {spec.label:12} rep {rep + 1}: ERROR {exc}", flush=True)
            return entry
        attempts.append((figures, raw))
        disturbed = _disturbance(figures) > ctx.args.max_others
        again = disturbed and attempt < ctx.args.retries
        print(f"  {tag} {spec.label:12} rep {rep + 1}: {_progress(scenario, figures)}  "
              f"({time.monotonic() - t0:.1f} s){'  disturbed: measuring again' if again else ''}", flush=True)
        if not again:
            break
    best = min(range(len(attempts)), key=lambda i: _disturbance(attempts[i][0]))
    figures, raw = attempts[best]
    entry.update(figures=figures, **raw)
    if len(attempts) > 1:
        entry["discarded_attempts"] = [f for i, (f, _) in enumerate(attempts) if i != best]
    return entry


def _run_all(ctx: Context, scenarios: Sequence[Scenario], specs: Sequence[ServerSpec]
             ) -> tuple[list[dict[str, Any]], dict[str, dict[str, dict[str, float]]]]:
    runs: list[dict[str, Any]] = []
    total = len(scenarios) * len(specs) * ctx.args.repeat
    n = 0
    started = time.monotonic()
    for scenario in scenarios:
        idle = f" ({ctx.args.idle_conns} idle)" if scenario.kind == "idle" else ""
        print(f"\n== {scenario.title}{idle}", flush=True)
        for rep in range(ctx.args.repeat):
            for spec in _order(specs, rep):
                n += 1
                runs.append(_measure_with_retries(ctx, scenario, spec, rep, f"[{n:3}/{total}]"))
    elapsed = time.monotonic() - started
    print(f"\nall measurements done in {elapsed / 60:.1f} min", flush=True)
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for scenario in scenarios:
        for spec in specs:
            got = [r["figures"] for r in runs
                   if r["scenario"] == scenario.key and r["server"] == spec.name and "figures" in r]
            if got:
                summary.setdefault(scenario.key, {})[spec.name] = report.medians(got)
    return runs, summary


def _finish(args: argparse.Namespace, stamp: str, *, versions: dict[str, str], scenarios: Sequence[Scenario],
            specs: Sequence[ServerSpec], runs: list[dict[str, Any]],
            summary: dict[str, dict[str, dict[str, float]]], negotiated: dict[str, str]) -> None:
    table_scenarios = [(s.key, s.title.replace("idle conns", f"{args.idle_conns:,} idle"), s.rows)
                       for s in scenarios]
    server_cols = [(s.name, s.label) for s in specs]
    table = report.markdown_table(table_scenarios, server_cols, summary, BASELINE)
    tls_names = [s.name for s in specs if s.tls]
    checks, ok = report.ceiling_checks(table_scenarios, summary, "plain", tls_names) \
        if "plain" in {s.name for s in specs} else ([], True)
    busy = report.busy_generator(table_scenarios, server_cols, summary)
    paired = report.paired_ratios(table_scenarios, server_cols, runs, BASELINE)
    settings = (f"medians of {args.repeat} run(s) of {args.duration:g} s after {args.warmup:g} s warm-up; "
                f"server on one core, load generator on the other")
    print(f"\n{settings}; ratios are to {BASELINE} (↑ more is better, ↓ less is better)\n")
    print(table)
    print("\nnegotiated: " + "; ".join(f"{dict(server_cols)[k]}: {v}" for k, v in negotiated.items()))
    if checks:
        print("\nload generator ceiling (plain TCP must beat every TLS server):")
        for line in checks:
            print("  " + line)
        if not ok:
            print("  WARNING: somewhere the load generator, not the TLS server, may have been the limit")
    if paired:
        print(f"\nrepetition by repetition, as a ratio to {BASELINE} in the same repetition:")
        for line in paired:
            print("  " + line)
    if busy:
        print(f"\nload generator at {report.BUSY_PCT:.0f} % CPU or more (throughput there may be its "
              "limit, not the server's; CPU per unit of work is unaffected):")
        for line in busy:
            print("  " + line)
    if errors := [r for r in runs if "error" in r]:
        print(f"\n{len(errors)} measurement(s) failed; see the JSON for each error")

    base = args.out / f"bench-{stamp}"
    doc = {
        "generated": stamp,
        "command": " ".join(sys.argv),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": versions,
        "negotiated": negotiated,
        "baseline": BASELINE,
        "scenarios": [dataclasses.asdict(s) for s in scenarios],
        "servers": [dataclasses.asdict(s) for s in specs],
        "summary": summary,
        "ceiling_checks": checks,
        "generator_busy": busy,
        "paired_ratios": paired,
        "runs": runs,
    }
    Path(f"{base}.json").write_text(json.dumps(doc, indent=1, default=_json_default))
    md = (f"{settings}; ratios are to {BASELINE} (↑ more is better, ↓ less is better)\n\n{table}\n\n"
          + "\n".join(f"- {line}" for line in checks) + "\n"
          + "".join(f"- load generator busy: {line}\n" for line in busy)
          + (f"\nRepetition by repetition, as a ratio to {BASELINE} in the same repetition:\n\n"
             + "".join(f"- {line}\n" for line in paired) if paired else ""))
    Path(f"{base}.md").write_text(md)
    written = [f"{base}.json", f"{base}.md"]
    if not args.no_chart:
        _chart(Path(f"{base}.png"), scenarios, server_cols=server_cols, summary=summary, subtitle=settings,
               written=written)
    print("\nwrote " + ", ".join(written))


def _chart(path: Path, scenarios: Sequence[Scenario], *, server_cols: list[tuple[str, str]],
           summary: dict[str, dict[str, dict[str, float]]], subtitle: str, written: list[str]) -> None:
    try:
        from . import chart  # noqa: PLC0415  # matplotlib only when a chart is wanted
    except ImportError as exc:  # matplotlib is in the bench extra only
        print(f"no chart: {exc}", file=sys.stderr)
        return
    titles = {s.key: s.title for s in scenarios}
    panels = [(k, titles[k], m) for k, m in CHART if k in titles]
    chart.draw(path, panels=panels, servers=server_cols, summary=summary, baseline=BASELINE,
               subtitle=subtitle)
    written.append(str(path))


def _json_default(obj: object) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)

