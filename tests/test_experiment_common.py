"""Paired drops and pooled seeds used by every experiment, on hand-made records."""

from __future__ import annotations

import pytest

from experiments.common import StudyConfig, claim, mean_drop, paired_drop, pooled
from interp.evaluate import PromptRecord


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
