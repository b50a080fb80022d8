"""Per-domain refusal drop (with 95% CIs) for each target: NPO, NPO + retain-CE at the study's α and
at each swept α, and LoRA-SFT, as H4 ran them. One legend names every condition drawn in any panel."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures import latest_metrics
from figures.style import COLUMN, DOMAIN_LABELS, apply, plt, save, sns

EXPERIMENT = "h4_retain_contains_ema"

COLORS = {"npo": "#c0392b", "npo_retain": "#2980b9", "sft": "#7f8c8d"}
LABELS = {"npo": "NPO", "npo_retain": "NPO + retain-CE", "sft": "LoRA-SFT"}
SWEEP = "npo_retain_a"


def label(cond: str) -> str:
    """Legend text of an H4 condition name (``npo_retain_a30`` → ``NPO + retain-CE, α=30``)."""
    if cond.startswith(SWEEP):
        return f"{LABELS['npo_retain']}, α={cond.removeprefix(SWEEP)}"
    return LABELS.get(cond, cond)


def _colors(conds: list[str]) -> dict[str, tuple]:
    sweep = sorted((c for c in conds if c.startswith(SWEEP)), key=lambda c: float(c.removeprefix(SWEEP)))
    out = {c: COLORS[c] for c in conds if c in COLORS}
    out.update(zip(sweep, sns.color_palette("crest", len(sweep) + 1)[1:]))
    others = [c for c in conds if c not in out]
    out.update(zip(others, sns.color_palette("Set2", len(others))))
    return out


def draw(metrics: dict):
    """The figure for H4's metrics (not saved)."""
    targets = metrics["targets"]
    order = list(dict.fromkeys(c for m in targets.values() for c in m["conditions"]))
    colors = _colors(order)
    fig, axes = plt.subplots(1, len(targets), figsize=(COLUMN * len(targets), 2.4), sharey=True, squeeze=False)
    handles = {}
    for ax, (target, m) in zip(axes[0], targets.items()):
        conds = [c for c in order if c in m["conditions"]]
        domains = list(m["conditions"][conds[0]])
        width = 0.8 / len(conds)
        x = np.arange(len(domains))
        for k, cond in enumerate(conds):
            rows = m["conditions"][cond]
            drop = np.array([rows[d]["drop"] for d in domains])
            lo = drop - np.array([rows[d]["ci"][0] for d in domains])
            hi = np.array([rows[d]["ci"][1] for d in domains]) - drop
            bars = ax.bar(x + (k - (len(conds) - 1) / 2) * width, drop, width, yerr=[lo, hi], capsize=1.5,
                          color=colors[cond], label=label(cond), error_kw={"lw": 0.6})
            handles.setdefault(cond, bars)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xticks(x, [DOMAIN_LABELS.get(d, d) + ("*" if d == target else "") for d in domains], rotation=45,
                      ha="right")
        ax.set_title(f"target: {DOMAIN_LABELS.get(target, target)} (* = target)")
        ax.set_ylabel("refusal drop (base − after)")
    fig.legend([handles[c] for c in order], [label(c) for c in order], loc="upper left",
               bbox_to_anchor=(1.0, 0.95), frameon=False)
    sns.despine(fig)
    return fig


def make(results: Path, out: Path) -> list[Path]:
    metrics = latest_metrics(results, EXPERIMENT)
    if metrics is None:
        return []
    apply()
    return save(draw(metrics), out, "ema_drops")
