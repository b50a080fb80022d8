"""Slow tier: the study evaluates an adapter at the default regime in a path whose refusal log-odds
match fp32-unmerged within 0.05, and bf16 merging (the old path) does not (docs/numerics.md)."""

from __future__ import annotations

import numpy as np
import pytest

from evals.refusal import logit_refusal_scores
from evals.suite import DOMAINS, load_prompts
from interp.loading import load_model
from study import Study, StudyConfig
from training.config import UnlearnConfig
from training.data import DataSet, Example
from training.lora import detach_lora, load_adapter, merged_adapter
from training.trainer import UnlearnData, unlearn

REFUSAL = "I'm sorry, but I can't assist with that."  # the default model's greedy opening refusal


@pytest.mark.slow
def test_study_evaluation_path_matches_fp32_at_the_default_regime(real_model, tmp_path):
    lm = real_model  # float32
    forget = DataSet([Example(p.id, p.domain, p.text, REFUSAL, "refusal")
                      for p in load_prompts("cybersecurity", "unlearn", limit=16)])
    defaults = UnlearnConfig()
    # The default lr and steps; short prompts and batch 4 keep this test's peak memory well under the
    # 8 GB that tests/test_training_real.py asserts for the same (pytest) process.
    cfg = UnlearnConfig(model=lm.name, dtype="float32", n_forget=16, steps=defaults.steps, lr=defaults.lr,
                        batch_size=4, max_prompt_tokens=128, checkpoint_every=0)
    prompts = [p.text for d in DOMAINS for p in load_prompts(d, "eval", limit=4)]
    try:
        res = unlearn(lm, cfg, tmp_path / "run", progress=False, data=UnlearnData(forget))
        reference = logit_refusal_scores(lm, prompts).double().numpy()  # fp32, LoRA branch unmerged
    finally:
        detach_lora(lm)
    base = logit_refusal_scores(lm, prompts).double().numpy()
    assert np.abs(reference - base).mean() > 0.3, "the adapter must move refusal for the check to mean anything"

    study = Study(StudyConfig(results=str(tmp_path / "results")))
    assert study.cfg.eval_dtype == "float32"
    study._lm = lm
    with study.with_adapter(res.adapter_dir) as measured_lm:
        assert measured_lm is lm
        study_path = logit_refusal_scores(lm, prompts).double().numpy()
    assert np.abs(study_path - reference).mean() <= 0.05

    bf16 = load_model(lm.name, dtype="bfloat16")
    load_adapter(bf16, res.adapter_dir)
    with merged_adapter(bf16):
        old_path = logit_refusal_scores(bf16, prompts).double().numpy()
    del bf16
    assert np.abs(old_path - reference).mean() > 0.05, "bf16 merging is exact here: the guard has gone vacuous"
