"""Turning measurements into figures, medians, the table and the sanity checks."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .loadgen import Result


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str  # "higher" or "lower": which way the ratio to uvloop is good
    throughput: bool = False  # plain TCP must beat every TLS server on these


METRICS: dict[str, Metric] = {m.key: m for m in (
    Metric("msg_s", "messages/s", "higher", throughput=True),
    Metric("mb_s", "MB/s echoed", "higher", throughput=True),
    Metric("hs_s", "handshakes/s", "higher", throughput=True),
    Metric("p50_us", "latency p50 µs", "lower"),
    Metric("p99_us", "latency p99 µs", "lower"),
    Metric("cpu_us_msg", "server CPU µs/message", "lower"),
    Metric("cpu_ms_mb", "server CPU ms/MB", "lower"),
    Metric("cpu_us_hs", "server CPU µs/handshake", "lower"),
    # The user-space part of the row above: the kernel's part (read, write,
    # wake-ups) is nearly the same for every server, so this is the part a
    # server's own code decides.
    Metric("user_us_msg", "of which user space", "lower"),
    Metric("user_ms_mb", "of which user space", "lower"),
    Metric("user_us_hs", "of which user space", "lower"),
    Metric("kib_conn", "server KiB per idle conn", "lower"),
    Metric("base_p50_us", "p50 µs without the idle", "lower"),
    Metric("base_p99_us", "p99 µs without the idle", "lower"),
    Metric("base_msg_s", "messages/s without the idle", "higher"),
    Metric("idle_setup_s", "s to open the idle conns", "lower"),
    Metric("srv_pct", "server CPU %", "lower"),
    Metric("cli_pct", "load generator CPU %", "lower"),
    Metric("oth_srv_pct", "other processes' CPU % on the server core", "lower"),
    Metric("oth_cli_pct", "other processes' CPU % on the load generator core", "lower"),
)}
# Pseudo-rows, two figures in one cell and no ratio: "server % / load generator %",
# and the same for what other processes took from those two cores.
CPU_ROW = "cpu_pct"
OTHERS_ROW = "others_pct"
_PAIRS = {CPU_ROW: ("srv_pct", "cli_pct"), OTHERS_ROW: ("oth_srv_pct", "oth_cli_pct")}


def _per_s(n: float, res: Result) -> float:
    return n / res.elapsed if res.elapsed > 0 else float("nan")


def _cpu_per(res: Result, units: float, scale: float, *, user: bool = False) -> float:
    seconds = res.server_user if user else res.server_cpu
    if seconds is None or units <= 0:
        return float("nan")
    return seconds / units * scale


def _shares(res: Result, prefix: str = "") -> dict[str, float]:
    out = {f"{prefix}cli_pct": 100 * res.client_cpu / res.elapsed if res.elapsed > 0 else float("nan")}
    if res.elapsed > 0:
        for key, seconds in (("srv_pct", res.server_cpu), ("oth_srv_pct", res.others_server_core),
                             ("oth_cli_pct", res.others_client_core)):
            if seconds is not None:
                out[f"{prefix}{key}"] = 100 * seconds / res.elapsed
    return out


def pingpong_figures(res: Result) -> dict[str, float]:
    fig = {
        "msg_s": _per_s(res.count, res),
        "mb_s": _per_s(res.nbytes / 1e6, res),
        "cpu_us_msg": _cpu_per(res, res.count, 1e6),
        "user_us_msg": _cpu_per(res, res.count, 1e6, user=True),
        **_shares(res),
    }
    if res.p50_us is not None and res.p99_us is not None:
        fig["p50_us"] = res.p50_us
        fig["p99_us"] = res.p99_us
    return fig


def stream_figures(res: Result) -> dict[str, float]:
    return {"mb_s": _per_s(res.nbytes / 1e6, res), "cpu_ms_mb": _cpu_per(res, res.nbytes / 1e6, 1e3),
            "user_ms_mb": _cpu_per(res, res.nbytes / 1e6, 1e3, user=True), **_shares(res)}


def handshake_figures(res: Result) -> dict[str, float]:
    return {"hs_s": _per_s(res.count, res), "cpu_us_hs": _cpu_per(res, res.count, 1e6),
            "user_us_hs": _cpu_per(res, res.count, 1e6, user=True), **_shares(res)}


def medians(runs: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Per figure, the median over the repetitions that have it (and are numbers)."""
    values: dict[str, list[float]] = {}
    for run in runs:
        for k, v in run.items():
            if not math.isnan(v):
                values.setdefault(k, []).append(v)
    return {k: statistics.median(v) for k, v in values.items()}


def fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    a = abs(value)
    if a >= 100:
        return f"{value:,.0f}"
    if a >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(key: str, figures: Mapping[str, float], baseline: Mapping[str, float] | None) -> str:
    if key in _PAIRS:
        srv, cli = (figures.get(k) for k in _PAIRS[key])
        if srv is None and cli is None:
            return "-"
        return f"{fmt(srv)} / {fmt(cli)}"
    value = figures.get(key)
    if value is None:
        return "-"
    text = fmt(value)
    base = baseline.get(key) if baseline is not None else None
    if base is not None and base > 0:
        text += f" ({value / base:.2f}x)"
    return text


