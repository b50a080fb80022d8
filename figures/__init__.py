"""Figure scripts: each reads saved results only (``results/<experiment>/latest/metrics.json``, its
experiment named by the script's ``EXPERIMENT``), never loads a model, and uses :mod:`figures.style`.
A script is a figure when it defines ``make(results, out) -> paths``; adding one is adding the file."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from interp.io import read_json

__all__ = ["FIGURES", "figure_scripts", "make_all", "latest_metrics"]


def figure_scripts() -> tuple[str, ...]:
    """Modules of this package that define a top-level ``make``, by name (read, not imported)."""
    names = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if not path.stem.startswith("_") and any(isinstance(n, ast.FunctionDef) and n.name == "make"
                                                 for n in tree.body):
            names.append(path.stem)
    return tuple(names)


FIGURES = figure_scripts()


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
