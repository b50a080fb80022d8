"""Membership-inference statistics of the forget sets as a cached Study stage: each domain's forget
set (the prompts the base model refuses, with its own refusals: what NPO trains on) and benign
prompts, scored by :func:`probes.membership.prompt_response_scores`."""

from __future__ import annotations

from interp.io import atomic_write_json, read_json
from interp.runs import Stage
from probes.membership import prompt_response_scores
from study.core import Study
from training.config import UnlearnConfig
from training.data import EmptyDataError, build_forget_set, build_retain_set

__all__ = ["forget_set_priors"]


def forget_set_priors(study: Study, domains: tuple[str, ...], k: float) -> dict:
    """Per-example membership statistics of each domain's forget set and of benign prompts (cached),
    built by the trainer's own data builders and defaults: the forget sets NPO trains on."""
    ucfg = UnlearnConfig(n_forget=study.cfg.n_forget, judge=study.cfg.judge, model=study.cfg.model)
    key = {"weights": study.weights_id, "dtype": study.cfg.eval_dtype, "train_dtype": study.train_dtype, "k": k,
           "n_forget": ucfg.n_forget, "judge": ucfg.judge, "max_new_tokens": ucfg.max_new_tokens, "domains": list(domains)}
    stage = Stage(study.results, "mia_prior", key)
    if not stage.done:
        path = stage.open()
        out, sets = {"domains": {}, "skipped": {}}, {}
        for d in domains:
            try:
                sets[d] = build_forget_set(study.train_lm, d, ucfg.n_forget, ucfg.judge, max_new_tokens=ucfg.max_new_tokens,
                                           batch_size=study.eval_batch_size)
            except EmptyDataError as err:
                out["skipped"][d] = str(err)
        sets["benign"] = build_retain_set(study.train_lm, (), 0, ucfg.judge, include_benign=ucfg.n_forget,
                                          max_new_tokens=ucfg.max_new_tokens, batch_size=study.eval_batch_size)
        for name, ds in sets.items():
            entry = {**prompt_response_scores(study.lm, [e.prompt for e in ds.examples],
                                              [e.response for e in ds.examples], k, study.eval_batch_size),
                     "prompt_ids": ds.prompt_ids}
            (out if name == "benign" else out["domains"])[name] = entry
        atomic_write_json(path / "priors.json", out)
        stage.complete()
    return read_json(stage.path / "priors.json")
