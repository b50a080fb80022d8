"""Conditions of the study: an unlearning run per seed, evaluated, with prompts pooled over seeds;
and evaluation of arbitrary prompt sets as a cached stage."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from evals.evaluate import OVER_REFUSAL, EvalReport, PromptRecord, evaluate_prompts
from evals.suite import DOMAINS, SuitePrompt, load_prompts
from interp.io import config_hash, read_jsonl, write_jsonl
from interp.runs import Stage
from study.core import Study, adapter_id_of

__all__ = ["suite_sets", "evaluate_sets", "pooled", "condition", "operating_step", "operating_point",
           "save_records"]


def suite_sets(study: Study, split: str = "eval") -> dict[str, list[SuitePrompt]]:
    """The prompt sets :meth:`Study.evaluate` uses: each domain's ``split`` (eval limit) plus over-refusal."""
    sets = {d: load_prompts(d, split, limit=study.cfg.eval_limit) for d in DOMAINS}
    sets[OVER_REFUSAL] = load_prompts(OVER_REFUSAL, split, limit=study.cfg.eval_limit)
    return sets


def _pairs(ps: Sequence[SuitePrompt | tuple[str, str]]) -> list[list[str]]:
    # Suite prompts keep their ``expected`` value (what an aligned answer is); pairs count as "refuse".
    return [[p.id, p.text, p.expected] if isinstance(p, SuitePrompt) else [str(x) for x in p] for p in ps]


def evaluate_sets(
    study: Study,
    condition_name: str,
    sets: Mapping[str, Sequence[SuitePrompt | tuple[str, str]]],
    adapter: Path | None = None,
    intervention: Callable[[], contextlib.AbstractContextManager] | None = None,
    intervention_id: str | None = None,
    generate: bool = True,
) -> tuple[EvalReport, list[PromptRecord]]:
    """:func:`evals.evaluate.evaluate_prompts` on custom prompt sets as a cached stage, under an
    adapter (merged) and/or an intervention (a context-manager factory entered inside the weights).

    ``generate=False`` measures the logit score only (no judge), which is much faster.
    """
    if intervention is not None and not intervention_id:
        raise ValueError("an intervention needs an intervention_id for the cache key")
    ecfg = dataclasses.replace(study.eval_config(), generate=generate)
    key = {"model": study.cfg.model, "weights": study.weights_id, "dtype": study.cfg.eval_dtype,
           "adapter": adapter_id_of(adapter), "intervention": intervention_id, "eval": ecfg.to_dict(),
           "sets": {k: config_hash(_pairs(v), 16) for k, v in sets.items()}}
    from interp.runs import STAGE_CODE

    stage = Stage(study.results, "eval_sets", key, code=STAGE_CODE["eval_sets" if generate else "eval_sets_logit"])
    if not stage.done:
        path = stage.open()
        with study.with_adapter(adapter), (intervention() if intervention else contextlib.nullcontext()):
            report = evaluate_prompts(study.lm, {k: [tuple(p) for p in _pairs(v)] for k, v in sets.items()}, ecfg)
        report.save(path / "report.json")
        report.save_records(path / "records.jsonl")
        stage.complete({"condition": condition_name})
    report = EvalReport.load(stage.path / "report.json")
    return report, [PromptRecord(**r) for r in read_jsonl(stage.path / "records.jsonl")]


def pooled(records_by_seed: dict[int, list[PromptRecord]]) -> list[PromptRecord]:
    """Stack per-seed records into one list whose ids are ``seed:id`` (the unit of resampling)."""
    from dataclasses import replace

    return [replace(r, id=f"{seed}:{r.id}") for seed, recs in records_by_seed.items() for r in recs]


def save_records(path: Path, records: list[PromptRecord]) -> None:
    write_jsonl(path, [r.__dict__ for r in records])


