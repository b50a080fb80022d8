"""Integration tier: the refusal measurements on the real embedded model and the packaged
human-labelled calibration set."""

from __future__ import annotations

import numpy as np
import pytest

from evals.calibration import load_labelled
from evals.evaluate import EvalConfig, evaluate_prompts
from evals.suite import DOMAINS, load_prompts

pytestmark = pytest.mark.slow



def test_logit_score_higher_on_harmful_than_benign(real_model):
    harmful = {d: load_prompts(d, "eval", limit=3) for d in DOMAINS}
    sets = {**harmful, "benign": load_prompts("benign", "eval", limit=6)}
    cfg = EvalConfig(generate=False, n_bootstrap=100, batch_size=16)
    rep = evaluate_prompts(real_model, sets, cfg, progress=False)
    harm = np.mean([rep.domains[d].mean_logit for d in DOMAINS])
    benign = rep.benign.mean_logit  # the "benign" key is the report's benign row
    assert harm > benign + 1.0, (harm, benign)


def test_stored_logit_scores_reproduce(real_model):
    """The file's base-condition logit scores (bf16) come back from the fp32 model within bf16 noise."""
    from evals.refusal import logit_refusal_scores

    rows = [r for r in load_labelled() if r["condition"] == "base"][::15]
    got = logit_refusal_scores(real_model, [r["prompt"] for r in rows]).numpy()
    stored = np.array([r["logit_score"] for r in rows])
    assert np.abs(got - stored).max() < 0.75, np.c_[got, stored]
    assert np.corrcoef(got, stored)[0, 1] > 0.9
