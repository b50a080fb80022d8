"""The selectivity frontier's arithmetic on planted trajectories (no model)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import planted_trajectory

from evals.suite import DOMAINS
from study.frontier import Condition, at_level, crossing, matched_contrast, matched_difference, spread_slope
from study.trajectory import Trajectory

STEPS = [0, 4, 8, 12]


def _traj(target: str, target_curve, untouched_curve, n: int = 6, noise: float = 0.0, seed: int = 0,
          kl=None, domain_curves=None) -> Trajectory:
    return planted_trajectory(target, target_curve, untouched_curve, STEPS, n, noise, seed, kl or [0.0, 0.1, 0.2, 0.3],
                              domain_curves)


def test_crossing_interpolates_the_first_bracket_and_reports_never():
    assert crossing(np.array([0.8, 0.6, 0.2, 0.1]), 0.4) == (2, pytest.approx(0.5))
    assert crossing(np.array([0.3, 0.2]), 0.5) == (0, 1.0)
    assert crossing(np.array([0.8, 0.7, 0.6]), 0.1) is None
    # Non-monotone: the first crossing counts, not a later one.
    i, w = crossing(np.array([0.8, 0.2, 0.9, 0.0]), 0.5)
    assert (i, w) == (1, pytest.approx(0.5))


def test_at_level_reads_the_untouched_curve_at_the_target_crossing():
    # Target 0.8 -> 0.6 -> 0.2 -> 0.0; untouched 0.7 -> 0.5 -> 0.3 -> 0.1. The target crosses 0.4 halfway
    # between steps 4 and 8, where the untouched curve is (0.5 + 0.3) / 2 = 0.4.
    runs = [_traj("safety", [0.8, 0.6, 0.2, 0.0], [0.7, 0.5, 0.3, 0.1], noise=0.05, seed=s) for s in range(3)]
    res = at_level(Condition("npo", "safety", runs), DOMAINS, 0.4, n_boot=200)
    assert res["value"] == pytest.approx(0.4)
    assert res["drop"] == pytest.approx(0.3)
    assert res["reached"] == 3 and res["ci"][0] <= 0.4 <= res["ci"][1]
    assert res["kl"] == pytest.approx(0.15)


def test_at_level_says_not_reached_with_the_closest_value_and_never_extrapolates():
    runs = [_traj("safety", [0.8, 0.7, 0.6, 0.5], [0.7, 0.6, 0.5, 0.4]) for _ in range(3)]
    res = at_level(Condition("npo_retain", "safety", runs), DOMAINS, 0.1, n_boot=50)
    assert res["value"] is None and res["reached"] == 0
    assert res["closest"] == pytest.approx(0.5) and "not reached" in res["note"]


def test_matched_difference_is_paired_and_signed():
    # Both targets reach 0.4 at the same point; the second condition's untouched curve is 0.2 lower.
    a = [_traj("safety", [0.8, 0.6, 0.2, 0.0], [0.7, 0.6, 0.5, 0.4], noise=0.05, seed=s) for s in range(3)]
    b = [_traj("safety", [0.8, 0.6, 0.2, 0.0], [0.7, 0.4, 0.3, 0.2], noise=0.05, seed=s) for s in range(3)]
    res = matched_difference(Condition("retain", "safety", a), Condition("npo", "safety", b), DOMAINS, 0.4,
                             n_boot=300)
    assert res["difference"] == pytest.approx(0.2)
    assert res["ci"][0] > 0
    assert "safety" not in res["domains"]


def test_matched_difference_compares_at_equal_forgetting_not_equal_steps():
    # Retain slows forgetting: after 4 steps it keeps more untouched refusal, but at the same target
    # refusal it keeps exactly as much as NPO (its curve is NPO's, stretched in time).
    npo = [_traj("cybersecurity", [0.8, 0.4, 0.0, 0.0], [0.8, 0.4, 0.0, 0.0])]
    slow = [_traj("cybersecurity", [0.8, 0.6, 0.4, 0.2], [0.8, 0.6, 0.4, 0.2])]
    res = matched_difference(Condition("retain", "cybersecurity", slow), Condition("npo", "cybersecurity", npo),
                             DOMAINS, 0.4, n_boot=50)
    assert res["difference"] == pytest.approx(0.0, abs=1e-12)


def test_matched_difference_says_which_condition_did_not_reach():
    a = [_traj("safety", [0.8, 0.7, 0.7, 0.7], [0.7] * 4)]
    b = [_traj("safety", [0.8, 0.1, 0.0, 0.0], [0.7, 0.2, 0.1, 0.1])]
    res = matched_difference(Condition("retain", "safety", a), Condition("npo", "safety", b), DOMAINS, 0.3, n_boot=20)
    assert res["difference"] is None and "retain" in res["note"] and "npo" not in res["note"]


def _cond(name, target_curve, untouched_curve, n_seeds=3, **kw):
    return Condition(name, "safety", [_traj("safety", target_curve, untouched_curve, noise=0.05, seed=s, **kw)
                                      for s in range(n_seeds)])


def test_matched_contrast_with_one_other_is_matched_difference():
    a, b = _cond("a", [0.8, 0.4, 0.1, 0.0], [0.7, 0.6, 0.5, 0.5]), _cond("b", [0.8, 0.2, 0.0, 0.0], [0.7, 0.4, 0.2, 0.2])
    one, ref = matched_contrast(a, [b], DOMAINS, 0.2, n_boot=100), matched_difference(a, b, DOMAINS, 0.2, n_boot=100)
    assert one["difference"] == pytest.approx(ref["difference"]) and one["ci"] == pytest.approx(ref["ci"])


def test_matched_contrast_takes_the_mean_over_the_others_of_the_paired_differences():
    # At target 0.2 (step 8 for every condition): first 0.5, the others 0.3 and 0.1 -> 0.5 - 0.2 = +0.3.
    t = [0.8, 0.5, 0.2, 0.1]
    first = _cond("p", t, [0.7, 0.6, 0.5, 0.5])
    others = [_cond("r1", t, [0.7, 0.5, 0.3, 0.3]), _cond("r2", t, [0.7, 0.4, 0.1, 0.1])]
    res = matched_contrast(first, others, DOMAINS, 0.2, n_boot=200)
    assert res["difference"] == pytest.approx(0.3) and res["second"] == pytest.approx(0.2)
    assert res["others"] == pytest.approx({"r1": 0.3, "r2": 0.1}) and res["ci"][0] > 0.2
    pair = [matched_difference(first, o, DOMAINS, 0.2, n_boot=0)["difference"] for o in others]
    assert res["difference"] == pytest.approx(np.mean(pair))
    # The comparison can be restricted to some domains: each condition's own curve there.
    held = {"bias": [0.7, 0.7, 0.7, 0.7]}
    first = _cond("p", t, [0.7, 0.6, 0.5, 0.5], domain_curves=held)
    res = matched_contrast(first, others, ["bias"], 0.2, n_boot=50)
    assert res["domains"] == ["bias"] and res["first"] == pytest.approx(0.7) and res["difference"] == pytest.approx(0.5)


def test_matched_contrast_says_which_other_did_not_reach_and_how_close_it_got():
    t = [0.8, 0.5, 0.2, 0.1]
    first, reached = _cond("p", t, [0.7] * 4), _cond("r1", t, [0.7] * 4)
    short = _cond("r2", [0.8, 0.6, 0.45, 0.4], [0.7] * 4)
    res = matched_contrast(first, [reached, short], DOMAINS, 0.2, n_boot=20)
    assert res["difference"] is None and res["ci"] is None and res["reached"] == [3, 3, 0]
    assert "not reached by r2" in res["note"] and "r1" not in res["note"]
    assert res["closest"]["r2"] == pytest.approx(0.4, abs=0.01)
    assert matched_contrast(first, [reached], ["safety"], 0.2)["note"] == "no domain left to compare"
    with pytest.raises(ValueError, match="at least one"):
        matched_contrast(first, [], DOMAINS, 0.2)


def test_spread_slope_recovers_a_planted_ratio():
    # The untouched drop is exactly half the target drop at every step.
    runs = [_traj("safety", [0.8, 0.6, 0.4, 0.2], [0.6, 0.5, 0.4, 0.3], noise=0.02, seed=s) for s in range(3)]
    res = spread_slope(Condition("npo", "safety", runs), DOMAINS, n_boot=100)
    assert res["slope"] == pytest.approx(0.5)


def test_condition_refuses_seeds_on_different_prompts():
    a = _traj("safety", [0.8, 0.6, 0.2, 0.0], [0.7] * 4, n=6)
    b = _traj("safety", [0.8, 0.6, 0.2, 0.0], [0.7] * 4, n=5)
    with pytest.raises(ValueError, match="different prompts"):
        Condition("npo", "safety", [a, b])


def test_trajectory_round_trips_through_json():
    t = _traj("safety", [0.8, 0.6, 0.2, 0.0], [0.7, 0.5, 0.3, 0.1], noise=0.05)
    back = Trajectory.from_dict(t.to_dict())
    assert back.steps == t.steps and np.allclose(back.p["safety"], t.p["safety"], atol=1e-6)


def test_at_level_flags_a_target_that_starts_below_the_level_and_domains_without_refusal():
    runs = [_traj("safety", [0.05, 0.04, 0.03, 0.02], [0.0, 0.0, 0.0, 0.0])]
    res = at_level(Condition("npo", "safety", runs), DOMAINS, 0.10, n_boot=20)
    assert "nothing to forget" in res["note"] and "no refusal to lose" in res["note"]


def _c3_ci() -> list[float]:
    """C3's interval on planted noisy runs of two different targets."""
    a = [_traj("safety", [0.8, 0.6, 0.2, 0.0], [0.7, 0.5, 0.3, 0.1], noise=0.1, seed=s) for s in range(3)]
    b = [_traj("cybersecurity", [0.8, 0.6, 0.2, 0.0], [0.7, 0.6, 0.5, 0.4], noise=0.1, seed=10 + s) for s in range(3)]
    return matched_difference(Condition("npo", "safety", a), Condition("npo", "cybersecurity", b), DOMAINS, 0.4,
                              n_boot=50)["ci"]


