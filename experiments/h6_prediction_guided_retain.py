"""H6 — closing the loop: choose retain domains by what entanglement predicts, at matched forgetting.

Hypothesis: if early-layer concept similarity to the target predicts which domains lose refusal when
the target is unlearned (H5), then a retain-CE budget of k domains × ``per_domain`` prompts spent on the
k domains most similar to the target keeps more untouched refusal than the same budget spent on k
random domains, compared where both have forgotten the target equally (:mod:`study.frontier`).
Prediction: at the primary matched target refusal level, the untouched domains' mean refusal
probability (every domain but the target) is *higher* with the predicted k than with random k:
predicted − random has a seeds × prompts CI above zero in every target. (The fixed-budget H6 said it
in drops, "the predicted drop is smaller"; refusal at matched target refusal is higher-is-better.)
Falsified if: the CI lies below zero in every target (random choices keep more): not replicated.
Anything else is inconclusive, and the verdict names why: a CI that spans zero, targets that disagree,
or a strategy that never reaches the level ("not reached", with the closest target refusal it got to;
never extrapolated). The primary level alone decides; the others are secondary.

Random draws (:mod:`study.retain_sets`): ``n_random`` fixed draws of k domains. "random" is their mean,
compared by :func:`study.frontier.matched_contrast`: predicted − the mean over the draws in one
bootstrap whose every resample draws seeds and prompts once for all conditions, i.e. the mean over
draws of the paired differences, with its CI. The draws are not resampled (two draws cannot estimate
the spread over k-subsets): the CI speaks to these draws. A draw short of the level makes "random" not
reached (averaging the draws that happen to reach it would select them); each draw's own paired
difference is reported beside it. Retained domains are propped up by their own retain prompts, so each
strategy's retained domains are listed and refusal is also compared over the held-out domains, those
no k-strategy (predicted or a random draw) retains (secondary; possibly none). References on the same
frontier: ``all`` (the same budget over every untouched domain) and ``none`` (plain NPO: the very runs
of H13/H14's ``npo``, the same cached stages). Retain-CE at the study's α; every number is a refusal
probability from the logit score on the eval split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evals.suite import DOMAINS
from interp.config import JsonConfig
from interp.runs import run_dir, write_run
from probes.entanglement import early_similarity
from study import Study, StudyConfig, claim
from study.frontier import Condition, curves, selectivity
from study.report import difference, frontier_cell, frontier_table, retain_set_lines
from study.retain_sets import compare_retain_sets, held_out_domains, retain_strategies
from study.trajectory import training_metric, trajectory_runs, trajectory_sets

EXPERIMENT = "h6_prediction_guided_retain"
ORDER, PRESETS, FIGURES = 6, ("full",), ("frontier_retain",)


@dataclass
class Config(JsonConfig):
    """H6 settings."""

    study: StudyConfig = field(default_factory=lambda: StudyConfig(seeds=(0, 1, 2)))
    """Shared model, evaluation and training settings (at least three seeds for the intervals)."""
    targets: tuple[str, ...] = ("cybersecurity", "safety")
    """Unlearning targets; the claim needs the CI on the same side of zero in every one."""
    k: int = 2
    """Number of retain domains chosen by prediction or at random."""
    per_domain: int = 6
    """Retain prompts per chosen domain; the total budget is k × per_domain for every strategy."""
    n_random: int = 2
    """Random draws of k domains (each a condition; compared through their mean)."""
    levels: tuple[float, ...] = (0.25, 0.10)
    """Matched target refusal levels (refusal probability); the last is primary."""
    n_boot: int = 1000
    """Bootstrap resamples (seeds × prompts, the crossing refound in each)."""

    def __post_init__(self) -> None:
        if not 1 <= self.k < len(DOMAINS) - 1:
            raise ValueError(f"k must be between 1 and {len(DOMAINS) - 2}")
        if self.n_random < 1:
            raise ValueError("n_random must be at least 1 random draw")
        if not self.levels or not all(0 < lv < 1 for lv in self.levels):
            raise ValueError("levels must be target refusal probabilities in (0, 1); the last is primary")


def _runs(study: Study, target: str, name: str, s: dict, sets: dict):
    if not s["retain_domains"]:  # the very call of H13/H14's NPO: the same cached stages
        return trajectory_runs(study, target, "npo", (), f"npo-{target}", sets)
    return trajectory_runs(study, target, "npo", retain_domains=tuple(s["retain_domains"]),
                           n_retain_per_domain=s["per_domain"], name=f"retain_{name}-{target}", sets=sets)


def main(cfg: Config) -> dict:
    study = Study(cfg.study)
    concepts, sets = study.concepts(), trajectory_sets(study)
    out, conditions = {}, {}
    for target in cfg.targets:
        untouched = [d for d in DOMAINS if d != target]
        sims = early_similarity(concepts, concepts.direction(target), "early", len(concepts.layers))
        strat = retain_strategies(target, sims, cfg.k, cfg.per_domain, cfg.n_random)
        conds = {n: Condition(n, target, _runs(study, target, n, s, sets)) for n, s in strat.items()}
        for n, c in conds.items():
            conditions[f"{n}|{target}"] = {**selectivity(c, untouched, cfg.levels, cfg.n_boot),
                                           "curves": curves(c, DOMAINS), "retain_domains": strat[n]["retain_domains"],
                                           "grad_cos": training_metric(c.runs, "grad_cos_forget_retain")}
        held = held_out_domains(strat, target)
        out[target] = {"early_similarity": {d: sims[d] for d in untouched}, "strategies": strat, "held_out": held,
                       **compare_retain_sets(conds, untouched, held, cfg.levels, cfg.n_boot)}
    metrics = {"targets": out, "conditions": conditions, "levels": list(cfg.levels), "primary_level": cfg.levels[-1],
               "n_seeds": len(cfg.study.seeds), "k": cfg.k, "per_domain": cfg.per_domain, "budget": cfg.k * cfg.per_domain}
    metrics["claim"] = verdict(metrics)
    write_run(run_dir(cfg.study.results, EXPERIMENT, cfg), cfg, metrics)
    return metrics


def verdict(m: dict) -> dict:
    """L1 from each target's predicted − random untouched refusal at the primary level: replicated if
    every CI is above zero, not replicated if every CI is below zero, else inconclusive (and why)."""
    lv = f"{m['primary_level']:g}"
    rows = {t: v["vs_random"]["untouched"] for t, v in m["targets"].items()}
    above = [t for t, r in rows.items() if r["ci"] is not None and r["ci"][0] > 0]
    below = [t for t, r in rows.items() if r["ci"] is not None and r["ci"][1] < 0]
    status = ("replicated" if rows and len(above) == len(rows) else
              "not replicated" if rows and len(below) == len(rows) else "inconclusive")
    why = [] if status != "inconclusive" else [
        f"{t}: {r['note']}" if r["ci"] is None else f"{t}: the CI spans zero"
        for t, r in rows.items() if t not in above and t not in below] + (
        ["the targets disagree in sign"] if above and below else [])
    parts = []
    for t, v in m["targets"].items():
        s, r = v["strategies"], rows[t]
        draws = " | ".join(", ".join(x["retain_domains"]) for n, x in s.items() if n.startswith("random"))
        ref = {n: frontier_cell(m["conditions"][f"{n}|{t}"]["levels"][lv]["untouched"]) for n in ("all", "none")}
        parts.append(
            f"{t} (predicted {', '.join(s['predicted']['retain_domains'])}; random {draws}; held out "
            f"{', '.join(v['held_out']) or 'none'}): predicted − random untouched refusal at target refusal {lv} "
            + (f"{r['difference']:+.2f} (CI {r['ci'][0]:+.2f}..{r['ci'][1]:+.2f}; predicted {r['first']:.2f}, "
               f"random {r['second']:.2f} = mean of {len(r['others'])} draws)" if r["ci"] else r.get("note", "n/a"))
            + f"; held out {difference(v['vs_random']['held_out'])}; references all {ref['all']}, none {ref['none']}")
    ev = "; ".join(parts) + "".join(
        f"; secondary, at {x:g}: " + ", ".join(f"{t} {difference(v['vs_random_at'][f'{x:g}']['untouched'])}"
                                             for t, v in m["targets"].items()) for x in m["levels"][:-1])
    ev += (f"; budget {m['k']} × {m['per_domain']} retain prompts, α of the study, {m['n_seeds']} seeds"
           + (f"; inconclusive because {'; '.join(why)}" if why else ""))
    return claim("L1", "Retain domains chosen by early-layer similarity keep more untouched refusal than random "
                 "ones at the same budget, at matched target forgetting", status, ev)


def report_section(m: dict) -> list[str]:
    """REPORT.md's H6 section: every retain strategy on the frontier, then per target what each
    retained, the held-out domains' refusal, and predicted against random at every level."""
    lines = ["## Prediction-guided retain sets at matched target forgetting (H6; figure: frontier_retain)", "",
             *frontier_table(m["conditions"], m["n_seeds"])]
    for t, v in m["targets"].items():
        lines += retain_set_lines(t, v, m["budget"], f"{m['primary_level']:g}")
    return lines
