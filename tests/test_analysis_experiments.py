"""Verdict logic and analyses of H5-H8 and H11 on synthetic inputs (no model is loaded)."""

from __future__ import annotations

import numpy as np
import pytest

from evals.suite import DOMAINS

# -- H5 ------------------------------------------------------------------------------------------


def _h5_points(drop, targets=DOMAINS, seed=0):
    """Pairs of ``targets`` × untouched domains with ``drop(similarity, base, rng)`` as the logit drop."""
    rng = np.random.default_rng(seed)
    out = []
    for t in targets:
        for d in DOMAINS:
            if d == t:
                continue
            sim, base = rng.uniform(-1, 1), rng.uniform(-2, 2)
            j_base = rng.uniform(0.1, 1)
            out.append({"target": t, "domain": d, "similarity": {b: sim for b in ("early", "middle", "late")},
                        "drop_logit": drop(sim, base, rng), "base_logit": base, "drop_judge": 0.5 * j_base,
                        "base_judge": j_base, "drop_relative": 0.5, "after_judge": 0.2})
    return out


REL = {"early": 0.9, "middle": 0.9, "late": 0.9}


def test_h5_planted_effect_is_found_within_targets_over_42_pairs():
    from experiments.h5_geometry_predicts_ema import analyse, verdict

    pts = _h5_points(lambda s, b, rng: s + 0.3 * rng.normal())
    bands = analyse(pts, 24, REL, n_perm=2000)
    e = bands["early"]["logit"]
    assert e["n"] == 42 and e["n_groups"] == 7 and not e["exact"]
    assert e["partial"] > 0.7 and e["p_perm_partial"] < 0.01 and e["spearman"] > 0.7
    assert bands["early"]["layers"] == list(range(8)) and bands["early"]["reliability"] == 0.9
    assert verdict(e, 0.9)[0] == "replicated"
    assert bands["early"]["relative"]["inconclusive"]  # a constant relative drop has no correlation


def test_h5_partial_correlation_removes_what_base_refusal_explains():
    from experiments.h5_geometry_predicts_ema import analyse, verdict

    # Similarity tracks the base log-odds and the drop tracks it too: ρ is large, the partial ρ is not.
    rng = np.random.default_rng(3)
    pts = _h5_points(lambda s, b, r: b + 0.05 * r.normal())
    for p in pts:
        p["similarity"] = {band: p["base_logit"] / 2 + 0.05 * rng.normal() for band in ("early", "middle", "late")}
    e = analyse(pts, 24, REL, n_perm=2000)["early"]["logit"]
    assert e["spearman"] > 0.8 and abs(e["partial"]) < 0.3 and e["p_perm_partial"] > 0.05
    assert verdict(e, 0.9)[0] != "replicated"


def test_h5_two_targets_give_12_pairs_and_none_relative_drops_are_dropped():
    from experiments.h5_geometry_predicts_ema import analyse

    pts = _h5_points(lambda s, b, rng: s + 0.3 * rng.normal(), targets=("cybersecurity", "safety"))
    pts[0]["drop_relative"] = None
    bands = analyse(pts, 24, REL, n_perm=500)
    assert bands["early"]["logit"]["n"] == 12 and bands["early"]["logit"]["n_groups"] == 2
    assert bands["early"]["relative"]["n"] == 11


@pytest.mark.parametrize("stat,reliability,status", [
    ({"partial": 0.6, "p_perm_partial": 0.01, "partial_ci": [0.3, 0.8]}, 0.9, "replicated"),
    ({"partial": 0.6, "p_perm_partial": 0.01, "partial_ci": [0.3, 0.8]}, 0.5, "inconclusive"),  # unreliable band
    ({"partial": 0.3, "p_perm_partial": 0.2, "partial_ci": [-0.2, 0.6]}, 0.9, "inconclusive"),
    ({"partial": -0.1, "p_perm_partial": 0.6, "partial_ci": [-0.5, 0.3]}, 0.9, "inconclusive"),  # ≤ 0, not reliably
    ({"partial": -0.6, "p_perm_partial": 0.2, "partial_ci": [-0.9, -0.1]}, 0.9, "not replicated"),
    ({"partial": -0.4, "p_perm_partial": 0.03, "partial_ci": [-0.7, 0.05]}, 0.9, "not replicated"),
    ({"partial": -0.6, "p_perm_partial": 0.01, "partial_ci": [-0.9, -0.1]}, 0.6, "inconclusive"),
    ({"partial": None, "p_perm_partial": None, "partial_ci": [None, None], "inconclusive": True, "note": "n=3"},
     0.9, "inconclusive"),
])
def test_h5_verdict_rule(stat, reliability, status):
    from experiments.h5_geometry_predicts_ema import verdict

    stat = {"n": 12, "inconclusive": False, "note": "", **stat}
    got, why = verdict(stat, reliability)
    assert got == status
    if reliability < 0.7:
        assert "unreliable" in why


