"""H11 — a membership-inference prior: does the base model's familiarity with a forget set predict
the EMA that unlearning it produces?

Each domain's forget set (the ``unlearn``-split prompts the base model refuses, with its own greedy
refusals: what NPO trains on) is scored with LOSS, zlib loss and Min-K% (k = 20%; :mod:`probes.membership`)
in three forms: ``prompt`` (the user message), ``response`` (the model's own refusal given the prompt;
NPO pushes these log-probs down) and ``response_minus_prompt``. Levels relative to benign prompts are
reported (a constant shift: it cannot change a rank correlation).
Hypothesis: the prior ranks targets by the EMA their unlearning causes (mean untouched-domain refusal
drop), a cheap predictor that needs no unlearning run.
Data: the seven targets of the transfer matrix (EMA from ``h8_transfer_matrix`` when it ran with these
study settings, else from the same cached runs here); the permutation p enumerates all 5040 orderings.
Prediction: Spearman ρ between the primary prior (response LOSS) and the judged EMA has p < 0.05.
Falsified if: p ≥ 0.05 over the seven targets. Under four targets there is no correlation: inconclusive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evals.grouped_stats import grouped_correlation
from evals.suite import DOMAINS, check_domain
from interp.config import JsonConfig
from interp.io import read_json
from interp.runs import run_dir, write_run
from probes.membership import FORMS, STATISTICS, form_means, relative_to
from study import Study, StudyConfig, claim, condition, mean_drop
from study.priors import forget_set_priors
from study.report import num, table

EXPERIMENT = "h11_mia_prior"
ORDER, PRESETS, FIGURES = 11, (), ("prior_vs_ema",)
PRIMARY = ("response", "loss")

__all__ = ["Config", "main", "ema_from_h8", "prior_correlations", "verdict", "report_section"]


@dataclass
class Config(JsonConfig):
    """H11 settings."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Shared model, evaluation and training settings."""
    targets: tuple[str, ...] = DOMAINS
    """Targets whose forget sets are scored and whose EMA is correlated with the prior: taken from H8
    when it ran with these settings, else unlearned here."""
    k: float = 0.2
    """Min-K% fraction of least likely tokens."""
    use_h8: bool = True
    """Take each target's EMA from ``h8_transfer_matrix`` results of the same study settings when present."""

    def __post_init__(self) -> None:
        for d in self.targets:
            check_domain(d, allow_extra=False)
        if not 0 < self.k <= 1:
            raise ValueError(f"k must be in (0, 1], got {self.k}")


def ema_from_h8(results: Path, study_cfg: StudyConfig) -> tuple[dict[str, dict[str, float]], str]:
    """``({target: {"judge": EMA, "logit": EMA}}, note)`` from the latest H8 run, if it used these settings."""
    path = Path(results) / "h8_transfer_matrix" / "latest"
    if not (path / "metrics.json").exists():
        return {}, "no h8_transfer_matrix results"
    used = read_json(path / "config.json").get("study", {})
    if used != study_cfg.to_dict():
        diff = sorted(k for k in set(used) | set(study_cfg.to_dict()) if used.get(k) != study_cfg.to_dict().get(k))
        return {}, f"h8_transfer_matrix ran with different study settings ({', '.join(diff)}); not used"
    m = read_json(path / "metrics.json")
    out = {t: {k: float(np.mean([v for d, v in m[f"drop_{k}"][t].items() if d != t])) for k in ("judge", "logit")}
           for t in m["rows"]}
    return out, f"EMA of {len(out)} targets from h8_transfer_matrix"


def prior_correlations(prior_means: dict[str, dict], ema: dict[str, dict[str, float]]) -> dict:
    """Spearman ρ (permutation p, exact up to seven targets) of every prior (form × statistic) vs the EMA."""
    targets = [t for t in ema if t in prior_means]

    def rho(x, y) -> dict:
        c = grouped_correlation(x, y).to_dict()
        return {"spearman": c["r"], "p_perm_spearman": c["p_perm"], **c}

    return {f"{form}/{s}": {m: rho([prior_means[t][form][s] for t in targets], [ema[t][m] for t in targets])
                            for m in ("judge", "logit")} for form in FORMS for s in STATISTICS}


