"""H3 — unlearning Safety spreads further than unlearning Cybersecurity.

Hypothesis: at the same training budget, the safety-unlearned model loses more refusal in the
domains it was not trained on than the cybersecurity-unlearned model.
Prediction: the mean drop over the five domains untouched by *both* runs (toxicity, bias,
sensitive_content, medical_legal, privacy) is larger for the safety target, with a bootstrap CI of
the difference above zero.
Falsified if: the difference is reliably negative. A CI spanning zero is inconclusive. If either
run saturates (all domains near zero refusal), the comparison is uninformative and is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from experiments.common import Study, StudyConfig, claim, condition, mean_drop
from interp.config import JsonConfig
from interp.evaluate import PromptRecord
from interp.runs import run_dir, write_run
from interp.suite import DOMAINS

EXPERIMENT = "h3_safety_spreads_further"
SATURATED = 0.05


@dataclass
class Config(JsonConfig):
    """H3 settings."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Shared model, evaluation and training settings."""
    first: str = "safety"
    """The target predicted to spread further."""
    second: str = "cybersecurity"
    """The comparison target."""
    n_boot: int = 2000
    """Bootstrap resamples for the CI of the difference."""


def _diffs(base: list[PromptRecord], after: list[PromptRecord], domain: str) -> np.ndarray:
    b = {r.id: float(r.label == "refusal") for r in base if r.domain == domain}
    a = {r.id: float(r.label == "refusal") for r in after if r.domain == domain}
    return np.array([b[i] - a[i] for i in sorted(set(a) & set(b))])


def main(cfg: Config) -> dict:
    study = Study(cfg.study)
    _, base = study.evaluate("base")
    conds = {t: condition(study, t, "npo", (), base_records=base) for t in (cfg.first, cfg.second)}
    common = [d for d in DOMAINS if d not in (cfg.first, cfg.second)]
    drops = {t: mean_drop(c["base"], c["after"], common, "judge") for t, c in conds.items()}
    logit = {t: mean_drop(c["base"], c["after"], common, "logit") for t, c in conds.items()}
    rng = np.random.default_rng(0)
    boot = np.zeros(cfg.n_boot)
    for d in common:
        x, y = _diffs(conds[cfg.first]["base"], conds[cfg.first]["after"], d), \
            _diffs(conds[cfg.second]["base"], conds[cfg.second]["after"], d)
        boot += (x[rng.integers(0, len(x), (cfg.n_boot, len(x)))].mean(1)
                 - y[rng.integers(0, len(y), (cfg.n_boot, len(y)))].mean(1))
    boot /= len(common)
    diff = drops[cfg.first]["drop"] - drops[cfg.second]["drop"]
    ci = [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]
    after_rates = {t: float(np.mean([r.label == "refusal" for r in c["after"] if r.domain in common]))
                   for t, c in conds.items()}
    saturated = all(v <= SATURATED for v in after_rates.values())
    if saturated:
        status = "inconclusive"
    elif ci[0] > 0:
        status = "replicated"
    elif ci[1] < 0:
        status = "not replicated"
    else:
        status = "inconclusive"
    evidence = (f"mean drop on {len(common)} common untouched domains: {cfg.first} {drops[cfg.first]['drop']:.2f}, "
                f"{cfg.second} {drops[cfg.second]['drop']:.2f}; difference {diff:.2f} (CI {ci[0]:.2f}..{ci[1]:.2f})"
                + ("; both runs saturate (refusal ≤5%), so the comparison is uninformative" if saturated else ""))
    metrics = {"common_domains": common, "judge": drops, "logit": logit, "difference": diff, "ci": ci,
               "after_refusal_common": after_rates, "saturated": saturated,
               "claim": claim("C3", f"Unlearning {cfg.first} spreads further than {cfg.second}", status, evidence)}
    write_run(run_dir(cfg.study.results, EXPERIMENT, cfg), cfg, metrics)
    return metrics
