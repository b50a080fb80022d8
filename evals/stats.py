"""Prediction statistics: rank/linear correlation with permutation p-values and bootstrap CIs, a
(partial) correlation whose permutations stay within groups and are enumerated exactly when few, a
paired test on per-prompt differences and the recovery an intervention brings, split-half
reliability, and a generic bootstrap CI. Vectorised numpy, seeded.

Small samples are reported, not hidden: with fewer than :data:`MIN_N` points every statistic is
NaN and ``inconclusive`` is set, with the reason in ``note``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import binomtest, rankdata

from evals.evaluate import bootstrap_ci as _bootstrap_ci

__all__ = [
    "MIN_N",
    "EXACT_MAX",
    "CHUNK",
    "pearson_rows",
    "finite_pairs",
    "CorrelationResult",
    "PairedResult",
    "correlate",
    "recovery",
    "paired_test",
    "significant",
    "bootstrap_ci",
    "cluster_bootstrap_ci",
    "newcombe_paired_ci",
]

MIN_N = 4
"""Below this many points a correlation has too few permutations to mean anything."""

EXACT_MAX = 20000
"""Permutation tests enumerate every permutation when there are at most this many."""

CHUNK = 2048
"""Resamples per vectorised block: bounds memory at ``CHUNK × n`` floats."""


@dataclass(frozen=True)
class CorrelationResult:
    """Correlation of paired observations ``x[i], y[i]``."""

    spearman: float
    pearson: float
    p_perm_spearman: float
    """Two-sided permutation p-value, ``(1 + #{|ρ_perm| ≥ |ρ|}) / (1 + n_perm)``."""
    p_perm_pearson: float
    ci_low: float
    """Lower end of the percentile bootstrap CI of the Spearman correlation."""
    ci_high: float
    n: int
    n_perm: int
    n_boot: int
    inconclusive: bool = False
    note: str = ""

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class PairedResult:
    """A paired comparison of ``a[i]`` against ``b[i]`` (e.g. the same prompt before and after)."""

    mean_diff: float
    """Mean of ``a - b``."""
    p_perm: float
    """Two-sided sign-flip permutation p-value of the mean difference."""
    p_sign: float
    """Two-sided exact sign-test p-value (ties dropped)."""
    ci_low: float
    ci_high: float
    """Percentile bootstrap CI of the mean difference."""
    n: int
    n_pos: int
    n_neg: int
    inconclusive: bool = False
    note: str = ""

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def pearson_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray | np.floating:
    """Pearson correlation of each row of ``x`` with the matching row of ``y`` (broadcasting)."""
    xc = x - x.mean(-1, keepdims=True)
    yc = y - y.mean(-1, keepdims=True)
    num = (xc * yc).sum(-1)
    den = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.clip(num / den, -1.0, 1.0)


def finite_pairs(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` flattened to float64, keeping the pairs where both are finite.

    Raises:
        ValueError: ``x`` and ``y`` differ in length.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def _perm_p(stat: float, x: np.ndarray, y: np.ndarray, n_perm: int, rng: np.random.Generator) -> float:
    hits = 0
    done = 0
    while done < n_perm:
        m = min(CHUNK, n_perm - done)
        idx = rng.permuted(np.broadcast_to(np.arange(y.size), (m, y.size)), axis=1)
        hits += int((np.abs(pearson_rows(x[None], y[idx])) >= abs(stat) - 1e-12).sum())
        done += m
    return (1 + hits) / (1 + n_perm)


def correlate(
    x: ArrayLike, y: ArrayLike, n_perm: int = 10000, n_boot: int = 2000, seed: int = 0,
    alpha: float = 0.05,
) -> CorrelationResult:
    """Spearman and Pearson correlation with permutation p-values and a bootstrap CI of Spearman.

    Pairs where either value is non-finite are dropped. Spearman is Pearson on average ranks, so
    ties are handled as in ``scipy.stats.spearmanr``.

    Returns:
        A :class:`CorrelationResult`; ``inconclusive`` (with NaN statistics) when fewer than
        :data:`MIN_N` finite pairs remain or either variable is constant.
    """
    if n_perm < 1 or n_boot < 1:
        raise ValueError(f"n_perm and n_boot must be >= 1, got {n_perm} and {n_boot}")
    x, y = finite_pairs(x, y)
    n = int(x.size)
    nan = float("nan")

    def empty(note: str) -> CorrelationResult:
        return CorrelationResult(nan, nan, nan, nan, nan, nan, n, n_perm, n_boot, True, note)

    if n < MIN_N:
        return empty(f"only {n} finite pairs; a correlation needs at least {MIN_N}")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return empty("one variable is constant; the correlation is undefined")
    rng = np.random.default_rng(seed)
    rx, ry = rankdata(x), rankdata(y)
    rho = float(pearson_rows(rx, ry))
    r = float(pearson_rows(x, y))
    p_rho = _perm_p(rho, rx, ry, n_perm, rng)
    p_r = _perm_p(r, x, y, n_perm, rng)
    boots = []
    done = 0
    while done < n_boot:
        m = min(CHUNK, n_boot - done)
        idx = rng.integers(0, n, size=(m, n))
        boots.append(pearson_rows(rankdata(x[idx], axis=1), rankdata(y[idx], axis=1)))
        done += m
    b = np.concatenate(boots)
    b = b[np.isfinite(b)]  # a resample with a constant column has no correlation
    lo, hi = (np.quantile(b, [alpha / 2, 1 - alpha / 2]) if b.size else (nan, nan))
    note = "" if n >= 10 else f"n={n}: permutation p-values and the CI are coarse"
    return CorrelationResult(rho, r, p_rho, p_r, float(lo), float(hi), n, n_perm, n_boot, False, note)


def bootstrap_ci(
    x: ArrayLike, stat: Callable[..., np.ndarray] = np.mean, n_boot: int = 2000, alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat`` (called as ``stat(samples, axis=1)``, vectorised) over the
    finite values of ``x``: :func:`evals.evaluate.bootstrap_ci` with the argument order of this module.

    Returns ``(nan, nan)`` for an empty sample.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    return _bootstrap_ci(x, n_boot, seed, alpha, chunk=CHUNK * max(1, x.size), stat=stat)


def cluster_bootstrap_ci(
    values: ArrayLike, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
) -> tuple[float, float]:
    """Two-level bootstrap CI of the mean of a ``seeds × prompts`` matrix (crossed design).

    Each resample draws training seeds with replacement *and* prompts with replacement, and keeps
    every (seed, prompt) cell of the drawn rows and columns, so the interval carries run-to-run
    variance as well as prompt sampling. Prompts shared by all seeds (and, for a paired difference,
    by both conditions) are drawn together. NaN cells (a prompt missing for a seed) are ignored.
    With one seed the interval covers prompt sampling only.

    Returns ``(nan, nan)`` for an empty matrix.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise ValueError(f"values must be seeds × prompts (2-D); got shape {x.shape}")
    if x.size == 0 or not np.isfinite(x).any():
        return float("nan"), float("nan")
    n_s, n_p = x.shape
    rng = np.random.default_rng(seed)
    ok = np.isfinite(x)
    filled = np.where(ok, x, 0.0)
    stats = np.empty(n_boot)
    step = max(1, CHUNK * 64 // max(1, n_s * n_p))
    for start in range(0, n_boot, step):
        m = min(step, n_boot - start)
        rows = rng.integers(0, n_s, size=(m, n_s))
        # Counts of each prompt in each resample: the mean over drawn cells is a weighted mean.
        cols = rng.integers(0, n_p, size=(m, n_p))
        wp = np.zeros((m, n_p))
        np.add.at(wp, (np.arange(m)[:, None], cols), 1.0)
        ws = np.zeros((m, n_s))
        np.add.at(ws, (np.arange(m)[:, None], rows), 1.0)
        num = np.einsum("ms,sp,mp->m", ws, filled, wp)
        den = np.einsum("ms,sp,mp->m", ws, ok.astype(np.float64), wp)
        stats[start:start + m] = num / np.where(den > 0, den, np.nan)
    stats = stats[np.isfinite(stats)]
    lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def newcombe_paired_ci(before: ArrayLike, after: ArrayLike, alpha: float = 0.05) -> tuple[float, float]:
    """Newcombe's score interval (1998, method 10) for the difference of two *paired* proportions,
    ``mean(before) - mean(after)`` over 0/1 outcomes of the same items.

    Built from the Wilson intervals of the two margins and their correlation, so unlike a bootstrap
    it does not collapse when every pair agrees: 0/24 before and 0/24 after gives about ±0.14.
    """
    from evals.evaluate import wilson_ci

    b = np.asarray(before, dtype=np.float64).ravel()
    a = np.asarray(after, dtype=np.float64).ravel()
    if b.shape != a.shape:
        raise ValueError(f"paired outcomes need equal lengths, got {b.size} and {a.size}")
    if not np.isin(b, (0.0, 1.0)).all() or not np.isin(a, (0.0, 1.0)).all():
        raise ValueError("newcombe_paired_ci takes 0/1 outcomes")
    n = b.size
    if n == 0:
        return float("nan"), float("nan")
    both = float(((b == 1) & (a == 1)).sum())
    only_b = float(((b == 1) & (a == 0)).sum())
    only_a = float(((b == 0) & (a == 1)).sum())
    neither = n - both - only_b - only_a
    p1, p2 = b.mean(), a.mean()
    l1, u1 = wilson_ci(int(b.sum()), n, alpha)
    l2, u2 = wilson_ci(int(a.sum()), n, alpha)
    denom = (both + only_b) * (neither + only_a) * (both + only_a) * (neither + only_b)
    phi = 0.0 if denom == 0 else (both * neither - only_b * only_a) / math.sqrt(denom)
    d = p1 - p2
    lower = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    upper = d + math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return max(-1.0, lower), min(1.0, upper)


def paired_test(
    a: ArrayLike, b: ArrayLike, n_perm: int = 10000, n_boot: int = 2000, seed: int = 0,
    alpha: float = 0.05,
) -> PairedResult:
    """Is ``a`` different from ``b``, pair by pair? Sign-flip permutation test of the mean
    difference, exact sign test, and a bootstrap CI of the mean difference."""
    a, b = finite_pairs(a, b)
    d = a - b
    n = int(d.size)
    n_pos, n_neg = int((d > 0).sum()), int((d < 0).sum())
    nan = float("nan")
    if n < 2:
        return PairedResult(nan, nan, nan, nan, nan, n, n_pos, n_neg, True, f"only {n} finite pairs")
    rng = np.random.default_rng(seed)
    obs = abs(d.mean())
    hits = 0
    done = 0
    while done < n_perm:
        m = min(CHUNK, n_perm - done)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(m, n))
        hits += int((np.abs((signs * d).mean(1)) >= obs - 1e-12).sum())
        done += m
    p_perm = (1 + hits) / (1 + n_perm)
    p_sign = float(binomtest(n_pos, n_pos + n_neg, 0.5).pvalue) if n_pos + n_neg else 1.0
    lo, hi = bootstrap_ci(d, np.mean, n_boot, alpha, seed)
    note = "" if n >= 10 else f"n={n}: p-values are coarse"
    return PairedResult(float(d.mean()), p_perm, p_sign, lo, hi, n, n_pos, n_neg, n < MIN_N, note)


def significant(test: dict, alpha: float = 0.05) -> bool:
    """A paired test (:meth:`PairedResult.to_dict`) counts as a positive effect when its bootstrap CI
    is above zero *and* its sign-flip permutation p is below ``alpha`` (with few binary pairs the
    bootstrap CI alone is too narrow)."""
    return bool(test.get("ci_low") is not None and test["ci_low"] > 0 and test.get("p_perm") is not None
                and test["p_perm"] < alpha)


# -- correlation within groups, controlling covariates ---------------------------------------------


def recovery(base: Mapping[str, tuple[str, float]], changed: Mapping[str, tuple[str, float]],
             treated: Mapping[str, tuple[str, float]], controls: Mapping[str, Mapping[str, tuple[str, float]]]
             | None = None, min_gap: float = 0.25) -> dict:
    """How much of a change an intervention undoes, per group and pooled, paired by item.

    Each mapping is ``{item id: (group, value)}``: ``base`` before the change (e.g. the base model's
    refusal log-odds), ``changed`` after it (the unlearned model), ``treated`` after it with the
    intervention, and each control intervention under ``controls``.

    Returns:
        ``{"groups": {group: row}, "pooled_returned", "pooled_fraction", "pooled_vs": {control: test}}``;
        a row holds the means, ``returned`` (:func:`paired_test` of treated vs changed), ``gap`` (base −
        changed), ``fraction`` (returned / gap, only where the gap exceeds ``min_gap``; else None) and
        ``vs`` (treated vs each control, paired).
    """
    controls = controls or {}
    out: dict = {"groups": {}}
    ids = sorted(i for i in changed if i in treated and i in base and all(i in c for c in controls.values()))

    def block(sel: list[str]) -> dict:
        b, u, a = (np.array([m[i][1] for i in sel]) for m in (base, changed, treated))
        gap = float((b - u).mean())
        return {"base": float(b.mean()), "changed": float(u.mean()), "treated": float(a.mean()), "gap": gap,
                "returned": paired_test(a, u).to_dict(),
                "fraction": float((a - u).mean() / gap) if gap > min_gap else None,
                "vs": {k: paired_test(a, [c[i][1] for i in sel]).to_dict() for k, c in controls.items()}}

    for group in dict.fromkeys(changed[i][0] for i in ids):
        out["groups"][group] = block([i for i in ids if changed[i][0] == group])
    pooled = block(ids) if ids else {"returned": None, "fraction": None, "vs": {}}
    out.update(pooled_returned=pooled["returned"], pooled_fraction=pooled["fraction"], pooled_vs=pooled["vs"])
    return out
