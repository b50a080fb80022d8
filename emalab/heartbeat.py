"""A heartbeat file for a running ``emalab run``, so that a killed invocation still counts in the run's cost.

``pipeline.json`` and ``pipeline_history.jsonl`` record an invocation when it finishes. While it works,
``pipeline_running.<pid>.json`` beside them holds what it has cost so far (elapsed seconds, peak RSS, the
finished experiments' timings, the one in progress); it is refreshed at every experiment boundary and
every :data:`EVERY_S` seconds by a daemon thread, and removed once the finished invocation is in the
history. A heartbeat whose writer is gone (SIGKILL, OOM kill, power cut) is folded into the history by
the next invocation (:func:`fold_stale`) as an entry with ``"interrupted": true``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from interp.io import append_jsonl, atomic_write_json
from interp.resources import peak_rss_gb

__all__ = ["EVERY_S", "STALE_AFTER_BEATS", "Heartbeat", "fold_stale", "heartbeat_files", "interrupted_entry",
           "interrupted_note", "peak_rss_note"]

EVERY_S = 60.0
"""Seconds between two refreshes of the heartbeat by its thread (tests set it lower)."""
STALE_AFTER_BEATS = 5
"""A heartbeat from another host is the writer's last when it has missed this many refreshes."""
_PREFIX = "pipeline_running"


def heartbeat_files(results: Path) -> list[Path]:
    """The heartbeat files in a results directory (one per running or killed invocation)."""
    return sorted(Path(results).glob(f"{_PREFIX}.*.json"))


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (epoch seconds), from ``/proc``; ``None`` where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
        ticks = int(stat.rsplit(")", 1)[1].split()[19])  # field 22, counted after the command name
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _writer_gone(beat: dict, mtime: float, current: str | None) -> bool:
    """Whether the process that wrote ``beat`` can no longer refresh it. Conservative: when in doubt it
    is alive (a run the results lock keeps from running twice), and the beat is left for a later call."""
    if beat.get("invocation") == current:
        return False
    pid, host = beat.get("pid"), beat.get("host")
    if host != socket.gethostname():
        # No pid to look at there: the writer is gone once it has missed several refreshes.
        every = beat.get("every_s") if isinstance(beat.get("every_s"), (int, float)) else EVERY_S
        return time.time() - mtime > STALE_AFTER_BEATS * max(float(every), 1.0)
    boot = _boot_id()
    if boot and beat.get("boot_id") and beat["boot_id"] != boot:
        return True  # written before a reboot: that pid is another process now
    if not isinstance(pid, int) or not _pid_alive(pid):
        return True
    if pid == os.getpid():
        return True  # an earlier invocation in this very process (not ``current``) that ended without folding
    start, began = _process_start(pid), beat.get("started_epoch")
    # A process that started after the invocation began is another process reusing the pid.
    return start is not None and isinstance(began, (int, float)) and start > began + 2.0


def interrupted_entry(beat: dict) -> dict:
    """The ``pipeline_history.jsonl`` entry of an invocation known only by its last heartbeat.

    Its ``timings_s["total"]`` is the elapsed time at that heartbeat: a lower bound on what the
    invocation cost (by up to :data:`EVERY_S` seconds, or an experiment's length where the thread could
    not write). Its finished experiments keep their timings; the one in progress is ``in_progress``.
    """
    timings = {k: v for k, v in (beat.get("timings_s") or {}).items() if isinstance(v, (int, float))}
    timings["total"] = round(float(beat["elapsed_s"]), 1)
    return {"config_hash": beat.get("config_hash"), "started": beat.get("started"),
            "stages_at_start": beat.get("stages_at_start"), "timings_s": timings,
            "peak_rss_gb": beat.get("peak_rss_gb"), "interrupted": True, "in_progress": beat.get("in_progress"),
            "last_heartbeat": beat.get("written"), "invocation": beat.get("invocation")}


def interrupted_note(invocations: list[dict]) -> str:
    """``"one interrupted, its time a lower bound to the minute"`` (or ``"2 interrupted, ..."``), or ``""``."""
    n = sum(1 for h in invocations if h.get("interrupted"))
    if not n:
        return ""
    return ("one interrupted, its time" if n == 1 else f"{n} interrupted, their times") + " a lower bound to the minute"


def peak_rss_note(pipeline: dict) -> str:
    """``"17.8 GB"`` for one invocation; for a resumed run, the highest peak over its invocations (each
    process's own VmHWM, an interrupted one's as of its last heartbeat) with the latest beside it:
    ``"17.8 GB (highest of 6 invocations; latest 12.6 GB)"``. ``""`` when nothing was recorded."""
    latest = pipeline.get("peak_rss_gb")
    peaks = [h["peak_rss_gb"] for h in pipeline.get("invocations", []) if h.get("peak_rss_gb")]
    if not peaks:
        return f"{latest:.1f} GB" if latest else ""
    top = max(peaks + ([latest] if latest else []))
    if len(peaks) < 2:
        return f"{top:.1f} GB"
    return f"{top:.1f} GB (highest of {len(peaks)} invocations" + (f"; latest {latest:.1f} GB)" if latest else ")")


