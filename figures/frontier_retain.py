"""Retain sets on the selectivity frontier (H6): the frontier figure of H13, one line per retain
strategy (predicted, each random draw, all, none); the per-domain panels show the retained domains
propped up beside the held-out ones."""

from __future__ import annotations

from pathlib import Path

from figures import frontier

EXPERIMENT = "h6_prediction_guided_retain"


def make(results: Path, out: Path) -> list[Path]:
    return frontier.make(results, out, EXPERIMENT, "frontier_retain")
