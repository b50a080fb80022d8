"""Per-run artifact directories and cached stages.

``results/<experiment>/<run_id>/`` holds ``config.json`` and ``metrics.json`` of one experiment
run; the run id carries the config hash and the git commit. Expensive intermediate stages (an
evaluation, an unlearning run, a set of concept vectors) live under ``results/stages/<name>/<hash>/``
keyed on everything that determines them, so experiments share them and an interrupted pipeline
resumes at the first stage without a ``DONE.json``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from interp.io import atomic_write_json, config_hash, ensure_writable_dir, git_commit, read_json

__all__ = ["Stage", "run_dir", "write_run"]


@dataclass
class Stage:
    """A directory whose contents are a pure function of ``key``; complete once ``DONE.json`` exists."""

    results: Path
    name: str
    key: dict

    @property
    def path(self) -> Path:
        return Path(self.results) / "stages" / self.name / config_hash(self.key, 16)

    @property
    def done(self) -> bool:
        marker = self.path / "DONE.json"
        return marker.exists() and read_json(marker).get("key") == _jsonable(self.key)

    def _lock(self):
        from interp.locks import FileLock

        return FileLock(Path(self.results) / "stages" / ".locks" / f"{self.name}-{self.path.name}.lock",
                        f"stage {self.name}/{self.path.name}",
                        hint="wait for that process to finish, or use another results directory")

    def open(self) -> Path:
        """Create the stage directory (clearing a stale one from a different key) and return it.

        The stage stays locked by this process until :meth:`complete` (or until the process exits), so
        two processes never write one stage.

        Raises:
            LockHeldError: another process is writing this stage.
        """
        ensure_writable_dir(Path(self.results) / "stages", "results directory")
        self._lock().acquire()
        if self.path.exists() and (self.path / "DONE.json").exists() and not self.done:
            shutil.rmtree(self.path)  # a hash collision with another key: never reuse it
        ensure_writable_dir(self.path, f"stage directory for {self.name}")
        atomic_write_json(self.path / "key.json", self.key)
        return self.path

    def complete(self, summary: dict | None = None) -> None:
        atomic_write_json(self.path / "DONE.json", {"key": self.key, "commit": git_commit(), **(summary or {})})
        self._lock().release()


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj, default=str))


def run_dir(results: str | Path, experiment: str, cfg: Any) -> Path:
    """``results/<experiment>/<cfg-hash>-<commit>/`` (created)."""
    cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else cfg
    rid = f"{config_hash(cfg_dict, 8)}-{git_commit()}"
    return ensure_writable_dir(Path(results) / experiment / rid, f"run directory for {experiment}")


def write_run(path: Path, cfg: Any, metrics: dict) -> None:
    """Write ``config.json`` and ``metrics.json`` of a finished run, and point ``latest`` at it."""
    atomic_write_json(path / "config.json", cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    atomic_write_json(path / "metrics.json", {"commit": git_commit(), **metrics})
    latest = path.parent / "latest"
    tmp = path.parent / f".latest.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(path.name)
    tmp.replace(latest)
