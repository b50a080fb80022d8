"""Retain sets chosen by a prediction or at random (H6): what each strategy retains, the untouched
domains that no k-strategy retains (held out), and the predicted set against the random draws at
matched target forgetting (:func:`study.frontier.matched_contrast`: predicted − the mean over the draws,
one seeds × prompts resample shared by all, the draws fixed)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from evals.suite import DOMAINS
from study.frontier import Condition, at_level, matched_contrast, matched_difference

__all__ = ["NO_HELD_OUT", "retain_strategies", "held_out_domains", "compare_retain_sets"]

NO_HELD_OUT = "no untouched domain is held out: every one is retained by some k-strategy"


def retain_strategies(target: str, similarity: Mapping[str, float], k: int, per_domain: int,
                      n_random: int) -> dict[str, dict]:
    """Each strategy's retain set for ``target``: ``{name: {"retain_domains", "per_domain", "budget"}}``
    for ``predicted`` (the k untouched domains most similar to the target, most similar first),
    ``random1``… (k domains each, sorted; drawn from a generator seeded by target and k, so a draw
    may equal the predicted set), ``all`` (the same k × ``per_domain`` budget spread over every
    untouched domain, at least one prompt each) and ``none`` (no retain term)."""
    untouched = [d for d in DOMAINS if d != target]
    rng = random.Random(f"{target}-{k}")
    out = {"predicted": {"retain_domains": sorted(untouched, key=lambda d: -similarity[d])[:k],
                         "per_domain": per_domain}}
    for j in range(n_random):
        out[f"random{j + 1}"] = {"retain_domains": sorted(rng.sample(untouched, k)), "per_domain": per_domain}
    out["all"] = {"retain_domains": untouched, "per_domain": max(1, k * per_domain // len(untouched))}
    out["none"] = {"retain_domains": [], "per_domain": None}
    for s in out.values():
        s["budget"] = len(s["retain_domains"]) * (s["per_domain"] or 0)
    return out


def held_out_domains(strategies: Mapping[str, dict], target: str) -> list[str]:
    """Untouched domains that neither ``predicted`` nor any ``random*`` draw retains (``all``, which
    retains every one, is left out of the definition)."""
    chosen = {d for n, s in strategies.items() if n == "predicted" or n.startswith("random")
              for d in s["retain_domains"]}
    return [d for d in DOMAINS if d != target and d not in chosen]


def compare_retain_sets(conds: Mapping[str, Condition], untouched: Sequence[str], held_out: Sequence[str],
                        levels: Sequence[float], n_boot: int = 2000) -> dict:
    """``predicted`` against the ``random*`` conditions at every matched level (the last is primary),
    over all ``untouched`` domains and over the ``held_out`` ones; each draw's own paired difference at
    the primary level; every condition's held-out refusal at every level.

    Returns ``{"vs_random_at": {level: {"untouched", "held_out"}}, "vs_random": the primary level's,
    "per_draw": {draw: matched_difference}, "held_out_refusal": {name: {level: at_level}}}``.
    """
    predicted = conds["predicted"]
    randoms = [c for n, c in conds.items() if n.startswith("random")]
    if not randoms:
        raise ValueError("compare_retain_sets needs at least one random* condition")
    at = {}
    for lv in levels:
        held = (matched_contrast(predicted, randoms, held_out, lv, n_boot) if held_out
                else {"difference": None, "ci": None, "note": NO_HELD_OUT})
        at[f"{lv:g}"] = {"untouched": matched_contrast(predicted, randoms, untouched, lv, n_boot), "held_out": held}
    return {"vs_random_at": at, "vs_random": at[f"{levels[-1]:g}"],
            "per_draw": {c.name: matched_difference(predicted, c, untouched, levels[-1], n_boot) for c in randoms},
            "held_out_refusal": {n: {f"{lv:g}": at_level(c, held_out, lv, n_boot) for lv in levels}
                                 for n, c in conds.items()} if held_out else {}}
