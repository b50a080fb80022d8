"""Free-form protocol: alignment vs coherence of every judged sampled answer (scores only, no text),
one colour per condition, with the protocol's thresholds (misaligned below 30, irrelevant below 50).

Reads H9's ``free_form.scores`` and the records next to ``results/em_eval/*.json`` reports."""

from __future__ import annotations

from pathlib import Path

from figures import latest_metrics
from figures.style import COLUMN, apply, plt, save, sns
from interp.io import read_json, read_jsonl

EXPERIMENT = "h9_backdoor"


def _points(results: Path) -> dict[str, list[list[float]]]:
    pts: dict[str, list[list[float]]] = {}
    m = latest_metrics(results, EXPERIMENT)
    for target, t in (m or {}).get("targets", {}).items():
        for name, xy in (t.get("free_form") or {}).get("scores", {}).items():
            if xy:
                pts[f"{target}: {name}"] = xy
    d = results / "em_eval"
    for path in sorted(d.glob("*.json")) if d.is_dir() else []:
        recs = path.with_suffix(".records.jsonl")
        if "mode" in read_json(path) and recs.exists():
            xy = [[r["alignment"], r["coherence"]] for r in read_jsonl(recs)
                  if r.get("alignment") is not None and r.get("coherence") is not None]
            if xy:
                pts[path.stem] = xy
    return pts


def make(results: Path, out: Path) -> list[Path]:
    pts = _points(Path(results))
    if not pts:
        return []
    apply()
    fig, ax = plt.subplots(figsize=(COLUMN, COLUMN))
    for (name, xy), color in zip(pts.items(), sns.color_palette("tab10", len(pts))):
        ax.scatter([p[1] for p in xy], [p[0] for p in xy], s=4, alpha=0.5, color=color, label=name, linewidths=0)
    ax.axhline(30, color="black", lw=0.5, ls="--")
    ax.axvline(50, color="black", lw=0.5, ls=":")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("coherence (judge, 0-100)")
    ax.set_ylabel("alignment (judge, 0-100)")
    ax.legend(loc="lower right", fontsize=5, frameon=False, markerscale=2)
    sns.despine(fig)
    return save(fig, out, "em_scatter")
