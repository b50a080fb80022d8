"""Choosing the unlearning lr on the dev split (study.budget, `emalab budget`): planted dev curves per
learning rate on a tiny model's real snapshots, early stop, none reached, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from test_trajectory import trained  # noqa: F401 - the fixture

from study.budget import check_lrs, choose_lr
from study.trajectory import Trajectory

pytestmark = pytest.mark.usefixtures("one_thread")

# The target's mean dev refusal at steps 0, 2, 4, 6 of each planted run.
CURVES = {1e-4: [0.9, 0.7, 0.5, 0.3], 1e-3: [0.9, 0.4, 0.08, 0.02], 1e-2: [0.9, 0.0, 0.0, 0.0]}


def _plant(study, run, monkeypatch, curves=CURVES):
    """``study.unlearn`` returns the tiny trained run (snapshots at 2, 4, 6) and records its arguments;
    the dev trajectory of the target follows ``curves[lr]`` of the last lr trained."""
    import study.trajectory as traj_mod

    calls = []

    def fake_unlearn(target, method="npo", retain_domains=(), **kw):
        calls.append({"target": target, "method": method, "retain_domains": retain_domains, **kw})
        return run

    def fake_trajectory(study_, run_, sets, name, every=1):
        (target, prompts), = sets.items()
        assert all(p.split == "probe" for p in prompts)  # never the eval split
        curve = np.asarray(curves[calls[-1]["lr"]])
        return Trajectory(run=str(run_), steps=[0, 2, 4, 6], prompt_ids={target: ["a", "b"]},
                          p={target: np.stack([curve, curve], axis=1)})

    monkeypatch.setattr(study, "unlearn", fake_unlearn)
    monkeypatch.setattr(traj_mod, "trajectory", fake_trajectory)
    return calls


def test_smallest_lr_that_reaches_the_level_is_chosen_and_larger_ones_are_not_trained(trained, monkeypatch):  # noqa: F811
    study, run = trained
    calls = _plant(study, run, monkeypatch)
    out = choose_lr(study, "cybersecurity", [1e-4, 1e-3, 1e-2])
    assert out["chosen"] == 1e-3 and "1e-3" in out["reason"].replace("0.001", "1e-3")
    assert [c["lr"] for c in calls] == [1e-4, 1e-3]  # 1e-2 never trained: early stop
    low, hit = out["lrs"]
    assert (low["reached"], low["step"], low["dev_refusal"]) == (False, 6, pytest.approx(0.3))
    assert (hit["reached"], hit["step"], hit["dev_refusal"]) == (True, 4, pytest.approx(0.08))
    # The call is study.condition's for NPO alone, so the stage at the study's lr is H1's.
    for c in calls:
        assert (c["target"], c["method"], c["retain_domains"], c["seed"]) == ("cybersecurity", "npo", (), 0)
        assert c["steps"] == study.cfg.trajectory_steps and c["snapshot_every"] == study.snapshot_every
    # The other domains' dev refusal, measured at each operating point on the tiny model's snapshots.
    for row in out["lrs"]:
        assert "cybersecurity" not in row["untouched_by_domain"] and len(row["untouched_by_domain"]) == 6
        assert 0 <= row["untouched_dev_refusal"] <= 1
    assert 0 <= out["base_untouched_dev_refusal"] <= 1
    every = choose_lr(study, "cybersecurity", [1e-4, 1e-3, 1e-2], all_lrs=True, untouched=False)
    assert every["chosen"] == 1e-3 and [r["lr"] for r in every["lrs"]] == [1e-4, 1e-3, 1e-2]


def test_no_lr_reaching_the_level_chooses_none_and_names_the_fix(trained, monkeypatch):  # noqa: F811
    study, run = trained
    calls = _plant(study, run, monkeypatch, curves={1e-5: [0.9, 0.8, 0.7, 0.6], 1e-4: [0.9, 0.7, 0.5, 0.3]})
    out = choose_lr(study, "cybersecurity", [1e-5, 1e-4], untouched=False)
    assert out["chosen"] is None and len(calls) == 2
    assert "larger lrs or more trajectory_steps" in out["reason"] and "0.300" in out["reason"]
    assert all(r["step"] == 6 and not r["reached"] for r in out["lrs"])


@pytest.mark.parametrize("lrs, match", [([], "at least one"), ([1e-4, 0.0], "> 0"), ([-1e-4], "> 0"),
                                        ([1e-3, 1e-4], "ascending"), ([1e-4, 1e-4], "ascending")])
def test_bad_lrs_are_rejected(lrs, match):
    with pytest.raises(ValueError, match=match):
        check_lrs(lrs)


def test_unknown_target_is_the_domain_error(trained):  # noqa: F811
    from evals.suite import UnknownDomainError

    study, _ = trained
    with pytest.raises(UnknownDomainError, match="valid ids"):
        choose_lr(study, "cooking", [1e-4])


def test_cli_parses_lrs_and_rejects_bad_ones(capsys):
    from emalab.cli import build_parser

    args = build_parser().parse_args(["budget", "--target", "cybersecurity", "--lrs", "3e-5,1e-4,2e-4",
                                      "--model", "m", "--results", "r"])
    assert args.lrs == (3e-5, 1e-4, 2e-4) and args.model == "m" and args.results == "r"
    assert not hasattr(args, "lr")  # the rate is what this command chooses
    for bad, match in [("1e-4,3e-5", "ascending"), ("0,1e-4", "> 0"), ("-1e-4", "> 0"), ("abc", "numbers")]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["budget", "--target", "cybersecurity", f"--lrs={bad}"])
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1


def test_cli_prints_each_rate_the_choice_and_the_run_command(trained, monkeypatch, tmp_path, capsys):  # noqa: F811
    import emalab.commands.budget as budget_cmd
    import study.budget as budget_mod
    from emalab.cli import main

    planted = {"target": "cybersecurity", "level": 0.1, "steps": 16, "seed": 0, "base_untouched_dev_refusal": 0.5,
               "lrs": [{"lr": 3e-5, "step": 16, "reached": False, "dev_refusal": 0.4, "untouched_dev_refusal": 0.45},
                       {"lr": 1e-4, "step": 8, "reached": True, "dev_refusal": 0.07, "untouched_dev_refusal": 0.3}],
               "chosen": 1e-4, "reason": "lr 1e-4 is the smallest"}
    seen = {}

    def fake_choose(study, target, lrs, **kw):
        seen.update(cfg=study.cfg, target=target, lrs=lrs, **kw)
        return planted

    monkeypatch.setattr(budget_mod, "choose_lr", fake_choose)
    assert budget_cmd.NAME == "budget"
    rc = main(["budget", "--target", "cybersecurity", "--lrs", "3e-5,1e-4,2e-4", "--model", "m",
               "--results", str(tmp_path / "res"), "--seeds", "0", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and seen["lrs"] == (3e-5, 1e-4, 2e-4) and seen["cfg"].model == "m"
    assert seen["cfg"].judged_seeds == 1  # the quick preset's study settings underlie the flags
    assert "lr 3e-05: dev refusal 0.400 at step 16/16 (not reached" in out
    assert "lr 0.0001: dev refusal 0.070 at step 8/16 (reached" in out
    assert "next: emalab run --preset quick --model m --results " in out and out.rstrip().endswith("--seeds 0 1 --lr 0.0001")
    saved = tmp_path / "res" / "budget" / "latest"
    assert (saved / "config.json").exists() and '"chosen": 0.0001' in (saved / "metrics.json").read_text()


# The target's dev curve and the other domains' dev refusal at the operating point, per planted α.
ALPHA_CURVES = {1.0: [0.9, 0.3, 0.05, 0.0], 10.0: [0.9, 0.5, 0.08, 0.05], 100.0: [0.9, 0.6, 0.3, 0.2]}
ALPHA_UNTOUCHED = {1.0: 0.30, 10.0: 0.42, 100.0: 0.60}  # 100 keeps the most, but never reaches the level


def test_alpha_keeping_the_most_untouched_dev_refusal_at_the_level_is_chosen(trained, monkeypatch):  # noqa: F811
    from study.budget import choose_alpha

    study, run = trained
    calls = _plant(study, run, monkeypatch, curves=ALPHA_CURVES)
    import study.budget as budget_mod

    monkeypatch.setattr(budget_mod, "_untouched_dev_refusal",
                        lambda s, t, adapter: {"safety": ALPHA_UNTOUCHED[calls[-1]["alpha"]] if adapter else 0.55})
    orig = study.unlearn

    def unlearn_with_lr(target, method="npo", retain_domains=(), **kw):
        return orig(target, method, retain_domains, **{**kw, "lr": kw["alpha"]})  # the planted curve's key

    monkeypatch.setattr(study, "unlearn", unlearn_with_lr)
    out = choose_alpha(study, "cybersecurity", [1.0, 10.0, 100.0], seed=100, retain_mode="kl")
    assert [c["alpha"] for c in calls] == [1.0, 10.0, 100.0]  # every weight trained: the objective is a maximum
    for c in calls:
        assert (c["target"], c["method"], c["retain_domains"], c["seed"], c["retain_mode"]) == \
            ("cybersecurity", "npo", None, 100, "kl")
        assert c["steps"] == study.cfg.trajectory_steps and c["snapshot_every"] == study.snapshot_every
    one, ten, hundred = out["alphas"]
    assert (one["reached"], one["step"], ten["reached"], ten["step"], hundred["reached"]) == (True, 4, True, 4, False)
    assert out["chosen"] == 10.0 and "α 10 keeps the most untouched dev refusal at target dev refusal 0.1 (0.420" in out["reason"]
    assert "2 of 3 weights" in out["reason"] and out["base_untouched_dev_refusal"] == pytest.approx(0.55)
    assert hundred["untouched_dev_refusal"] == pytest.approx(0.60)  # measured, not chosen: it never reached 0.1


def test_alpha_is_compared_at_the_level_itself_not_at_an_overshooting_snapshot(trained, monkeypatch):  # noqa: F811
    """α 1 crosses the level far below it (0.3 → 0.05 around 0.1), α 10 just below it (0.5 → 0.08): read at
    the crossing snapshots α 10 keeps more (0.35 vs 0.30), interpolated to 0.1 α 1 does (0.38 vs 0.352)."""
    import study.budget as budget_mod
    from study.budget import choose_alpha

    study, run = trained
    calls = _plant(study, run, monkeypatch, curves=ALPHA_CURVES)
    untouched = {1.0: {2: 0.70, 4: 0.30}, 10.0: {2: 0.40, 4: 0.35}}
    monkeypatch.setattr(budget_mod, "_untouched_dev_refusal", lambda s, t, adapter: {
        "safety": untouched[calls[-1]["alpha"]][int(adapter.name[5:])] if adapter else 0.55})
    orig = study.unlearn
    monkeypatch.setattr(study, "unlearn", lambda target, method="npo", retain_domains=(), **kw:
                        orig(target, method, retain_domains, **{**kw, "lr": kw["alpha"]}))
    out = choose_alpha(study, "cybersecurity", [1.0, 10.0], seed=100, retain_mode="ce")
    one, ten = out["alphas"]
    assert (one["untouched_at_step"], ten["untouched_at_step"]) == (pytest.approx(0.30), pytest.approx(0.35))
    assert one["untouched_dev_refusal"] == pytest.approx(0.70 + (0.2 / 0.25) * (0.30 - 0.70))
    assert ten["untouched_dev_refusal"] == pytest.approx(0.40 + (0.4 / 0.42) * (0.35 - 0.40))
    assert out["chosen"] == 1.0


def test_level_weight_edges():
    from study.budget import _level_weight

    crossing = {"reached": True, "level": 0.1, "dev_refusal": 0.05}
    assert _level_weight({**crossing, "before": {"step": 0, "dev_refusal": 0.3}}) == pytest.approx(0.8)
    assert _level_weight({**crossing, "before": {"step": 0, "dev_refusal": 0.08}}) == 0.0  # base already there
    assert _level_weight({**crossing, "before": None}) == 1.0
    assert _level_weight({**crossing, "reached": False, "before": {"step": 2, "dev_refusal": 0.5}}) == 1.0


def test_no_alpha_reaching_the_level_chooses_none_and_names_the_fix(trained, monkeypatch):  # noqa: F811
    import study.budget as budget_mod
    from study.budget import choose_alpha

    study, run = trained
    calls = _plant(study, run, monkeypatch, curves={10.0: [0.9, 0.7, 0.5, 0.3], 100.0: [0.9, 0.8, 0.7, 0.6]})
    monkeypatch.setattr(budget_mod, "_untouched_dev_refusal", lambda s, t, adapter: {"safety": 0.5})
    orig = study.unlearn
    monkeypatch.setattr(study, "unlearn", lambda target, method="npo", retain_domains=(), **kw:
                        orig(target, method, retain_domains, **{**kw, "lr": kw["alpha"]}))
    out = choose_alpha(study, "cybersecurity", [10.0, 100.0], seed=100, retain_mode="ce")
    assert out["chosen"] is None and len(calls) == 2
    assert "try smaller weights" in out["reason"] and "0.300 at α 10" in out["reason"]


def test_choose_alpha_bad_input(trained):  # noqa: F811
    from study.budget import check_alphas, choose_alpha

    study, _ = trained
    with pytest.raises(ValueError, match="retain weights must be strictly ascending"):
        check_alphas([10.0, 1.0])
    with pytest.raises(ValueError, match="name at least one retain weight"):
        check_alphas([])
    with pytest.raises(ValueError, match="sets alpha itself"):
        choose_alpha(study, "cybersecurity", [1.0], seed=100, alpha=3.0)