def test_matched_difference_interval_does_not_follow_the_hash_seed():
    """The bootstrap draws each domain's prompts in a fixed order, not in a set's (per-process) order."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = "import sys; sys.path[:0] = ['.', 'tests']; from test_frontier import _c3_ci; print(_c3_ci())"
    outs = {subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2", "3")}
    assert len(outs) == 1 and outs.pop().startswith("[-")


def test_best_rule_reads_the_envelope_after_the_crossing_and_ignores_points_above_the_level():
    # Target crosses 0.4 halfway between steps 4 and 8 (untouched 0.25 there), stays below it at step 8
    # (untouched 0.2) but rebounds above it at step 12, where untouched is highest (0.6): that point
    # is not at matched forgetting. A recovery after the crossing (a run that stays low) is credited.
    rebound = [_traj("safety", [0.8, 0.6, 0.2, 0.5], [0.7, 0.3, 0.2, 0.6], seed=s) for s in range(3)]
    recover = [_traj("safety", [0.8, 0.6, 0.2, 0.1], [0.7, 0.3, 0.2, 0.45], seed=s) for s in range(3)]
    first = at_level(Condition("a", "safety", rebound), DOMAINS, 0.4, n_boot=0)
    best_rebound = at_level(Condition("a", "safety", rebound), DOMAINS, 0.4, n_boot=0, rule="best")
    best_recover = at_level(Condition("b", "safety", recover), DOMAINS, 0.4, n_boot=0, rule="best")
    assert first["value"] == pytest.approx(0.25)
    assert best_rebound["value"] == pytest.approx(0.25)
    assert best_recover["value"] == pytest.approx(0.45) and best_recover["kl"] == pytest.approx(0.3)
    diff = matched_difference(Condition("b", "safety", recover), Condition("a", "safety", rebound), DOMAINS, 0.4,
                              n_boot=50, rule="best")
    assert diff["difference"] == pytest.approx(0.2) and diff["rule"] == "best"
    with pytest.raises(ValueError, match="reading rule"):
        at_level(Condition("a", "safety", rebound), DOMAINS, 0.4, rule="last")
