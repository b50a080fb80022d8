"""A model's unlearning budget, chosen on the dev split: the smallest learning rate at which NPO alone
brings the target's refusal on its *probe* prompts to the study's operating level within the
trajectory's steps (:func:`choose_lr`). A setting tuned per model is tuned here, never on the eval
prompts that decide the claims, and written down with the run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evals.suite import DOMAINS, check_domain, load_prompts
from study.conditions import evaluate_sets, operating_point
from study.core import Study

__all__ = ["check_lrs", "choose_lr"]


def check_lrs(lrs: Sequence[float]) -> tuple[float, ...]:
    """``lrs`` as a tuple, or a one-line ``ValueError``: at least one, each > 0, strictly ascending."""
    lrs = tuple(float(x) for x in lrs)
    if not lrs:
        raise ValueError("name at least one learning rate")
    bad = [x for x in lrs if not x > 0]
    if bad:
        raise ValueError(f"learning rates must be > 0, got {bad[0]:g}")
    if any(b <= a for a, b in zip(lrs, lrs[1:])):
        raise ValueError(f"learning rates must be strictly ascending, got {','.join(f'{x:g}' for x in lrs)}")
    return lrs


def _untouched_dev_refusal(study: Study, target: str, adapter) -> dict[str, float]:
    """Mean P(refuse) of every other domain's probe prompts under ``adapter`` (logit score, one cached stage)."""
    from study.trajectory import refusal_probability

    sets = {d: load_prompts(d, "probe", limit=study.cfg.probe_limit) for d in DOMAINS if d != target}
    _, records = evaluate_sets(study, f"dev-untouched-{target}", sets, adapter=adapter, generate=False)
    return {d: float(np.mean([refusal_probability(r) for r in records if r.domain == d])) for d in sets}


def choose_lr(study: Study, target: str, lrs: Sequence[float], seed: int | None = None,
              all_lrs: bool = False, untouched: bool = True) -> dict:
    """Train NPO alone on ``target`` at each learning rate (ascending) with the study's trajectory
    settings, and read each run's operating point on the dev split (:func:`study.operating_point`).

    Each run is the stage :func:`study.condition` trains for seed ``seed`` at that learning rate (no
    retain loss, ``trajectory_steps`` steps, the study's snapshots), so the run at the chosen rate is
    the one H1 reads when the study runs with ``lr`` set to it. Rates above the first one that reaches
    the level are not trained unless ``all_lrs``.

    Args:
        lrs: candidate learning rates, strictly ascending.
        seed: training seed (default: the study's first).
        untouched: also score the other domains' probe prompts at each operating point, and on the
            base model (one logit-score stage each).

    Returns:
        ``{"target", "level", "steps"`` (the budget), ``"seed", "lrs"`` (one dict per rate trained:
        ``lr, step, reached, dev_refusal``, and with ``untouched`` ``untouched_dev_refusal`` (mean over
        the other domains) and ``untouched_by_domain``), ``"base_untouched_dev_refusal"``,
        ``"chosen"`` (the smallest rate that reached the level, or ``None``), ``"reason"}``.
    """
    from training.trainer import snapshot_dir

    check_domain(target, allow_extra=False)
    lrs = check_lrs(lrs)
    cfg = study.cfg
    if not cfg.trajectory_steps:
        raise ValueError("StudyConfig.trajectory_steps is 0: the budget is read off a trajectory; set it (e.g. 16)")
    if cfg.operating_level is None:
        raise ValueError("StudyConfig.operating_level is None: there is no level to reach; set it (e.g. 0.10)")
    seed = cfg.seeds[0] if seed is None else seed
    out: dict = {"target": target, "level": cfg.operating_level, "steps": cfg.trajectory_steps, "seed": seed,
                 "lrs": [], "base_untouched_dev_refusal": None, "chosen": None, "reason": ""}
    if untouched:
        base = _untouched_dev_refusal(study, target, None)
        out["base_untouched_dev_refusal"] = float(np.mean(list(base.values())))
    for lr in lrs:
        # The same call as study.condition's for NPO alone, so the stage at the study's lr is H1's.
        run = study.unlearn(target, "npo", (), seed=seed, lr=lr, steps=cfg.trajectory_steps,
                            snapshot_every=study.snapshot_every)
        point = operating_point(study, run, target)
        row = {"lr": lr, "step": point["step"], "reached": point["reached"], "dev_refusal": point["dev_refusal"],
               "run": str(run)}
        if untouched:
            by_domain = _untouched_dev_refusal(study, target, snapshot_dir(run, point["step"]))
            row["untouched_dev_refusal"] = float(np.mean(list(by_domain.values())))
            row["untouched_by_domain"] = by_domain
        out["lrs"].append(row)
        if point["reached"] and out["chosen"] is None:
            out["chosen"] = lr
            out["reason"] = (f"lr {lr:g} is the smallest tried whose dev refusal reaches {cfg.operating_level:g} "
                             f"within {cfg.trajectory_steps} steps (at step {point['step']})")
            if not all_lrs:
                break
    if out["chosen"] is None:
        low = min(out["lrs"], key=lambda r: r["dev_refusal"])
        out["reason"] = (f"no lr reaches dev refusal {cfg.operating_level:g} within {cfg.trajectory_steps} steps "
                         f"(lowest {low['dev_refusal']:.3f} at lr {low['lr']:g}): try larger lrs or more "
                         "trajectory_steps")
    return out
