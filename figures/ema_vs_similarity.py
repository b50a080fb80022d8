"""EMA vs concept similarity to the target, one panel per depth band, with Spearman ρ and p."""

from __future__ import annotations

from pathlib import Path

from figures import latest_metrics
from figures.style import DOMAIN_LABELS, FULL, apply, plt, save, sns


def make(results: Path, out: Path) -> list[Path]:
    metrics = latest_metrics(results, "h5_geometry_predicts_ema")
    if metrics is None:
        return []
    apply()
    bands = list(metrics["bands"])
    measures = [("judge", "drop_judge", "refusal drop (judge)"), ("logit", "drop_logit", "log-odds drop")]
    measures = [m for m in measures if all(m[1] in p for p in metrics["points"])]
    fig, grid = plt.subplots(len(measures), len(bands), figsize=(FULL, 2.1 * len(measures)), sharex="col",
                             sharey="row", squeeze=False)
    targets = sorted({p["target"] for p in metrics["points"]})
    palette = dict(zip(targets, sns.color_palette("deep", len(targets))))
    for row, (measure, key, ylabel) in zip(grid, measures):
        for ax, band in zip(row, bands):
            for p in metrics["points"]:
                ax.scatter(p["similarity"][band], p[key], color=palette[p["target"]], s=14)
                ax.annotate(DOMAIN_LABELS.get(p["domain"], p["domain"]), (p["similarity"][band], p[key]),
                            fontsize=5, xytext=(2, 2), textcoords="offset points")
            c = metrics["bands"][band][measure]
            layers = metrics["bands"][band]["layers"]
            ax.set_title(f"{band} L{layers[0]}–{layers[-1]}: ρ={c['spearman']:.2f} (p={c['p_perm_spearman']:.3f})",
                         fontsize=7)
        row[0].set_ylabel(ylabel)
    for ax in grid[-1]:
        ax.set_xlabel("cosine to target concept")
    for t in targets:
        grid[0][-1].scatter([], [], color=palette[t], label=f"target: {DOMAIN_LABELS.get(t, t)}", s=14)
    grid[0][-1].legend(frameon=False, loc="best", fontsize=6)
    fig.tight_layout()
    return save(fig, out, "ema_vs_similarity")
