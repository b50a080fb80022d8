"""The main job: every hypothesis of the study on one model, then figures and REPORT.md.

Stages are cached under ``results/stages`` (see :mod:`interp.runs`), so an interrupted run resumes
without redoing finished work, and experiments that share a stage compute it once.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from emalab import heartbeat
from interp.config import ConfigError, JsonConfig
from interp.io import append_jsonl, atomic_write_json, config_hash, ensure_writable_dir
from interp.resources import peak_rss_gb
from study import StudyConfig

__all__ = ["PRESETS", "PRESET_NAMES", "PipelineConfig", "run_pipeline", "write_pipeline_json",
           "available_experiments", "experiment_modules", "preset_experiments", "preset_overrides"]

PRESET_NAMES = ("quick", "full")
"""Presets from small to large; each runs the experiments of the smaller ones first."""


def available_experiments() -> list[str]:
    """Experiment modules (``experiments/h*.py``) that ``run --experiments`` accepts."""
    import experiments

    return sorted(m.name for m in pkgutil.iter_modules(experiments.__path__) if m.name.startswith("h"))


def experiment_modules() -> dict[str, ModuleType]:
    """Every experiment module by name, in hypothesis order (each module's ``ORDER``)."""
    modules = {name: importlib.import_module(f"experiments.{name}") for name in available_experiments()}
    return dict(sorted(modules.items(), key=lambda kv: kv[1].ORDER))


def preset_experiments(preset: str) -> tuple[str, ...]:
    """The experiments whose ``PRESETS`` name ``preset``: those of the smaller presets first, then
    this preset's additions, each group by ``RUN_ORDER`` (default: ``ORDER``)."""
    def key(module: ModuleType) -> tuple[int, int]:
        tier = min(PRESET_NAMES.index(p) for p in module.PRESETS)
        return tier, getattr(module, "RUN_ORDER", module.ORDER)

    chosen = {n: m for n, m in experiment_modules().items() if preset in m.PRESETS}
    return tuple(sorted(chosen, key=lambda n: key(chosen[n])))


def preset_overrides(preset: str) -> dict[str, dict]:
    """``{experiment: Config fields}`` of a preset, from each of its modules' ``PRESET_OVERRIDES``."""
    modules = experiment_modules()
    return {n: dict(modules[n].PRESET_OVERRIDES[preset]) for n in preset_experiments(preset)
            if preset in getattr(modules[n], "PRESET_OVERRIDES", {})}


QUICK = preset_experiments("quick")


@dataclass
class PipelineConfig(JsonConfig):
    """What the main job runs."""

    study: StudyConfig = field(default_factory=lambda: StudyConfig(seeds=(0, 1, 2), judged_seeds=1))
    """Model, evaluation and training settings shared by all experiments (quick: three training seeds
    for every trajectory and logit score, the first of them judged)."""
    experiments: tuple[str, ...] = QUICK
    """Experiment modules to run, in order."""
    figures: bool = True
    """Regenerate the figures from the saved results."""
    report: bool = True
    """Write REPORT.md from the saved results."""
    overrides: dict[str, dict] = field(default_factory=dict)
    """Per-experiment Config fields, e.g. {"h4_retain_contains_ema": {"sft_targets": ["safety"]}}."""

    def __post_init__(self) -> None:
        known = available_experiments()
        unknown = [e for e in self.experiments if e not in known]
        if unknown:
            raise ConfigError(f"PipelineConfig.experiments: unknown experiment(s) {unknown}; "
                              f"choose from {', '.join(known)}")
        if not self.experiments:
            raise ConfigError("PipelineConfig.experiments: empty; name at least one of " + ", ".join(known))
        stray = sorted(set(self.overrides) - set(self.experiments))
        if stray:
            raise ConfigError(f"PipelineConfig.overrides: {stray} are not among the experiments run "
                              f"({', '.join(self.experiments)}); drop them or add the experiments")

    def experiment_configs(self) -> dict[str, object]:
        """Each experiment's validated ``Config`` (built before any model is loaded)."""
        out = {}
        for name in self.experiments:
            module = importlib.import_module(f"experiments.{name}")
            try:
                out[name] = module.Config.from_dict({**self.overrides.get(name, {}), "study": self.study.to_dict()})
            except ValueError as err:
                raise ConfigError(f"overrides for {name}: {err}") from err
        return out


# Which experiments a preset runs, and their Config overrides, are declared by the experiment modules
# (``PRESETS``, ``PRESET_OVERRIDES``); the shared study settings are the presets' own.
PRESETS: dict[str, PipelineConfig] = {
    "quick": PipelineConfig(overrides=preset_overrides("quick")),
    "full": PipelineConfig(
        study=StudyConfig(eval_limit=None, probe_limit=None, seeds=(0, 1, 2), max_new_tokens=48,
                          direction_layer_step=1, direction_positions=None, trajectory_every=2),
        experiments=preset_experiments("full"), overrides=preset_overrides("full"),
    ),
}


def count_stages(results: Path) -> int:
    """Completed cached stages under ``results/stages`` (0 at the start of a cold run)."""
    return sum(1 for _ in (Path(results) / "stages").glob("*/*/DONE.json"))


def write_pipeline_json(path: Path, cfg: PipelineConfig, timings: dict, started: str,
                        stages_at_start: int | None = None, machine: dict | None = None,
                        invocation: str | None = None) -> None:
    """Record this invocation in ``pipeline.json`` (the latest one) and append it to
    ``pipeline_history.jsonl`` beside it. The cost of a run that was interrupted and resumed is the sum
    over the history entries of the same config (``invocations``), whatever ran in between.

    Invocations that were killed are in the history too: their heartbeat files are folded in first
    (:func:`emalab.heartbeat.fold_stale`) as entries with ``"interrupted": true``, whose ``total`` is a
    lower bound (the elapsed time at their last heartbeat). ``invocation`` is the running invocation's
    heartbeat id, whose own heartbeat is not folded."""
    key = config_hash(cfg.to_dict())
    entry = {"config_hash": key, "started": started, "stages_at_start": stages_at_start, "timings_s": timings,
             "peak_rss_gb": round(peak_rss_gb(), 2)}
    if invocation is not None:
        entry["invocation"] = invocation
    heartbeat.fold_stale(path.parent, current=invocation)
    history_path = path.with_name("pipeline_history.jsonl")
    append_jsonl(history_path, entry)
    same = [h for h in read_history(history_path) if h.get("config_hash") == key]
    atomic_write_json(path, {"config": cfg.to_dict(), "timings_s": timings, "peak_rss_gb": entry["peak_rss_gb"],
                             "machine": machine or {}, "invocations": same,
                             "total_s_all_invocations": round(sum(h["timings_s"]["total"] for h in same), 1)})


def read_history(path: Path) -> list[dict]:
    """Entries of ``pipeline_history.jsonl``; unreadable lines (a torn write) are skipped with a warning.

    The history only sums the cost of resumed runs, so a damaged line must never cost a finished run
    its report.
    """
    rows, bad = [], 0
    if not path.exists():
        return rows
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("timings_s"), dict) and \
                isinstance(row["timings_s"].get("total"), (int, float)):
            rows.append(row)
        else:
            bad += 1
    if bad:
        print(f"[emalab] skipped {bad} unreadable line(s) in {path}", file=sys.stderr)
    return rows


