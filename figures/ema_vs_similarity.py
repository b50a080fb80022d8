"""EMA vs concept similarity to the target (H5): one column per depth band, one row per drop measure,
with the plain and the partial Spearman ρ (base refusal controlled; permutations within target) and
each band's split-half reliability. The pre-registered primary measure is marked."""

from __future__ import annotations

from pathlib import Path

from figures import latest_metrics
from figures.style import DOMAIN_LABELS, FULL, apply, plt, save, sns

EXPERIMENT = "h5_geometry_predicts_ema"

MEASURES = (("logit", "log-odds drop"), ("judge", "refusal drop (judge)"), ("relative", "drop / base rate"))


def _fmt(x, spec: str = ".2f") -> str:
    return "–" if x is None else format(x, spec)


def make(results: Path, out: Path) -> list[Path]:
    metrics = latest_metrics(results, EXPERIMENT)
    if metrics is None:
        return []
    apply()
    bands = list(metrics["bands"])
    pts = metrics["points"]
    measures = [(m, label) for m, label in MEASURES if all(f"drop_{m}" in p for p in pts)
                and all(m in metrics["bands"][b] for b in bands)]
    fig, grid = plt.subplots(len(measures), len(bands), figsize=(FULL, 2.1 * len(measures)), sharex="col",
                             sharey="row", squeeze=False)
    targets = sorted({p["target"] for p in pts})
    palette = dict(zip(targets, sns.color_palette("deep", len(targets))))
    for i, (row, (measure, ylabel)) in enumerate(zip(grid, measures)):
        for ax, band in zip(row, bands):
            for p in pts:
                y = p[f"drop_{measure}"]
                if y is None:
                    continue
                ax.scatter(p["similarity"][band], y, color=palette[p["target"]], s=14)
                ax.annotate(DOMAIN_LABELS.get(p["domain"], p["domain"]), (p["similarity"][band], y),
                            fontsize=5, xytext=(2, 2), textcoords="offset points")
            b = metrics["bands"][band]
            c = b[measure]
            title = (f"ρ={_fmt(c['spearman'])}, partial {_fmt(c.get('partial'))} "
                     f"(p={_fmt(c.get('p_perm_partial'), '.3f')})")
            if i == 0:
                rel = b.get("reliability")
                title = (f"{band} L{b['layers'][0]}–{b['layers'][-1]}, reliability {_fmt(rel)}\n" + title)
            ax.set_title(title, fontsize=6)
        row[0].set_ylabel(ylabel + (" (primary)" if measure == metrics.get("primary") else ""))
    for ax in grid[-1]:
        ax.set_xlabel("cosine to target concept")
    for t in targets:
        grid[0][-1].scatter([], [], color=palette[t], label=f"target: {DOMAIN_LABELS.get(t, t)}", s=14)
    grid[0][-1].legend(frameon=False, loc="best", fontsize=5)
    fig.tight_layout()
    return save(fig, out, "ema_vs_similarity")
