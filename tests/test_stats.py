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


# -- within-group permutations, partial correlation, split-half reliability --------------------------


def test_exact_within_group_permutation_p_by_hand():
    from evals.grouped_stats import grouped_correlation

    x = y = [1.0, 2.0, 3.0, 4.0]
    # One group: 4! = 24 orderings; |ρ| >= 1 only for the identity and the reversal.
    one = grouped_correlation(x, y, n_boot=50)
    assert one.exact and one.n_perm == 24 and one.r == pytest.approx(1.0) and one.p_perm == pytest.approx(2 / 24)
    # Two groups {1,2}, {3,4}: 2!·2! = 4 orderings with ρ = 1, 0.8, 0.8, 0.6; only the identity reaches 1.
    two = grouped_correlation(x, y, groups=["a", "a", "b", "b"], n_boot=50)
    assert two.exact and two.n_perm == 4 and two.n_groups == 2 and two.p_perm == pytest.approx(1 / 4)


def test_within_group_permutations_enumerate_or_sample_and_keep_groups():
    from evals.grouped_stats import within_group_permutations

    groups = np.array(["a", "b", "a", "b", "a"])
    perms, exact = within_group_permutations(groups, 5)
    assert exact and perms.shape == (12, 5) and len({tuple(p) for p in perms}) == 12  # 3! · 2!
    assert (groups[perms] == groups).all()
    sampled, exact = within_group_permutations(groups, 5, n_perm=300, seed=1, exact_max=5)
    assert not exact and sampled.shape == (300, 5) and (groups[sampled] == groups).all()
    assert np.array_equal(sampled, within_group_permutations(groups, 5, n_perm=300, seed=1, exact_max=5)[0])
    assert np.array_equal(np.sort(sampled, axis=1), np.tile(np.arange(5), (300, 1)))


def test_partial_correlation_matches_the_closed_form_and_vanishes_when_the_covariate_explains():
    from evals.grouped_stats import grouped_correlation, partial_correlation

    rng = np.random.default_rng(0)
    z = rng.normal(size=60)
    x, y = z + 0.3 * rng.normal(size=60), z + 0.3 * rng.normal(size=60)  # related only through z
    rxy, rxz, ryz = (pearsonr(a, b).statistic for a, b in ((x, y), (x, z), (y, z)))
    closed = (rxy - rxz * ryz) / math.sqrt((1 - rxz ** 2) * (1 - ryz ** 2))
    assert partial_correlation(x, y, z, method="pearson") == pytest.approx(closed, abs=1e-12)
    assert partial_correlation(x, y, method="pearson") == pytest.approx(rxy, abs=1e-12)
    plain = grouped_correlation(x, y, n_perm=2000, n_boot=300)
    part = grouped_correlation(x, y, covariates=z, n_perm=2000, n_boot=300)
    assert plain.r > 0.8 and plain.p_perm < 0.01 and not plain.partial
    assert part.partial and abs(part.r) < 0.2 and part.p_perm > 0.05 and part.ci_low < 0 < part.ci_high


def test_partial_correlation_keeps_a_direct_effect():
    from evals.grouped_stats import grouped_correlation

    rng = np.random.default_rng(1)
    x, z = rng.normal(size=50), rng.normal(size=50)
    y = x + 0.5 * rng.normal(size=50) + 0 * z
    part = grouped_correlation(x, y, covariates=z, n_perm=2000, n_boot=300)
    assert part.r > 0.8 and part.p_perm < 0.01 and part.ci_low > 0.5


def test_group_offsets_are_not_evidence_under_within_group_permutation():
    from evals.grouped_stats import grouped_correlation

    rng = np.random.default_rng(2)
    groups = np.repeat(["a", "b", "c"], 8)
    offset = np.repeat([0.0, 5.0, 10.0], 8)  # x and y share only the group offsets
    x, y = offset + rng.normal(size=24), offset + rng.normal(size=24)
    pooled = grouped_correlation(x, y, n_perm=2000, n_boot=100)
    within = grouped_correlation(x, y, groups=groups, n_perm=2000, n_boot=100)
    assert pooled.r == within.r > 0.7 and pooled.p_perm < 0.01
    assert within.p_perm > 0.2  # the shuffles keep the offsets, so they reach ρ as often as not


def test_grouped_correlation_degenerate_cases():
    from evals.grouped_stats import grouped_correlation

    assert grouped_correlation([1, 2, 3, 4], [1, 2, 4, 3], covariates=[1, 1, 2, 2]).inconclusive  # n < 4 + 1
    assert "constant" in grouped_correlation([1, 2, 3, 4, 5], [1, 1, 1, 1, 1]).note
    x = np.arange(8.0)
    res = grouped_correlation(x, np.sin(x), covariates=2 * x + 1)
    assert res.inconclusive and "entirely" in res.note and res.to_dict()["r"] is None
    with pytest.raises(ValueError, match="one label per point"):
        grouped_correlation(x, x, groups=["a"] * 3)


def test_split_half_and_spearman_brown():
    from evals.grouped_stats import spearman_brown, split_half

    a, b = split_half(5)
    assert a.tolist() == [0, 2, 4] and b.tolist() == [1, 3]
    assert spearman_brown([0.5, 1.0, 0.0]) == pytest.approx([2 / 3, 1.0, 0.0])
    assert spearman_brown(0.6, k=3.0) == pytest.approx(1.8 / 2.2)
    assert spearman_brown([-0.5, -1.0]).tolist() == [-1.0, -1.0]  # clipped where the formula leaves [-1, 1]
    with pytest.raises(ValueError, match="at least 2"):
        split_half(1)


def test_recovery_by_hand():
    from evals.stats import recovery

    def vals(offset, seed):
        rng = np.random.default_rng(seed)
        return {f"{g}-{i}": (g, float(offset + rng.normal(0, 0.1))) for g in ("a", "b") for i in range(8)}

    base, changed, treated = vals(3.0, 0), vals(1.0, 0), vals(2.0, 0)
    out = recovery(base, changed, treated, controls={"random": vals(1.0, 0)})
    assert out["pooled_returned"]["mean_diff"] == pytest.approx(1.0)
    assert out["pooled_fraction"] == pytest.approx(0.5) and out["groups"]["a"]["fraction"] == pytest.approx(0.5)
    assert out["pooled_vs"]["random"]["mean_diff"] == pytest.approx(1.0) and out["pooled_vs"]["random"]["ci_low"] > 0
    assert recovery(changed, changed, treated)["pooled_fraction"] is None  # no gap, no fraction