def verdict(primary: dict) -> tuple[str, str]:
    """M1's status from the primary prior's correlation with the judged EMA."""
    if primary["inconclusive"]:
        return "inconclusive", f"n={primary['n']} targets: {primary['note']}"
    return ("replicated" if primary["p_perm_spearman"] < 0.05 else "not replicated",
            f"ρ={primary['spearman']:.2f}, p={primary['p_perm_spearman']:.3f}, n={primary['n']}")


def main(cfg: Config) -> dict:
    study = Study(cfg.study)
    pri = forget_set_priors(study, cfg.targets, cfg.k)
    means, benign = {d: form_means(e) for d, e in pri["domains"].items()}, form_means(pri["benign"])
    relative = {d: {form: relative_to(m[form], benign[form]) for form in ("prompt", "response")}
                for d, m in means.items()}
    ema, source = (ema_from_h8(Path(cfg.study.results), cfg.study) if cfg.use_h8 else ({}, "use_h8 is off"))
    ema = {t: v for t, v in ema.items() if t in cfg.targets}
    missing = [t for t in cfg.targets if t not in ema]
    if missing:
        _, base = study.evaluate("base")
        for t in missing:
            cond = condition(study, t, "npo", (), base_records=base)
            untouched = [d for d in DOMAINS if d != t]
            ema[t] = {m: mean_drop(cond["base"], cond["after"], untouched, m)["drop"] for m in ("judge", "logit")}
        source += f"; EMA of {', '.join(missing)} from NPO runs here"
    corr = prior_correlations(means, ema)
    status, why = verdict(corr["/".join(PRIMARY)]["judge"])
    ev = (f"primary prior = base-model LOSS of its own forget-set refusals vs mean untouched judge drop: {why}; "
          + ", ".join(f"{t}: LOSS {means[t]['response']['loss']:.3f}, EMA {ema[t]['judge']:.2f}" for t in ema if t in means))
    metrics = {"k": cfg.k, "priors": means, "benign": benign, "relative_to_benign": relative,
               "n_examples": {d: len(e["prompt_ids"]) for d, e in pri["domains"].items()},
               "skipped": pri.get("skipped", {}), "ema": ema, "ema_source": source, "correlations": corr,
               "primary": "/".join(PRIMARY), "claim": claim(
                   "M1", "A membership-inference prior on the forget set predicts the EMA of unlearning it", status, ev)}
    write_run(run_dir(cfg.study.results, EXPERIMENT, cfg), cfg, metrics)
    return metrics


def report_section(m: dict) -> list[str]:
    """REPORT.md: each forget set's statistics beside its EMA, and every prior's correlation with the EMA."""
    lines = ["## Membership-inference prior (H11; figure: prior_vs_ema)", "",
             f"Base-model statistics of each domain's forget set (prompt alone; the model's own refusal given the "
             f"prompt), Min-K% with k={m['k']}. EMA source: {m['ema_source']}.", "",
             *table("domain", "n", "prompt LOSS", "refusal LOSS", "refusal zlib (×10⁻³)", "refusal Min-K%",
                    "refusal LOSS − benign", "EMA (judge)")]
    for d, p in m["priors"].items():
        lines.append(f"| {d} | {m['n_examples'].get(d, '–')} | {p['prompt']['loss']:.3f} | {p['response']['loss']:.3f} | "
                     f"{p['response']['zlib'] * 1e3:.2f} | {p['response']['min_k']:.2f} | "
                     f"{m['relative_to_benign'][d]['response']['loss']:+.3f} | {num(m['ema'].get(d, {}).get('judge'))} |")
    lines += ["", *table("prior", "ρ (judge EMA)", "p", "ρ (logit EMA)", "p", "n")]
    for name, c in m["correlations"].items():
        j, lg = c["judge"], c["logit"]
        lines.append(f"| {name}{' (primary)' if name == m['primary'] else ''} | {num(j['spearman'])} | "
                     f"{num(j['p_perm_spearman'], '.3f')} | {num(lg['spearman'])} | {num(lg['p_perm_spearman'], '.3f')} | "
                     f"{j['n']} |")
    return lines + [""]
