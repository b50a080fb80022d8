"""Advisory file locks that name their holder, for the model cache, run directories and stages.

A lock is a file holding the holder's pid and host; ``fcntl.flock`` does the locking, so a process
that dies (even by SIGKILL) releases its locks and a stale lock file is harmless. Locks are
reentrant within a process, so a library call that locks a directory may run under a caller that
already holds it.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; runs are then unguarded as before
    fcntl = None

__all__ = ["LockHeldError", "FileLock", "lock_holder"]

_HELD: dict[str, list] = {}
_GUARD = threading.Lock()


class LockHeldError(RuntimeError):
    """Another process holds the lock; the message names it and the fix."""


def lock_holder(path: str | Path) -> str:
    """The ``pid N on HOST`` recorded in a lock file, or ``an unknown process``."""
    try:
        text = Path(path).read_text(encoding="utf-8").split()
    except OSError:
        text = []
    return f"pid {text[0]} on {text[1]}" if len(text) >= 2 else "an unknown process"


class FileLock:
    """An exclusive lock on ``path`` (created, with its parent, if needed).

    Args:
        path: the lock file.
        what: what the lock guards, for messages (e.g. ``"run directory results/unlearn/x"``).
        wait: wait for the holder to finish (``True``) or fail at once with :class:`LockHeldError`.
        timeout: seconds to wait at most (``None``: forever).
        hint: the fix appended to a :class:`LockHeldError` message.
        log: called once with a line when the lock is busy and we wait.
    """

    def __init__(self, path: str | Path, what: str, wait: bool = False, timeout: int | float | None = None,
                 hint: str = "wait for it to finish or stop it", log=None) -> None:
        self.path = Path(path)
        self.what = what
        self.wait = wait
        self.timeout = timeout
        self.hint = hint
        self.log = log

    @property
    def _key(self) -> str:
        return str(self.path.resolve())

    def acquire(self) -> FileLock:
        with _GUARD:
            held = _HELD.get(self._key)
            if held is not None:
                held[1] += 1
                return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = self.path.open("a+", encoding="utf-8")
        if fcntl is not None:
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            told = False
            while True:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = lock_holder(self.path)
                    if not self.wait or (deadline is not None and time.monotonic() > deadline):
                        fh.close()
                        raise LockHeldError(f"{self.what} is in use by {holder} (lock {self.path}); "
                                            f"{self.hint}") from None
                    if not told and self.log is not None:
                        self.log(f"{self.what} is in use by {holder}; waiting for it")
                        told = True
                    time.sleep(0.2)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()} {socket.gethostname()}\n")
        fh.flush()
        with _GUARD:
            _HELD[self._key] = [fh, 1]
        return self

    def release(self) -> None:
        with _GUARD:
            held = _HELD.get(self._key)
            if held is None:
                return
            held[1] -= 1
            if held[1] > 0:
                return
            del _HELD[self._key]
        fh = held[0]
        try:
            fh.seek(0)
            fh.truncate()  # an empty lock file reads as free; it is never unlinked (that would race)
            fh.flush()
        finally:
            if fcntl is not None:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
