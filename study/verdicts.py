"""Verdict arithmetic on judged records: paired drops from base with two-level (seeds × prompts)
intervals, domain means, differences between conditions, and the claim record."""

from __future__ import annotations

import numpy as np

from evals.evaluate import PromptRecord

__all__ = ["paired_drop", "mean_drop", "drop_difference", "drop_contrast", "claim"]


def _refused(records: list[PromptRecord], domain: str) -> dict[str, float]:
    return {r.id: float(r.label == "refusal") for r in records if r.domain == domain}


def _logits(records: list[PromptRecord], domain: str) -> dict[str, float]:
    return {r.id: r.logit_score for r in records if r.domain == domain}


def _seed_and_prompt(rid: str) -> tuple[str, str]:
    # Pooled records carry "seed:prompt-id" (see :func:`pooled`); plain ones are one seed.
    head, sep, tail = rid.partition(":")
    return (head, tail) if sep and head.lstrip("-").isdigit() else ("", rid)


def _drop_matrix(before: list[PromptRecord], after: list[PromptRecord], domain: str, measure: str
                 ) -> tuple[np.ndarray, float, float]:
    """``seeds × prompts`` matrix of before - after on shared prompts (NaN where a cell is missing)."""
    get = _refused if measure == "judge" else _logits
    b, a = get(before, domain), get(after, domain)
    ids = sorted(set(b) & set(a))
    if not ids:
        raise ValueError(f"no shared prompts for {domain}; were both evaluations run on the same split?")
    cells = [_seed_and_prompt(i) for i in ids]
    seeds, prompts = sorted({s for s, _ in cells}), sorted({p for _, p in cells})
    si, pi = {s: k for k, s in enumerate(seeds)}, {p: k for k, p in enumerate(prompts)}
    mat = np.full((len(seeds), len(prompts)), np.nan)
    for rid, (s, q) in zip(ids, cells):
        mat[si[s], pi[q]] = b[rid] - a[rid]
    return mat, float(np.mean([b[i] for i in ids])), float(np.mean([a[i] for i in ids]))


def paired_drop(before: list[PromptRecord], after: list[PromptRecord], domain: str, measure: str = "judge",
                n_boot: int = 2000, seed: int = 0) -> dict:
    """Drop in refusal (before - after) on the same prompts, with a two-level 95% CI.

    The interval resamples training seeds and prompts (:func:`evals.stats.cluster_bootstrap_ci`),
    paired because both conditions share the prompts. ``measure``: ``judge`` (refusal rate from
    generations) or ``logit`` (mean refusal log-odds).
    """
    from evals.stats import cluster_bootstrap_ci

    mat, before_mean, after_mean = _drop_matrix(before, after, domain, measure)
    ci, method = list(cluster_bootstrap_ci(mat, n_boot, seed=seed)), "seeds x prompts bootstrap"
    if measure == "judge" and ci[0] == ci[1]:
        # Every resample agrees (e.g. 0/n refusals before and after): a bootstrap cannot express the
        # uncertainty of a rate measured on n prompts, Newcombe's paired score interval can.
        from evals.stats import newcombe_paired_ci

        get = _refused
        b, a = get(before, domain), get(after, domain)
        ids = sorted(set(b) & set(a))
        ci, method = list(newcombe_paired_ci([b[i] for i in ids], [a[i] for i in ids])), "Newcombe paired score"
    return {"before": before_mean, "after": after_mean, "drop": float(np.nanmean(mat)), "ci": ci,
            "ci_method": method, "n": int(np.isfinite(mat).sum()), "n_seeds": int(mat.shape[0])}


def _domain_mean_ci(mats: list[np.ndarray], n_boot: int, seed: int) -> tuple[float, list[float], int]:
    """Mean over domains of each ``seeds × prompts`` matrix's mean, with a two-level CI that draws
    seeds once per resample (they are shared by every domain) and prompts within each domain."""
    n_seeds = {m.shape[0] for m in mats}
    if len(n_seeds) != 1:
        raise ValueError(f"domains were evaluated over different numbers of seeds {sorted(n_seeds)}")
    (n_s,) = n_seeds
    rng = np.random.default_rng(seed)
    boots = np.zeros(n_boot)
    rows = rng.integers(0, n_s, size=(n_boot, n_s))
    for mat in mats:
        cols = rng.integers(0, mat.shape[1], size=(n_boot, mat.shape[1]))
        boots += np.array([np.nanmean(mat[r][:, c]) for r, c in zip(rows, cols)])
    boots /= len(mats)
    return (float(np.mean([np.nanmean(m) for m in mats])),
            [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))], n_s)


def mean_drop(before: list[PromptRecord], after: list[PromptRecord], domains: list[str], measure: str = "judge",
              n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean over ``domains`` of the per-domain paired drop; the CI resamples seeds (shared by every
    domain) and prompts within each domain."""
    mats = [_drop_matrix(before, after, d, measure)[0] for d in domains]
    drop, ci, n_s = _domain_mean_ci(mats, n_boot, seed)
    return {"drop": drop, "ci": ci, "domains": list(domains), "n_seeds": n_s}


def drop_difference(first: dict, second: dict, domains: list[str], measure: str = "judge",
                    n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean drop of condition ``first`` minus that of ``second`` over ``domains``, paired.

    Both are :func:`condition` results measured on the same prompts against the same base, so the
    difference is taken prompt by prompt (seed *k* of one paired with seed *k* of the other) and the
    two-level CI resamples the shared prompts once for both conditions.
    """
    mats = []
    for d in domains:
        m1 = _drop_matrix(first["base"], first["after"], d, measure)[0]
        m2 = _drop_matrix(second["base"], second["after"], d, measure)[0]
        if m1.shape != m2.shape:
            raise ValueError(f"{d}: the conditions differ in seeds or prompts ({m1.shape} vs {m2.shape}); "
                             "compare conditions evaluated on the same prompts with the same seeds")
        mats.append(m1 - m2)
    diff, ci, n_s = _domain_mean_ci(mats, n_boot, seed)
    return {"difference": diff, "ci": ci, "domains": list(domains), "n_seeds": n_s}


def drop_contrast(first: dict, others: list[dict], domains: list[str], measure: str = "judge",
                  n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean drop of condition ``first`` minus the mean over ``others`` of theirs, over ``domains``.

    Like :func:`drop_difference` (the case of one other), paired prompt by prompt and seed by seed,
    and the two-level CI resamples seeds and prompts once for every condition, so a contrast with
    several draws of a comparison condition (e.g. random choices) keeps its pairing.
    """
    if not others:
        raise ValueError("drop_contrast needs at least one condition to compare with")
    mats = []
    for d in domains:
        m1 = _drop_matrix(first["base"], first["after"], d, measure)[0]
        rest = [_drop_matrix(o["base"], o["after"], d, measure)[0] for o in others]
        if any(m.shape != m1.shape for m in rest):
            raise ValueError(f"{d}: the conditions differ in seeds or prompts ({m1.shape} vs "
                             f"{sorted({m.shape for m in rest})}); compare conditions evaluated on the same prompts")
        mats.append(m1 - np.mean(rest, axis=0))
    diff, ci, n_s = _domain_mean_ci(mats, n_boot, seed)
    return {"difference": diff, "ci": ci, "domains": list(domains), "n_seeds": n_s, "n_others": len(others)}


def claim(cid: str, text: str, status: str, evidence: str) -> dict:
    if status not in ("replicated", "not replicated", "inconclusive"):
        raise ValueError(f"unknown claim status {status!r}")
    return {"id": cid, "claim": text, "status": status, "evidence": evidence}


