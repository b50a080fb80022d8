"""Resumable training checkpoints, written atomically.

A checkpoint is a directory ``<run>/checkpoints/step-000012/`` holding the trainable weights
(``trainable.safetensors``), the optimizer state (``optimizer.pt``), and ``state.json`` with the
step, data position, scheduler state, RNG states and the run config. It is assembled in a hidden
temporary directory and renamed into place, so a directory named ``step-*`` is always complete: a
kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from interp.io import atomic_write_json, read_json
from interp.locks import FileLock

__all__ = [
    "Checkpoint",
    "capture_rng",
    "restore_rng",
    "save_checkpoint",
    "latest_checkpoint",
    "load_checkpoint",
    "checkpoint_dirs",
    "run_dir_lock",
]

_PREFIX = "step-"


@dataclass
class Checkpoint:
    """Everything needed to continue a run exactly where it stopped."""

    path: Path
    step: int
    """Completed optimiser steps."""
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    data_position: dict[str, int]
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as JSON-able values."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    out = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def run_dir_lock(run_dir: str | Path) -> FileLock | contextlib.AbstractContextManager:
    """The lock one process holds while it writes (or wipes) a run directory; a second one fails fast.

    Under a data-parallel launcher (``WORLD_SIZE`` > 1) the ranks of one job share the directory and
    only rank 0 writes it, so only rank 0 takes the lock; the other ranks get a no-op.
    """
    run_dir = Path(run_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return FileLock(run_dir / ".emalab.lock", f"run directory {run_dir}",
                    hint="wait for that run to finish, or pass another --out")


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit():
            found.append((int(p.name[len(_PREFIX):]), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    data_position: dict[str, int],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
    keep: int = 2,
) -> Path:
    """Write a checkpoint atomically and prune all but the newest ``keep``.

    Args:
        rng: RNG states to store; default: the current ones (call right after the step).
    """
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    # The pid in the name lets a later save tell a dead writer's leftovers from a live writer's work.
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".tmp-{_PREFIX}{step:06d}-{os.getpid()}-"))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer, tmp / "optimizer.pt")
        atomic_write_json(tmp / "state.json", {
            "step": step, "data_position": data_position, "scheduler": scheduler,
            "rng": rng if rng is not None else capture_rng(), "config": config, "extra": extra or {},
        })
        for f in tmp.iterdir():  # flush file contents before the rename publishes them
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # re-saving the same step (e.g. a final save after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # leftovers of a kill during an earlier save
        if not _writer_alive(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _writer_alive(tmp_name: str) -> bool:
    """Whether the process that named ``.tmp-step-NNNNNN-<pid>-…`` still runs (never our own leftovers)."""
    parts = tmp_name.split("-")
    if len(parts) < 5 or not parts[3].isdigit():
        return False  # the pre-pid naming: always a leftover
    pid = int(parts[3])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def load_checkpoint(path: str | Path) -> Checkpoint:
    from safetensors.torch import load_file

    path = Path(path)
    state = read_json(path / "state.json")
    return Checkpoint(
        path=path,
        step=int(state["step"]),
        trainable=load_file(str(path / "trainable.safetensors")),
        optimizer=torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True),
        scheduler=state["scheduler"],
        rng=state["rng"],
        data_position=state["data_position"],
        config=state["config"],
        extra=state.get("extra", {}),
    )
