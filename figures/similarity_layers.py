"""Concept-vector cosine similarity at a few layers (early, middle, late), from H5's saved matrices,
and, where H5 saved it, the split-half reliability of the vectors per layer (with its bar)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures import latest_metrics
from figures.style import DOMAIN_LABELS, FULL, apply, plt, save, sns

EXPERIMENT = "h5_geometry_predicts_ema"


def make(results: Path, out: Path) -> list[Path]:
    metrics = latest_metrics(results, EXPERIMENT)
    if metrics is None or "similarity" not in metrics:
        return []
    apply()
    sim = metrics["similarity"]
    layers = sim["layers"]
    picks = sorted({layers[0], layers[len(layers) // 6], layers[len(layers) // 2], layers[-1]})
    names = [DOMAIN_LABELS.get(n, n) for n in sim["names"]]
    rel = metrics.get("reliability")
    n_axes = len(picks) + (1 if rel else 0)
    fig, axes = plt.subplots(1, n_axes, figsize=(FULL, FULL / len(picks) + 0.4))
    for ax, layer in zip(axes, picks):
        m = np.array(sim["matrix"][layers.index(layer)])
        sns.heatmap(m, vmin=-1, vmax=1, cmap="vlag", square=True, cbar=False, ax=ax, xticklabels=names,
                    yticklabels=names if ax is axes[0] else False, annot=True, fmt=".1f", annot_kws={"size": 4})
        ax.set_title(f"layer {layer}")
        ax.tick_params(axis="x", rotation=90)
    if rel:
        ax = axes[-1]
        ax.plot(layers[:len(rel["per_layer"])], rel["per_layer"], color="0.2", lw=1)
        ax.axhline(rel["min"], color="#c0392b", lw=0.6, ls="--")
        ax.set(ylim=(-1, 1), xlabel="layer", title="split-half reliability")
    return save(fig, out, "similarity_layers")
