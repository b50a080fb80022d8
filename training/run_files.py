"""A run directory's files besides the checkpoints (:mod:`training.checkpoint`): its id and default
place, the metrics log, the checks that a resume belongs to the same run, the adapter snapshots of
trajectories, and the run's result.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from interp.io import git_commit
from interp.loading import LoadedModel
from interp.resources import peak_rss_gb  # noqa: F401  re-exported: it lived here
from training.config import RESUME_EXEMPT_FIELDS, UnlearnConfig, config_diff
from training.containment import ConceptGate, Containment, gate_files
from training.distributed import DataParallel
from training.lora import has_adapter, save_adapter

__all__ = [
    "IncompatibleCheckpointError",
    "UnlearnResult",
    "CONTAINMENT_FILE",
    "peak_rss_gb",
    "run_id",
    "default_run_dir",
    "read_metrics",
    "check_resume",
    "check_containment",
    "load_checkpoint_config",
    "snapshot_dir",
    "snapshots",
    "save_snapshot",
]

CONTAINMENT_FILE = "containment.json"
"""Content hashes of a run's given direction / concept vector and its calibrated gate."""


class IncompatibleCheckpointError(ValueError):
    """The run directory holds a checkpoint of a different config (or different data)."""


@dataclass
class UnlearnResult:
    """Where a run's artifacts are and how it went."""

    run_dir: Path
    adapter_dir: Path
    metrics_path: Path
    config: UnlearnConfig
    steps: int
    adapter_id: str
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds_per_step: float = float("nan")
    peak_rss_gb: float = float("nan")
    manifest: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "run_dir": str(self.run_dir), "adapter_dir": str(self.adapter_dir), "steps": self.steps,
            "adapter_id": self.adapter_id, "seconds_per_step": self.seconds_per_step,
            "peak_rss_gb": self.peak_rss_gb, "resumed_from": self.resumed_from, "final": last,
            "config_hash": self.config.hash(),
        }


def run_id(cfg: UnlearnConfig) -> str:
    """``<method>-<targets>-<config hash>-<git commit>``."""
    return f"{cfg.method}-{'+'.join(cfg.target_domains)}-{cfg.hash()}-{git_commit()}"


def default_run_dir(cfg: UnlearnConfig) -> Path:
    return Path(os.environ.get("EMALAB_RESULTS", "results")) / "unlearn" / run_id(cfg)


def read_metrics(path: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` with ``step <= upto``; a torn last line (killed mid-write) is dropped."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
        if upto is None or row["step"] <= upto:
            rows.append(row)
    return rows


def check_resume(cfg: UnlearnConfig, saved: dict[str, Any], where: Path) -> None:
    """Raise :class:`IncompatibleCheckpointError` unless ``saved`` differs from ``cfg`` in resume-exempt fields only."""
    diff = config_diff(saved, cfg, ignore=RESUME_EXEMPT_FIELDS)
    if diff:
        raise IncompatibleCheckpointError(
            f"{where} belongs to a run with a different config; refusing to resume. Differences "
            f"(checkpoint -> requested):\n  " + "\n  ".join(diff)
            + "\nUse another output directory, or delete the old run."
        )


def check_containment(run_dir: Path, containment: Containment) -> None:
    """Raise :class:`IncompatibleCheckpointError` unless the run was trained with these containment inputs."""
    path = run_dir / CONTAINMENT_FILE
    saved = json.loads(path.read_text())["identity"] if path.exists() else {}
    if saved != containment.identity():
        raise IncompatibleCheckpointError(
            f"{run_dir} was trained with other containment inputs ({saved or 'none'}) than the ones given now "
            f"({containment.identity() or 'none'}); use another output directory, or delete the old run.")


def snapshot_dir(run_dir: Path, step: int) -> Path:
    """Where :attr:`UnlearnConfig.snapshot_every` keeps the adapter of ``step``."""
    return Path(run_dir) / "snapshots" / f"step-{step:06d}"


def snapshots(run_dir: Path) -> dict[int, Path]:
    """``{step: adapter directory}`` of a run's complete snapshots, in step order."""
    found = {}
    for d in sorted((Path(run_dir) / "snapshots").glob("step-*")):
        if (d / "adapter_config.json").exists() and d.name[5:].isdigit():
            found[int(d.name[5:])] = d
    return found


def save_snapshot(lm: LoadedModel, cfg: UnlearnConfig, run_dir: Path, step: int, dp: DataParallel,
                  gate: ConceptGate | None = None) -> None:
    """Keep the adapter of ``step`` in :func:`snapshot_dir` (rank 0 writes; every rank waits), with
    the concept gate it is trained through."""
    # Written atomically by rank 0; a resumed run rewrites the same step with the same weights.
    if dp.is_main and has_adapter(lm):
        gate_meta, gate_tensors = gate_files(gate)
        save_adapter(lm, snapshot_dir(run_dir, step), {"config": cfg.to_dict(), "step": step, **gate_meta},
                     gate_tensors)
    dp.barrier()


def load_checkpoint_config(path: Path) -> dict[str, Any]:
    """The config stored in a checkpoint, without loading its tensors."""
    return json.loads((Path(path) / "state.json").read_text())["config"]
