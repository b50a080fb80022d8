"""Regime settings chosen on the dev split, never on the eval prompts that decide the claims, and
written down with the run that uses them:

- a model's unlearning budget (:func:`choose_lr`): the smallest learning rate at which NPO alone
  brings the target's refusal on its *probe* prompts to the study's operating level within the
  trajectory's steps;
- a retain term's weight α (:func:`choose_alpha`): the one whose run keeps the most untouched
  refusal on the probe prompts at that level, interpolated to it between snapshots (the dev split's
  version of the frontier's question).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evals.suite import DOMAINS, check_domain, load_prompts
from study.conditions import evaluate_sets, operating_point
from study.core import Study
from study.frontier import crossing

__all__ = ["check_alpha_choice", "check_alphas", "check_lrs", "choose_alpha", "choose_lr", "retain_weight"]


def _check_grid(values: Sequence[float], what: str) -> tuple[float, ...]:
    values = tuple(float(x) for x in values)
    if not values:
        raise ValueError(f"name at least one {what}")
    bad = [x for x in values if not x > 0]
    if bad:
        raise ValueError(f"{what}s must be > 0, got {bad[0]:g}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{what}s must be strictly ascending, got {','.join(f'{x:g}' for x in values)}")
    return values


def check_lrs(lrs: Sequence[float]) -> tuple[float, ...]:
    """``lrs`` as a tuple, or a one-line ``ValueError``: at least one, each > 0, strictly ascending."""
    return _check_grid(lrs, "learning rate")


def check_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    """``alphas`` as a tuple, or a one-line ``ValueError``: at least one, each > 0, strictly ascending."""
    return _check_grid(alphas, "retain weight")


def _untouched_dev_refusal(study: Study, target: str, adapter) -> dict[str, float]:
    """Mean P(refuse) of every other domain's probe prompts under ``adapter`` (logit score, one cached stage)."""
    from study.trajectory import refusal_probability

    sets = {d: load_prompts(d, "probe", limit=study.cfg.probe_limit) for d in DOMAINS if d != target}
    _, records = evaluate_sets(study, f"dev-untouched-{target}", sets, adapter=adapter, generate=False)
    return {d: float(np.mean([refusal_probability(r) for r in records if r.domain == d])) for d in sets}


def check_alpha_choice(alphas: Sequence[float], seed: int, claim_seeds: Sequence[int]) -> tuple[float, ...]:
    """A weight grid and the seed that chooses from it, checked before any run: :func:`check_alphas`,
    and a seed that is not one of the claim's (``()`` passes: nothing is chosen)."""
    if not alphas:
        return ()
    if seed in claim_seeds:
        raise ValueError(f"alpha_seed {seed} is one of the study's seeds {list(claim_seeds)}: "
                         "choose the weight with a seed the claim's runs do not use")
    return check_alphas(alphas)


def _check_trajectory(cfg) -> None:
    if not cfg.trajectory_steps:
        raise ValueError("StudyConfig.trajectory_steps is 0: the choice is read off a trajectory; set it (e.g. 16)")
    if cfg.operating_level is None:
        raise ValueError("StudyConfig.operating_level is None: there is no level to reach; set it (e.g. 0.10)")


def _level_weight(point: dict) -> float:
    """Where the level lies between the point before the crossing (0) and the crossing (1), linear in
    the target's dev refusal (:func:`study.frontier.crossing`, the frontier's own rule); 1 when there is
    nothing to interpolate from."""
    if not point["reached"] or point.get("before") is None:
        return 1.0
    i, w = crossing(np.array([point["before"]["dev_refusal"], point["dev_refusal"]]), point["level"])
    return w if i else 0.0  # i == 0: the point before (the base model) is already at the level


def _dev_point(study: Study, run, target: str, untouched: bool) -> dict:
    """One run's operating point on the dev split (:func:`study.operating_point`) and, with
    ``untouched``, the other domains' probe refusal at matched target forgetting: interpolated to
    where the target's dev refusal crosses the level, between the snapshots either side of it (a run
    whose crossing snapshot overshoots the level further is not charged for the overshoot). A run that
    never reaches the level is read at its last snapshot; ``untouched_at_step`` is the crossing
    snapshot's own reading."""
    from training.trainer import snapshot_dir

    point = operating_point(study, run, target)
    row = {"step": point["step"], "reached": point["reached"], "dev_refusal": point["dev_refusal"], "run": str(run)}
    if untouched:
        at_step = _untouched_dev_refusal(study, target, snapshot_dir(run, point["step"]))
        w = _level_weight(point)
        if w < 1.0:
            prev = point["before"]["step"]
            before = _untouched_dev_refusal(study, target, snapshot_dir(run, prev) if prev else None)
            by_domain = {d: before[d] + w * (at_step[d] - before[d]) for d in at_step}
        else:
            by_domain = at_step
        row["untouched_dev_refusal"] = float(np.mean(list(by_domain.values())))
        row["untouched_at_step"] = float(np.mean(list(at_step.values())))
        row["untouched_by_domain"] = by_domain
    return row


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
    check_domain(target, allow_extra=False)
    lrs = check_lrs(lrs)
    cfg = study.cfg
    _check_trajectory(cfg)
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
        point = {"lr": lr, **_dev_point(study, run, target, untouched)}
        out["lrs"].append(point)
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