def test_h5_config_options():
    from experiments.h5_geometry_predicts_ema import Config

    assert Config().measure == "logit" and Config().contrast == "benign" and Config().position == "last"
    assert Config(targets=DOMAINS, contrast="rest").targets == DOMAINS
    with pytest.raises(ValueError, match="Study.activations"):
        Config(position="mean")
    for bad in ({"measure": "rate"}, {"contrast": "other"}, {"position": "first"}, {"targets": ()},
                {"targets": ("nope",)}):
        with pytest.raises(ValueError):
            Config(**bad)


def test_full_preset_runs_c5_on_all_seven_targets():
    from emalab.pipeline import PRESETS

    cfgs = PRESETS["full"].experiment_configs()
    assert cfgs["h5_geometry_predicts_ema"].targets == DOMAINS
    assert PRESETS["quick"].experiment_configs()["h5_geometry_predicts_ema"].targets == ("cybersecurity", "safety")


# -- H7 ------------------------------------------------------------------------------------------


def test_h7_correlation_leaves_the_target_out():
    from experiments.h7_mechanism import untouched_correlation

    ablation = {d: float(i) for i, d in enumerate(DOMAINS)}
    npo = dict(ablation)
    target = DOMAINS[0]
    npo[target] = 100.0  # the target's own drop must not move the statistic
    c = untouched_correlation(ablation, npo, target)
    assert target not in c["domains"] and c["n"] == 6 and c["exact"] and c["n_perm"] == 720
    assert c["spearman"] == pytest.approx(1.0) and c["p_perm_spearman"] == pytest.approx(2 / 720)
    npo[DOMAINS[-1]] = -5.0  # an untouched domain does move it
    assert untouched_correlation(ablation, npo, target)["spearman"] < 1.0


# -- drop_contrast (study.verdicts) -------------------------------------------------------------


def _cond(after_logits: list[float], n: int = 12, seeds: int = 2):
    """A condition over ``seeds`` seeds whose logit after unlearning on prompt i is ``after_logits[i % len]``."""
    from evals.evaluate import PromptRecord
    from study import pooled

    def recs(values):
        return {s: [PromptRecord(id=f"p{i}", domain="bias", logit_score=values[i % len(values)], label="refusal")
                    for i in range(n)] for s in range(seeds)}

    return {"base": pooled(recs([2.0])), "after": pooled(recs(after_logits))}


def test_drop_contrast_averages_the_other_conditions_pairwise():
    from study import drop_contrast

    first = _cond([1.0, 0.0])  # drops 1, 2, 1, 2, ...
    others = [_cond([0.0, -1.0]), _cond([-1.0, -2.0])]  # drops 2,3 and 3,4: mean 2.5, 3.5
    res = drop_contrast(first, others, ["bias"], "logit")
    assert res["difference"] == pytest.approx(-1.5) and res["n_others"] == 2
    assert res["ci"] == pytest.approx([-1.5, -1.5])  # a constant paired difference has no spread
    with pytest.raises(ValueError, match="at least one"):
        drop_contrast(first, [], ["bias"])
    with pytest.raises(ValueError, match="differ in seeds or prompts"):
        drop_contrast(first, [_cond([0.0], n=6)], ["bias"], "logit")


# -- H11 -----------------------------------------------------------------------------------------


def test_h11_uses_the_seven_targets_and_decides_with_them():
    from experiments import h11_mia_prior as h11

    assert h11.Config().targets == DOMAINS
    priors = {d: {form: {"loss": 1.0 + i / 10, "zlib": 0.01, "min_k": -3.0} for form in h11.FORMS}
              for i, d in enumerate(DOMAINS)}
    ema = {d: {"judge": 0.1 * i, "logit": 0.0} for i, d in enumerate(DOMAINS)}
    primary = h11.prior_correlations(priors, ema)["response/loss"]["judge"]
    assert primary["exact"] and primary["n_perm"] == 5040 and primary["p_perm_spearman"] == pytest.approx(2 / 5040)
    assert h11.verdict(primary)[0] == "replicated"
    ema = {d: {"judge": [0.3, 0.1, 0.4, 0.2, 0.5, 0.0, 0.6][i], "logit": 0.0} for i, d in enumerate(DOMAINS)}
    assert h11.verdict(h11.prior_correlations(priors, ema)["response/loss"]["judge"])[0] == "not replicated"
    two = h11.prior_correlations(priors, {d: ema[d] for d in DOMAINS[:2]})["response/loss"]["judge"]
    assert h11.verdict(two)[0] == "inconclusive"



def _experiment_names() -> list[str]:
    from emalab.pipeline import available_experiments

    return available_experiments()


@pytest.mark.parametrize("name", _experiment_names())
def test_experiment_modules_are_short_and_state_their_test(name):
    """Every experiment reads as its hypothesis: at most 150 lines, the test stated up front."""
    import importlib
    import re
    from pathlib import Path

    module = importlib.import_module(f"experiments.{name}")
    assert len(Path(module.__file__).read_text(encoding="utf-8").splitlines()) <= 150
    for word in ("Hypothes(is|es)", "Prediction", "Falsified"):
        assert re.search(word, module.__doc__)
    assert callable(module.main) and hasattr(module, "Config")


def test_every_experiment_is_checked_for_length():
    assert set(range(1, 14)) <= {int(n[1:].split("_")[0]) for n in _experiment_names()}