def condition(study: Study, target: str, method: str = "npo", retain_domains: tuple[str, ...] | None = (),
              base_records: list[PromptRecord] | None = None, **unlearn_kwargs) -> dict:
    """Unlearn ``target`` once per seed, judge each adapter at the operating point, pool prompts over seeds.

    Each run trains ``trajectory_steps`` steps with snapshots (unless ``steps`` is passed, or the
    study has no trajectories), and the judged evaluation reads one snapshot, the run's operating
    point: chosen on the dev split (:func:`operating_step`, with ``cfg.operating_level``) or else
    ``cfg.steps``. A condition and its trajectory share one training run. Only the first
    ``judged_seeds`` seeds are judged; every seed's run is in ``runs``.

    Returns:
        ``{"after": pooled records, "base": base records pooled the same way, "runs": stage dirs of
        every seed, "adapters": each run's operating-point adapter (what any further measurement of
        the condition should read), "judged_runs": the runs judged, "operating_steps": their steps,
        "operating_points": what the dev split saw at each (:func:`operating_point`; empty without a level),
        "reports": per-seed report dicts}``.
    """
    from training.trainer import snapshot_dir

    if base_records is None:
        _, base_records = study.evaluate("base")
    cfg = study.cfg
    trajectory = bool(cfg.trajectory_steps) and "steps" not in unlearn_kwargs
    if trajectory:
        unlearn_kwargs = {**unlearn_kwargs, "steps": cfg.trajectory_steps, "snapshot_every": study.snapshot_every}
    after, base, runs, adapters, judged, reports, steps_used, points = {}, {}, [], [], [], [], [], []
    for k, seed in enumerate(cfg.seeds):
        run = study.unlearn(target, method, retain_domains, seed=seed, **unlearn_kwargs)
        runs.append(str(run))
        point = operating_point(study, run, target) if trajectory and cfg.operating_level is not None else None
        step = (point["step"] if point else cfg.steps) if trajectory else None
        adapter = snapshot_dir(run, step) if trajectory else run / "adapter"
        adapters.append(str(adapter))
        if cfg.judged_seeds is not None and k >= cfg.judged_seeds:
            continue
        report, records = study.evaluate(f"{method}-{target}", adapter=adapter)
        after[seed], base[seed] = records, base_records
        judged.append(str(run))
        steps_used.append(step)
        if point is not None:
            points.append(point)
        reports.append(report.to_dict())
    return {"after": pooled(after), "base": pooled(base), "runs": runs, "adapters": adapters, "judged_runs": judged,
            "reports": reports, "operating_steps": steps_used, "operating_points": points}


def operating_step(study: Study, run: Path, target: str) -> int:
    """The run's operating point, chosen on the dev split: the first scored snapshot whose mean
    refusal probability on the target's probe prompts is at or below ``cfg.operating_level`` (the
    last step if none is: see :func:`operating_point`, which says whether the level was reached). The
    eval prompts, which decide the claims, play no part in the choice."""
    return operating_point(study, run, target)["step"]


def operating_point(study: Study, run: Path, target: str) -> dict:
    """:func:`operating_step` with what the dev split saw: ``{"step", "reached"`` (the level was met
    within the budget; if not, ``step`` is the budget's end, not a choice), ``"dev_refusal"`` (the
    target's mean refusal probability on the probe prompts at ``step``), ``"level"``, ``"before"}``:
    the scored point just before ``step`` as ``{"step", "dev_refusal"}`` (step 0 is the base model;
    ``None`` when ``step`` is the first point), so a reading can be interpolated to the level itself."""
    from study.trajectory import trajectory

    sets = {target: load_prompts(target, "probe", limit=study.cfg.probe_limit)}
    t = trajectory(study, run, sets, f"dev-{target}", every=study.cfg.trajectory_every)
    curve = t.mean(target)
    level = study.cfg.operating_level
    below = [(s, float(v)) for s, v in zip(t.steps, curve) if s > 0 and v <= level]
    step, value = below[0] if below else (t.steps[-1], float(curve[-1]))
    k = list(t.steps).index(step)
    before = {"step": int(t.steps[k - 1]), "dev_refusal": float(curve[k - 1])} if k else None
    return {"step": int(step), "reached": bool(below), "dev_refusal": value, "level": level, "before": before}
