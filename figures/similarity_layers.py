"""Concept-vector cosine similarity at a few layers (early, middle, late), from H5's saved matrices."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures import latest_metrics
from figures.style import DOMAIN_LABELS, FULL, apply, plt, save, sns


def make(results: Path, out: Path) -> list[Path]:
    metrics = latest_metrics(results, "h5_geometry_predicts_ema")
    if metrics is None or "similarity" not in metrics:
        return []
    apply()
    sim = metrics["similarity"]
    layers = sim["layers"]
    picks = sorted({layers[0], layers[len(layers) // 6], layers[len(layers) // 2], layers[-1]})
    names = [DOMAIN_LABELS.get(n, n) for n in sim["names"]]
    fig, axes = plt.subplots(1, len(picks), figsize=(FULL, FULL / len(picks) + 0.4))
    for ax, layer in zip(axes, picks):
        m = np.array(sim["matrix"][layers.index(layer)])
        sns.heatmap(m, vmin=-1, vmax=1, cmap="vlag", square=True, cbar=False, ax=ax, xticklabels=names,
                    yticklabels=names if ax is axes[0] else False, annot=True, fmt=".1f", annot_kws={"size": 4})
        ax.set_title(f"layer {layer}")
        ax.tick_params(axis="x", rotation=90)
    return save(fig, out, "similarity_layers")
