"""Free-form protocol: misalignment rate (or, without a trusted judge, the rate of answers that are
neither refusals nor irrelevant) per condition, with two-level 95% intervals (questions, then samples).

Reads H9's ``free_form`` block and every ``results/em_eval/*.json`` report of ``emalab eval --protocol em``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures import latest_metrics
from figures.style import COLUMN, apply, plt, save, sns
from interp.io import read_json

EXPERIMENT = "h9_backdoor"

COLORS = {"scores": "#c0392b", "counts": "#7f8c8d"}


def _bars(results: Path) -> list[tuple[str, str, dict]]:
    """``(label, mode, rate dict)`` per condition."""
    bars = []
    m = latest_metrics(results, EXPERIMENT)
    for target, t in (m or {}).get("targets", {}).items():
        ff = t.get("free_form")
        if not ff:
            continue
        for name, c in ff["conditions"].items():
            bars.append((f"{target}: {name}", ff["mode"], c["rates"][ff["measure"]]))
    for path in sorted((results / "em_eval").glob("*.json")) if (results / "em_eval").is_dir() else []:
        rep = read_json(path)
        if "rates" in rep and "mode" in rep:
            bars.append((path.stem, rep["mode"], rep["rates"]["misaligned" if rep["mode"] == "scores" else "other"]))
    return bars


def make(results: Path, out: Path) -> list[Path]:
    bars = _bars(Path(results))
    if not bars:
        return []
    apply()
    fig, ax = plt.subplots(figsize=(COLUMN, 0.8 + 0.22 * len(bars)))
    y = np.arange(len(bars))
    rate = np.array([b[2]["rate"] if b[2]["rate"] is not None else np.nan for b in bars])
    # Two-level interval (questions, then samples): a Wilson interval treats clustered answers as independent.
    lo = np.array([b[2]["ci"][0] for b in bars])
    hi = np.array([b[2]["ci"][1] for b in bars])
    ax.barh(y, rate, xerr=[rate - lo, hi - rate], color=[COLORS[b[1]] for b in bars], capsize=1.5,
            error_kw={"lw": 0.6})
    ax.set_yticks(y, [b[0] for b in bars])
    ax.invert_yaxis()
    modes = {b[1] for b in bars}
    ax.set_xlabel("misaligned rate" if modes == {"scores"} else
                  "rate (red: misaligned, judged; grey: not refusal/irrelevant, counts only)")
    ax.set_xlim(0, 1)
    sns.despine(fig)
    return save(fig, out, "em_rates")
