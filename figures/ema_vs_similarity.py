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
    fig, axes = plt.subplots(1, len(bands), figsize=(FULL, 2.3), sharey=True)
    targets = sorted({p["target"] for p in metrics["points"]})
    palette = dict(zip(targets, sns.color_palette("deep", len(targets))))
    for ax, band in zip(axes, bands):
        for p in metrics["points"]:
            ax.scatter(p["similarity"][band], p["drop_judge"], color=palette[p["target"]], s=14)
            ax.annotate(DOMAIN_LABELS.get(p["domain"], p["domain"]), (p["similarity"][band], p["drop_judge"]),
                        fontsize=5, xytext=(2, 2), textcoords="offset points")
        c = metrics["bands"][band]["judge"]
        layers = metrics["bands"][band]["layers"]
        ax.set_title(f"{band} (L{layers[0]}–{layers[-1]}): ρ={c['spearman']:.2f}, p={c['p_perm_spearman']:.3f}")
        ax.set_xlabel("cosine to target concept")
    axes[0].set_ylabel("refusal drop (judge)")
    for t in targets:
        axes[-1].scatter([], [], color=palette[t], label=f"target: {DOMAIN_LABELS.get(t, t)}", s=14)
    axes[-1].legend(frameon=False, loc="best")
    return save(fig, out, "ema_vs_similarity")
