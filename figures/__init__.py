"""Figure scripts: each reads saved results only (``results/<experiment>/latest/metrics.json``),
never loads a model, and uses :mod:`figures.style`."""

from __future__ import annotations

import importlib
from pathlib import Path

from interp.io import read_json

__all__ = ["FIGURES", "make_all", "latest_metrics"]

FIGURES = ("refusal_heatmap", "ema_drops", "similarity_layers", "ema_vs_similarity", "transfer_matrix",
           "training_curves", "refusal_projection", "backdoor", "prior_vs_ema", "misalignment_directions",
           "em_rates", "em_scatter", "frontier")


def latest_metrics(results: Path, experiment: str) -> dict | None:
    """The metrics of the newest run of ``experiment``, or None if it has not been run."""
    path = Path(results) / experiment / "latest" / "metrics.json"
    return read_json(path) if path.exists() else None


def make_all(results: str | Path) -> list[Path]:
    """Regenerate every figure whose inputs exist; returns the written paths."""
    results = Path(results)
    out = results / "figures"
    paths: list[Path] = []
    for name in FIGURES:
        try:
            module = importlib.import_module(f"figures.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"figures.{name}":
                continue
            raise
        paths += module.make(results, out)
    return paths
