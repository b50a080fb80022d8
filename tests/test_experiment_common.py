"""Paired drops and pooled seeds used by every experiment, on hand-made records."""

from __future__ import annotations

import pytest

from evals.evaluate import PromptRecord
from study import StudyConfig, claim, mean_drop, paired_drop, pooled


def rec(pid, domain, label, logit=0.0):
    return PromptRecord(id=pid, domain=domain, logit_score=logit, label=label)


BEFORE = [rec("a", "bias", "refusal", 2.0), rec("b", "bias", "refusal", 1.0), rec("c", "bias", "compliance", -1.0),
          rec("d", "privacy", "refusal", 3.0)]
AFTER = [rec("a", "bias", "compliance", -2.0), rec("b", "bias", "refusal", 0.0), rec("c", "bias", "compliance", -1.0),
         rec("d", "privacy", "incoherent", 1.0)]


def test_paired_drop_by_hand():
    d = paired_drop(BEFORE, AFTER, "bias")
    assert d["before"] == pytest.approx(2 / 3) and d["after"] == pytest.approx(1 / 3)
    assert d["drop"] == pytest.approx(1 / 3) and d["n"] == 3
    assert d["ci"][0] <= d["drop"] <= d["ci"][1]
    lg = paired_drop(BEFORE, AFTER, "bias", "logit")
    assert lg["drop"] == pytest.approx((4 + 1 + 0) / 3)


def test_incoherent_is_not_refusal():
    assert paired_drop(BEFORE, AFTER, "privacy")["after"] == 0.0


def test_mean_drop_averages_domains():
    m = mean_drop(BEFORE, AFTER, ["bias", "privacy"])
    assert m["drop"] == pytest.approx((1 / 3 + 1) / 2)


def test_no_shared_prompts_is_an_error():
    with pytest.raises(ValueError, match="no shared prompts"):
        paired_drop(BEFORE, [rec("z", "bias", "refusal")], "bias")


def test_pooled_prefixes_seed():
    out = pooled({0: BEFORE[:1], 1: BEFORE[:1]})
    assert [r.id for r in out] == ["0:a", "1:a"]


def test_claim_status_is_checked():
    assert claim("C1", "x", "replicated", "e")["status"] == "replicated"
    with pytest.raises(ValueError):
        claim("C1", "x", "sort of", "e")


def test_study_config_validation():
    with pytest.raises(ValueError, match="eval_limit"):
        StudyConfig(eval_limit=2)
    assert StudyConfig.from_dict(StudyConfig().to_dict()) == StudyConfig()


def _seeded(n_prompts: int, seed_effects: list[float], domain: str = "bias"):
    """Base logit 0 on every prompt; after: prompt effect (shared by seeds) + seed effect."""
    import numpy as np

    prompt_effect = np.random.default_rng(1).normal(0, 0.2, n_prompts)
    before = {s: [rec(f"p{i}", domain, "refusal", 0.0) for i in range(n_prompts)] for s in range(len(seed_effects))}
    after = {s: [rec(f"p{i}", domain, "compliance", -(1 + prompt_effect[i] + e)) for i in range(n_prompts)]
             for s, e in enumerate(seed_effects)}
    return pooled(before), pooled(after)


def test_seed_variance_widens_the_interval_and_one_seed_is_prompts_only():
    b, a = _seeded(24, [0.0, 0.0, 0.0])
    same = paired_drop(b, a, "bias", "logit")
    b, a = _seeded(24, [-1.0, 0.0, 1.0])
    varied = paired_drop(b, a, "bias", "logit")
    assert same["n_seeds"] == varied["n_seeds"] == 3 and varied["n"] == 72
    assert same["drop"] == pytest.approx(varied["drop"])  # seed effects cancel in the mean
    width = lambda d: d["ci"][1] - d["ci"][0]  # noqa: E731
    # Pooling seeds as independent prompts would give about the same width for both; the two-level
    # interval carries the run-to-run spread.
    assert width(varied) > 3 * width(same)
    one = paired_drop(*_seeded(24, [0.5]), "bias", "logit")
    assert one["n_seeds"] == 1 and width(one) > 0


def test_mean_drop_shares_seed_draws_across_domains():
    b1, a1 = _seeded(12, [-1.0, 1.0], "bias")
    b2, a2 = _seeded(12, [-1.0, 1.0], "privacy")
    m = mean_drop(b1 + b2, a1 + a2, ["bias", "privacy"], "logit")
    d = paired_drop(b1, a1, "bias", "logit")
    assert m["n_seeds"] == 2
    # The seed effect is common to both domains, so averaging domains does not average it away.
    assert (m["ci"][1] - m["ci"][0]) > 0.6 * (d["ci"][1] - d["ci"][0])


def test_drop_difference_is_paired_over_shared_prompts():
    from study import drop_difference

    # Both conditions share a large prompt effect; their difference is a constant 0.1 per prompt.
    b, a1 = _seeded(24, [0.0, 0.0])
    _, a2 = _seeded(24, [0.1, 0.1])
    first, second = {"base": b, "after": a2}, {"base": b, "after": a1}
    res = drop_difference(first, second, ["bias"], "logit")
    assert res["difference"] == pytest.approx(0.1)
    # Paired: the shared prompt effect cancels, so the interval is tight around 0.1.
    assert res["ci"][0] == pytest.approx(0.1) and res["ci"][1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="differ in seeds or prompts"):
        drop_difference(first, {"base": b[:24], "after": a1[:24]}, ["bias"], "logit")


def test_judged_drop_with_no_refusals_anywhere_has_a_real_interval():
    b = [rec(f"p{i}", "bias", "compliance") for i in range(24)]
    a = [rec(f"p{i}", "bias", "compliance") for i in range(24)]
    d = paired_drop(b, a, "bias")
    assert d["drop"] == 0.0 and d["ci"][0] < 0 < d["ci"][1] and d["ci_method"] == "Newcombe paired score"
    d = paired_drop(BEFORE, AFTER, "bias")
    assert d["ci_method"] == "seeds x prompts bootstrap"
