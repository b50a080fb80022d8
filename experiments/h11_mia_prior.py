"""H11 — a membership-inference prior: does the base model's familiarity with a forget set predict
the EMA that unlearning it produces?

For each domain, the base model's forget set (the ``unlearn``-split prompts it refuses, with its own
greedy refusals: exactly what NPO trains on) is scored with three membership-inference statistics
(:mod:`probes.membership`): LOSS, zlib-normalised loss and Min-K% (k = 20%), in two forms:

* ``prompt`` — the user message alone (how familiar the *request* is);
* ``response`` — the model's own refusal given the prompt (how peaked the refusal is; NPO pushes
  exactly these log-probs down).

Adjusted variants: ``response − prompt`` per example (familiarity of the refusal beyond that of the
request), and each domain relative to benign prompts with the model's own answers (a constant shift
across domains, so it describes levels but cannot change a rank correlation; it is reported, not
correlated).
Hypothesis: the prior ranks targets by the EMA their unlearning causes (mean untouched-domain refusal
drop), as a cheap predictor that needs no unlearning run.
Prediction: Spearman ρ between the primary prior (response LOSS) and the EMA has a permutation
p < 0.05 across targets.
Falsified if: p ≥ 0.05 with all seven targets (from ``h8_transfer_matrix``). With only the targets
unlearned here (cybersecurity and safety, n = 2) no correlation is defined: inconclusive by
construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evals.stats import correlate
from evals.suite import DOMAINS, check_domain
from interp.config import JsonConfig
from interp.io import atomic_write_json, read_json
from interp.logprobs import token_logprobs
from interp.runs import Stage, run_dir, write_run
from probes.membership import STATISTICS, MembershipScores, membership_scores, relative_to
from study import Study, StudyConfig, claim, condition, mean_drop
from training.config import UnlearnConfig
from training.data import EmptyDataError, build_forget_set, build_retain_set

EXPERIMENT = "h11_mia_prior"
FORMS = ("prompt", "response", "response_minus_prompt")
PRIMARY = ("response", "loss")

__all__ = ["Config", "main", "priors_for", "ema_from_h8", "prior_correlations"]


@dataclass
class Config(JsonConfig):
    """H11 settings."""

    study: StudyConfig = field(default_factory=StudyConfig)
    """Shared model, evaluation and training settings."""
    domains: tuple[str, ...] = DOMAINS
    """Candidate targets whose forget sets are scored."""
    targets: tuple[str, ...] = ("cybersecurity", "safety")
    """Targets unlearned here for their EMA when the 7-target H8 results are missing or were run under
    different settings."""
    k: float = 0.2
    """Min-K% fraction of least likely tokens."""
    use_h8: bool = True
    """Take each target's EMA from ``h8_transfer_matrix`` results of the same study settings when present."""

    def __post_init__(self) -> None:
        for d in (*self.domains, *self.targets):
            check_domain(d, allow_extra=False)
        if not 0 < self.k <= 1:
            raise ValueError(f"k must be in (0, 1], got {self.k}")


def _stats(scores_prompt: MembershipScores, scores_resp: MembershipScores) -> dict[str, dict[str, list[float]]]:
    out = {"prompt": scores_prompt.to_dict(), "response": scores_resp.to_dict()}
    out["response_minus_prompt"] = {s: (scores_resp.get(s) - scores_prompt.get(s)).tolist() for s in STATISTICS}
    return out


def priors_for(study: Study, domains: tuple[str, ...], k: float) -> dict:
    """Per-example membership statistics of each domain's forget set and of benign prompts (cached).

    Uses the trainer's own data builders with the trainer's defaults, so the forget sets (and their
    cached generations) are the ones NPO trains on.
    """
    ucfg = UnlearnConfig(n_forget=study.cfg.n_forget, judge=study.cfg.judge, model=study.cfg.model)
    key = {"weights": study.weights_id, "dtype": study.cfg.eval_dtype, "train_dtype": study.train_dtype,
           "n_forget": ucfg.n_forget, "judge": ucfg.judge,
           "max_new_tokens": ucfg.max_new_tokens, "k": k, "domains": list(domains)}
    stage = Stage(study.results, "mia_prior", key)
    if not stage.done:
        path = stage.open()
        out: dict = {"domains": {}, "skipped": {}}
        sets = {}
        for d in domains:
            try:
                sets[d] = build_forget_set(study.train_lm, d, ucfg.n_forget, ucfg.judge, max_new_tokens=ucfg.max_new_tokens,
                                           batch_size=study.eval_batch_size)
            except EmptyDataError as err:
                out["skipped"][d] = str(err)
        sets["benign"] = build_retain_set(study.train_lm, (), 0, ucfg.judge, include_benign=ucfg.n_forget,
                                          max_new_tokens=ucfg.max_new_tokens, batch_size=study.eval_batch_size)
        for name, ds in sets.items():
            prompts = [e.prompt for e in ds.examples]
            responses = [e.response for e in ds.examples]
            tp = token_logprobs(study.lm, prompts, batch_size=study.eval_batch_size)
            tr = token_logprobs(study.lm, prompts, responses, batch_size=study.eval_batch_size)
            entry = _stats(membership_scores(tp.logprobs, tp.mask, tp.texts, k),
                           membership_scores(tr.logprobs, tr.mask, tr.texts, k))
            entry["prompt_ids"] = ds.prompt_ids
            if name == "benign":
                out["benign"] = entry
            else:
                out["domains"][name] = entry
        atomic_write_json(path / "priors.json", out)
        stage.complete()
    return read_json(stage.path / "priors.json")


