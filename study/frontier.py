"""The selectivity frontier: collateral refusal loss per unit of target forgetting, at matched forgetting.

A condition (method × α × lr × target) is a set of trajectories, one per training seed, measured on
the same prompts (:class:`study.trajectory.Trajectory`). Along each trajectory the target's mean
refusal falls; the *selectivity* of the condition at a level ``L`` is the untouched domains' mean
refusal at the first point where the target's refusal reaches ``L``, linearly interpolated between
the two snapshots that bracket the crossing. Comparing conditions at the same ``L`` removes the
step budget from the comparison: a counter-term that slows forgetting is compared where it has
forgotten as much, not after as many steps.

Intervals come from a two-level bootstrap that redoes the whole computation per resample: training
seeds are drawn with replacement, and prompts within each domain, the same draws for every condition
that shares them (so differences between conditions are paired over seeds k and shared prompts),
and the crossing is found again on the resampled target curve. A seed whose target never reaches
``L`` is left out of the mean and counted; a condition none of whose seeds reach it reports "not
reached" with the closest level it got to, never an extrapolation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from study.trajectory import Trajectory

__all__ = ["RULES", "crossing", "Condition", "at_level", "matched_difference", "matched_contrast", "spread_slope",
           "selectivity", "recovery", "curves"]


def crossing(curve: np.ndarray, level: float) -> tuple[int, float] | None:
    """First point where ``curve`` (one value per step) reaches ``level`` or below, as ``(i, w)``:
    the value there is ``(1 - w)·x[i-1] + w·x[i]``; ``(0, 1.0)`` when it starts at or below the level;
    ``None`` when it never gets there."""
    curve = np.asarray(curve, dtype=np.float64)
    below = np.nonzero(curve <= level)[0]
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return 0, 1.0
    hi, lo = curve[i - 1], curve[i]
    w = 1.0 if hi == lo else float((hi - level) / (hi - lo))
    return i, w


def _interp(values: np.ndarray, cross: tuple[int, float]) -> float:
    i, w = cross
    return float(values[i]) if i == 0 else float((1 - w) * values[i - 1] + w * values[i])


@dataclass
class Condition:
    """The trajectories of one condition (one per seed), on shared prompts."""

    name: str
    target: str
    runs: list[Trajectory]
    _stacks: dict[str, np.ndarray] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError(f"condition {self.name!r} has no trajectories")
        ids = self.runs[0].prompt_ids
        for t in self.runs[1:]:
            if t.prompt_ids != ids:
                raise ValueError(f"condition {self.name!r}: seeds were measured on different prompts")

    def stack(self, name: str) -> np.ndarray:
        """``seeds × steps × prompts`` of set ``name`` (seeds must share their step grid); built once,
        since every bootstrap resample indexes it."""
        if name not in self._stacks:
            grids = {tuple(t.steps) for t in self.runs}
            if len(grids) != 1:
                raise ValueError(f"condition {self.name!r}: seeds have different snapshot steps {sorted(grids)}")
            self._stacks[name] = np.stack([t.p[name] for t in self.runs])
        return self._stacks[name]

    def kl(self) -> np.ndarray:
        """``seeds × steps`` KL to base on benign prompts."""
        return np.asarray([[np.nan if v is None else v for v in t.kl] for t in self.runs], dtype=np.float64)


RULES = ("first", "best")
"""Where a seed's trajectory is read at a level: ``first`` the first crossing (interpolated);
``best`` the frontier's envelope, the highest untouched refusal among the crossing and every later
scored point whose target refusal is still at or below the level (credits a counter-term that
restores untouched refusal after the target is forgotten)."""


def _seed_values(target: np.ndarray, others: list[np.ndarray], level: float,
                 extra: np.ndarray | None = None, rule: str = "first") -> tuple[list[float], list[float], float]:
    """Per seed: the untouched mean (and ``extra``) where the target is read at ``level`` (``rule``).

    ``target``: seeds × steps (mean over its prompts); ``others``: each seeds × steps."""
    untouched = np.mean(others, axis=0)  # seeds × steps
    vals, extras = [], []
    for s in range(target.shape[0]):
        c = crossing(target[s], level)
        if c is None:
            continue
        points = [(_interp(untouched[s], c), c)]
        if rule == "best":
            points += [(float(untouched[s][j]), (j, 1.0)) for j in range(c[0] + 1, target.shape[1])
                       if target[s][j] <= level]
        value, where = max(points, key=lambda p: p[0])
        vals.append(value)
        if extra is not None:
            extras.append(_interp(extra[s], where))
    return vals, extras, float(target.min())


def _check_rule(rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown reading rule {rule!r}; choose one of {', '.join(RULES)}")


def _resampled(cond: Condition, domains: Sequence[str], rows: np.ndarray, cols: dict[str, np.ndarray]):
    target = cond.stack(cond.target)[rows][:, :, cols[cond.target]].mean(-1)
    others = [cond.stack(d)[rows][:, :, cols[d]].mean(-1) for d in domains]
    return target, others


def at_level(cond: Condition, domains: Sequence[str], level: float, n_boot: int = 2000, seed: int = 0,
             rule: str = "first") -> dict:
    """Untouched refusal of ``cond`` (mean over ``domains``) at matched target refusal ``level``, each
    seed read by ``rule`` (:data:`RULES`).

    Returns ``value`` (mean over the seeds that reach the level), its CI, ``drop`` from the base
    (step 0) with CI, the KL to base at the crossing, ``reached`` (seeds that got there of all), and
    ``closest`` (the lowest target refusal seen) when none did.
    """
    _check_rule(rule)
    domains = [d for d in domains if d != cond.target]
    n_seeds = len(cond.runs)
    full = {d: np.arange(cond.stack(d).shape[2]) for d in (*domains, cond.target)}
    target, others = _resampled(cond, domains, np.arange(n_seeds), full)
    base = float(np.mean([o[:, 0].mean() for o in others]))
    vals, kls, closest = _seed_values(target, others, level, cond.kl(), rule)
    out = {"level": level, "rule": rule, "base_untouched": base, "reached": len(vals), "n_seeds": n_seeds,
           "base_target": float(target[:, 0].mean())}
    notes = []
    if out["base_target"] <= level:
        notes.append(f"the target starts at {out['base_target']:.2f}, at or below the level: nothing to forget")
    if base < 0.02:
        notes.append(f"{', '.join(domains)} refuse(s) with probability {base:.2f} at base: no refusal to lose")
    if notes:
        out["note"] = "; ".join(notes)
    if not vals:
        return {**out, "value": None, "ci": None, "drop": None, "drop_ci": None, "kl": None,
                "closest": closest, "note": f"not reached: the target's refusal got to {closest:.2f} at best"}
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        rows = rng.integers(0, n_seeds, n_seeds)
        cols = {d: rng.integers(0, len(ix), len(ix)) for d, ix in full.items()}
        v, _, _ = _seed_values(*_resampled(cond, domains, rows, cols), level, rule=rule)
        if v:
            boots.append((float(np.mean(v)), float(np.mean([cond.stack(d)[rows][:, 0][:, cols[d]].mean()
                                                             for d in domains]))))
    b = np.asarray(boots).reshape(-1, 2)
    value = float(np.mean(vals))
    ci = [float(np.quantile(b[:, 0], 0.025)), float(np.quantile(b[:, 0], 0.975))] if len(b) else None
    dci = [float(np.quantile(b[:, 1] - b[:, 0], 0.025)), float(np.quantile(b[:, 1] - b[:, 0], 0.975))] \
        if len(b) else None
    kl = [k for k in kls if np.isfinite(k)]
    return {**out, "value": value, "ci": ci, "drop": base - value, "drop_ci": dci,
            "kl": float(np.mean(kl)) if kl else None, "closest": closest,
            "boot_reached_share": len(boots) / n_boot if n_boot else None}


def matched_difference(first: Condition, second: Condition, domains: Sequence[str], level: float,
                       n_boot: int = 2000, seed: int = 0, rule: str = "first") -> dict:
    """Untouched refusal of ``first`` minus ``second`` at matched target refusal ``level``, over the
    ``domains`` untouched by both, paired: seed k with seed k, the same prompt draws for both.

    With different targets (C3) each condition's crossing is found on its own target's curve; the
    untouched domains and their prompts are shared. Positive: ``first`` keeps more refusal. Both are
    read by ``rule`` (:data:`RULES`).
    """
    _check_rule(rule)
    domains = [d for d in domains if d not in (first.target, second.target)]
    n = min(len(first.runs), len(second.runs))
    if n < len(first.runs) or n < len(second.runs):
        first, second = (Condition(c.name, c.target, c.runs[:n]) for c in (first, second))
    # In a fixed order: the bootstrap draws each domain's resample in turn (a set would follow PYTHONHASHSEED).
    names = list(dict.fromkeys((*domains, first.target, second.target)))
    sizes = {d: first.stack(d).shape[2] for d in names}
    full = {d: np.arange(k) for d, k in sizes.items()}
    va, _, _ = _seed_values(*_resampled(first, domains, np.arange(n), full), level, rule=rule)
    vb, _, _ = _seed_values(*_resampled(second, domains, np.arange(n), full), level, rule=rule)
    out = {"level": level, "rule": rule, "domains": domains, "n_seeds": n, "reached": [len(va), len(vb)]}
    if not va or not vb:
        return {**out, "difference": None, "ci": None,
                "note": "not reached by " + " and ".join(c.name for c, v in ((first, va), (second, vb)) if not v)}
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        rows = rng.integers(0, n, n)
        cols = {d: rng.integers(0, k, k) for d, k in sizes.items()}
        a, _, _ = _seed_values(*_resampled(first, domains, rows, cols), level, rule=rule)
        b, _, _ = _seed_values(*_resampled(second, domains, rows, cols), level, rule=rule)
        if a and b:
            boots.append(np.mean(a) - np.mean(b))
    diff = float(np.mean(va) - np.mean(vb))
    ci = [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))] if boots else None
    return {**out, "difference": diff, "ci": ci, "first": float(np.mean(va)), "second": float(np.mean(vb)),
            "boot_reached_share": len(boots) / n_boot if n_boot else None}


def matched_contrast(first: Condition, others: Sequence[Condition], domains: Sequence[str], level: float,
                     n_boot: int = 2000, seed: int = 0, rule: str = "first") -> dict:
    """Untouched refusal of ``first`` minus the mean over ``others`` at matched target refusal ``level``,
    over the ``domains`` untouched by all of them, paired: seed k with seed k, and one draw of seeds and
    prompts per resample shared by every condition, so the interval is that of the mean over ``others``
    of the paired differences (``others`` are fixed, not resampled). With one other it is
    :func:`matched_difference` (the same resamples).

    If any condition never reaches ``level`` there is no difference: averaging over the others that
    happen to reach it would select them. The result says which did not, with the lowest target
    refusal each got to (``closest``); nothing is extrapolated.
    """
    _check_rule(rule)
    if not others:
        raise ValueError("matched_contrast needs at least one other condition")
    conds = [first, *others]
    domains = [d for d in domains if d not in {c.target for c in conds}]
    n = min(len(c.runs) for c in conds)
    conds = [c if len(c.runs) == n else Condition(c.name, c.target, c.runs[:n]) for c in conds]
    out = {"level": level, "rule": rule, "domains": domains, "n_seeds": n, "names": [c.name for c in conds]}
    if not domains:
        return {**out, "reached": None, "difference": None, "ci": None, "note": "no domain left to compare"}
    # In a fixed order: the bootstrap draws each domain's resample in turn (a set would follow PYTHONHASHSEED).
    names = list(dict.fromkeys((*domains, *(c.target for c in conds))))
    sizes = {d: conds[0].stack(d).shape[2] for d in names}
    full = {d: np.arange(k) for d, k in sizes.items()}
    read = [_seed_values(*_resampled(c, domains, np.arange(n), full), level, rule=rule) for c in conds]
    out["reached"] = [len(v) for v, _, _ in read]
    short = {c.name: closest for c, (v, _, closest) in zip(conds, read) if not v}
    if short:
        return {**out, "difference": None, "ci": None, "closest": short,
                "note": "not reached by " + " and ".join(f"{k} (its target's refusal got to {v:.2f} at best)"
                                                         for k, v in short.items())}
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        rows = rng.integers(0, n, n)
        cols = {d: rng.integers(0, k, k) for d, k in sizes.items()}
        vs = [_seed_values(*_resampled(c, domains, rows, cols), level, rule=rule)[0] for c in conds]
        if all(vs):
            boots.append(np.mean(vs[0]) - np.mean([np.mean(v) for v in vs[1:]]))
    means = [float(np.mean(v)) for v, _, _ in read]
    diff = means[0] - float(np.mean(means[1:]))
    ci = [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))] if boots else None
    return {**out, "difference": diff, "ci": ci, "first": means[0], "second": float(np.mean(means[1:])),
            "others": dict(zip(out["names"][1:], means[1:])), "boot_reached_share": len(boots) / n_boot if n_boot else None}


def spread_slope(cond: Condition, domains: Sequence[str], n_boot: int = 2000, seed: int = 0) -> dict:
    """Slope of the untouched drop against the target drop along training (through the origin, all
    snapshots of all seeds): collateral refusal lost per unit of target refusal forgotten."""
    domains = [d for d in domains if d != cond.target]
    n_seeds = len(cond.runs)
    full = {d: np.arange(cond.stack(d).shape[2]) for d in (*domains, cond.target)}

    def slope(rows, cols) -> float:
        target, others = _resampled(cond, domains, rows, cols)
        x = (target[:, :1] - target).ravel()
        u = np.mean(others, axis=0)
        y = (u[:, :1] - u).ravel()
        return float((x @ y) / (x @ x)) if x @ x > 0 else float("nan")

    value = slope(np.arange(n_seeds), full)
    rng = np.random.default_rng(seed)
    boots = [slope(rng.integers(0, n_seeds, n_seeds), {d: rng.integers(0, len(ix), len(ix)) for d, ix in full.items()})
             for _ in range(n_boot)]
    boots = [b for b in boots if np.isfinite(b)]
    ci = [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))] if boots else None
    return {"slope": value, "ci": ci, "n_seeds": n_seeds}


def selectivity(cond: Condition, domains: Sequence[str], levels: Sequence[float], n_boot: int = 2000) -> dict:
    """A condition on the frontier: at each level, the untouched domains' refusal (and drop), the
    over-refusal and benign refusal at the same point, and the spread slope."""
    return {"levels": {f"{lv:g}": {"untouched": at_level(cond, domains, lv, n_boot),
                                   "over_refusal": at_level(cond, ["over_refusal"], lv, n_boot),
                                   "benign": at_level(cond, ["benign"], lv, n_boot)} for lv in levels},
            "slope": spread_slope(cond, domains, n_boot)}


def recovery(retain: Condition, npo: Condition, domains: Sequence[str], level: float, bar: float = 0.5,
             n_boot: int = 2000, rule: str = "first") -> dict:
    """How much of NPO's untouched drop a counter-term keeps, at matched target refusal: the paired
    difference (retain − NPO) over NPO's drop from base; ``passes`` when it is at least ``bar`` and
    the difference's CI is above zero. Both conditions are read by ``rule``, NPO's drop too."""
    diff = matched_difference(retain, npo, domains, level, n_boot, rule=rule)
    drop = at_level(npo, domains, level, n_boot=0, rule=rule)["drop"]
    rec = diff["difference"] / drop if diff["difference"] is not None and drop and drop > 0 else None
    return {**diff, "npo_drop": drop, "recovery": rec,
            "passes": rec is not None and rec >= bar and diff["ci"] is not None and diff["ci"][0] > 0}


def curves(cond: Condition, domains: Sequence[str]) -> dict:
    """Per seed: steps, target / untouched-mean / per-domain refusal, over-refusal, benign, KL (figures)."""
    untouched = [d for d in domains if d != cond.target]
    return {"target": cond.target, "seeds": [{
        "steps": t.steps, "target": t.mean(cond.target).tolist(),
        "untouched": np.mean([t.mean(d) for d in untouched], axis=0).tolist(),
        "domains": {d: t.mean(d).tolist() for d in domains}, "over_refusal": t.mean("over_refusal").tolist(),
        "benign": t.mean("benign").tolist(), "kl": t.kl, "run": t.run} for t in cond.runs]}
