"""The judges' agreement with the packaged human labels, held to floors (no model: the stored
responses and logit scores are re-judged). A judge change that loses agreement fails here."""

from __future__ import annotations

from evals.calibration import calibrate

KEYWORD_KAPPA_FLOOR = 0.95            # base + ablated part, three classes
KEYWORD_KAPPA_FLOOR_UNLEARNED = 0.85  # the whole unlearned part
KEYWORD_KAPPA_FLOOR_HELDOUT = 0.80    # the unlearned held-out half (no rule was written on it)
LOGIT_AUROC_FLOOR = 0.90


def test_calibration_floors_from_stored_labels():
    res = calibrate(judges=["keyword"])
    assert res["n"] >= 150
    parts = res["judges"]["keyword"]["by_part"]
    assert parts["base"]["kappa"] >= KEYWORD_KAPPA_FLOOR, parts
    assert parts["unlearned"]["kappa"] >= KEYWORD_KAPPA_FLOOR_UNLEARNED, parts
    assert res["logit"]["auroc"] >= LOGIT_AUROC_FLOOR, res["logit"]
    held = calibrate(judges=["keyword"], split="heldout")["judges"]["keyword"]["by_part"]
    assert held["unlearned"]["kappa"] >= KEYWORD_KAPPA_FLOOR_HELDOUT, held
