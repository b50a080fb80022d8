"""H5 — early-layer concept geometry predicts which domains suffer EMA (claim C5).

Hypothesis (Mushtaq et al.): domains whose concept vectors are more similar to the target's in the
*early* layers of the base model lose more refusal when the target is unlearned.
Data: one point per (target, untouched domain) pair: 12 for the two targets of the quick preset, the
42 off-diagonal cells of the 7×7 transfer matrix in the full preset (the same cached NPO runs as H8).
Pre-registered primary analysis: the *logit* drop (base − unlearned mean refusal log-odds; unlike the
judged drop it is not bounded by the domain's base rate); concept vectors domain − benign at the last
prompt token (resid_post, base model); the mean cosine to the target's vector over the first third of
the layers; the Spearman *partial* correlation of similarity and drop controlling the untouched
domain's base refusal (same measure), with a p-value from permutations *within target* (drops
shuffled among the untouched domains of one target; exact when there are few orderings).
Prediction: that partial ρ is positive with permutation p < 0.05.
Reliability: the per-layer cosine of concept vectors from the even vs the odd probe prompts,
Spearman-Brown corrected, averaged over the band and domains; below 0.7 a band cannot carry a verdict.
Falsified (not replicated) if the early band is reliable and the partial ρ is reliably ≤ 0 (bootstrap
CI ≤ 0 or permutation p < 0.05); otherwise inconclusive. Reported beside it: the judged and relative
(judged / base rate) drops, the plain ρ, the middle and late bands; an option: the domain − rest contrast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from evals.grouped_stats import grouped_correlation
from evals.suite import DOMAINS, check_domain
from interp.config import JsonConfig
from interp.runs import run_dir, write_run
from probes.concepts import CONTRASTS
from probes.entanglement import BANDS, band_layers, similarity_matrix
from study import Study, StudyConfig, claim
from study.geometry import band_reliability, ema_points
from study.report import num, table

EXPERIMENT = "h5_geometry_predicts_ema"
ORDER, PRESETS, FIGURES = 5, ("quick", "full"), ("ema_vs_similarity", "similarity_layers")
PRESET_OVERRIDES = {"full": {"targets": list(DOMAINS)}}  # the 42 off-diagonal pairs of H8's 7×7 matrix (its runs)
MEASURES = {"logit": "base_logit", "judge": "base_judge", "relative": "base_judge"}  # drop: base it is controlled for
PREREGISTERED = {"measure": "logit", "contrast": "benign", "position": "last"}
SATURATED = 0.05

__all__ = ["Config", "main", "analyse", "verdict", "report_section"]


@dataclass
class Config(JsonConfig):
    """H5 settings."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Shared model, evaluation and training settings."""
    targets: tuple[str, ...] = ("cybersecurity", "safety")
    """Unlearning targets whose untouched domains give the pairs (the full preset: all seven)."""
    measure: str = "logit"
    """Drop measure of the verdict: logit (pre-registered), judge, or relative (judged drop / base rate)."""
    contrast: str = "benign"
    """Concept-vector contrast: benign (domain − benign; pre-registered) or rest (domain − other domains)."""
    position: str = "last"
    """Token position of the activations: last (last template token; pre-registered) or mean (over the prompt)."""
    n_perm: int = 10000
    """Permutations for the p-values (all orderings when there are at most 20000)."""
    min_reliability: float = 0.7
    """Smallest mean split-half reliability of a band that can carry the verdict."""

    def __post_init__(self) -> None:
        for name, options in (("measure", MEASURES), ("contrast", CONTRASTS), ("position", ("last", "mean"))):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {', '.join(options)}, got {getattr(self, name)!r}")
        if self.position == "mean":
            raise ValueError("position='mean' needs activations averaged over each prompt's tokens, which "
                             "Study.activations does not collect (it stores the last prompt token only)")
        if not self.targets:
            raise ValueError("targets must name at least one domain")
        for t in self.targets:
            check_domain(t, allow_extra=False)


def analyse(pts: list[dict], n_layers: int, reliability: dict[str, float], n_perm: int = 10000) -> dict:
    """Per band and measure: plain and partial Spearman ρ, permutations within target."""
    groups = [p["target"] for p in pts]
    bands = {}
    for band in BANDS:
        x = [p["similarity"][band] for p in pts]
        bands[band] = {"layers": band_layers(band, n_layers), "reliability": reliability[band]}
        for m, cov in MEASURES.items():
            y = [float("nan") if p[f"drop_{m}"] is None else p[f"drop_{m}"] for p in pts]
            a = grouped_correlation(x, y, groups, n_perm=n_perm).to_dict()
            b = grouped_correlation(x, y, groups, covariates=[p[cov] for p in pts], n_perm=n_perm).to_dict()
            bands[band][m] = {"spearman": a["r"], "p_perm_spearman": a["p_perm"], "ci_low": a["ci_low"],
                              "ci_high": a["ci_high"], "partial": b["r"], "p_perm_partial": b["p_perm"],
                              "partial_ci": [b["ci_low"], b["ci_high"]], "n": b["n"], "n_groups": b["n_groups"],
                              "exact": b["exact"], "inconclusive": b["inconclusive"], "note": b["note"]}
    return bands


