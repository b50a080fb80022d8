"""H8 — the 7×7 transfer matrix (beyond the paper).

Hypothesis: the refusal drop in domain j after unlearning domain i is predicted by the early-layer
similarity of i and j, across all 42 ordered off-diagonal pairs.
Prediction: Spearman ρ between the off-diagonal drop matrix and the early-layer similarity matrix
is positive with permutation p < 0.05, the drops shuffled within each row (target), since the pairs
of one unlearning run are not independent.
Falsified if: ρ ≤ 0. The claim itself is tested, on these same 42 pairs, by H5 (C5) with the
full preset: base-refusal partial correlation and split-half reliability of the concept vectors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evals.grouped_stats import grouped_correlation
from evals.suite import DOMAINS
from interp.config import JsonConfig
from interp.runs import run_dir, write_run
from probes.entanglement import BANDS, early_similarity
from study import Study, StudyConfig, condition, paired_drop

EXPERIMENT = "h8_transfer_matrix"
ORDER, PRESETS, FIGURES = 8, ("full",), ("transfer_matrix",)


@dataclass
class Config(JsonConfig):
    """H8 settings."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Shared model, evaluation and training settings."""
    targets: tuple[str, ...] = DOMAINS
    """Domains to unlearn in turn (rows of the matrix)."""


def main(cfg: Config) -> dict:
    study = Study(cfg.study)
    _, base = study.evaluate("base")
    concepts = study.concepts()
    n_layers = len(concepts.layers)
    drops, logit, sims = {}, {}, {band: {} for band in BANDS}
    for target in cfg.targets:
        cond = condition(study, target, "npo", (), base_records=base)
        drops[target] = {d: paired_drop(cond["base"], cond["after"], d, "judge")["drop"] for d in DOMAINS}
        logit[target] = {d: paired_drop(cond["base"], cond["after"], d, "logit")["drop"] for d in DOMAINS}
        for band in BANDS:
            sims[band][target] = early_similarity(concepts, concepts.direction(target), band, n_layers)
    pairs = [(i, j) for i in cfg.targets for j in DOMAINS if i != j]
    rows = [i for i, _ in pairs]

    def rho(band: str, y: dict) -> dict:
        c = grouped_correlation([sims[band][i][j] for i, j in pairs], [y[i][j] for i, j in pairs], rows).to_dict()
        return {"spearman": c["r"], "p_perm_spearman": c["p_perm"], **c}

    corr = {band: {"judge": rho(band, drops), "logit": rho(band, logit)} for band in BANDS}
    metrics = {"rows": list(cfg.targets), "cols": list(DOMAINS), "drop_judge": drops, "drop_logit": logit,
               "similarity": sims, "correlation": corr}
    write_run(run_dir(cfg.study.results, EXPERIMENT, cfg), cfg, metrics)
    return metrics


def report_section(m: dict) -> list[str]:
    """REPORT.md: early-band similarity against the off-diagonal drops."""
    c = m["correlation"]["early"]["judge"]
    return ["## Transfer matrix (H8)", "", f"Early-band similarity vs off-diagonal drop: ρ={c['spearman']:.2f}"
            f" (p={c['p_perm_spearman']:.3f}, n={c['n']}).", ""]
