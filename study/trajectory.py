"""Training trajectories: the refusal of every domain at each adapter snapshot of an unlearning run.

A run trained with ``snapshot_every`` keeps its adapter every k steps (:func:`training.trainer.snapshots`).
Each snapshot, and the base model as step 0, is scored with the fast logit refusal score on the same
prompt sets (a cached :func:`study.evaluate_sets` stage per snapshot, so an interrupted trajectory
resumes), and the KL to the base model on the benign prompts is recorded beside it. A prompt's
refusal is ``P(refuse)``, the sigmoid of its refusal log-odds at the first response token (for
``rebut`` prompts the variant without "No", which is an aligned rebuttal's opening there): a rate
on the same 0-1 scale as a judged refusal rate, smooth along training, so that trajectories can be
interpolated at matched levels (:mod:`study.frontier`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evals.evaluate import BENIGN, OVER_REFUSAL, PromptRecord
from evals.suite import DOMAINS, load_prompts
from study.conditions import evaluate_sets
from study.core import Study

__all__ = ["Trajectory", "trajectory_sets", "refusal_probability", "trajectory", "trajectory_runs", "forget_sizes",
           "training_metric"]


@dataclass
class Trajectory:
    """One run's refusal along training: ``p[set]`` is ``steps × prompts`` (P(refuse) per prompt)."""

    run: str
    """The unlearning run's stage directory."""
    steps: list[int]
    """Training steps measured (0 is the base model)."""
    prompt_ids: dict[str, list[str]]
    """Prompt ids of each set, in column order."""
    p: dict[str, np.ndarray]
    """``{set: steps × prompts}`` refusal probability."""
    kl: list[float | None] = field(default_factory=list)
    """Mean next-token KL(base || model) on the benign prompts at each step (0 at step 0)."""

    def mean(self, name: str) -> np.ndarray:
        """Mean refusal probability of set ``name`` at each step."""
        return self.p[name].mean(axis=1)

    def to_dict(self) -> dict:
        return {"run": self.run, "steps": self.steps, "prompt_ids": self.prompt_ids,
                "p": {k: v.round(6).tolist() for k, v in self.p.items()}, "kl": self.kl}

    @classmethod
    def from_dict(cls, d: dict) -> Trajectory:
        return cls(run=d["run"], steps=list(d["steps"]), prompt_ids=d["prompt_ids"],
                   p={k: np.asarray(v, dtype=np.float64) for k, v in d["p"].items()}, kl=list(d.get("kl", [])))


def trajectory_sets(study: Study, limit: int | None = None) -> dict:
    """The prompt sets of a trajectory: each domain's eval split, benign and over-refusal
    (``limit`` prompts each; default the study's ``eval_limit``)."""
    limit = study.cfg.eval_limit if limit is None else limit
    return {name: load_prompts(name, "eval", limit=limit) for name in (*DOMAINS, BENIGN, OVER_REFUSAL)}


def refusal_probability(record: PromptRecord) -> float:
    """P(refuse) of one prompt from its logit score (the without-"No" variant on ``rebut`` prompts)."""
    score = record.logit_score
    if record.expected == "rebut" and record.logit_score_without_no is not None:
        score = record.logit_score_without_no
    return float(1.0 / (1.0 + np.exp(-score)))


def _matrix_row(records: list[PromptRecord], sets: dict) -> tuple[dict[str, list[str]], dict[str, list[float]]]:
    by_id = {(r.domain, r.id): r for r in records}
    ids = {name: [p.id if hasattr(p, "id") else str(p[0]) for p in prompts] for name, prompts in sets.items()}
    row = {name: [refusal_probability(by_id[(name, pid)]) for pid in pids] for name, pids in ids.items()}
    return ids, row


def trajectory(study: Study, run: Path, sets: dict | None = None, name: str = "run", every: int = 1) -> Trajectory:
    """Score the base model and the snapshots of ``run`` (a :meth:`Study.unlearn` stage trained with
    ``snapshot_every``) at every ``every``-th step, and at the last, on ``sets`` with the logit score;
    each point is a cached stage."""
    from training.trainer import snapshots

    sets = sets if sets is not None else trajectory_sets(study)
    snaps = snapshots(run)
    last = max(snaps, default=0)
    snaps = {k: v for k, v in snaps.items() if k % every == 0 or k == last}
    if not snaps:
        raise ValueError(f"{run} has no adapter snapshots; train it with snapshot_every > 0 "
                         "(StudyConfig.snapshot_every)")
    steps, rows, kl = [0], [], [0.0]
    base_report, base_records = evaluate_sets(study, "base", sets, generate=False)
    ids, row = _matrix_row(base_records, sets)
    rows.append(row)
    for step, adapter in snaps.items():
        report, records = evaluate_sets(study, f"{name}@{step}", sets, adapter=adapter, generate=False)
        rows.append(_matrix_row(records, sets)[1])
        steps.append(step)
        kl.append(report.utility["kl_to_base"] if report.utility else None)
    p = {k: np.asarray([r[k] for r in rows], dtype=np.float64) for k in sets}
    return Trajectory(run=str(run), steps=steps, prompt_ids=ids, p=p, kl=kl)


def trajectory_runs(study: Study, target: str, method: str = "npo", retain_domains: tuple[str, ...] | None = (),
                    name: str | None = None, sets: dict | None = None, **unlearn_kwargs) -> list[Trajectory]:
    """One trajectory per training seed of a condition: the same runs :func:`study.condition` trains
    (``trajectory_steps`` steps with snapshots), each scored at every ``trajectory_every``-th step."""
    cfg = study.cfg
    if not cfg.trajectory_steps:
        raise ValueError("StudyConfig.trajectory_steps is 0: set it (e.g. 16) to train runs with snapshots")
    sets = sets if sets is not None else trajectory_sets(study)
    name = name or f"{method}-{target}"
    out = []
    for seed in cfg.seeds:
        run = study.unlearn(target, method, retain_domains, seed=seed, steps=cfg.trajectory_steps,
                            snapshot_every=study.snapshot_every, **unlearn_kwargs)
        out.append(trajectory(study, run, sets, f"{name}-s{seed}", every=cfg.trajectory_every))
    return out


def forget_sizes(runs: list[Trajectory]) -> list[int | None]:
    """Each run's forget-set size (refusals kept, from the run's ``data_manifest.json``; ``None`` when
    the run directory does not record one)."""
    out = []
    for t in runs:
        path = Path(t.run) / "data_manifest.json"
        try:
            out.append(int(json.loads(path.read_text())["forget"]["kept"]))
        except (OSError, KeyError, TypeError, ValueError):
            out.append(None)
    return out


def training_metric(runs: list[Trajectory], name: str) -> dict | None:
    """Mean, min and max of a per-step training diagnostic (``metrics.jsonl``'s ``metrics[name]``,
    e.g. ``grad_cos_forget_retain``) over every step of every run; ``None`` when no run logged it."""
    values = []
    for t in runs:
        path = Path(t.run) / "metrics.jsonl"
        if not path.exists():
            continue
        for line in path.read_text().splitlines():
            v = json.loads(line).get("metrics", {}).get(name) if line.strip() else None
            if isinstance(v, (int, float)) and np.isfinite(v):
                values.append(float(v))
    if not values:
        return None
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "n": len(values)}