def verdict(stat: dict, reliability: float, min_reliability: float = 0.7) -> tuple[str, str]:
    """C5's status from the early band's primary statistic (:func:`analyse`) and its reliability."""
    if reliability < min_reliability:
        return "inconclusive", f"the early band's concept vectors are unreliable ({reliability:.2f} < {min_reliability})"
    r, p, (lo, hi) = stat["partial"], stat["p_perm_partial"], stat["partial_ci"]
    if stat["inconclusive"] or r is None:
        return "inconclusive", f"no partial correlation: {stat['note']}"
    why = f"partial ρ={r:.2f} [{lo:.2f}, {hi:.2f}], within-target permutation p={p:.3f}, n={stat['n']}"
    if r > 0 and p < 0.05:
        return "replicated", why
    if r <= 0 and ((hi is not None and hi <= 0) or p < 0.05):
        return "not replicated", why
    return "inconclusive", why


def main(cfg: Config) -> dict:
    study = Study(cfg.study)
    pts = ema_points(study, cfg.targets, cfg.contrast)
    concepts, (rel, band_rel) = study.concepts(contrast=cfg.contrast), band_reliability(study, cfg.contrast)
    bands = analyse(pts, len(concepts.layers), band_rel, cfg.n_perm)
    status, why = verdict(bands["early"][cfg.measure], band_rel["early"], cfg.min_reliability)
    chosen = {"measure": cfg.measure, "contrast": cfg.contrast, "position": cfg.position}
    pre = "pre-registered" if chosen == PREREGISTERED else f"NOT the pre-registered analysis ({PREREGISTERED})"
    e = bands["early"]
    evidence = (f"{cfg.measure} drop, {cfg.contrast} contrast, {cfg.position} token ({pre}): {why}; early-band "
                f"reliability {band_rel['early']:.2f}; plain ρ early: " + ", ".join(
                    f"{m} {e[m]['spearman']:.2f} (p={e[m]['p_perm_spearman']:.3f})" for m in MEASURES
                    if e[m]["spearman"] is not None) + f"; {len(pts)} pairs over {len(cfg.targets)} targets")
    metrics = {"points": pts, "bands": bands, "primary": cfg.measure, "preregistered": chosen == PREREGISTERED,
               "saturated": sum(p["after_judge"] for p in pts) / len(pts) <= SATURATED,
               "contrast": cfg.contrast, "position": cfg.position, "targets": list(cfg.targets),
               "reliability": {"per_layer": rel.per_layer(), "bands": band_rel, "min": cfg.min_reliability},
               "similarity": similarity_matrix(concepts).to_dict(),
               "claim": claim("C5", "Early-layer concept similarity to the target predicts EMA", status, evidence)}
    write_run(run_dir(cfg.study.results, EXPERIMENT, cfg), cfg, metrics)
    return metrics


def report_section(m: dict) -> list[str]:
    """REPORT.md: plain and partial ρ per band, and every (target, untouched domain) point."""
    primary = m.get("primary", "logit")
    lines = ["## Geometry vs EMA (figure: ema_vs_similarity, similarity_layers)", "",
             f"Permutations within target; partial ρ controls each untouched domain's base refusal; primary "
             f"measure: {primary} drop.", "", *table("band", "layers", "reliability", "ρ (judge drop)", "p",
                                                     "ρ (logit drop)", "p", "partial ρ (primary)", "95% CI", "p")]
    for band, b in m["bands"].items():
        j, lg, pr = b["judge"], b["logit"], b.get(primary, {})
        ci = pr.get("partial_ci") or [None, None]
        lines.append(f"| {band} | {b['layers'][0]}–{b['layers'][-1]} | {num(b.get('reliability'))} | "
                     f"{num(j['spearman'])} | {num(j['p_perm_spearman'], '.3f')} | {num(lg['spearman'])} | "
                     f"{num(lg['p_perm_spearman'], '.3f')} | {num(pr.get('partial'))} | "
                     f"[{num(ci[0])}, {num(ci[1])}] | {num(pr.get('p_perm_partial'), '.3f')} |")
    lines += ["", *table("target", "domain", "early sim", "middle sim", "late sim", "drop (judge)", "drop (logit)")]
    lines += [f"| {p['target']} | {p['domain']} | {p['similarity']['early']:.2f} | {p['similarity']['middle']:.2f} | "
              f"{p['similarity']['late']:.2f} | {p['drop_judge']:.2f} | {p['drop_logit']:.2f} |" for p in m["points"]]
    return lines + [""]