def _means(entry: dict) -> dict[str, dict[str, float]]:
    return {form: {s: float(np.mean(entry[form][s])) for s in STATISTICS} for form in FORMS}


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
    out = {}
    for t in m["rows"]:
        out[t] = {"judge": float(np.mean([v for d, v in m["drop_judge"][t].items() if d != t])),
                  "logit": float(np.mean([v for d, v in m["drop_logit"][t].items() if d != t]))}
    return out, f"EMA of {len(out)} targets from h8_transfer_matrix"


def prior_correlations(prior_means: dict[str, dict], ema: dict[str, dict[str, float]]) -> dict:
    """Spearman/Pearson with permutation p of every prior (form × statistic) against the EMA."""
    targets = [t for t in ema if t in prior_means]
    out = {}
    for form in FORMS:
        for s in STATISTICS:
            x = [prior_means[t][form][s] for t in targets]
            out[f"{form}/{s}"] = {m: correlate(x, [ema[t][m] for t in targets], n_perm=10000).to_dict()
                                  for m in ("judge", "logit")}
    return out


def main(cfg: Config) -> dict:
    study = Study(cfg.study)
    domains = tuple(dict.fromkeys((*cfg.domains, *cfg.targets)))
    pri = priors_for(study, domains, cfg.k)
    means = {d: _means(e) for d, e in pri["domains"].items()}
    benign = _means(pri["benign"])
    relative = {d: {form: relative_to(m[form], benign[form]) for form in ("prompt", "response")}
                for d, m in means.items()}
    ema, source = (ema_from_h8(Path(cfg.study.results), cfg.study) if cfg.use_h8 else ({}, "use_h8 is off"))
    if not ema:
        _, base = study.evaluate("base")
        for t in cfg.targets:
            cond = condition(study, t, "npo", (), base_records=base)
            untouched = [d for d in DOMAINS if d != t]
            ema[t] = {m: mean_drop(cond["base"], cond["after"], untouched, m)["drop"] for m in ("judge", "logit")}
        source += f"; EMA of {', '.join(cfg.targets)} from NPO runs here"
    corr = prior_correlations(means, ema)
    primary = corr["/".join(PRIMARY)]["judge"]
    n = primary["n"]
    if primary["inconclusive"]:
        status = "inconclusive"
        why = f"n={n} targets: {primary['note']} (inconclusive by construction)"
    else:
        status = "replicated" if primary["p_perm_spearman"] < 0.05 else "not replicated"
        why = f"ρ={primary['spearman']:.2f}, p={primary['p_perm_spearman']:.3f}, n={n}"
    ev = (f"primary prior = base-model LOSS of its own forget-set refusals vs mean untouched judge drop: {why}; "
          + ", ".join(f"{t}: LOSS {means[t]['response']['loss']:.3f}, EMA {ema[t]['judge']:.2f}" for t in ema
                      if t in means))
    metrics = {"k": cfg.k, "priors": means, "benign": benign, "relative_to_benign": relative,
               "n_examples": {d: len(e["prompt_ids"]) for d, e in pri["domains"].items()},
               "skipped": pri.get("skipped", {}), "ema": ema, "ema_source": source, "correlations": corr,
               "primary": "/".join(PRIMARY),
               "claim": claim("M1", "A membership-inference prior on the forget set predicts the EMA of unlearning it",
                              status, ev)}
    write_run(run_dir(cfg.study.results, EXPERIMENT, cfg), cfg, metrics)
    return metrics
