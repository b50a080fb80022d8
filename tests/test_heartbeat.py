"""The pipeline heartbeat: an invocation killed mid-way still counts in the run's cost."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

from emalab import heartbeat, pipeline
from emalab.pipeline import PipelineConfig, write_pipeline_json
from interp.io import atomic_write_json, config_hash, read_json, read_jsonl
from study import StudyConfig

EXPS = ("h1_narrow_unlearning", "h2_ema_spreads")


def _cfg(results: Path) -> PipelineConfig:
    return PipelineConfig(study=StudyConfig(results=str(results)), experiments=EXPS, figures=False, report=False)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_beat(results: Path, cfg: PipelineConfig, pid: int, elapsed: float, **extra) -> Path:
    """A heartbeat as a killed invocation leaves it (written by the real Heartbeat, then given ``pid``)."""
    beat = heartbeat.Heartbeat(results, config_hash(cfg.to_dict()), "t-killed", 0)
    data = {**beat.snapshot(), "pid": pid, "elapsed_s": elapsed, "in_progress": EXPS[1],
            "timings_s": {EXPS[0]: elapsed - 10.0}, "peak_rss_gb": 9.5,
            "invocation": f"{socket.gethostname()}:{pid}:{elapsed}", **extra}
    path = results / f"pipeline_running.{pid}.json"
    atomic_write_json(path, data)
    return path


def test_a_killed_invocation_is_folded_in_and_summed(tmp_path):
    cfg = _cfg(tmp_path)
    write_pipeline_json(tmp_path / "pipeline.json", cfg, {EXPS[0]: 100.0, "total": 100.0}, "t0")
    beat = _write_beat(tmp_path, cfg, _dead_pid(), 250.0)
    write_pipeline_json(tmp_path / "pipeline.json", cfg, {EXPS[0]: 0.1, EXPS[1]: 40.0, "total": 41.0}, "t2")
    d = read_json(tmp_path / "pipeline.json")
    assert d["total_s_all_invocations"] == 391.0
    assert [(h["started"], h.get("interrupted", False)) for h in d["invocations"]] == [
        ("t0", False), ("t-killed", True), ("t2", False)]
    killed = d["invocations"][1]
    assert killed["timings_s"] == {EXPS[0]: 240.0, "total": 250.0}
    assert killed["in_progress"] == EXPS[1] and killed["peak_rss_gb"] == 9.5
    assert not beat.exists()
    # folded once: a later invocation does not count it again
    write_pipeline_json(tmp_path / "pipeline.json", cfg, {"total": 1.0}, "t3")
    assert read_json(tmp_path / "pipeline.json")["total_s_all_invocations"] == 392.0


def test_killed_between_its_history_entry_and_the_removal_is_not_counted_twice(tmp_path):
    cfg = _cfg(tmp_path)
    pid = _dead_pid()
    inv = f"{socket.gethostname()}:{pid}:29.0"
    write_pipeline_json(tmp_path / "pipeline.json", cfg, {"total": 30.0}, "t0", invocation=inv)
    beat = _write_beat(tmp_path, cfg, pid, 29.0)
    assert heartbeat.fold_stale(tmp_path) == [] and not beat.exists()
    assert len(read_jsonl(tmp_path / "pipeline_history.jsonl")) == 1


@pytest.mark.parametrize("pid", [os.getppid(), 1], ids=["parent", "init"])
def test_a_live_writer_is_not_folded(tmp_path, pid):
    cfg = _cfg(tmp_path)
    beat = _write_beat(tmp_path, cfg, pid, 500.0)
    write_pipeline_json(tmp_path / "pipeline.json", cfg, {"total": 5.0}, "t1")
    assert beat.exists() and read_json(tmp_path / "pipeline.json")["total_s_all_invocations"] == 5.0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc")
def test_a_reused_pid_does_not_keep_a_dead_invocation_alive(tmp_path):
    cfg = _cfg(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # the invocation began 10 minutes before this (live) process started: the pid was reused
        beat = _write_beat(tmp_path, cfg, proc.pid, 70.0, started_epoch=time.time() - 600)
        assert [e["timings_s"]["total"] for e in heartbeat.fold_stale(tmp_path)] == [70.0]
        assert not beat.exists()
    finally:
        proc.kill()
        proc.wait()


def test_another_host_or_boot(tmp_path):
    cfg = _cfg(tmp_path)
    other = _write_beat(tmp_path, cfg, os.getppid(), 10.0, host="elsewhere", every_s=60.0)
    assert heartbeat.fold_stale(tmp_path) == [] and other.exists()  # refreshed just now: may still run
    old = time.time() - 6 * 60
    os.utime(other, (old, old))
    assert len(heartbeat.fold_stale(tmp_path)) == 1 and not other.exists()
    if heartbeat._boot_id():
        rebooted = _write_beat(tmp_path, cfg, os.getppid(), 20.0, boot_id="an-earlier-boot")
        assert len(heartbeat.fold_stale(tmp_path)) == 1 and not rebooted.exists()


def test_torn_heartbeat_is_a_warning_not_a_crash(tmp_path, capsys):
    cfg = _cfg(tmp_path)
    (tmp_path / "pipeline_running.123.json").write_text('{"config_hash": "abc", "elap')
    write_pipeline_json(tmp_path / "pipeline.json", cfg, {"total": 5.0}, "t1")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreadable heartbeat" in err[0]
    assert read_json(tmp_path / "pipeline.json")["total_s_all_invocations"] == 5.0
    assert heartbeat.heartbeat_files(tmp_path) == []


def test_the_thread_refreshes_elapsed_and_stops(tmp_path):
    with heartbeat.Heartbeat(tmp_path, "h", "t0", every_s=0.02) as beat:
        first = read_json(beat.path)["elapsed_s"]
        deadline = time.monotonic() + 10
        while read_json(beat.path)["elapsed_s"] <= first + 0.1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert read_json(beat.path)["elapsed_s"] > first + 0.1
    assert not any(t.name == "emalab-heartbeat" for t in threading.enumerate())
    mtime = beat.path.stat().st_mtime_ns
    time.sleep(0.1)
    assert beat.path.stat().st_mtime_ns == mtime  # nobody writes after the run ends
    beat.remove()
    assert not beat.path.exists()


def test_a_failing_write_never_reaches_the_run(tmp_path, monkeypatch, capsys):
    def broken(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(heartbeat, "atomic_write_json", broken)
    with heartbeat.Heartbeat(tmp_path, "h", "t0", every_s=0.01) as beat:
        time.sleep(0.1)
        beat.beat("h1_narrow_unlearning", {})
    err = capsys.readouterr().err
    assert err.count("could not write the heartbeat") == 1


@pytest.fixture
def fake_experiments(monkeypatch):
    """Experiments that take no model: each records the heartbeat it sees while it runs."""
    seen = {}

    def module(name, fail=False):
        def main(cfg):
            [path] = heartbeat.heartbeat_files(cfg)
            seen[name] = read_json(path)
            if fail:
                raise RuntimeError("experiment failed")
            return {}

        mod = types.ModuleType(f"experiments.{name}", f"{name}: a fake experiment.")
        mod.main = main
        return mod

    def install(fail_second=False):
        for i, name in enumerate(EXPS):
            monkeypatch.setitem(sys.modules, f"experiments.{name}", module(name, fail_second and i == 1))
        return seen

    monkeypatch.setattr(pipeline, "_machine", lambda cfg: {})
    return install


def test_a_normal_run_beats_at_each_experiment_and_leaves_no_heartbeat(tmp_path, fake_experiments):
    seen = fake_experiments()
    cfg = _cfg(tmp_path)
    killed = _write_beat(tmp_path, cfg, _dead_pid(), 120.0)
    pipeline._run(cfg, dict.fromkeys(EXPS, tmp_path), tmp_path, log=lambda line: None)
    assert seen[EXPS[0]]["in_progress"] == EXPS[0] and seen[EXPS[0]]["timings_s"] == {}
    assert seen[EXPS[1]]["in_progress"] == EXPS[1] and list(seen[EXPS[1]]["timings_s"]) == [EXPS[0]]
    assert seen[EXPS[0]]["pid"] == os.getpid() and seen[EXPS[0]]["config_hash"] == config_hash(cfg.to_dict())
    assert not killed.exists() and heartbeat.heartbeat_files(tmp_path) == []
    d = read_json(tmp_path / "pipeline.json")
    assert [h.get("interrupted", False) for h in d["invocations"]] == [True, False]
    assert d["total_s_all_invocations"] == pytest.approx(120.0 + d["timings_s"]["total"])


def test_a_failed_experiment_is_counted_at_once(tmp_path, fake_experiments):
    fake_experiments(fail_second=True)
    cfg = _cfg(tmp_path)
    with pytest.raises(RuntimeError, match="experiment failed"):
        pipeline._run(cfg, dict.fromkeys(EXPS, tmp_path), tmp_path, log=lambda line: None)
    assert heartbeat.heartbeat_files(tmp_path) == []
    [entry] = read_jsonl(tmp_path / "pipeline_history.jsonl")
    assert entry["interrupted"] and entry["in_progress"] == EXPS[1] and list(entry["timings_s"]) == [EXPS[0], "total"]


def test_the_report_and_the_table_say_one_was_interrupted(tmp_path):
    from emalab.cross_model import ResultsRun, _facts
    from emalab.report import _setup

    cfg = _cfg(tmp_path)
    write_pipeline_json(tmp_path / "pipeline.json", cfg, {"total": 60.0}, "t0")
    _write_beat(tmp_path, cfg, _dead_pid(), 600.0)
    write_pipeline_json(tmp_path / "pipeline.json", cfg, {"total": 60.0}, "t2")
    [wall] = [line for line in _setup(tmp_path) if "Wall time" in line]
    assert "3 invocations of this config took 720s in all (one interrupted, its time a lower bound to the minute)" \
        in wall
    facts = _facts(ResultsRun(tmp_path, json.loads((tmp_path / "pipeline.json").read_text()), {}))
    assert facts["wall time"] == ("12 min (720 s over 3 invocations, one interrupted, its time a lower bound to the "
                                  "minute; latest 1 min)")
    assert heartbeat.interrupted_note([{}, {"interrupted": True}, {"interrupted": True}]).startswith("2 interrupted")


def test_a_resumed_runs_peak_is_the_highest_over_its_invocations(tmp_path):
    """A killed invocation's peak (9.5 GB at its last heartbeat) is not hidden by a later, lighter one's."""
    from emalab.cross_model import ResultsRun, _facts
    from emalab.report import _setup

    cfg = _cfg(tmp_path)
    write_pipeline_json(tmp_path / "pipeline.json", cfg, {"total": 60.0}, "t0")
    _write_beat(tmp_path, cfg, _dead_pid(), 600.0)
    write_pipeline_json(tmp_path / "pipeline.json", cfg, {"total": 60.0}, "t2")
    p = json.loads((tmp_path / "pipeline.json").read_text())
    assert p["peak_rss_gb"] < 9.5  # the latest invocation alone (this test process)
    expected = f"9.5 GB (highest of 3 invocations; latest {p['peak_rss_gb']:.1f} GB)"
    [wall] = [line for line in _setup(tmp_path) if "Wall time" in line]
    assert wall.endswith(f"peak RSS {expected}")
    assert _facts(ResultsRun(tmp_path, p, {}))["peak RSS"] == expected


def test_peak_note_for_one_invocation_and_for_none():
    assert heartbeat.peak_rss_note({"peak_rss_gb": 3.14}) == "3.1 GB"
    assert heartbeat.peak_rss_note({"peak_rss_gb": 3.14, "invocations": [{"peak_rss_gb": 3.14}]}) == "3.1 GB"
    assert heartbeat.peak_rss_note({}) == ""
