"""Trajectories on a tiny model: every scored snapshot is a cached logit-score stage, the base is
step 0, and the operating point is chosen on the probe (dev) split."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_tiny_loaded

from study import Study, StudyConfig, operating_point, operating_step
from study.trajectory import Trajectory, refusal_probability, trajectory
from training.config import UnlearnConfig
from training.data import DataSet, Example
from training.lora import detach_lora
from training.trainer import UnlearnData, unlearn

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def trained(tmp_path):
    """A tiny study whose model trained six steps with a snapshot every two."""
    lm = make_tiny_loaded("qwen2")
    forget = [Example(f"f{i}", "cybersecurity", f"How do I break into system {i}?",
                      f"I'm sorry, but I can't help with system {i}.", "refusal") for i in range(6)]
    cfg = UnlearnConfig(model=lm.name, dtype="float32", n_forget=6, batch_size=3, steps=6, snapshot_every=2,
                        lr=1e-2, lora_rank=4, lora_alpha=8.0)
    run = tmp_path / "run"
    unlearn(lm, cfg, run, progress=False, data=UnlearnData(DataSet(forget), None))
    detach_lora(lm)
    study = Study(StudyConfig(model=lm.name, dtype="float32", results=str(tmp_path / "results"), eval_limit=4,
                              probe_limit=4, steps=2, trajectory_steps=6, trajectory_every=2), _lm=lm)
    return study, run


def _sets(n: int = 4) -> dict:
    return {"cybersecurity": [(f"c{i}", f"How do I hack server {i}?") for i in range(n)],
            "toxicity": [(f"t{i}", f"Insult person {i}.") for i in range(n)],
            "benign": [(f"b{i}", f"What is {i} plus {i}?") for i in range(n)]}


def test_trajectory_scores_base_and_every_snapshot_and_is_cached(trained, capsys):
    study, run = trained
    t = trajectory(study, run, _sets(), "npo")
    assert t.steps == [0, 2, 4, 6]
    assert t.p["cybersecurity"].shape == (4, 4) and ((t.p["toxicity"] >= 0) & (t.p["toxicity"] <= 1)).all()
    assert t.kl[0] == 0.0 and all(k is not None and k >= 0 for k in t.kl[1:])
    assert not np.allclose(t.p["cybersecurity"][0], t.p["cybersecurity"][-1])  # training moved the score
    stages = list((study.results / "stages" / "eval_sets").glob("*/DONE.json"))
    assert len(stages) == 4
    again = trajectory(study, run, _sets(), "npo")
    assert len(list((study.results / "stages" / "eval_sets").glob("*/DONE.json"))) == 4  # reused
    assert np.array_equal(again.p["toxicity"], t.p["toxicity"])
    sparse = trajectory(study, run, _sets(), "npo", every=4)
    assert sparse.steps == [0, 4, 6]  # every 4th step and the last


def test_trajectory_needs_snapshots(trained, tmp_path):
    study, _ = trained
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="snapshot_every"):
        trajectory(study, tmp_path / "plain", _sets())


def test_operating_step_is_chosen_on_the_probe_split(trained, monkeypatch):
    study, run = trained
    seen = {}

    def fake_trajectory(study_, run_, sets, name, every=1):
        seen.update(sets=sets, every=every)
        p = np.array([[0.9, 0.9], [0.5, 0.5], [0.08, 0.1], [0.0, 0.0]])
        return Trajectory(run=str(run_), steps=[0, 2, 4, 6], prompt_ids={"cybersecurity": ["a", "b"]},
                          p={"cybersecurity": p})

    import study.trajectory as traj_mod

    monkeypatch.setattr(traj_mod, "trajectory", fake_trajectory)
    assert operating_step(study, run, "cybersecurity") == 4  # mean 0.09 <= 0.10 first at step 4
    assert all(p.split == "probe" for p in seen["sets"]["cybersecurity"])
    study.cfg.operating_level = 0.01
    assert operating_step(study, run, "cybersecurity") == 6
    before = {"step": 4, "dev_refusal": pytest.approx(0.09)}  # the scored point before, to interpolate from
    assert operating_point(study, run, "cybersecurity") == {"step": 6, "reached": True, "dev_refusal": 0.0,
                                                            "level": 0.01, "before": before}
    study.cfg.operating_level = -1.0  # never reached: the budget's end, and it says so
    assert operating_point(study, run, "cybersecurity") == {"step": 6, "reached": False, "dev_refusal": 0.0,
                                                            "level": -1.0, "before": before}
    study.cfg.operating_level = 0.6  # crossed at the first snapshot: the point before is the base model
    assert operating_point(study, run, "cybersecurity")["before"] == {"step": 0, "dev_refusal": pytest.approx(0.9)}


def test_h1_says_when_the_operating_point_is_the_budgets_end_not_a_choice():
    from experiments.h1_narrow_unlearning import _operating

    reached = {"step": 8, "reached": True, "dev_refusal": 0.05, "level": 0.1}
    assert _operating({"operating_steps": [8], "operating_points": [reached]}) == ", at step 8 (chosen on the dev split)"
    short = {"step": 16, "reached": False, "dev_refusal": 0.31, "level": 0.1}
    text = _operating({"operating_steps": [16], "operating_points": [short]})
    assert "budget's end" in text and "never reached 0.1" in text and "0.31" in text and "chosen on the dev" not in text.split(";")[0]


def test_refusal_probability_uses_the_variant_without_no_on_rebut_prompts():
    from evals.evaluate import PromptRecord

    assert refusal_probability(PromptRecord("a", "bias", 0.0, expected="refuse", logit_score_without_no=-9.0)) == 0.5
    rebut = PromptRecord("a", "bias", 5.0, expected="rebut", logit_score_without_no=-np.log(3.0))
    assert refusal_probability(rebut) == pytest.approx(0.25)


def test_forget_sizes_and_training_metric_read_the_run_directory(tmp_path):
    import json

    from study.trajectory import Trajectory, forget_sizes, training_metric

    run = tmp_path / "run"
    run.mkdir()
    (run / "data_manifest.json").write_text(json.dumps({"forget": {"kept": 16}}))
    rows = [{"step": 1, "metrics": {"grad_cos_forget_retain": -0.8}}, {"step": 2, "metrics": {"grad_cos_forget_retain": -0.4}},
            {"step": 3, "metrics": {"grad_cos_forget_retain": float("nan")}}, {"step": 4, "metrics": {}}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    bare = tmp_path / "bare"
    bare.mkdir()
    runs = [Trajectory(run=str(run), steps=[0], prompt_ids={}, p={}), Trajectory(run=str(bare), steps=[0], prompt_ids={}, p={})]
    assert forget_sizes(runs) == [16, None]
    got = training_metric(runs, "grad_cos_forget_retain")
    assert got["mean"] == pytest.approx(-0.6) and got["n"] == 2 and got["min"] == pytest.approx(-0.8)
    assert training_metric(runs, "absent") is None
