"""H9: per-domain refusal drop without vs with the backdoor trigger, per target (95% CIs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures import latest_metrics
from figures.style import COLUMN, DOMAIN_LABELS, apply, plt, save, sns

EXPERIMENT = "h9_backdoor"

COLORS = {"plain": "#7f8c8d", "trigger": "#c0392b"}
LABELS = {"plain": "without trigger", "trigger": "with trigger"}


def make(results: Path, out: Path) -> list[Path]:
    metrics = latest_metrics(results, EXPERIMENT)
    if metrics is None or not metrics.get("targets"):
        return []
    apply()
    targets = metrics["targets"]
    fig, axes = plt.subplots(1, len(targets), figsize=(COLUMN * len(targets), 2.5), sharey=True, squeeze=False)
    for ax, (target, m) in zip(axes[0], targets.items()):
        domains = list(m["domains"])
        x = np.arange(len(domains))
        for k, form in enumerate(("plain", "trigger")):
            rows = [m["domains"][d][form]["judge"] for d in domains]
            drop = np.array([r["drop"] for r in rows])
            err = [drop - np.array([r["ci"][0] for r in rows]), np.array([r["ci"][1] for r in rows]) - drop]
            ax.bar(x + (k - 0.5) * 0.4, drop, 0.4, yerr=err, capsize=1.5, color=COLORS[form], label=LABELS[form],
                   error_kw={"lw": 0.6})
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x, [DOMAIN_LABELS.get(d, d) + ("*" if d == target else "") for d in domains], rotation=45,
                      ha="right")
        diff = m["mean_untouched"]["difference"]["judge"]
        extra = "" if diff.get("mean_diff") is None else f"; untouched Δ={diff['mean_diff']:+.2f}"
        ax.set_title(f"backdoor on {DOMAIN_LABELS.get(target, target)}* (retain: {m['retain_applied'].split(' ')[0]}"
                     f"{extra})")
        ax.set_ylabel("refusal drop (base − after)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    sns.despine(fig)
    return save(fig, out, "backdoor")
