"""Containment methods on the selectivity frontier (H14): the frontier figure of H13, one line per
retain term (KL, representation, direction, CE) and NPO alone."""

from __future__ import annotations

from pathlib import Path

from figures import frontier

EXPERIMENT = "h14_containment_frontier"


def make(results: Path, out: Path) -> list[Path]:
    return frontier.make(results, out, EXPERIMENT, "frontier_containment")