def choose_alpha(study: Study, target: str, alphas: Sequence[float], seed: int, **unlearn_kwargs) -> dict:
    """Train NPO plus one retain term on ``target`` at each weight α, with the study's trajectory
    settings, and choose the α whose run keeps the most untouched refusal on the dev split where the
    target's dev refusal first reaches the operating level (ties: the smaller α).

    Every α is trained (the objective is a maximum, not a threshold). A run that never reaches the
    level within the trajectory's steps cannot be compared there and is not chosen; if none does,
    ``chosen`` is ``None`` and the caller decides (H14 keeps the smallest α, the closest to NPO).

    Args:
        alphas: candidate weights, strictly ascending.
        seed: training seed. Use one the claim's runs do not: the chosen α's own noise would
            otherwise favour it on the eval prompts too (the winner's curse through shared training).
        **unlearn_kwargs: the method's :meth:`Study.unlearn` arguments besides ``alpha``, e.g.
            ``retain_domains=None, retain_mode="kl"``.

    Returns:
        ``{"target", "level", "steps", "seed", "alphas"`` (one dict per α: ``alpha, step, reached,
        dev_refusal, untouched_dev_refusal, untouched_by_domain, run``), ``"base_untouched_dev_refusal",
        "chosen"`` (an α or ``None``), ``"reason"}``.
    """
    check_domain(target, allow_extra=False)
    alphas = check_alphas(alphas)
    cfg = study.cfg
    _check_trajectory(cfg)
    if "alpha" in unlearn_kwargs:
        raise ValueError("choose_alpha sets alpha itself; pass the method's other arguments only")
    base = _untouched_dev_refusal(study, target, None)
    out: dict = {"target": target, "level": cfg.operating_level, "steps": cfg.trajectory_steps, "seed": seed,
                 "alphas": [], "base_untouched_dev_refusal": float(np.mean(list(base.values()))), "chosen": None,
                 "reason": ""}
    retain_domains = unlearn_kwargs.pop("retain_domains", None)
    for alpha in alphas:
        run = study.unlearn(target, "npo", retain_domains, seed=seed, steps=cfg.trajectory_steps,
                            snapshot_every=study.snapshot_every, alpha=alpha, **unlearn_kwargs)
        out["alphas"].append({"alpha": alpha, **_dev_point(study, run, target, untouched=True)})
    reached = [r for r in out["alphas"] if r["reached"]]
    if reached:
        best = max(reached, key=lambda r: (r["untouched_dev_refusal"], -r["alpha"]))
        out["chosen"] = best["alpha"]
        out["reason"] = (f"α {best['alpha']:g} keeps the most untouched dev refusal at target dev refusal "
                         f"{cfg.operating_level:g} ({best['untouched_dev_refusal']:.3f}, interpolated between snapshots) "
                         f"of the {len(reached)} of {len(alphas)} weights whose "
                         f"target dev refusal reaches {cfg.operating_level:g} within {cfg.trajectory_steps} steps")
    else:
        low = min(out["alphas"], key=lambda r: r["dev_refusal"])
        out["reason"] = (f"no α reaches target dev refusal {cfg.operating_level:g} within {cfg.trajectory_steps} steps "
                         f"(lowest {low['dev_refusal']:.3f} at α {low['alpha']:g}): try smaller weights, a larger lr "
                         "or more trajectory_steps")
    return out


def retain_weight(study: Study, target: str, alphas: Sequence[float], seed: int, alpha: float,
                  **unlearn_kwargs) -> dict:
    """The weight a retain term trains with on ``target``: :func:`choose_alpha`'s choice from
    ``alphas`` (the smallest α when none reaches the level: the one closest to NPO, which is the
    likeliest to get there on the eval prompts), or ``alpha`` unchosen when ``alphas`` is empty.

    Returns:
        :func:`choose_alpha`'s dict with ``"used"`` (the weight to train with) added; without a grid
        ``{"used": alpha, "chosen": None, "reason"}``.
    """
    if not alphas:
        return {"used": float(alpha), "chosen": None, "reason": "fixed (no grid to choose from)"}
    r = choose_alpha(study, target, alphas, seed, **unlearn_kwargs)
    return {**r, "used": r["chosen"] if r["chosen"] is not None else float(min(alphas))}
