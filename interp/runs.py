"""Per-run artifact directories and cached stages.

``results/<experiment>/<run_id>/`` holds ``config.json`` and ``metrics.json`` of one experiment
run; the run id carries the config hash and the git commit. Expensive intermediate stages (an
evaluation, an unlearning run, a set of concept vectors) live under ``results/stages/<name>/<hash>/``
keyed on everything that determines them, so experiments share them and an interrupted pipeline
resumes at the first stage without a ``DONE.json``.

"Everything" includes the code that computes a stage and the prompt suite it reads: each key gets
a ``_code`` entry, the digest of the source files of the modules listed for that stage in
:data:`STAGE_CODE` (the whole library for a stage not listed) and of the suite's data files. A fixed
judge or a rebuilt suite therefore recomputes the stages it affects, and says so once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from interp.io import atomic_write_json, config_hash, ensure_writable_dir, git_commit, read_json
from interp.resources import peak_rss_gb, rss_gb

__all__ = ["Stage", "STAGE_CODE", "LIBRARY", "code_version", "run_dir", "write_run"]

LIBRARY: tuple[str, ...] = ("interp", "evals", "study", "probes", "training")
"""The measuring code: a stage with no entry in :data:`STAGE_CODE` is keyed on all of it."""

# The judge is several modules (evals.judge is the seam that re-exports them); all of them label.
_GENERATION = ("interp.loading", "interp.chat", "interp.generate", "evals.judge", "evals.judgement",
               "evals.coherence", "evals.opening", "evals.rebuttal", "evals.keyword_judge", "evals.model_judge",
               "evals.suite")
# The adapter is the site mapping (interp.adapter) on the module-tree basics and the family discovery,
# and a gated LoRA adapter's per-row scaling (interp.gating).
_ADAPTER = ("interp.adapter", "interp.module_tree", "interp.family_discovery", "interp.gating")
# How a saved adapter is put on the measurement model: loaded, merged (or left unmerged for memory) and
# restored (training.lora), or run through its concept gate (training.concept_gate); every stage that
# measures an adapter runs them.
_ADAPTER_LOAD = ("training.lora", "training.concept_gate")
# The evaluation is the loop (evals.evaluate), its result types and its per-row statistics.
_EVALUATION = ("evals.evaluate", "evals.report_types", "evals.domain_summary", "evals.refusal", "evals.utility")
STAGE_CODE: dict[str, tuple[str, ...]] = {
    "eval": (*_GENERATION, *_EVALUATION, "interp.prefix", *_ADAPTER, *_ADAPTER_LOAD),
    "eval_sets": (*_GENERATION, *_EVALUATION, "interp.prefix", *_ADAPTER, *_ADAPTER_LOAD),
    # The logit score alone (trajectories): no generation, no judge, so a judge fix keeps these.
    "eval_sets_logit": ("interp.loading", "interp.chat", "interp.prefix", *_ADAPTER, "evals.suite",
                        *_EVALUATION, *_ADAPTER_LOAD),
    "activations": ("interp.loading", "interp.chat", "evals.suite", *_ADAPTER, *_ADAPTER_LOAD, "interp.activations"),
    "unlearn": (*_GENERATION, *_ADAPTER, "evals.refusal", "training"),
    "refusal_direction": (*_GENERATION, *_ADAPTER, "interp.activations", "evals.refusal", "probes"),
    "gate_accuracy": ("interp.loading", "interp.chat", "interp.activations", *_ADAPTER, "evals.suite",
                      "training.containment", "training.concept_gate"),
}
"""Modules (or whole packages) whose source determines each library stage's output."""

_DATA = "evals/data/suite"
_ROOT = Path(__file__).resolve().parents[1]
_announced: set[str] = set()


def _module_files(module: str) -> list[Path]:
    base = _ROOT.joinpath(*module.split("."))
    if base.is_dir():
        return sorted(p for p in base.rglob("*.py") if "__pycache__" not in p.parts)
    path = base.with_suffix(".py")
    if not path.exists():
        raise ValueError(f"stage code module {module!r} has no source file at {path}; name a module of "
                         f"{', '.join(LIBRARY)} (or a file under {_ROOT})")
    return [path]


@lru_cache(maxsize=None)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    # Keyed on size and mtime so that an edited file is read again, an unchanged one never twice.
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        st = path.stat()
        h.update(str(path.relative_to(_ROOT)).encode())
        h.update(_file_digest(path, st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def code_version(name: str, modules: tuple[str, ...] | None = None) -> str:
    """Digest of the source that computes stage ``name`` and of the suite data it reads."""
    modules = modules if modules is not None else STAGE_CODE.get(name, LIBRARY)
    files = {f for m in modules for f in _module_files(m)}
    files |= {p for p in (_ROOT / _DATA).glob("*") if p.is_file()}
    return _digest(sorted(files))


@dataclass
class Stage:
    """A directory whose contents are a pure function of ``key`` and of the code that computes it;
    complete once ``DONE.json`` exists.

    ``code`` names the modules whose source determines the stage (default :data:`STAGE_CODE` by
    ``name``, else the whole library); their digest joins the key as ``_code``.
    """

    results: Path
    name: str
    key: dict
    code: tuple[str, ...] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if "_code" in self.key:
            raise ValueError("'_code' is reserved in a stage key: Stage adds the code version itself")
        self._input_key = self.key
        self.key = {**self.key, "_code": code_version(self.name, self.code)}

    @property
    def path(self) -> Path:
        return Path(self.results) / "stages" / self.name / config_hash(self.key, 16)

    @property
    def _index(self) -> Path:
        return Path(self.results) / "stages" / self.name / "code_versions.json"

    def _announce_code_change(self) -> None:
        """Say once per stage name and process that cached results were made by other code."""
        index = read_json(self._index) if self._index.exists() else {}
        before = index.get(config_hash(self._input_key, 16))
        if before and before != self.key["_code"] and self.name not in _announced:
            _announced.add(self.name)
            print(f"stage {self.name}: the code or suite that computes it changed since the cached result "
                  f"({before} -> {self.key['_code']}); recomputing", file=sys.stderr)

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
        self._announce_code_change()
        ensure_writable_dir(self.path, f"stage directory for {self.name}")
        atomic_write_json(self.path / "key.json", self.key)
        self._opened = time.perf_counter()
        return self.path

    def complete(self, summary: dict | None = None) -> None:
        # What the stage cost, for the README's costs and for sizing a machine: its wall time and the
        # process's resident memory (the peak is the process's so far: it rises at the stage that needed it).
        cost = {"peak_rss_gb": round(peak_rss_gb(), 2)}
        if (now := rss_gb()) is not None:
            cost["rss_gb"] = round(now, 2)
        if (opened := getattr(self, "_opened", None)) is not None:
            cost["seconds"] = round(time.perf_counter() - opened, 1)
        atomic_write_json(self.path / "DONE.json", {"key": self.key, "commit": git_commit(), "cost": cost,
                                                    **(summary or {})})
        index = read_json(self._index) if self._index.exists() else {}
        index[config_hash(self._input_key, 16)] = self.key["_code"]
        atomic_write_json(self._index, index)
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