def run_pipeline(cfg: PipelineConfig, log=print) -> Path:
    """Run the experiments, figures and report; returns the path of REPORT.md (or the results dir)."""
    results = Path(cfg.study.results)
    # Everything that can be checked without a model is checked before the first (slow) stage.
    exp_cfgs = cfg.experiment_configs()
    from interp.loading import check_model_source

    check_model_source(cfg.study.model)
    ensure_writable_dir(results, "results directory (--results)")
    from interp.locks import FileLock

    with FileLock(results / ".emalab.lock", f"results directory {results}",
                  hint="wait for that run to finish, or pass another --results"):
        return _run(cfg, exp_cfgs, results, log)


def _machine(cfg: PipelineConfig) -> dict:
    """Where the study ran and in which dtypes (``auto`` resolved), for the report's setup."""
    from interp.loading import resolve_device
    from interp.precision import machine_key, resolve_dtype_choice

    device = resolve_device(cfg.study.device)
    return {"machine": machine_key(), "device": str(device),
            "train_dtype": resolve_dtype_choice(cfg.study.dtype, device), "eval_dtype": cfg.study.eval_dtype}


def _run(cfg: PipelineConfig, exp_cfgs: dict, results: Path, log) -> Path:
    timings = {}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    stages_at_start = count_stages(results)
    heartbeat.fold_stale(results, log=log)  # invocations killed earlier count in this run's cost
    t_all = time.perf_counter()
    with heartbeat.Heartbeat(results, config_hash(cfg.to_dict()), started, stages_at_start) as beat:
        for name in cfg.experiments:
            module = importlib.import_module(f"experiments.{name}")
            exp_cfg = exp_cfgs[name]
            log(f"[emalab] {name}: {module.__doc__.strip().splitlines()[0]}")
            beat.beat(name, timings)
            t0 = time.perf_counter()
            metrics = module.main(exp_cfg)
            timings[name] = round(time.perf_counter() - t0, 1)
            verdict = metrics.get("claim")
            log(f"[emalab] {name} done in {timings[name]:.0f}s"
                + (f" — {verdict['id']}: {verdict['status']}" if verdict else ""))
        if cfg.figures:
            from figures import make_all

            beat.beat("figures", timings)
            paths = make_all(results)
            log(f"[emalab] {len(paths)} figures in {results / 'figures'}")
        timings["total"] = round(time.perf_counter() - t_all, 1)
    write_pipeline_json(results / "pipeline.json", cfg, timings, started, stages_at_start, _machine(cfg),
                        invocation=beat.invocation)
    beat.remove()
    if cfg.report:
        from emalab.report import write_report

        report = write_report(results)
        log(f"[emalab] report: {report}")
        return report
    return results
