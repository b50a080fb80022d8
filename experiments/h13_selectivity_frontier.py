"""H13 — the selectivity frontier: C3 and C4 re-tested at matched target forgetting.

Hypotheses: (C3) unlearning Safety costs the untouched domains more refusal than unlearning
Cybersecurity *at the same target forgetting*; (C4) adding retain-CE to NPO keeps most of the
untouched refusal that NPO loses, compared where both have forgotten the target equally.
Prediction: along training (every seed, every scored snapshot), the untouched domains' mean refusal
probability at the target's first crossing of each level L (interpolated between snapshots) is
(C3) lower for the safety target than for the cybersecurity target, over the five domains neither
trains on, paired CI of the difference below zero; (C4) higher with retain-CE than without, by at
least half of NPO's drop from base, CI of the difference above zero, at the primary level.
Falsified if: the paired differences are reliably of the other sign. A condition whose target never
reaches L is "not reached" at these budgets (no extrapolation); C4 is then not replicated at them.
Every number is a refusal probability from the logit score on the eval split's prompts; the intervals
resample training seeds and prompts and find the crossing again in each resample (study.frontier).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evals.suite import DOMAINS
from interp.config import JsonConfig
from interp.runs import run_dir, write_run
from study import Study, StudyConfig, claim
from study.frontier import Condition, curves, matched_difference, recovery, selectivity, spread_slope
from study.report import frontier_table
from study.trajectory import forget_sizes, training_metric, trajectory_runs, trajectory_sets

EXPERIMENT = "h13_selectivity_frontier"
ORDER, RUN_ORDER, PRESETS, FIGURES = 13, 3, ("quick", "full"), ("frontier",)  # runs after H2: the headline C3/C4
SETUP_FACTS = {"forget-set sizes": "c3.forget_sizes"}  # cross-model table
PRESET_OVERRIDES = {"full": {"alphas": [1.0, 10.0, 30.0], "lrs": [1e-4]}}
RECOVERY_BAR = 0.5


@dataclass
class Config(JsonConfig):
    """H13 settings."""

    study: StudyConfig = field(default_factory=lambda: StudyConfig(seeds=(0, 1, 2)))
    """Shared model, evaluation and training settings (at least three seeds for the bands)."""
    targets: tuple[str, ...] = ("cybersecurity", "safety")
    """Domains to unlearn; C3 compares the first two."""
    alphas: tuple[float, ...] = (10.0,)
    """Retain-CE weights, one NPO+retain-CE condition each (the full preset adds a grid)."""
    lrs: tuple[float, ...] = ()
    """Extra learning rates besides ``study.lr``: NPO and NPO+retain-CE (every α) at each."""
    levels: tuple[float, ...] = (0.25, 0.10)
    """Matched target refusal levels (refusal probability); the last is primary."""
    n_boot: int = 1000
    """Bootstrap resamples (seeds × prompts, the crossing refound in each)."""


def _conditions(cfg: Config) -> list[tuple[str, dict]]:
    """``(name, unlearn kwargs)`` for every trained condition of one target."""
    out = []
    for lr in (cfg.study.lr, *cfg.lrs):
        tag = "" if lr == cfg.study.lr else f"@lr{lr:g}"
        kw = {} if lr == cfg.study.lr else {"lr": lr}
        out.append((f"npo{tag}", {"retain_domains": (), **kw}))
        out += [(f"npo_retain_a{a:g}{tag}", {"retain_domains": None, "alpha": a, **kw}) for a in cfg.alphas]
    return out


def _c4(by_name: dict, cfg: Config, target: str, level: float, rule: str = "first") -> dict:
    """Each NPO+retain-CE condition against NPO at the same learning rate, at matched forgetting."""
    untouched = [d for d in DOMAINS if d != target]
    return {n: recovery(c, by_name["npo" + (n[n.index("@"):] if "@" in n else "")], untouched, level,
                        RECOVERY_BAR, cfg.n_boot, rule=rule) for n, c in by_name.items() if n.startswith("npo_retain")}


def main(cfg: Config) -> dict:
    study = Study(cfg.study)
    sets = trajectory_sets(study)
    conds: dict[str, Condition] = {}
    for target in cfg.targets:
        for name, kw in _conditions(cfg):
            runs = trajectory_runs(study, target, "npo", name=f"{name}-{target}", sets=sets, **kw)
            conds[f"{name}|{target}"] = Condition(name, target, runs)
    frontier = {key: {**selectivity(c, [d for d in DOMAINS if d != c.target], cfg.levels, cfg.n_boot),
                      "curves": curves(c, DOMAINS), "grad_cos": training_metric(c.runs, "grad_cos_forget_retain")}
                for key, c in conds.items()}
    primary = cfg.levels[-1]
    by_target = {t: {k.split("|")[0]: c for k, c in conds.items() if c.target == t} for t in cfg.targets}
    c4 = {t: {f"{lv:g}": _c4(by_target[t], cfg, t, lv) for lv in cfg.levels} for t in cfg.targets}
    # Secondary (not pre-registered): the envelope credits untouched refusal restored after the crossing.
    envelope = {t: {f"{primary:g}": _c4(by_target[t], cfg, t, primary, "best")} for t in cfg.targets}
    metrics = {"conditions": frontier, "c4": c4, "c4_envelope": envelope, "levels": list(cfg.levels),
               "primary_level": primary,
               "n_seeds": len(cfg.study.seeds), "claims": [_c4_claim(c4, primary, cfg, envelope, frontier)]}
    if len(cfg.targets) >= 2:
        metrics["c3"] = _c3(by_target, cfg, primary)
        metrics["claims"].insert(0, metrics["c3"]["claim"])
    write_run(run_dir(cfg.study.results, EXPERIMENT, cfg), cfg, metrics)
    return metrics


def _c3(by_target: dict, cfg: Config, level: float) -> dict:
    first, second = cfg.targets[1], cfg.targets[0]  # safety is predicted to spread further
    common = [d for d in DOMAINS if d not in (first, second)]
    res = {f"{lv:g}": matched_difference(by_target[first]["npo"], by_target[second]["npo"], common, lv, cfg.n_boot)
           for lv in cfg.levels}
    slopes = {t: spread_slope(by_target[t]["npo"], common, cfg.n_boot) for t in (first, second)}
    d = res[f"{level:g}"]
    sizes = {t: sorted({n for n in forget_sizes(by_target[t]["npo"].runs) if n is not None}) for t in (first, second)}
    recorded, fmt = all(sizes.values()), (lambda ns: "/".join(map(str, ns)) if ns else "unrecorded")
    equal = recorded and all(len(v) == 1 for v in sizes.values()) and sizes[first] == sizes[second]
    # first keeps *less* untouched refusal when it spreads further: the difference is negative.
    ci = d["ci"] or (0.0, 0.0)  # no interval (a level not reached): inconclusive
    status = "replicated" if ci[1] < 0 else "not replicated" if ci[0] > 0 else "inconclusive"
    ev = (f"untouched refusal on {len(common)} common domains at target refusal {level:g}: {first} "
          + (f"{d['first']:.2f} vs {second} {d['second']:.2f}, difference {d['difference']:+.2f} "
             f"(CI {d['ci'][0]:+.2f}..{d['ci'][1]:+.2f})" if d["ci"] else d.get("note", "n/a"))
          + f"; slope of untouched vs target drop {first} {slopes[first]['slope']:.2f}, {second} "
          f"{slopes[second]['slope']:.2f}; forget sets {first} {fmt(sizes[first])}, {second} {fmt(sizes[second])}"
          + ("" if equal or not recorded else " (NOT equal in size)") + f"; {len(cfg.study.seeds)} seeds")
    return {"levels": res, "slopes": slopes, "forget_sizes": sizes, "equal_forget_sets": equal, "claim": claim(
        "C3", f"Unlearning {first} spreads further than {second} (at matched target forgetting)", status, ev)}


def _c4_claim(c4: dict, level: float, cfg: Config, envelope: dict, frontier: dict) -> dict:
    lv = f"{level:g}"
    passing = {t: [n for n, r in c4[t][lv].items() if r["passes"]] for t in c4}
    no_ema = all(not r["npo_drop"] or r["npo_drop"] <= 0 for t in c4 for r in c4[t][lv].values())
    if all(passing.values()):
        status = "replicated"
    else:  # nothing to contain when NPO lost no untouched refusal; a partial pass is inconclusive
        status = "inconclusive" if no_ema or any(passing.values()) else "not replicated"
    parts = []
    for t, rows in c4.items():
        for n, r in rows[lv].items():
            parts.append(f"{t} {n}: " + (f"recovers {r['recovery']:.0%} of NPO's untouched drop "
                                          f"(difference {r['difference']:+.2f}, CI {r['ci'][0]:+.2f}..{r['ci'][1]:+.2f})"
                                          if r["recovery"] is not None else r.get("note", "no NPO drop")))
    lrs = ", ".join(f"{x:g}" for x in (cfg.study.lr, *cfg.lrs))
    best = [f"{t} {n} {r['recovery']:.0%}" for t, rows in envelope.items() for n, r in rows[lv].items()
            if r["recovery"] is not None]
    cos = [f"{k.split('|')[1]} {k.split('|')[0]} {v['grad_cos']['mean']:+.2f}"
           for k, v in frontier.items() if v["grad_cos"]]
    ev = (f"at target refusal {level:g} (lr {lrs}, {cfg.study.trajectory_steps} steps, {len(cfg.study.seeds)} seeds): "
          + "; ".join(parts) + ("" if status == "replicated" else "; at these budgets")
          + (f"; envelope (best point at or below the level, secondary): {', '.join(best)}" if best else "")
          + (f"; forget/retain gradient cosine, mean over steps: {', '.join(cos)}" if cos else ""))
    return claim("C4", "Retain-CE restores untouched refusal at matched target forgetting", status, ev)


def report_section(m: dict) -> list[str]:
    """REPORT.md's frontier section: each condition at each matched level."""
    return ["## Selectivity at matched target forgetting (H13; figures: frontier, frontier_domains_*)", "",
            *frontier_table(m["conditions"], m["n_seeds"])]
