"""H12: geometry of the compliance shift (cross-layer cosine, cosine with the refusal direction) and
how much refusal subtracting each direction returns in each unlearned model (own / other source /
random / benign-shift controls)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures import latest_metrics
from figures.style import DOMAIN_LABELS, FULL, apply, plt, save, sns

EXPERIMENT = "h12_misalignment_directions"


def make(results: Path, out: Path) -> list[Path]:
    metrics = latest_metrics(results, EXPERIMENT)
    if metrics is None or not metrics.get("geometry"):
        return []
    apply()
    sources = metrics["sources"]
    fig, axes = plt.subplots(2, max(2, len(sources)), figsize=(FULL, 4.6), squeeze=False)
    for ax, s in zip(axes[0], sources):
        m = np.array(metrics["geometry"][s]["cross_layer_cosine"])
        sns.heatmap(m, vmin=-1, vmax=1, cmap="vlag", ax=ax, square=True, cbar_kws={"label": "cosine", "shrink": 0.7},
                    xticklabels=4, yticklabels=4)
        ax.set(title=f"shift of NPO-{DOMAIN_LABELS.get(s, s)}: cross-layer cosine", xlabel="layer", ylabel="layer")
    ax = axes[1][0]
    layers = metrics["layers"]
    for s in sources:
        ax.plot(layers, metrics["geometry"][s]["cosine_refusal"], label=f"{DOMAIN_LABELS.get(s, s)} shift · refusal")
    for key, vals in metrics["between_sources"].items():
        a, b = key.split("|")
        ax.plot(layers, vals, ls="--", color="0.4", label=f"{DOMAIN_LABELS.get(a, a)} · {DOMAIN_LABELS.get(b, b)} shift")
    if metrics.get("refusal_direction") is not None:
        ax.axvline(metrics["refusal_direction"], color="0.7", lw=0.6)
    ax.axhline(0, color="black", lw=0.6)
    ax.set(xlabel="layer", ylabel="cosine", title="shift vs refusal direction / each other", ylim=(-1, 1))
    ax.legend(frameon=False, fontsize=5)
    ax = axes[1][1]
    models = list(metrics["transfer"])
    kinds = [*sources, *(k for k in ("random", "benign") if k in metrics["transfer"][models[0]])]
    width = 0.8 / len(kinds)
    palette = dict(zip(kinds, [*sns.color_palette("deep", len(sources)), (0.6, 0.6, 0.6), (0.8, 0.75, 0.6)]))
    for k, kind in enumerate(kinds):
        rows = [metrics["transfer"][m][kind]["pooled_returned"] for m in models]
        mean = np.array([r["mean_diff"] or 0.0 for r in rows])
        err = [mean - np.array([r["ci_low"] if r["ci_low"] is not None else 0.0 for r in rows]),
               np.array([r["ci_high"] if r["ci_high"] is not None else 0.0 for r in rows]) - mean]
        ax.bar(np.arange(len(models)) + (k - (len(kinds) - 1) / 2) * width, mean, width, yerr=err, capsize=1.5,
               color=palette[kind], label=f"subtract {DOMAIN_LABELS.get(kind, kind)}"
               + (" shift" if kind in sources else " control"), error_kw={"lw": 0.6})
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(np.arange(len(models)), [f"NPO-{DOMAIN_LABELS.get(m, m)}" for m in models])
    ax.set(ylabel="refusal log-odds returned", title=f"transfer: subtracted at resid_post[{metrics.get('layer')}]")
    ax.legend(frameon=False, fontsize=5)
    for extra in axes[0][len(sources):]:
        extra.axis("off")
    for extra in axes[1][2:]:
        extra.axis("off")
    return save(fig, out, "misalignment_directions")
