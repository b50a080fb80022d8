"""Correlations over grouped points, the statistics of C5 (concept geometry vs EMA): partial
correlations that control covariates (each domain's base refusal), permutation tests that permute
within groups (per target) and enumerate every ordering when there are few, and split-half
reliability with the Spearman-Brown correction."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import rankdata

from evals.stats import CHUNK, EXACT_MAX, MIN_N, finite_pairs, pearson_rows

__all__ = ["GroupedCorrelation", "partial_correlation", "within_group_permutations", "grouped_correlation", "split_half", "spearman_brown"]


@dataclass(frozen=True)
class GroupedCorrelation:
    """A (partial) correlation of ``x`` and ``y`` whose null keeps every point in its group."""

    r: float
    """Spearman or Pearson correlation; partial (covariates regressed out of both) when ``partial``."""
    p_perm: float
    """Two-sided permutation p-value: ``y`` shuffled within each group. Exact (share of all
    permutations at least as extreme, the identity included) when ``exact``, else
    ``(1 + hits) / (1 + n_perm)``."""
    ci_low: float
    """Lower end of the percentile bootstrap CI, points resampled within each group."""
    ci_high: float
    n: int
    n_groups: int
    n_perm: int
    """Permutations used: all of them when ``exact``."""
    exact: bool
    method: str
    partial: bool
    inconclusive: bool = False
    note: str = ""

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}


def _ranks(a: np.ndarray) -> np.ndarray:
    return rankdata(a, axis=-1)


def _residual_maker(z: np.ndarray) -> np.ndarray:
    """``I - H`` for the least-squares projection on ``[1, z]`` (``z``: ``(..., n, q)``)."""
    ones = np.ones((*z.shape[:-1], 1))
    design = np.concatenate([ones, z], axis=-1)
    hat = design @ np.linalg.pinv(design)
    return np.eye(z.shape[-2]) - hat


def _partial_rows(x: np.ndarray, y: np.ndarray, z: np.ndarray | None) -> np.ndarray | np.floating:
    """Pearson correlation of each row of ``x`` and ``y`` after regressing ``z`` out of both; NaN
    where a residual vanishes (the covariates explain a variable entirely)."""
    if z is None or z.shape[-1] == 0:
        return pearson_rows(x, y)
    m = _residual_maker(z)
    rx = np.einsum("...ij,...j->...i", m, x)
    ry = np.einsum("...ij,...j->...i", m, y)
    tiny = 1e-9 * np.maximum(np.abs(x).max(-1), np.abs(y).max(-1)) + 1e-300
    dead = (np.abs(rx).max(-1) < tiny) | (np.abs(ry).max(-1) < tiny)
    return np.where(dead, np.nan, pearson_rows(rx, ry))


def _covariates(covariates: ArrayLike | None, n: int) -> np.ndarray:
    if covariates is None:
        return np.zeros((n, 0))
    z = np.asarray(covariates, dtype=np.float64)
    z = z[:, None] if z.ndim == 1 else z
    if z.ndim != 2 or z.shape[0] != n:
        raise ValueError(f"covariates must be (n,) or (n, q) with n={n}, got shape {z.shape}")
    return z


def partial_correlation(x: ArrayLike, y: ArrayLike, covariates: ArrayLike | None = None,
                        method: str = "spearman") -> float:
    """Correlation of ``x`` and ``y`` controlling ``covariates``: the correlation of their residuals
    after a least-squares fit on ``[1, covariates]``. ``spearman`` does this on ranks (all variables
    ranked first). Without covariates it is the plain correlation. NaN when undefined."""
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be spearman or pearson, got {method!r}")
    x, y = finite_pairs(x, y)
    z = _covariates(covariates, x.size)
    if method == "spearman":
        x, y, z = _ranks(x), _ranks(y), _ranks(z.T).T if z.size else z
    return float(_partial_rows(x, y, z))


def within_group_permutations(groups: ArrayLike | None, n: int, n_perm: int = 10000, seed: int = 0,
                              exact_max: int = EXACT_MAX) -> tuple[np.ndarray, bool]:
    """Index permutations of ``range(n)`` that move each position only within its group.

    Returns:
        ``(perms, exact)``: every one of the ``∏ n_g!`` permutations (the identity included) when
        there are at most ``exact_max``, else ``n_perm`` seeded random ones; ``perms`` is ``(m, n)``.
    """
    g = np.zeros(n, dtype=int) if groups is None else np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must hold one label per point ({n}), got shape {g.shape}")
    members = [np.flatnonzero(g == label) for label in dict.fromkeys(g.tolist())]
    total = math.prod(math.factorial(len(m)) for m in members)
    if total <= exact_max:
        per = [np.array(list(itertools.permutations(m)), dtype=int).reshape(-1, len(m)) for m in members]
        pick = np.indices([len(p) for p in per]).reshape(len(per), -1)
        out = np.tile(np.arange(n), (total, 1))
        for m, p, k in zip(members, per, pick):
            out[:, m] = p[k]
        return out, True
    rng = np.random.default_rng(seed)
    out = np.tile(np.arange(n), (n_perm, 1))
    for m in members:
        out[:, m] = rng.permuted(np.broadcast_to(m, (n_perm, m.size)), axis=1)
    return out, False


def grouped_correlation(
    x: ArrayLike, y: ArrayLike, groups: ArrayLike | None = None, covariates: ArrayLike | None = None,
    method: str = "spearman", n_perm: int = 10000, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05,
    exact_max: int = EXACT_MAX,
) -> GroupedCorrelation:
    """(Partial) correlation with a permutation p-value that shuffles ``y`` within ``groups``.

    Points whose ``x``, ``y`` or covariates are not finite are dropped. The covariates stay with
    their points under permutation (only ``y`` moves), so the null is "``y`` is exchangeable within
    each group"; the bootstrap resamples points within each group.

    Returns:
        A :class:`GroupedCorrelation`; ``inconclusive`` with NaN statistics when fewer than
        :data:`MIN_N` (plus one per covariate) points remain or a variable is constant.
    """
    if method not in ("spearman", "pearson"):
        raise ValueError(f"method must be spearman or pearson, got {method!r}")
    if n_perm < 1 or n_boot < 1:
        raise ValueError(f"n_perm and n_boot must be >= 1, got {n_perm} and {n_boot}")
    xa, ya = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"x and y must have the same length, got {xa.size} and {ya.size}")
    z = _covariates(covariates, xa.size)
    g = np.zeros(xa.size, dtype=int) if groups is None else np.asarray(groups)
    if g.shape != xa.shape:
        raise ValueError(f"groups must hold one label per point ({xa.size}), got shape {g.shape}")
    keep = np.isfinite(xa) & np.isfinite(ya) & np.isfinite(z).all(1)
    xa, ya, z, g = xa[keep], ya[keep], z[keep], g[keep]
    n, q = int(xa.size), z.shape[1]
    n_groups = len(set(g.tolist()))
    nan = float("nan")

    def empty(note: str) -> GroupedCorrelation:
        return GroupedCorrelation(nan, nan, nan, nan, n, n_groups, 0, False, method, q > 0, True, note)

    if n < MIN_N + q:
        return empty(f"only {n} finite points; this correlation needs at least {MIN_N + q}")
    if np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return empty("one variable is constant; the correlation is undefined")
    rank = _ranks if method == "spearman" else (lambda a: a)
    zr = rank(z.T).T if q else z
    rx, ry = rank(xa), rank(ya)
    r = float(_partial_rows(rx, ry, zr if q else None))
    if not np.isfinite(r):
        return empty("the covariates explain x or y entirely; no partial correlation")
    perms, exact = within_group_permutations(g, n, n_perm, seed, exact_max)
    hits = 0
    resid = _residual_maker(zr) if q else np.eye(n)
    ex = resid @ rx
    for start in range(0, len(perms), CHUNK):
        ey = ry[perms[start:start + CHUNK]] @ resid.T
        hits += int((np.abs(pearson_rows(ex[None], ey)) >= abs(r) - 1e-12).sum())
    p = hits / len(perms) if exact else (1 + hits) / (1 + len(perms))
    rng = np.random.default_rng(seed + 1)
    boots = []
    members = [np.flatnonzero(g == label) for label in dict.fromkeys(g.tolist())]
    for start in range(0, n_boot, CHUNK):
        m = min(CHUNK, n_boot - start)
        idx = np.concatenate([rng.choice(mem, size=(m, mem.size)) for mem in members], axis=1)
        zb = z[idx]  # m n q
        zb = np.stack([rank(zb[..., k]) for k in range(q)], -1) if q else None
        boots.append(_partial_rows(rank(xa[idx]), rank(ya[idx]), zb))
    b = np.concatenate(boots)
    b = b[np.isfinite(b)]
    lo, hi = np.quantile(b, [alpha / 2, 1 - alpha / 2]) if b.size else (nan, nan)
    note = "" if n >= 10 else f"n={n}: the permutation p-value and the CI are coarse"
    return GroupedCorrelation(r, float(p), float(lo), float(hi), n, n_groups, len(perms), exact, method, q > 0,
                              False, note)


# -- split-half reliability ------------------------------------------------------------------------


def split_half(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic halves of ``range(n)``: even and odd positions (interleaved, so an ordering of
    the items by source or length falls evenly into both)."""
    if n < 2:
        raise ValueError(f"a split-half needs at least 2 items, got {n}")
    idx = np.arange(n)
    return idx[0::2], idx[1::2]


def spearman_brown(r: float | ArrayLike, k: float = 2.0) -> np.ndarray | np.floating:
    """Reliability of a measure ``k`` times as long as one whose reliability is ``r``:
    ``k r / (1 + (k - 1) r)``; for a split-half correlation (``k = 2``) the full-length reliability.
    Clipped to [-1, 1] (the formula leaves that range for r < -1/(2k - 1))."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    r = np.clip(np.asarray(r, dtype=np.float64), -1.0, 1.0)
    den = 1 + (k - 1) * r
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, k * r / np.where(den > 0, den, 1.0), -1.0)
    return np.clip(out, -1.0, 1.0)


# -- recovery by an intervention -------------------------------------------------------------------
