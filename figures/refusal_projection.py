"""Per-layer projection of each domain's mean activation on the base refusal direction,
before vs after unlearning (H7)."""

from __future__ import annotations

from pathlib import Path

from figures import latest_metrics
from figures.style import DOMAIN_LABELS, FULL, apply, plt, save, sns

EXPERIMENT = "h7_mechanism"


def make(results: Path, out: Path) -> list[Path]:
    metrics = latest_metrics(results, EXPERIMENT)
    if metrics is None:
        return []
    apply()
    targets = metrics["targets"]
    fig, axes = plt.subplots(1, len(targets), figsize=(FULL, 2.4), sharey=True, squeeze=False)
    for ax, (target, m) in zip(axes[0], targets.items()):
        names = [n for n in m["projection_before"] if n != "benign"] + ["benign"]
        palette = dict(zip(names, sns.color_palette("tab10", len(names))))
        for name in names:
            ax.plot(m["projection_before"][name], color=palette[name], lw=1, label=DOMAIN_LABELS.get(name, name))
            ax.plot(m["projection_after"][name], color=palette[name], lw=1, ls="--")
        ax.axvline(metrics["refusal_direction"]["layer"], color="grey", lw=0.6, ls=":")
        ax.set(title=f"after unlearning {DOMAIN_LABELS.get(target, target)} (dashed)", xlabel="layer",
               ylabel="projection on refusal direction")
    axes[0][0].legend(frameon=False, fontsize=5, ncol=2)
    return save(fig, out, "refusal_projection")
