"""H5 — early-layer concept geometry predicts which domains suffer EMA.

Hypothesis (Mushtaq et al.): domains whose concept vectors are more similar to the target's in the
*early* layers of the base model lose more refusal when the target is unlearned.
Prediction: across (target, untouched domain) pairs, the early-band cosine similarity of the two
domains' concept vectors (domain − benign difference of means, base model) correlates positively
with the domain's refusal drop; Spearman ρ > 0 with permutation p < 0.05 for the early band.
Falsified if: ρ ≤ 0 in the early band. Positive but not significant is inconclusive. The middle
and late bands are reported for contrast: the claim is specifically about early layers.
When unlearning saturates the judged refusal (untouched domains at ≤5% refusal afterwards), the
judged drop only restates each domain's baseline rate, so the logit drop becomes the primary
measure; the metrics say which one the verdict used.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evals.stats import correlate
from evals.suite import DOMAINS
from interp.config import JsonConfig
from interp.runs import run_dir, write_run
from probes.entanglement import BANDS, band_layers, early_similarity, similarity_matrix
from study import Study, StudyConfig, claim, condition, paired_drop

EXPERIMENT = "h5_geometry_predicts_ema"
SATURATED = 0.05


@dataclass
class Config(JsonConfig):
    """H5 settings."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Shared model, evaluation and training settings."""
    targets: tuple[str, ...] = ("cybersecurity", "safety")
    """Unlearning targets whose untouched domains give the data points."""
    contrast: str = "benign"
    """Concept-vector contrast: benign (domain − benign) or rest (domain − other domains)."""
    n_perm: int = 10000
    """Permutations for the p-value."""


def points(study: Study, targets: tuple[str, ...], contrast: str) -> list[dict]:
    """One point per (target, untouched domain): band similarities and observed drops."""
    _, base = study.evaluate("base")
    concepts = study.concepts(contrast=contrast)
    n_layers = len(concepts.layers)
    out = []
    for target in targets:
        cond = condition(study, target, "npo", (), base_records=base)
        target_dir = concepts.direction(target)
        sims = {band: early_similarity(concepts, target_dir, band, n_layers) for band in BANDS}
        for d in DOMAINS:
            if d == target:
                continue
            judged = paired_drop(cond["base"], cond["after"], d, "judge")
            out.append({"target": target, "domain": d,
                        "similarity": {band: sims[band][d] for band in BANDS},
                        "drop_judge": judged["drop"], "after_judge": judged["after"],
                        "drop_logit": paired_drop(cond["base"], cond["after"], d, "logit")["drop"]})
    return out


def main(cfg: Config) -> dict:
    study = Study(cfg.study)
    pts = points(study, cfg.targets, cfg.contrast)
    n_layers = len(study.concepts(contrast=cfg.contrast).layers)
    bands = {}
    for band in BANDS:
        x = [p["similarity"][band] for p in pts]
        bands[band] = {
            "layers": band_layers(band, n_layers),
            "judge": correlate(x, [p["drop_judge"] for p in pts], n_perm=cfg.n_perm).to_dict(),
            "logit": correlate(x, [p["drop_logit"] for p in pts], n_perm=cfg.n_perm).to_dict(),
        }
    saturated = sum(p["after_judge"] for p in pts) / len(pts) <= SATURATED
    primary = "logit" if saturated else "judge"
    early = bands["early"][primary]
    if early.get("inconclusive"):
        status = "inconclusive"
    elif early["spearman"] > 0 and early["p_perm_spearman"] < 0.05:
        status = "replicated"
    elif early["spearman"] <= 0:
        status = "not replicated"
    else:
        status = "inconclusive"
    evidence = (f"verdict on the {primary} drop" + (" (judged refusal saturated)" if saturated else "") + "; "
                ) + "; ".join(
        f"{b}: judge-drop ρ={m['judge']['spearman']:.2f} (p={m['judge']['p_perm_spearman']:.3f}), "
        f"logit-drop ρ={m['logit']['spearman']:.2f} (p={m['logit']['p_perm_spearman']:.3f})"
        for b, m in bands.items()) + f"; n={len(pts)} pairs"
    similarity = similarity_matrix(study.concepts(contrast=cfg.contrast)).to_dict()
    metrics = {"points": pts, "bands": bands, "primary": primary, "saturated": saturated, "contrast": cfg.contrast, "similarity": similarity, "claim": claim(
        "C5", "Early-layer concept similarity to the target predicts EMA", status, evidence)}
    write_run(run_dir(cfg.study.results, EXPERIMENT, cfg), cfg, metrics)
    return metrics
