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

__all__ = ["suite_sets", "evaluate_sets", "pooled", "condition", "save_records"]


def suite_sets(study: Study, split: str = "eval") -> dict[str, list[SuitePrompt]]:
    """The prompt sets :meth:`Study.evaluate` uses: each domain's ``split`` (eval limit) plus over-refusal."""
    sets = {d: load_prompts(d, split, limit=study.cfg.eval_limit) for d in DOMAINS}
    sets[OVER_REFUSAL] = load_prompts(OVER_REFUSAL, split, limit=study.cfg.eval_limit)
    return sets


def _pairs(ps: Sequence[SuitePrompt | tuple[str, str]]) -> list[list[str]]:
    return [[p.id, p.text] if isinstance(p, SuitePrompt) else [str(p[0]), str(p[1])] for p in ps]


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
    stage = Stage(study.results, "eval_sets", key)
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
    """Unlearn ``target`` once per seed, evaluate each adapter, and pool prompts over seeds.

    Returns:
        ``{"after": pooled records, "base": base records pooled the same way, "runs": stage dirs,
        "reports": per-seed report dicts}``.
    """
    if base_records is None:
        _, base_records = study.evaluate("base")
    after, base, runs, reports = {}, {}, [], []
    for seed in study.cfg.seeds:
        run = study.unlearn(target, method, retain_domains, seed=seed, **unlearn_kwargs)
        report, records = study.evaluate(f"{method}-{target}", adapter=run / "adapter")
        after[seed], base[seed] = records, base_records
        runs.append(str(run))
        reports.append(report.to_dict())
    return {"after": pooled(after), "base": pooled(base), "runs": runs, "reports": reports}
