"""Prediction statistics on planted data: monotone → ρ = 1 with a small p; noise → large p."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr

from evals.stats import MIN_N, bootstrap_ci, correlate, paired_test


def test_monotone_data_gives_spearman_one_and_small_p():
    x = np.arange(12, dtype=float)
    y = np.exp(x / 3)  # monotone, not linear
    r = correlate(x, y, n_perm=2000, n_boot=500)
    assert r.spearman == pytest.approx(1.0) and r.pearson < 1.0
    assert r.p_perm_spearman <= 1e-3 and not r.inconclusive
    assert r.ci_low == pytest.approx(1.0) and r.ci_high == pytest.approx(1.0)


def test_matches_scipy_point_estimates_with_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, 40).astype(float)
    y = x + rng.normal(size=40)
    r = correlate(x, y, n_perm=500, n_boot=200)
    assert r.spearman == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert r.pearson == pytest.approx(pearsonr(x, y).statistic, abs=1e-12)
    assert r.ci_low <= r.spearman <= r.ci_high


def test_independent_noise_gives_large_p():
    rng = np.random.default_rng(2)
    r = correlate(rng.normal(size=30), rng.normal(size=30), n_perm=2000, n_boot=500, seed=3)
    assert r.p_perm_spearman > 0.05 and r.p_perm_pearson > 0.05
    assert r.ci_low < 0 < r.ci_high


def test_seeded_and_anticorrelated():
    x = np.arange(8.0)
    a = correlate(x, -x, n_perm=300, n_boot=100, seed=5)
    b = correlate(x, -x, n_perm=300, n_boot=100, seed=5)
    assert a == b and a.spearman == pytest.approx(-1.0) and a.p_perm_spearman < 0.01


@pytest.mark.parametrize("x,y,why", [([1, 2, 3], [3, 2, 1], "at least 4"), ([1, 2, 3, 4], [1, 1, 1, 1], "constant"),
                                     ([1, 2, np.nan, 4, 5], [1, 2, 3, np.inf, 5], "at least 4")])
def test_small_or_degenerate_samples_are_inconclusive(x, y, why):
    r = correlate(x, y)
    assert r.inconclusive and why in r.note
    assert math.isnan(r.spearman) and math.isnan(r.p_perm_spearman)
    assert r.to_dict()["spearman"] is None
    assert MIN_N == 4


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="same length"):
        correlate([1, 2, 3, 4], [1, 2, 3])


def test_paired_test_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(4)
    before = rng.normal(size=40)
    shifted = paired_test(before + 1.0 + 0.1 * rng.normal(size=40), before, n_perm=2000, n_boot=500)
    assert shifted.mean_diff == pytest.approx(1.0, abs=0.1)
    assert shifted.p_perm < 1e-3 and shifted.p_sign < 1e-6 and shifted.n_pos == 40
    assert shifted.ci_low < 1.0 < shifted.ci_high + 0.1
    noise = paired_test(rng.normal(size=40), rng.normal(size=40), n_perm=2000, n_boot=500)
    assert noise.p_perm > 0.05
    assert paired_test([1.0], [0.0]).inconclusive


def test_bootstrap_ci_covers_the_mean():
    x = np.random.default_rng(5).normal(3.0, 1.0, size=200)
    lo, hi = bootstrap_ci(x, np.mean, n_boot=1000)
    assert lo < 3.0 < hi and hi - lo < 0.5
    lo_med, hi_med = bootstrap_ci(x, np.median, n_boot=500)
    assert lo_med < np.median(x) < hi_med
    assert all(math.isnan(v) for v in bootstrap_ci([]))


def test_cluster_bootstrap_ci_covers_mean_ignores_missing_cells_and_checks_shape():
    from evals.stats import cluster_bootstrap_ci

    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 1.0, (3, 30))
    lo, hi = cluster_bootstrap_ci(x, seed=1)
    assert lo < x.mean() < hi
    assert cluster_bootstrap_ci(x, seed=1) == (lo, hi)  # seeded
    holed = x.copy()
    holed[0, :5] = np.nan
    lo2, hi2 = cluster_bootstrap_ci(holed, seed=1)
    assert np.isfinite([lo2, hi2]).all() and lo2 < np.nanmean(holed) < hi2
    assert all(np.isnan(cluster_bootstrap_ci(np.empty((0, 0)))))
    with pytest.raises(ValueError, match="seeds × prompts"):
        cluster_bootstrap_ci(np.zeros((2, 2, 2)))


def test_newcombe_paired_ci_never_collapses_is_antisymmetric_and_covers():
    from evals.stats import newcombe_paired_ci

    lo, hi = newcombe_paired_ci([0] * 24, [0] * 24)
    assert lo < 0 < hi and hi == pytest.approx(-lo) and 0.1 < hi < 0.2
    rng = np.random.default_rng(0)
    b = (rng.random(40) < 0.5).astype(float)
    a = np.where(rng.random(40) < 0.7, b, 1 - b)
    lo1, hi1 = newcombe_paired_ci(b, a)
    lo2, hi2 = newcombe_paired_ci(a, b)
    assert lo1 == pytest.approx(-hi2) and hi1 == pytest.approx(-lo2)
    assert lo1 <= b.mean() - a.mean() <= hi1
    # Coverage of the true difference over correlated pairs (p_before 0.4, p_after 0.25).
    rng = np.random.default_rng(1)
    hits, sims, n = 0, 1000, 40  # Monte Carlo SE of the coverage about 0.007
    for _ in range(sims):
        before = (rng.random(n) < 0.4).astype(float)
        keep = rng.random(n) < 0.625  # after = before where kept (so p_after = 0.25), else 0
        after = before * keep
        lo, hi = newcombe_paired_ci(before, after)
        hits += lo <= 0.15 <= hi
    assert hits / sims > 0.92
    with pytest.raises(ValueError, match="0/1"):
        newcombe_paired_ci([0.5], [1])
