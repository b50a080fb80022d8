"""Atomic file writes, strict JSONL reading, config hashing and run provenance."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows: appends are not locked
    fcntl = None

__all__ = [
    "MalformedFileError",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
    "load_safetensors",
    "read_json",
    "read_jsonl",
    "write_jsonl",
    "append_jsonl",
    "config_hash",
    "git_commit",
    "sha256_file",
    "ensure_writable_dir",
    "check_not_input",
    "shared_mode",
]


class MalformedFileError(ValueError):
    """A data file could not be parsed; the message names the file and line."""


def ensure_writable_dir(path: str | Path, what: str = "directory") -> Path:
    """Create ``path`` if needed and check that it is writable, with an error that names the fix."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        try:
            # A few blocks, not zero bytes: an empty file can still be created on a full disk.
            with probe.open("wb") as fh:
                fh.write(b"\0" * 65536)
                fh.flush()
                os.fsync(fh.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as err:
        raise PermissionError(
            f"{what} {path} is not writable ({err.strerror}); point it elsewhere "
            f"(e.g. set EMALAB_CACHE or pass --out) or free space there"
        ) from err
    return path


def shared_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file (or directory) under the current umask.

    ``mkstemp``/``mkdtemp`` create 0600/0700 entries; renamed into place they would lock a cache
    shared by a group out of it, so temporary files get the ordinary mode before they are published.
    """
    old = os.umask(0)
    os.umask(old)
    return (0o777 if directory else 0o666) & ~old


def check_not_input(out: str | Path, *inputs: str | Path, flag: str = "--out") -> Path:
    """Raise if ``out`` is one of ``inputs`` (same file, through links too): a write would destroy its input."""
    out = Path(out)
    for src in inputs:
        src = Path(src)
        same = out.resolve() == src.resolve()
        if not same and out.exists() and src.exists():
            same = os.path.samefile(out, src)
        if same:
            raise ValueError(f"the output {out} is the input {src}; it would be overwritten: pass another {flag}")
    return out


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file and rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name keeps concurrent writers (and their leftovers) apart.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, shared_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {k: _to_jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return obj


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_safetensors(path: str | Path, file_format: str | None = None, what: str = "safetensors",
                     missing_hint: str = "") -> tuple[dict, dict[str, str]]:
    """Tensors (name → torch tensor) and string header of a file written by :func:`atomic_save_safetensors`.

    Args:
        file_format: the header's ``format`` entry must equal this (an emalab file kind).
        what: names the file kind in the error.
        missing_hint: appended to the error when the file does not exist.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the header's ``format`` is not ``file_format``.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist{missing_hint}")
    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata() or {}
        if file_format is not None and header.get("format") != file_format:
            raise ValueError(f"{path} is not an emalab {what} file (format {header.get('format')!r})")
        return {k: fh.get_tensor(k) for k in fh.keys()}, header


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        line = path.read_bytes()[:err.start].count(b"\n") + 1
        raise MalformedFileError(f"{path}: line {line}: not UTF-8 text; re-save the file as UTF-8") from err
    except json.JSONDecodeError as err:
        raise MalformedFileError(
            f"{path}: line {err.lineno}, column {err.colno}: invalid JSON ({err.msg}); fix or delete the file"
        ) from err


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of a UTF-8 file; a bad byte is an error naming its line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise MalformedFileError(f"{path}:{lineno}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                                         f"{err.start + 1}); re-save the file as UTF-8") from err


def read_jsonl(path: str | Path, required: Iterable[str] = (), torn_tail: bool = False) -> list[dict]:
    """Read a JSONL file strictly: every non-blank line must be a JSON object with ``required`` keys.

    Args:
        torn_tail: drop an unparsable *last* line that lacks its newline (an append cut short by a
            kill or a full disk) instead of failing; for logs written with :func:`append_jsonl`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; pass a JSONL file")
    required = tuple(required)
    rows: list[dict] = []
    for lineno, line in _decoded_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError, ValueError) as err:
            if torn_tail and not line.endswith("\n"):
                break  # only the last line can lack its newline
            msg = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
            raise MalformedFileError(f"{path}:{lineno}: invalid JSON ({msg}); fix or delete this line") from err
        if not isinstance(row, dict):
            raise MalformedFileError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise MalformedFileError(f"{path}:{lineno}: missing required field(s) {missing}")
        rows.append(row)
    return rows


def _jsonl_lines(rows: Iterable[dict]) -> Iterator[str]:
    for row in rows:
        yield json.dumps(_to_jsonable(row), ensure_ascii=False) + "\n"


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(_jsonl_lines(rows)))


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one row to a log, repairing a torn last line first.

    A kill or a full disk can leave the last line without its newline; appending after it would
    glue two rows into one unparsable line. The torn fragment is cut off (it never was a row), and
    the append holds an exclusive lock so concurrent writers never interleave.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = next(_jsonl_lines([row])).encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, shared_mode())
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.lseek(fd, 0, os.SEEK_END)
        if size:
            os.lseek(fd, size - 1, os.SEEK_SET)
            if os.read(fd, 1) != b"\n":
                start = _last_newline_end(fd, size)
                os.lseek(fd, start, os.SEEK_SET)
                tail = os.read(fd, size - start)
                try:
                    json.loads(tail)  # a whole row that only lacks its newline is kept
                    os.write(fd, b"\n")
                except ValueError:
                    os.ftruncate(fd, start)
        os.lseek(fd, 0, os.SEEK_END)
        os.write(fd, line)
    finally:
        os.close(fd)  # closing releases the flock


def _last_newline_end(fd: int, size: int, chunk: int = 1 << 16) -> int:
    """Offset just past the last ``\\n`` before ``size`` (0 if there is none)."""
    pos = size
    while pos > 0:
        start = max(0, pos - chunk)
        os.lseek(fd, start, os.SEEK_SET)
        block = os.read(fd, pos - start)
        i = block.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def config_hash(obj: Any, length: int = 12) -> str:
    """A stable short hash of a config (dataclass or JSON-able object)."""
    blob = json.dumps(_to_jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_commit(short: bool = True) -> str:
    """The current git commit of the emalab checkout, with ``-dirty`` when there are local changes."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short" if short else "HEAD", "HEAD"] if short else ["git", "rev-parse", "HEAD"],
            cwd=here, capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here, capture_output=True, text=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "nogit"
    return f"{sha}-dirty" if dirty else sha
