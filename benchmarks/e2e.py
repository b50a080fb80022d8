"""Benchmark 5 — end to end: the quick main job's wall time and peak memory, read from the
``pipeline.json`` that ``emalab run`` writes. Never runs the pipeline itself (it takes hours on a
laptop CPU); before the main job has run, the result says ``not_measured``, and ``partial`` when the
file comes from a run of part of the quick preset or one that reused cached stages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmarks.harness import BenchConfig, BenchResult, Variant, make_result
from interp.io import read_json

__all__ = ["pipeline_json_path", "run"]

_RSS_KEYS = ("peak_rss_gb", "max_rss_gb", "peak_rss")
CACHED_STAGE_S = 5.0
"""An experiment that finishes faster than this reused cached stages (none runs cold in seconds)."""


def pipeline_json_path(cfg: BenchConfig) -> Path:
    if cfg.pipeline_json:
        return Path(cfg.pipeline_json)
    return Path(os.environ.get("EMALAB_RESULTS", "results")) / "pipeline.json"


def _find(data: Any, keys: tuple[str, ...]) -> Any:
    if isinstance(data, dict):
        for k in keys:
            if k in data:
                return data[k]
        for v in data.values():
            found = _find(v, keys)
            if found is not None:
                return found
    return None


def run(lm: Any, cfg: BenchConfig) -> BenchResult:
    path = pipeline_json_path(cfg)
    config = {"pipeline_json": str(path)}
    if not path.exists():
        return make_result("e2e", {}, {}, config, notes=[f"{path} does not exist: the main job (`emalab run`) has "
                                                         "not been run here yet"], status="not_measured")
    data = read_json(path)
    timings = _summed_timings(data)
    total = timings.get("total")
    if total is None:
        return make_result("e2e", {}, {}, config, notes=[f"{path} holds no timings_s.total"], status="not_measured")
    rss = max((h["peak_rss_gb"] for h in data.get("invocations", []) if h.get("peak_rss_gb")),
              default=_find(data, _RSS_KEYS))
    study = data.get("config", {}).get("study", {})
    config.update(model=study.get("model"), dtype=study.get("dtype"), experiments=data.get("config", {}).get("experiments"))
    stages = {k: v for k, v in timings.items() if k != "total"}
    variant = Variant([float(total)], {"runs": 1}, "emalab run: the experiments below, figures, report",
                      extra={"stage_seconds": stages, "peak_rss_gb": rss})
    ran = list(data.get("config", {}).get("experiments") or stages)
    quick = _quick_preset()
    complete = quick is None or set(quick) <= set(ran)
    invocations = data.get("invocations") or []
    if invocations and invocations[0].get("stages_at_start") is not None:
        # Recorded by the pipeline: a cold run started with no cached stage. (Analysis-only experiments
        # such as H2/H3 legitimately take 0 s: they read H1's stages.)
        n = invocations[0]["stages_at_start"]
        cached = [f"{n} cached stage(s) at the start"] if n else []
    else:
        cached = sorted(k for k, v in stages.items() if v < CACHED_STAGE_S)
    checks = {"complete_quick_preset": complete, "cold_run": not cached}
    notes = ["read from the main job's pipeline.json; not re-run by the benchmark",
             "seconds per experiment: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items())
             + (f"; peak RSS {rss:.1f} GB" if rss is not None else "")]
    if len(invocations) > 1:
        notes.append(f"summed over {len(invocations)} invocations of the same config (interrupted/extended, resumed)")
    if not complete:
        notes.append(f"not the whole quick preset: ran {len(ran)} of its {len(quick)} experiments "
                     f"(missing {sorted(set(quick) - set(ran))})")
    if cached:
        notes.append(f"not a cold run ({', '.join(cached)}; or experiments under {CACHED_STAGE_S:.0f} s): it reused "
                     "cached stages, so the wall time is not the cost of the job")
    if rss is None:
        notes.append("peak RSS is not recorded in pipeline.json (needs a peak_rss_gb field there)")
    status = "measured" if complete and not cached else "partial"
    return make_result("e2e", {"emalab_run": variant}, {}, config, checks=checks, notes=notes, status=status)


def _summed_timings(data: dict) -> dict[str, float]:
    """Per-stage seconds summed over every invocation of the config (an interrupted and resumed run
    costs the sum; a stage that was cached in a later invocation adds ~0), else the latest timings."""
    invocations = data.get("invocations") or []
    if len(invocations) < 2:
        return dict(data.get("timings_s", {}))
    out: dict[str, float] = {}
    for h in invocations:
        for k, v in h["timings_s"].items():
            out[k] = round(out.get(k, 0.0) + float(v), 1)
    return out


def _quick_preset() -> tuple[str, ...] | None:
    try:
        from emalab.pipeline import QUICK
    except ImportError:
        return None
    return tuple(QUICK)
