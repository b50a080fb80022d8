"""The 7×7 transfer matrix of refusal drops beside the early-layer similarity matrix (H8)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures import latest_metrics
from figures.style import DOMAIN_LABELS, FULL, apply, plt, save, sns

EXPERIMENT = "h8_transfer_matrix"


def make(results: Path, out: Path) -> list[Path]:
    metrics = latest_metrics(results, EXPERIMENT)
    if metrics is None:
        return []
    apply()
    rows, cols = metrics["rows"], metrics["cols"]
    drops = np.array([[metrics["drop_judge"][r][c] for c in cols] for r in rows])
    sims = np.array([[metrics["similarity"]["early"][r][c] for c in cols] for r in rows])
    labels_r = [DOMAIN_LABELS.get(r, r) for r in rows]
    labels_c = [DOMAIN_LABELS.get(c, c) for c in cols]
    fig, axes = plt.subplots(1, 2, figsize=(FULL, 3.0))
    sns.heatmap(drops, annot=True, fmt=".2f", cmap="rocket_r", ax=axes[0], xticklabels=labels_c, yticklabels=labels_r,
                annot_kws={"size": 5}, cbar_kws={"label": "refusal drop"})
    axes[0].set(title="Refusal drop: unlearn row → eval column", ylabel="unlearned domain")
    sns.heatmap(sims, annot=True, fmt=".2f", cmap="vlag", vmin=-1, vmax=1, ax=axes[1], xticklabels=labels_c,
                yticklabels=labels_r, annot_kws={"size": 5}, cbar_kws={"label": "cosine"})
    c = metrics["correlation"]["early"]["judge"]
    axes[1].set(title=f"Early-layer similarity (ρ={c['spearman']:.2f}, p={c['p_perm_spearman']:.3f})")
    return save(fig, out, "transfer_matrix")
