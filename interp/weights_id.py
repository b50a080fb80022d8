"""Content keys for model weights: what a cached stage is keyed on, so a retrained checkpoint recomputes.

A local directory is identified by the SHA-256 of its weight and config files' contents; each file's digest
is cached by (absolute path, size, mtime) so a 15 GB checkpoint is hashed once, not on every load. A hub
model is identified by the commit its files resolve to (``--revision``, else the branch head at load time).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from interp.io import atomic_write_json, sha256_file

__all__ = ["WEIGHT_SUFFIXES", "local_weights_id", "hub_commit", "file_digest"]

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
"""Files whose contents are weights; ``config.json`` is hashed too (it changes the computation)."""
_CONFIG_FILES = ("config.json", "generation_config.json")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def _cache_file() -> Path:
    from interp.registry import cache_root

    return cache_root() / "weights_digests.json"


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or corrupt: the digests are recomputed, never trusted blindly


def file_digest(path: str | Path, cache: dict | None = None) -> str:
    """SHA-256 of one file, reused from ``cache`` when its path, size and mtime are unchanged."""
    path = Path(path).resolve()
    st = path.stat()
    key = str(path)
    stamp = [st.st_size, st.st_mtime_ns]
    if cache is not None and cache.get(key, {}).get("stamp") == stamp:
        return cache[key]["sha256"]
    digest = sha256_file(path)
    if cache is not None:
        cache[key] = {"stamp": stamp, "sha256": digest}
    return digest


def local_weights_id(directory: str | Path, length: int = 16, cache_path: str | Path | None = None) -> str:
    """Hash of a model directory's weight and config files (names and contents).

    Args:
        cache_path: where per-file digests are kept (default ``<emalab cache>/weights_digests.json``).

    Raises:
        FileNotFoundError: the directory holds no weight file.
    """
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
                   and (p.suffix in WEIGHT_SUFFIXES or p.name in _CONFIG_FILES))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise FileNotFoundError(f"{directory} holds no weight file ({', '.join(WEIGHT_SUFFIXES)})")
    cache_path = Path(cache_path) if cache_path is not None else _cache_file()
    cache = _read_cache(cache_path)
    before = json.dumps(cache, sort_keys=True)
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(directory).as_posix()}\0{file_digest(p, cache)}\n".encode())
    if json.dumps(cache, sort_keys=True) != before:
        try:
            atomic_write_json(cache_path, cache)
        except OSError:
            pass  # a read-only cache only costs rehashing next time
    return h.hexdigest()[:length]


def hub_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit a hub model's files resolve to (from the local hub cache when offline).

    Raises:
        OSError: the hub is unreachable and nothing is cached for ``repo_id`` at ``revision``.
    """
    if revision and _COMMIT.match(revision):
        return revision
    from huggingface_hub import hf_hub_download

    config = hf_hub_download(repo_id, "config.json", revision=revision,
                             local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1")
    # The hub cache lays files out as .../snapshots/<commit>/<file>.
    commit = Path(config).parent.name
    return commit if _COMMIT.match(commit) else f"{revision or 'main'}@unknown"
