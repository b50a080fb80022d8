"""The selectivity frontier (H13): untouched-domain refusal against target refusal along training,
one line per condition (mean over seeds, band = range over seeds), with the KL-to-base cost beside
it; and per-domain small multiples (``frontier_domains``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures import latest_metrics
from figures.style import FULL, apply, plt, save

EXPERIMENT = "h13_selectivity_frontier"


def _by_target(metrics: dict) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for key, cond in metrics["conditions"].items():
        name, target = key.split("|")
        out.setdefault(target, {})[name] = cond["curves"]
    return out


def _band(ax, seeds: list[dict], xkey: str, ykey: str, label: str, color) -> None:
    xs = np.asarray([s[xkey] for s in seeds], dtype=float)
    ys = np.asarray([[np.nan if v is None else v for v in s[ykey]] for s in seeds], dtype=float)
    ax.plot(xs.mean(0), np.nanmean(ys, 0), "-o", ms=2.5, lw=1.2, color=color, label=f"{label} (n={len(seeds)})")
    for x, y in zip(xs, ys):
        ax.plot(x, y, lw=0.5, alpha=0.35, color=color)


def make(results: Path, out: Path, experiment: str = EXPERIMENT, name: str = "frontier") -> list[Path]:
    metrics = latest_metrics(results, experiment)
    if metrics is None:
        return []
    apply()
    by_target = _by_target(metrics)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, axes = plt.subplots(2, len(by_target), figsize=(FULL, 4.2), squeeze=False)
    for j, (target, conds) in enumerate(by_target.items()):
        top, bottom = axes[0][j], axes[1][j]
        for k, (label, curves) in enumerate(conds.items()):  # not ``name``: that is the figure's
            _band(top, curves["seeds"], "target", "untouched", label, colors[k % len(colors)])
            _band(bottom, curves["seeds"], "target", "kl", label, colors[k % len(colors)])
        for level in metrics["levels"]:
            for ax in (top, bottom):
                ax.axvline(level, color="0.6", lw=0.6, ls=":")
        top.set(title=f"target: {target}", xlabel=f"{target} refusal P", ylabel="untouched mean refusal P")
        bottom.set(xlabel=f"{target} refusal P", ylabel="KL to base (benign)")
        for ax in (top, bottom):
            ax.invert_xaxis()  # training runs left to right: forgetting grows
        top.legend(frameon=False, fontsize=5)
    paths = save(fig, out, name)
    return paths + _domains(by_target, metrics, out, colors, name)


def _domains(by_target: dict, metrics: dict, out: Path, colors: list, name: str) -> list[Path]:
    paths = []
    for target, conds in by_target.items():
        domains = [d for d in next(iter(conds.values()))["seeds"][0]["domains"] if d != target]
        fig, axes = plt.subplots(1, len(domains), figsize=(FULL, 1.9), squeeze=False, sharey=True)
        for ax, d in zip(axes[0], domains):
            for k, (label, curves) in enumerate(conds.items()):
                seeds = [{"target": s["target"], "y": s["domains"][d]} for s in curves["seeds"]]
                _band(ax, seeds, "target", "y", label, colors[k % len(colors)])
            ax.invert_xaxis()
            ax.set(title=d, xlabel=f"{target} P")
        axes[0][0].set_ylabel("refusal P")
        axes[0][-1].legend(frameon=False, fontsize=4)
        paths += save(fig, out, f"{name}_domains_{target}")
    return paths
