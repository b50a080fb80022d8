"""H14's verdict on planted trajectories (no model): a method that keeps more untouched refusal than
retain-CE at matched forgetting wins; one that never reaches the level is not compared; the gated
method is trained through its concept vector and its gate's accuracy is reported beside the frontier."""

from __future__ import annotations

import pytest
from conftest import planted_trajectory

import experiments.h14_containment_frontier as h14
import study.budget as budget_mod
from study import StudyConfig

FAST = [0.8, 0.4, 0.1, 0.0, 0.0]


def _traj(target, target_curve, untouched_curve, seed):
    return planted_trajectory(target, target_curve, untouched_curve, seed=seed)


GATES = {0: (0.9, 1.0, 0.8), 1: (0.8, 0.75, 0.85), 2: (0.7, 0.5, 0.9)}  # seed: accuracy, on target, on untouched


# Planted dev-split choice per (method, target): the chosen α, or None (no weight reached the level).
CHOSEN = {"ce": 10.0, "kl": 1000.0, "repr": 100.0, "direction": None}


def _run(monkeypatch, tmp_path, curves, chosen=CHOSEN, **config):
    seen = {}

    def fake_choose(study, target, alphas, seed, **kw):
        assert "alpha" not in kw and seed == 100 and tuple(alphas) == (1.0, 10.0, 100.0, 1000.0)
        seen["choose", kw["retain_mode"], target] = kw
        a = chosen[kw["retain_mode"]]
        rows = [{"alpha": x, "step": 4, "reached": a is not None, "dev_refusal": 0.05 if a is not None else 0.3,
                 "untouched_dev_refusal": 0.4 + (0.1 if x == a else 0.0), "run": "r"} for x in alphas]
        return {"target": target, "level": 0.1, "steps": 16, "seed": seed, "alphas": rows,
                "base_untouched_dev_refusal": 0.5, "chosen": a, "reason": "planted"}

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
    monkeypatch.setattr(budget_mod, "choose_alpha", fake_choose)
    monkeypatch.setattr(h14, "trajectory_sets", lambda study: {})
    monkeypatch.setattr(h14, "gate_report", fake_gate)
    monkeypatch.setattr(h14.Study, "refusal_direction_file", lambda self: tmp_path / "direction.safetensors")
    monkeypatch.setattr(h14.Study, "concept_file", lambda self, d, contrast: tmp_path / f"{d}-{contrast}.safetensors")
    m = h14.main(h14.Config(study=StudyConfig(results=str(tmp_path), seeds=(0, 1, 2)), n_boot=200, **config))
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
    assert {k[-1] for k in seen} == {"cybersecurity", "safety"}  # the paper's two targets by default
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


def test_each_retain_weight_is_chosen_on_the_dev_split_per_method_and_target(monkeypatch, tmp_path):
    same = (FAST, [0.7, 0.5, 0.3, 0.3, 0.3])
    curves = {k: same for k in ("npo", "ce", "kl", "repr", "direction", "gate")}
    m, seen = _run(monkeypatch, tmp_path, curves)
    for target in ("cybersecurity", "safety"):
        for method, alpha in (("ce", 10.0), ("kl", 1000.0), ("repr", 100.0), ("direction", 1.0)):
            assert seen[method, target]["alpha"] == alpha  # the claim's runs train with the chosen weight
            assert seen["choose", method, target]["retain_mode"] == method
        assert "alpha" not in seen["gate", target] and ("choose", "gate", target) not in seen  # no retain term
        assert m["targets"][target]["weights"]["direction"]["chosen"] is None  # fell back to the smallest
    assert m["alpha_choice"] == {"grid": [1.0, 10.0, 100.0, 1000.0], "seed": 100}
    ev = m["claim"]["evidence"]
    assert "chosen on the dev split (seed 100): cybersecurity ce 10, cybersecurity kl 1000" in ev
    assert "safety direction 1 (none reached)" in ev
    text = "\n".join(h14.report_section(m))
    assert "Retain weights for safety, chosen on the dev split (probe prompts; seed 100, α grid 1, 10, 100, 1000)" in text
    assert "kl α 1000 (α 1: target 0.05 at step 4, untouched 0.40" in text and "untouched 0.50)" in text
    assert "direction α 1 (no weight reached the level; smallest) (α 1: target 0.30 at step 4 (not reached)" in text


def test_an_empty_grid_fixes_every_weight_at_alpha_untuned(monkeypatch, tmp_path):
    same = (FAST, [0.7, 0.5, 0.3, 0.3, 0.3])
    curves = {k: same for k in ("npo", "ce", "kl", "repr", "direction", "gate")}
    m, seen = _run(monkeypatch, tmp_path, curves, alpha_grid=(), alpha=3.0)
    assert not [k for k in seen if k[0] == "choose"]
    assert all(seen[k, "safety"]["alpha"] == 3.0 for k in ("ce", "kl", "repr", "direction"))
    assert m["alpha_choice"] is None and "α 3 for every term (untuned)" in m["claim"]["evidence"]
    assert "Retain weights" not in "\n".join(h14.report_section(m))


def test_a_weight_chosen_with_a_claim_seed_or_a_bad_grid_is_refused():
    with pytest.raises(ValueError, match="alpha_seed 1 is one of the study's seeds"):
        h14.Config(study=StudyConfig(seeds=(0, 1, 2)), alpha_seed=1)
    with pytest.raises(ValueError, match="retain weights must be > 0"):
        h14.Config(alpha_grid=(0.0, 1.0))
    assert h14.Config(alpha_grid=(), alpha_seed=0).alpha_seed == 0  # no choice made, no seed used
