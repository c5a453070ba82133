"""The PNG: one bar panel per figure, servers side by side, ratio to uvloop above each bar."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a build machine

import matplotlib.pyplot as plt  # after choosing the backend

from .report import METRICS, fmt

COLOURS = {"tlsuv": "#d62728", "tlsuv-pure": "#ff9896", "asyncio": "#1f77b4", "uvloop": "#2ca02c",
           "twisted": "#9467bd", "plain": "#7f7f7f"}


def draw(
    path: Path,
    *,
    panels: Sequence[tuple[str, str, str]],  # (scenario key, scenario title, figure key)
    servers: Sequence[tuple[str, str]],
    summary: Mapping[str, Mapping[str, Mapping[str, float]]],
    baseline: str,
    subtitle: str,
) -> None:
    cols = 6
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (skey, title, key) in zip(axes.flat, panels, strict=False):
        per_server = summary.get(skey, {})
        names = [(s, label) for s, label in servers if key in per_server.get(s, {})]
        values = [per_server[s][key] for s, _ in names]
        bars = ax.bar([label for _, label in names], values,
                      color=[COLOURS.get(s, "#333333") for s, _ in names])
        base = per_server.get(baseline, {}).get(key)
        for bar, (_, _), value in zip(bars, names, values, strict=True):
            text = fmt(value) + (f"\n{value / base:.2f}x" if base else "")
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
        metric = METRICS[key]
        ax.set_title(f"{title}\n{metric.label} ({metric.better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.margins(y=0.25)
    fig.suptitle(f"tlsuv echo benchmark — medians, ratio to {baseline}\n{subtitle}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
