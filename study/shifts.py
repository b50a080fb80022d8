"""Compliance shifts on the study's models: the residual-stream layer that matches a direction's
stream, the refusal logit score of every prompt under an adapter with a direction added or
subtracted there (a cached stage), and steering the base model with a raw shift."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from evals.evaluate import PromptRecord
from evals.stats import paired_test
from evals.suite import DOMAINS, SuitePrompt
from interp.direction import Direction
from interp.io import config_hash
from probes.interventions import add_activation
from probes.shift import random_like
from study.conditions import evaluate_sets
from study.core import Study

__all__ = ["logit_by_id", "matching_layer", "shifted_logits", "steer_base"]

_Sets = Mapping[str, Sequence[SuitePrompt | tuple[str, str]]]  # prompt sets as :func:`study.evaluate_sets` takes them


def logit_by_id(records: list[PromptRecord], domains: Sequence[str] = DOMAINS) -> dict[str, tuple[str, float]]:
    """``{prompt id: (domain, refusal logit score)}`` of the records in ``domains``."""
    return {r.id: (r.domain, float(r.logit_score)) for r in records if r.domain in domains}


def matching_layer(meta: dict) -> int:
    """The resid_post layer that carries the stream a direction was read from (resid_pre[L] = resid_post[L−1])."""
    layer = int(meta["layer"])
    return max(layer - 1, 0) if meta.get("site", "resid_pre") == "resid_pre" else layer


def shifted_logits(study: Study, sets: _Sets, name: str, adapter: Path | None = None, vec: Direction | None = None,
                   at: int = 0, coeff: float = -1.0) -> dict[str, tuple[str, float]]:
    """:func:`logit_by_id` of ``sets`` evaluated (logit score only, cached) under ``adapter`` with
    ``coeff`` × ``vec`` added at resid_post[``at``] at every position (no vector: the plain model)."""
    ctx = (lambda: add_activation(study.lm, vec, at, coeff=coeff, site="resid_post")) if vec is not None else None
    ident = f"add{coeff:g}x{config_hash(vec.raw(at).double().tolist(), 16)}@resid_post{at}" if vec is not None else None
    return logit_by_id(evaluate_sets(study, name, sets, adapter, ctx, ident, generate=False)[1])


def steer_base(study: Study, sets: _Sets, shifts: Mapping[str, Direction], base_logit: dict[str, tuple[str, float]],
               random_seed: int = 0) -> dict:
    """Each raw shift added to the base model at its largest-norm layer, against a seeded random
    direction of equal norms: the mean drop of the refusal logit per domain, and the paired test
    of shift against random per prompt."""
    out = {}
    for s, shift in shifts.items():
        at = int(shift.layers[int(shift.norms.double().argmax())])
        add = shifted_logits(study, sets, f"base+shift-{s}@{at}", None, shift, at, 1.0)
        ctl = shifted_logits(study, sets, f"base+random-{s}@{at}", None, random_like(shift, random_seed), at, 1.0)

        def drop(x):
            return {d: float(np.mean([base_logit[i][1] - x[i][1] for i in x if x[i][0] == d])) for d in DOMAINS}

        out[s] = {"layer": at, "norm": float(shift.norms[shift.layers.index(at)]), "drop": drop(add),
                  "drop_random": drop(ctl), "drop_vs_random": paired_test([ctl[i][1] for i in sorted(add)],
                                                                          [add[i][1] for i in sorted(add)]).to_dict()}
    return out
