"""Per-domain refusal drop (with 95% CIs) for each target, NPO vs NPO+retain-CE (vs SFT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures import latest_metrics
from figures.style import COLUMN, DOMAIN_LABELS, apply, plt, save, sns

COLORS = {"npo": "#c0392b", "npo_retain": "#2980b9", "sft": "#7f8c8d"}
LABELS = {"npo": "NPO", "npo_retain": "NPO + retain-CE", "sft": "LoRA-SFT"}


def make(results: Path, out: Path) -> list[Path]:
    metrics = latest_metrics(results, "h4_retain_contains_ema")
    if metrics is None:
        return []
    apply()
    targets = metrics["targets"]
    fig, axes = plt.subplots(1, len(targets), figsize=(COLUMN * len(targets), 2.4), sharey=True, squeeze=False)
    for ax, (target, m) in zip(axes[0], targets.items()):
        conds = list(m["conditions"])
        domains = list(m["conditions"]["npo"])
        width = 0.8 / len(conds)
        x = np.arange(len(domains))
        for k, cond in enumerate(conds):
            rows = m["conditions"][cond]
            drop = np.array([rows[d]["drop"] for d in domains])
            lo = drop - np.array([rows[d]["ci"][0] for d in domains])
            hi = np.array([rows[d]["ci"][1] for d in domains]) - drop
            ax.bar(x + (k - (len(conds) - 1) / 2) * width, drop, width, yerr=[lo, hi], capsize=1.5,
                   color=COLORS.get(cond), label=LABELS.get(cond, cond), error_kw={"lw": 0.6})
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x, [DOMAIN_LABELS.get(d, d) + ("*" if d == target else "") for d in domains], rotation=45,
                      ha="right")
        ax.set_title(f"target: {DOMAIN_LABELS.get(target, target)} (* = target)")
        ax.set_ylabel("refusal drop (base − after)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    sns.despine(fig)
    return save(fig, out, "ema_drops")
