"""H14's verdict on planted trajectories (no model): a method that keeps more untouched refusal than
retain-CE at matched forgetting wins; one that never reaches the level is not compared."""

from __future__ import annotations

from conftest import planted_trajectory

import experiments.h14_containment_frontier as h14
from study import StudyConfig

FAST = [0.8, 0.4, 0.1, 0.0, 0.0]


def _traj(target, target_curve, untouched_curve, seed):
    return planted_trajectory(target, target_curve, untouched_curve, seed=seed)


def _run(monkeypatch, tmp_path, curves):
    def fake_runs(study, target, method="npo", retain_domains=(), name=None, sets=None, **kw):
        t, u = curves[kw.get("retain_mode", "npo")]
        return [_traj(target, t, u, s) for s in study.cfg.seeds]

    monkeypatch.setattr(h14, "trajectory_runs", fake_runs)
    monkeypatch.setattr(h14, "trajectory_sets", lambda study: {})
    monkeypatch.setattr(h14.Study, "refusal_direction_file", lambda self: tmp_path / "direction.safetensors")
    return h14.main(h14.Config(study=StudyConfig(results=str(tmp_path), seeds=(0, 1, 2)), n_boot=200))


def test_a_method_that_keeps_more_untouched_refusal_than_retain_ce_wins(monkeypatch, tmp_path):
    curves = {"npo": (FAST, [0.7, 0.4, 0.2, 0.1, 0.1]), "ce": (FAST, [0.7, 0.5, 0.3, 0.3, 0.3]),
              "kl": (FAST, [0.7, 0.5, 0.3, 0.3, 0.3]), "repr": (FAST, [0.7, 0.65, 0.6, 0.6, 0.6]),
              "direction": ([0.8, 0.7, 0.6, 0.5, 0.5], [0.7] * 5)}
    m = _run(monkeypatch, tmp_path, curves)
    c = m["claim"]
    assert c["id"] == "M1" and c["status"] == "replicated"
    vs = m["targets"]["cybersecurity"]["vs_ce"]
    assert vs["repr"]["ci"][0] > 0 and abs(vs["kl"]["difference"]) < 0.05
    assert vs["direction"]["difference"] is None and "not reached" in vs["direction"]["note"]


def test_retain_ce_unbeaten_is_not_replicated_at_these_budgets(monkeypatch, tmp_path):
    same = (FAST, [0.7, 0.5, 0.3, 0.3, 0.3])
    m = _run(monkeypatch, tmp_path, {"npo": (FAST, [0.7, 0.4, 0.2, 0.1, 0.1]), "ce": same, "kl": same,
                                     "repr": same, "direction": same})
    assert m["claim"]["status"] == "not replicated" and "at these budgets" in m["claim"]["evidence"]