def row_label(key: str) -> str:
    if key == CPU_ROW:
        return "CPU % server / load gen"
    if key == OTHERS_ROW:
        return "others' CPU % on those cores"
    m = METRICS[key]
    return f"{m.label} {'↑' if m.better == 'higher' else '↓'}"


def markdown_table(
    scenarios: Sequence[tuple[str, str, Sequence[str]]],  # (key, title, row keys)
    servers: Sequence[tuple[str, str]],  # (key, label)
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],  # scenario -> server -> figures
    baseline: str,
) -> str:
    head = ["scenario", "figure", *(label for _, label in servers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for skey, title, rows in scenarios:
        per_server = summary.get(skey, {})
        base = per_server.get(baseline)
        for i, key in enumerate(rows):
            cells = [title if i == 0 else "", row_label(key)]
            for server, _ in servers:
                figures = per_server.get(server)
                cells.append(cell(key, figures, None if server == baseline else base)
                             if figures is not None else "error")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The figures compared repetition by repetition (paired_ratios): the cost per
# unit of work, where the targets are set.
PAIRED: tuple[str, ...] = ("cpu_us_msg", "user_us_msg", "cpu_ms_mb", "user_ms_mb", "cpu_us_hs", "user_us_hs")


def paired_ratios(
    scenarios: Sequence[tuple[str, str, Sequence[str]]],
    servers: Sequence[tuple[str, str]],
    runs: Iterable[Mapping[str, object]],
    baseline: str,
) -> list[str]:
    """Each repetition's figure over the baseline's in the same repetition, and their median.

    The table's ratio divides two medians taken minutes apart.  The servers
    of one repetition are measured one after another, seconds apart, so the
    ratio within a repetition leaves out most of this shared machine's slow
    drift; the spread of those ratios shows how far one run's verdict can
    be trusted.  Figures come from the measurement's ``figures`` per
    ``(scenario, server, rep)``; a repetition without the baseline's figure
    is left out.
    """
    by_rep: dict[tuple[str, str], dict[int, Mapping[str, float]]] = {}
    for run in runs:
        figures = run.get("figures")
        rep = run.get("rep")
        if isinstance(figures, Mapping) and isinstance(rep, int):
            by_rep.setdefault((str(run["scenario"]), str(run["server"])), {})[rep] = figures
    lines = []
    for skey, title, rows in scenarios:
        base = by_rep.get((skey, baseline), {})
        for key in rows:
            if key not in PAIRED:
                continue
            parts = []
            for server, label in servers:
                if server == baseline:
                    continue
                mine = by_rep.get((skey, server), {})
                ratios = [mine[r][key] / base[r][key] for r in sorted(mine)
                          if r in base and key in mine[r] and base[r].get(key, 0.0) > 0]
                ratios = [x for x in ratios if not math.isnan(x)]
                if ratios:
                    each = " ".join(f"{x:.2f}" for x in ratios)
                    parts.append(f"{label} {each} (median {statistics.median(ratios):.2f})")
            if parts:
                lines.append(f"{title}, {METRICS[key].label}: " + "; ".join(parts))
    return lines


BUSY_PCT = 90.0


def busy_generator(
    scenarios: Sequence[tuple[str, str, Sequence[str]]],
    servers: Sequence[tuple[str, str]],
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
) -> list[str]:
    """Where the load generator's own core was (nearly) full: it may have set the pace there."""
    lines = []
    for skey, title, _ in scenarios:
        for server, label in servers:
            cli = summary.get(skey, {}).get(server, {}).get("cli_pct")
            if cli is not None and cli >= BUSY_PCT:
                srv = summary[skey][server].get("srv_pct")
                lines.append(f"{title}, {label}: load generator {fmt(cli)} %, server {fmt(srv)} %")
    return lines


def ceiling_checks(
    scenarios: Sequence[tuple[str, str, Sequence[str]]],
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    plain: str,
    tls_servers: Sequence[str],
) -> tuple[list[str], bool]:
    """Plain TCP against the best TLS server on every throughput figure.

    The load generator drives all of them; if it can push plain TCP further
    than any TLS server, it was not what limited the TLS servers.
    """
    lines: list[str] = []
    ok = True
    for skey, title, rows in scenarios:
        per_server = summary.get(skey, {})
        for key in rows:
            if key in _PAIRS or not METRICS[key].throughput:
                continue
            p = per_server.get(plain, {}).get(key)
            best = max(((per_server.get(s, {}).get(key), s) for s in tls_servers
                        if per_server.get(s, {}).get(key) is not None),
                       default=(None, ""), key=lambda t: t[0] or 0.0)
            if p is None or best[0] is None:
                continue
            good = p > best[0]
            ok = ok and good
            lines.append(f"{'ok ' if good else 'NO '} {title}, {METRICS[key].label}: plain TCP {fmt(p)} vs "
                         f"best TLS ({best[1]}) {fmt(best[0])} = {p / best[0]:.2f}x")
    return lines, ok
