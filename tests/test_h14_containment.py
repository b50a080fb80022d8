"""H14's verdict on planted trajectories (no model): a method that keeps more untouched refusal than
retain-CE at matched forgetting wins; one that never reaches the level is not compared; the gated
method is trained through its concept vector and its gate's accuracy is reported beside the frontier."""

from __future__ import annotations

import pytest
from conftest import planted_trajectory

import experiments.h14_containment_frontier as h14
from study import StudyConfig

FAST = [0.8, 0.4, 0.1, 0.0, 0.0]


def _traj(target, target_curve, untouched_curve, seed):
    return planted_trajectory(target, target_curve, untouched_curve, seed=seed)


GATES = {0: (0.9, 1.0, 0.8), 1: (0.8, 0.75, 0.85), 2: (0.7, 0.5, 0.9)}  # seed: accuracy, on target, on untouched


def _run(monkeypatch, tmp_path, curves):
    seen = {}

    def fake_runs(study, target, method="npo", retain_domains=(), name=None, sets=None, **kw):
        mode = "gate" if kw.get("concept_gate") else kw.get("retain_mode", "npo")
        seen[mode, target] = kw
        t, u = curves[mode]
        return [_traj(target, t, u, s) for s in study.cfg.seeds]

    def fake_gate(study, run, target):
        a, on, off = GATES[int(str(run).rsplit("-", 1)[-1])]  # planted-<seed>
        return {"accuracy": a, "target_accuracy": on, "untouched_accuracy": off, "target_mean": on - 0.1,
                "untouched_mean": 1 - off + 0.1, "n_target": 4, "n_untouched": 24}

    monkeypatch.setattr(h14, "trajectory_runs", fake_runs)
    monkeypatch.setattr(h14, "trajectory_sets", lambda study: {})
    monkeypatch.setattr(h14, "gate_report", fake_gate)
    monkeypatch.setattr(h14.Study, "refusal_direction_file", lambda self: tmp_path / "direction.safetensors")
    monkeypatch.setattr(h14.Study, "concept_file", lambda self, d, contrast: tmp_path / f"{d}-{contrast}.safetensors")
    m = h14.main(h14.Config(study=StudyConfig(results=str(tmp_path), seeds=(0, 1, 2)), n_boot=200))
    return m, seen


def test_a_method_that_keeps_more_untouched_refusal_than_retain_ce_wins(monkeypatch, tmp_path):
    curves = {"npo": (FAST, [0.7, 0.4, 0.2, 0.1, 0.1]), "ce": (FAST, [0.7, 0.5, 0.3, 0.3, 0.3]),
              "kl": (FAST, [0.7, 0.5, 0.3, 0.3, 0.3]), "repr": (FAST, [0.7, 0.65, 0.6, 0.6, 0.6]),
              "direction": ([0.8, 0.7, 0.6, 0.5, 0.5], [0.7] * 5), "gate": (FAST, [0.7, 0.6, 0.55, 0.5, 0.5])}
    m, seen = _run(monkeypatch, tmp_path, curves)
    c = m["claim"]
    assert c["id"] == "M1" and c["status"] == "replicated"
    vs = m["targets"]["cybersecurity"]["vs_ce"]
    assert vs["repr"]["ci"][0] > 0 and abs(vs["kl"]["difference"]) < 0.05
    assert vs["direction"]["difference"] is None and "not reached" in vs["direction"]["note"]
    assert vs["gate"]["ci"][0] > 0 and "gate|cybersecurity" in m["conditions"]
    assert {t for _, t in seen} == {"cybersecurity", "safety"}  # the paper's two targets by default
    gate_kw = seen["gate", "cybersecurity"]
    assert gate_kw["retain_mode"] == "none" and gate_kw["gate_layer"] == 4 and gate_kw["concept_gate"]
    assert str(gate_kw["gate_vector"]).endswith("cybersecurity-rest.safetensors")
    assert str(seen["gate", "safety"]["gate_vector"]).endswith("safety-rest.safetensors")


def test_the_gates_accuracy_is_reported_beside_the_frontier(monkeypatch, tmp_path, capsys):
    curves = {k: (FAST, [0.7, 0.5, 0.3, 0.3, 0.3]) for k in ("npo", "ce", "kl", "repr", "direction", "gate")}
    m, _ = _run(monkeypatch, tmp_path, curves)
    g = m["targets"]["cybersecurity"]["gate"]
    assert len(g["per_seed"]) == 3
    assert g["target_accuracy"] == pytest.approx((1.0 + 0.75 + 0.5) / 3)
    assert g["untouched_accuracy"] == pytest.approx((0.8 + 0.85 + 0.9) / 3)
    text = "\n".join(h14.report_section(m))
    assert "Concept gate (cybersecurity; layer 4, target − rest vector" in text
    assert "open on 75% of target prompts" in text and "shut on 85% of untouched prompts" in text


def test_retain_ce_unbeaten_is_not_replicated_at_these_budgets(monkeypatch, tmp_path):
    same = (FAST, [0.7, 0.5, 0.3, 0.3, 0.3])
    m, _ = _run(monkeypatch, tmp_path, {"npo": (FAST, [0.7, 0.4, 0.2, 0.1, 0.1]), "ce": same, "kl": same,
                                        "repr": same, "direction": same, "gate": same})
    assert m["claim"]["status"] == "not replicated" and "at these budgets" in m["claim"]["evidence"]


def test_an_unknown_method_or_no_retain_ce_reference_is_refused():
    with pytest.raises(ValueError, match="choose from ce, kl, repr, direction, gate"):
        h14.Config(methods=("ce", "rmu"))
    with pytest.raises(ValueError, match="must include 'ce'"):
        h14.Config(methods=("kl",))


def test_a_method_short_of_the_primary_level_is_compared_where_it_got_to(monkeypatch, tmp_path):
    # gate reaches target 0.25 (not 0.10) keeping more untouched refusal: compared at 0.25, listed as
    # secondary; the claim still rests on the primary level only.
    short = [0.8, 0.5, 0.2, 0.15, 0.15]
    ce = (FAST, [0.7, 0.5, 0.3, 0.3, 0.3])
    curves = {"npo": (FAST, [0.7, 0.4, 0.2, 0.1, 0.1]), "ce": ce, "kl": ce, "repr": ce, "direction": ce,
              "gate": (short, [0.7, 0.68, 0.66, 0.65, 0.65])}
    m, _ = _run(monkeypatch, tmp_path, curves)
    at = m["targets"]["cybersecurity"]["vs_ce_at"]
    assert set(at) == {"0.25", "0.1"} and at["0.1"] == m["targets"]["cybersecurity"]["vs_ce"]
    assert at["0.1"]["gate"]["difference"] is None and at["0.25"]["gate"]["ci"][0] > 0
    ev = m["claim"]["evidence"]
    assert m["claim"]["status"] != "replicated" and "cybersecurity gate +" in ev.split("secondary, at 0.25:")[1]
    text = "\n".join(h14.report_section(m))
    assert "target refusal 0.25, secondary" in text and "target refusal 0.1, untouched" in text
