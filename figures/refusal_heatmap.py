"""Refusal rate (generation judge) per domain × condition, from H4's saved tables."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures import latest_metrics
from figures.style import COLUMN, DOMAIN_LABELS, apply, plt, save, sns

EXPERIMENT = "h4_retain_contains_ema"

CONDITION_LABELS = {"npo": "NPO", "npo_retain": "NPO+retain", "sft": "LoRA-SFT"}


def table(metrics: dict) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Rows = domains, columns = base then each target × condition; values and CI half-widths."""
    targets = metrics["targets"]
    domains = list(next(iter(targets.values()))["conditions"]["npo"].keys())
    cols, vals, errs = ["base"], [], []
    first = next(iter(targets.values()))["conditions"]["npo"]
    vals.append([first[d]["before"] for d in domains])
    errs.append([np.nan] * len(domains))
    for target, m in targets.items():
        for cond, rows in m["conditions"].items():
            cols.append(f"{DOMAIN_LABELS.get(target, target)}: {CONDITION_LABELS.get(cond, cond)}")
            vals.append([rows[d]["after"] for d in domains])
            errs.append([(rows[d]["ci"][1] - rows[d]["ci"][0]) / 2 for d in domains])
    return domains, cols, np.array(vals).T, np.array(errs).T


def make(results: Path, out: Path) -> list[Path]:
    metrics = latest_metrics(results, EXPERIMENT)
    if metrics is None:
        return []
    apply()
    domains, cols, vals, _ = table(metrics)
    fig, ax = plt.subplots(figsize=(max(COLUMN, 0.55 * len(cols) + 1.2), 0.32 * len(domains) + 1.4))
    sns.heatmap(vals, annot=True, fmt=".2f", vmin=0, vmax=1, cmap="rocket_r", cbar_kws={"label": "refusal rate"},
                xticklabels=cols, yticklabels=[DOMAIN_LABELS.get(d, d) for d in domains], ax=ax,
                annot_kws={"size": 6})
    ax.set_title("Refusal rate by domain and condition")
    ax.tick_params(axis="x", rotation=45)
    plt.setp(ax.get_xticklabels(), ha="right")
    return save(fig, out, "refusal_heatmap")
