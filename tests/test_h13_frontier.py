"""H13's verdicts on planted trajectories (no model): C4 replicated when retain keeps the untouched
refusal at matched forgetting, not replicated when it only slows forgetting; C3 signed correctly."""

from __future__ import annotations

import pytest
from conftest import planted_trajectory

import experiments.h13_selectivity_frontier as h13
from study import StudyConfig


def _traj(target, target_curve, untouched_curve, seed):
    return planted_trajectory(target, target_curve, untouched_curve, seed=seed)


def _run(monkeypatch, tmp_path, curves):
    def fake_runs(study, target, method="npo", retain_domains=(), name=None, sets=None, **kw):
        kind = "retain" if retain_domains is None else "npo"
        t_curve, u_curve = curves[(kind, target)]
        return [_traj(target, t_curve, u_curve, seed) for seed in study.cfg.seeds]

    monkeypatch.setattr(h13, "trajectory_runs", fake_runs)
    monkeypatch.setattr(h13, "trajectory_sets", lambda study: {})
    cfg = h13.Config(study=StudyConfig(results=str(tmp_path), seeds=(0, 1, 2)), n_boot=200)
    return h13.main(cfg)


FAST = [0.8, 0.4, 0.1, 0.0, 0.0]


def test_c4_replicated_when_retain_keeps_untouched_refusal_at_matched_forgetting(monkeypatch, tmp_path):
    curves = {("npo", "cybersecurity"): (FAST, [0.7, 0.4, 0.2, 0.1, 0.1]),
              ("retain", "cybersecurity"): (FAST, [0.7, 0.65, 0.6, 0.6, 0.6]),
              ("npo", "safety"): (FAST, [0.7, 0.3, 0.1, 0.05, 0.05]),
              ("retain", "safety"): (FAST, [0.7, 0.65, 0.6, 0.6, 0.6])}
    m = _run(monkeypatch, tmp_path, curves)
    c3, c4 = m["claims"]
    assert c4["id"] == "C4" and c4["status"] == "replicated"
    r = m["c4"]["cybersecurity"]["0.1"]["npo_retain_a10"]
    assert r["recovery"] == pytest.approx((0.6 - 0.2) / (0.7 - 0.2), abs=0.02) and r["ci"][0] > 0
    # Safety's untouched refusal at the matched level is lower: it spreads further.
    assert c3["id"] == "C3" and c3["status"] == "replicated"
    assert (tmp_path / "h13_selectivity_frontier" / "latest" / "metrics.json").exists()
    lines = h13.report_section(m)
    assert any("npo_retain_a10" in line and "cybersecurity" in line for line in lines)


def test_c4_not_replicated_when_retain_only_slows_forgetting(monkeypatch, tmp_path):
    slow = [0.8, 0.6, 0.4, 0.2, 0.1]
    same_path = [0.7, 0.5, 0.3, 0.1, 0.0]  # untouched tracks the target along the same path
    curves = {("npo", t): ([0.8, 0.4, 0.0, 0.0, 0.0], [0.7, 0.3, -0.1, -0.1, -0.1]) for t in ("cybersecurity", "safety")}
    curves.update({("retain", t): (slow, same_path) for t in ("cybersecurity", "safety")})
    m = _run(monkeypatch, tmp_path, curves)
    c4 = m["claims"][-1]
    assert c4["status"] == "not replicated" and "at these budgets" in c4["evidence"]
    c3 = m["claims"][0]
    assert c3["status"] == "inconclusive"  # identical NPO curves for both targets


def test_c4_not_reached_is_reported_never_extrapolated(monkeypatch, tmp_path):
    curves = {("npo", t): (FAST, [0.7, 0.4, 0.2, 0.1, 0.1]) for t in ("cybersecurity", "safety")}
    curves.update({("retain", t): ([0.8, 0.7, 0.6, 0.5, 0.4], [0.7] * 5) for t in ("cybersecurity", "safety")})
    m = _run(monkeypatch, tmp_path, curves)
    c4 = m["claims"][-1]
    assert c4["status"] == "not replicated" and "not reached" in c4["evidence"]
    row = m["conditions"]["npo_retain_a10|safety"]["levels"]["0.1"]["untouched"]
    assert row["value"] is None and row["closest"] == pytest.approx(0.4, abs=0.05)
