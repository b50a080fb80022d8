"""Slow tier: a few NPO steps on the real embedded model lower the log-probability of its refusals,
and the shared model fixture is handed back unchanged."""

from __future__ import annotations

import pytest
import torch

from evals.suite import load_prompts
from training.config import UnlearnConfig
from training.data import DataSet, Example, collate
from training.lora import detach_lora, has_adapter
from training.losses import response_logits, sequence_logprobs
from training.trainer import UnlearnData, reference_logprobs, unlearn

# The default model's own opening refusal to these prompts (greedy); fixed here to skip generation.
REFUSAL = "I'm sorry, but I can't assist with that."


@pytest.mark.slow
def test_npo_steps_lower_forget_logprob_on_real_model(real_model, tmp_path):
    lm = real_model
    prompts = load_prompts("cybersecurity", "unlearn", limit=4)
    forget = DataSet([Example(p.id, p.domain, p.text, REFUSAL, "refusal") for p in prompts])
    cfg = UnlearnConfig(model=lm.name, dtype="float32", n_forget=4, batch_size=4, steps=3, lr=1e-3,
                        checkpoint_every=0)
    probe = torch.tensor([[151644, 872, 198, 9707, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        base_logits = lm.model(input_ids=probe).logits
    before = reference_logprobs(lm, cfg, forget)
    try:
        res = unlearn(lm, cfg, tmp_path / "run", progress=False, data=UnlearnData(forget))
        with torch.no_grad():
            b = collate(lm.tokenizer, forget.examples)
            rl = response_logits(lm.model, b.input_ids, b.attention_mask, b.response_mask)
            after = sequence_logprobs(rl.logits, rl.labels, rl.mask)
        assert (after < before).all(), (before.tolist(), after.tolist())
        assert (before - after).mean() > 1.0
        assert res.history[-1]["losses"]["forget"] < res.history[0]["losses"]["forget"]
        assert res.peak_rss_gb < 8.0
    finally:
        detach_lora(lm)
    assert not has_adapter(lm) and "adapter_id" not in lm.extra
    with torch.no_grad():
        torch.testing.assert_close(lm.model(input_ids=probe).logits, base_logits)
