"""H6 — closing the loop: choose retain domains by what entanglement predicts.

Hypothesis: if early-layer similarity to the target predicts which domains suffer EMA (H5), then
spending a fixed retain budget on the k most at-risk domains contains EMA better than spending it
on k random domains, and about as well as spreading it over all domains.
Prediction: mean untouched-domain refusal drop (NPO + retain-CE) is smallest for the predicted
k, larger for random k; "all" is reported as the reference at the same total budget.
Falsified if: predicted-k contains no better than random-k (difference CI spans or is below zero).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from evals.suite import DOMAINS
from interp.config import JsonConfig
from interp.runs import run_dir, write_run
from probes.entanglement import early_similarity
from study import Study, StudyConfig, claim, condition, mean_drop

EXPERIMENT = "h6_prediction_guided_retain"


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


def _claim(out: dict) -> dict:
    """Point estimates only (one retain set per strategy, a few random draws): a loss for the predicted
    choice in every target falsifies; a win is not confirmed without a paired test (inconclusive)."""
    beats = [t["predicted_beats_random"] for t in out.values()]
    status = "not replicated" if not any(beats) else "inconclusive"
    evidence = "; ".join(
        f"{target}: mean untouched drop with retain on predicted {t['predicted']} "
        f"{t['strategies']['predicted']['mean_untouched_drop']:.2f}, random "
        f"{t['strategies']['random']['mean_untouched_drop']:.2f}, all {t['strategies']['all']['mean_untouched_drop']:.2f}, "
        f"no retain {t['strategies']['none']['mean_untouched_drop']:.2f}" for target, t in out.items())
    return claim("L1", "Retain domains chosen by early-layer similarity contain EMA better than random ones "
                 "at the same budget", status, evidence + " (point estimates, no CI)")


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
        results = {}
        for name, choices in strategies.items():
            drops = []
            for domains, per in choices:
                cond = condition(study, target, "npo", domains, base_records=base, n_retain_per_domain=per)
                drops.append({"domains": list(domains), "per_domain": per,
                              "mean_untouched": mean_drop(cond["base"], cond["after"], untouched, "judge"),
                              "target": mean_drop(cond["base"], cond["after"], [target], "judge")})
            results[name] = {"runs": drops,
                             "mean_untouched_drop": sum(d["mean_untouched"]["drop"] for d in drops) / len(drops),
                             "target_drop": sum(d["target"]["drop"] for d in drops) / len(drops)}
        out[target] = {"early_similarity": sims, "predicted": list(predicted), "strategies": results,
                       "predicted_beats_random": results["predicted"]["mean_untouched_drop"]
                       < results["random"]["mean_untouched_drop"]}
    metrics = {"targets": out, "k": cfg.k, "budget": budget, "claim": _claim(out)}
    write_run(run_dir(cfg.study.results, EXPERIMENT, cfg), cfg, metrics)
    return metrics