def fold_stale(results: Path, current: str | None = None, log=None) -> list[dict]:
    """Fold the heartbeats of invocations whose process is gone into ``pipeline_history.jsonl``.

    Each becomes an entry with ``"interrupted": true`` (see :func:`interrupted_entry`) and its file is
    removed; an invocation already in the history (killed between its entry and the removal) is not
    added twice. A heartbeat that cannot be read is dropped with a one-line warning: it never costs a run.

    Args:
        results: the results directory (where ``pipeline.json`` lives).
        current: the running invocation's id, whose heartbeat is never folded.
        log: called with one line per folded or dropped heartbeat (default: stderr).

    Returns:
        The entries appended to the history.
    """
    from emalab.pipeline import read_history  # pipeline imports this module

    log = log or (lambda line: print(line, file=sys.stderr))
    history = Path(results) / "pipeline_history.jsonl"
    added = []
    for path in heartbeat_files(results):
        try:
            mtime = path.stat().st_mtime
            beat = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
            if not isinstance(beat, dict) or not isinstance(beat.get("elapsed_s"), (int, float)):
                raise ValueError("not a heartbeat")
        except FileNotFoundError:
            continue  # its writer finished meanwhile
        except (OSError, ValueError) as err:
            log(f"[emalab] dropped unreadable heartbeat {path} ({err}); that invocation's time is not counted")
            path.unlink(missing_ok=True)
            continue
        if not _writer_gone(beat, mtime, current):
            continue
        entry = interrupted_entry(beat)
        seen = entry["invocation"] is not None and any(
            h.get("invocation") == entry["invocation"] for h in read_history(history))
        if not seen:
            append_jsonl(history, entry)
            added.append(entry)
            log(f"[emalab] counted an interrupted invocation (started {entry['started']}, pid {beat.get('pid')}): "
                f"at least {entry['timings_s']['total']:.0f}s, "
                + (f"killed during {entry['in_progress']}" if entry["in_progress"] else "killed between experiments"))
        path.unlink(missing_ok=True)
    return added


class Heartbeat:
    """Keeps ``pipeline_running.<pid>.json`` current while an invocation runs.

    Use as a context manager around the work; call :meth:`beat` at every experiment boundary. The thread
    never raises into the run (a failed write is warned about once). On a normal exit the thread stops
    and the file stays until :meth:`remove`, to be called once the history entry is written. On an
    exception (an experiment's error, Ctrl-C) the invocation is folded into the history at once.

    Args:
        results: the results directory.
        config_hash: the pipeline config's hash (that of its ``pipeline_history.jsonl`` entries).
        started: the invocation's start, as in its history entry.
        stages_at_start: cached stages when it started.
        every_s: seconds between the thread's refreshes (default :data:`EVERY_S`).
    """

    def __init__(self, results: Path, config_hash: str, started: str, stages_at_start: int | None = None,
                 every_s: float | None = None) -> None:
        self.results = Path(results)
        self.every_s = float(EVERY_S if every_s is None else every_s)
        self.path = self.results / f"{_PREFIX}.{os.getpid()}.json"
        self._t0 = time.perf_counter()
        self._started_epoch = time.time()
        self.invocation = f"{socket.gethostname()}:{os.getpid()}:{self._started_epoch:.3f}"
        self._fixed = {"config_hash": config_hash, "started": started, "started_epoch": self._started_epoch,
                       "stages_at_start": stages_at_start, "pid": os.getpid(), "host": socket.gethostname(),
                       "boot_id": _boot_id(), "invocation": self.invocation, "every_s": self.every_s}
        self._timings: dict[str, float] = {}
        self._in_progress: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned = False

    def elapsed_s(self) -> float:
        return time.perf_counter() - self._t0

    def snapshot(self) -> dict:
        """What the heartbeat file holds now."""
        return {**self._fixed, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "elapsed_s": round(self.elapsed_s(), 1), "peak_rss_gb": round(peak_rss_gb(), 2),
                "in_progress": self._in_progress, "timings_s": dict(self._timings)}

    def beat(self, in_progress: str | None = None, timings: dict[str, float] | None = None) -> None:
        """Record an experiment boundary (the one starting, the finished ones' timings) and write the file."""
        with self._lock:
            self._in_progress = in_progress
            if timings is not None:
                self._timings = dict(timings)
        self._write()

    def _write(self) -> None:
        try:
            with self._lock:
                atomic_write_json(self.path, self.snapshot())
        except Exception as err:  # bookkeeping must never stop a study
            if not self._warned:
                self._warned = True
                print(f"[emalab] could not write the heartbeat {self.path} ({err}); if this run is killed, "
                      "its time will be missing from the run's cost", file=sys.stderr)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._write()

    def __enter__(self) -> Heartbeat:
        self._write()
        self._thread = threading.Thread(target=self._loop, name="emalab-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is None:
            self.beat(None)
            return
        try:
            self.beat(self._in_progress)
            entry = interrupted_entry(self.snapshot())
            append_jsonl(self.results / "pipeline_history.jsonl", entry)
            self.remove()
            print(f"[emalab] this invocation stopped ({exc_type.__name__}) after {entry['timings_s']['total']:.0f}s; "
                  "its time is in pipeline_history.jsonl", file=sys.stderr)
        except Exception:  # never mask the run's own error; the next invocation folds the file
            pass

    def remove(self) -> None:
        """Remove the heartbeat file (after the invocation's history entry is written)."""
        self.stop()
        self.path.unlink(missing_ok=True)
