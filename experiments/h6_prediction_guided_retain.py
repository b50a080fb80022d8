"""H6 — closing the loop: choose retain domains by what entanglement predicts.

Hypothesis: if early-layer similarity to the target predicts which domains suffer EMA (H5), then
spending a fixed retain budget on the k most at-risk domains contains EMA better than spending it
on k random domains, and about as well as spreading it over all domains.
Prediction: mean untouched-domain refusal drop (NPO + retain-CE) is smaller for the predicted k
than for random k: the paired difference predicted − random (averaged over the random draws; seeds
× prompts CI) lies below zero in every target. "all" and "none" are reported as references.
Falsified if: the difference lies above zero in every target (random choices contain EMA better).
The rule is symmetric: either answer needs the CI to exclude zero in every target; anything else,
including a CI that spans zero, is inconclusive.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from evals.suite import DOMAINS
from interp.config import JsonConfig
from interp.runs import run_dir, write_run
from probes.entanglement import early_similarity
from study import Study, StudyConfig, claim, condition, drop_contrast, mean_drop
from study.report import table

EXPERIMENT = "h6_prediction_guided_retain"
ORDER, PRESETS, FIGURES = 6, ("full",), ()

__all__ = ["Config", "main", "verdict"]


@dataclass
class Config(JsonConfig):
    """H6 settings."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Shared model, evaluation and training settings."""
    targets: tuple[str, ...] = ("cybersecurity", "safety")
    """Unlearning targets."""
    k: int = 2
    """Number of retain domains chosen by prediction or at random."""
    per_domain: int = 6
    """Retain prompts per chosen domain; the total budget is k × per_domain for every strategy."""
    n_random: int = 2
    """Random draws of k domains (averaged)."""

    def __post_init__(self) -> None:
        if not 1 <= self.k < len(DOMAINS) - 1:
            raise ValueError(f"k must be between 1 and {len(DOMAINS) - 2}")


def verdict(out: dict) -> dict:
    """C-L1 from each target's paired difference ``predicted_vs_random`` (``{"difference", "ci"}``,
    predicted − random mean untouched drop): replicated if every CI is below 0, not replicated if
    every CI is above 0, else inconclusive."""
    cis = [t["predicted_vs_random"]["ci"] for t in out.values()]
    if cis and all(hi < 0 for _, hi in cis):
        status = "replicated"
    elif cis and all(lo > 0 for lo, _ in cis):
        status = "not replicated"
    else:
        status = "inconclusive"
    evidence = "; ".join(
        f"{target}: predicted {t['predicted']} − random mean untouched drop "
        f"{t['predicted_vs_random']['difference']:+.2f} [{t['predicted_vs_random']['ci'][0]:.2f}, "
        f"{t['predicted_vs_random']['ci'][1]:.2f}] (predicted {t['strategies']['predicted']['mean_untouched_drop']:.2f}, "
        f"random {t['strategies']['random']['mean_untouched_drop']:.2f}, all {t['strategies']['all']['mean_untouched_drop']:.2f}, "
        f"none {t['strategies']['none']['mean_untouched_drop']:.2f})" for target, t in out.items())
    return claim("L1", "Retain domains chosen by early-layer similarity contain EMA better than random ones "
                 "at the same budget", status, evidence)


def main(cfg: Config) -> dict:
    study = Study(cfg.study)
    _, base = study.evaluate("base")
    concepts = study.concepts()
    budget = cfg.k * cfg.per_domain
    out = {}
    for target in cfg.targets:
        untouched = [d for d in DOMAINS if d != target]
        sims = early_similarity(concepts, concepts.direction(target), "early", len(concepts.layers))
        predicted = tuple(sorted(untouched, key=lambda d: -sims[d])[: cfg.k])
        rng = random.Random(f"{target}-{cfg.k}")
        randoms = [tuple(sorted(rng.sample(untouched, cfg.k))) for _ in range(cfg.n_random)]
        strategies = {"predicted": [(predicted, cfg.per_domain)],
                      "random": [(r, cfg.per_domain) for r in randoms],
                      "all": [(tuple(untouched), max(1, budget // len(untouched)))],
                      "none": [((), None)]}
        results, conds = {}, {}
        for name, choices in strategies.items():
            drops, conds[name] = [], []
            for domains, per in choices:
                cond = condition(study, target, "npo", domains, base_records=base, n_retain_per_domain=per)
                conds[name].append(cond)
                drops.append({"domains": list(domains), "per_domain": per,
                              "mean_untouched": mean_drop(cond["base"], cond["after"], untouched, "judge"),
                              "target": mean_drop(cond["base"], cond["after"], [target], "judge")})
            results[name] = {"runs": drops,
                             "mean_untouched_drop": sum(d["mean_untouched"]["drop"] for d in drops) / len(drops),
                             "target_drop": sum(d["target"]["drop"] for d in drops) / len(drops)}
        out[target] = {"early_similarity": sims, "predicted": list(predicted), "strategies": results,
                       "predicted_vs_random": drop_contrast(conds["predicted"][0], conds["random"], untouched)}
    metrics = {"targets": out, "k": cfg.k, "budget": budget, "claim": verdict(out)}
    write_run(run_dir(cfg.study.results, EXPERIMENT, cfg), cfg, metrics)
    return metrics


def report_section(m: dict) -> list[str]:
    """REPORT.md: mean untouched and target drop of every retain strategy."""
    lines = ["## Prediction-guided retain sets (H6)", "",
             *table("target", "strategy", "mean untouched drop", "target drop")]
    for t, v in m["targets"].items():
        for s, r in v["strategies"].items():
            lines.append(f"| {t} | {s} | {r['mean_untouched_drop']:.2f} | {r['target_drop']:.2f} |")
    return lines + [""]
