"""Training curves (total loss and components) of the H4 unlearning runs, from their metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

from figures import latest_metrics
from figures.style import FULL, apply, plt, save
from interp.io import read_jsonl

EXPERIMENT = "h4_retain_contains_ema"


def make(results: Path, out: Path) -> list[Path]:
    metrics = latest_metrics(results, EXPERIMENT)
    if metrics is None:
        return []
    apply()
    targets = metrics["targets"]
    fig, axes = plt.subplots(1, len(targets), figsize=(FULL, 2.2), squeeze=False)
    for ax, (target, m) in zip(axes[0], targets.items()):
        for cond, runs in m["runs"].items():
            path = Path(runs[0]) / "metrics.jsonl"
            if not path.exists():
                continue
            rows = [r for r in read_jsonl(path) if "step" in r]
            for key in ("forget", "retain", "sft"):
                ys = [(r["step"], r["losses"][key]) for r in rows if key in r.get("losses", {})]
                if ys:
                    ax.plot(*zip(*ys), lw=1, label=f"{cond}: {key}")
        ax.set(title=f"target: {target}", xlabel="step", ylabel="loss")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize=5)
    return save(fig, out, "training_curves")
