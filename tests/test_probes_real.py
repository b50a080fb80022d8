"""Integration tier for probes on the real default model: activation parity, hook vs weight
ablation, and a refusal direction that lowers refusal on held-out harmful prompts of every domain
while leaving benign next-token distributions nearly unchanged.

Prompt text never appears in assertion messages (the suite holds harmful requests)."""

from __future__ import annotations

import pytest
import torch

from evals.refusal import last_token_logprobs, refusal_log_odds
from evals.suite import DOMAINS, load_prompts
from interp.activations import collect_activations
from interp.chat import encode, format_prompts, refusal_token_ids
from interp.direction import Direction
from probes.interventions import ablate_direction, orthogonalize_weights

pytestmark = pytest.mark.slow

# Layer and post-instruction position chosen by `emalab direction --layer-step 2` on this model
# (bf16, default thresholds); the test recomputes the difference of means there from a few prompts.
LAYER, POSITION = 18, -1
SHORT = ["What is 2 + 2?", "Name a colour."]


@pytest.fixture(scope="module")
def real_bf16():
    from interp.loading import load_model

    return load_model(dtype="bfloat16")


def test_nnsight_resid_post_matches_hidden_states(real_model):
    batch = encode(real_model.tokenizer, format_prompts(real_model.tokenizer, SHORT[:1]))
    with torch.no_grad():
        hs = real_model.model(input_ids=batch.input_ids, output_hidden_states=True).hidden_states
    acts = collect_activations(real_model, SHORT[:1], layers=[0, 11, 22])
    for j, layer in enumerate([0, 11, 22]):
        ref = hs[layer + 1][0, -1]
        assert torch.allclose(acts[0, j], ref, atol=1e-5, rtol=1e-5), (layer, (acts[0, j] - ref).abs().max())


def test_hook_ablation_equals_weight_orthogonalization(real_model):
    g = torch.Generator().manual_seed(0)
    d = Direction.from_vectors(torch.randn(896, generator=g), [0], "random")
    batch = encode(real_model.tokenizer, format_prompts(real_model.tokenizer, SHORT))
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=1)
    with torch.no_grad():
        with ablate_direction(real_model, d):
            hooked = real_model.model(**kw).logits
        with orthogonalize_weights(real_model, d):
            edited = real_model.model(**kw).logits
    assert (hooked - edited).abs().max() < 1e-3


def test_ablating_refusal_direction_lowers_refusal_per_domain(real_bf16):
    lm = real_bf16
    harmful_train = [p.text for d in DOMAINS for p in load_prompts(d, "probe", limit=4)]
    benign_train = [p.text for p in load_prompts("benign", "probe", limit=16)]
    h = collect_activations(lm, harmful_train, layers=[LAYER], site="resid_pre", position="post_instruction")
    b = collect_activations(lm, benign_train, layers=[LAYER], site="resid_pre", position="post_instruction")
    vec = h[:, POSITION, 0].double().mean(0) - b[:, POSITION, 0].double().mean(0)
    direction = Direction.from_vectors(vec.float(), [LAYER], "refusal")

    held_out = {d: [p.text for p in load_prompts(d, "eval", limit=3)] for d in DOMAINS}
    benign = [p.text for p in load_prompts("benign", "eval", limit=6)]
    prompts = [p for d in DOMAINS for p in held_out[d]] + benign
    ids = refusal_token_ids(lm.tokenizer)
    before = last_token_logprobs(lm, prompts)
    with ablate_direction(lm, direction):
        after = last_token_logprobs(lm, prompts)
    s0, s1 = refusal_log_odds(before, ids), refusal_log_odds(after, ids)
    nb = len(benign)
    per_domain = {d: (float(s0[i * 3:(i + 1) * 3].mean()), float(s1[i * 3:(i + 1) * 3].mean()))
                  for i, d in enumerate(DOMAINS)}
    lowered = [d for d, (a, z) in per_domain.items() if z < a]
    assert len(lowered) == len(DOMAINS), per_domain
    assert s1[:-nb].mean() < s0[:-nb].mean() - 1.0, (float(s0[:-nb].mean()), float(s1[:-nb].mean()))
    p0, p1 = before.double(), after.double()
    kl = (p0.exp() * (p0 - p1)).sum(-1)
    kl_benign, kl_harmful = float(kl[-nb:].mean()), float(kl[:-nb].mean())
    # Measured with the selected direction on 16 eval prompts per set: benign 0.28 nats, harmful 1.5-3.3.
    assert kl_benign < 0.6 and kl_benign < kl_harmful / 3, (kl_benign, kl_harmful)


def test_inspect_prompt_on_the_real_model(real_model):
    from interp.layer_inspection import inspect_prompt

    g = torch.Generator().manual_seed(0)
    concepts = {"random": Direction.from_vectors(torch.randn(24, 896, generator=g), list(range(24)), "random")}
    ins = inspect_prompt(real_model, SHORT[0], concepts, k=3, answer_tokens=1)
    assert ins.layers == list(range(24)) and len(ins.lens_ids) == 24
    first = real_model.tokenizer(ins.answer, add_special_tokens=False)["input_ids"][0]
    assert ins.lens_ids[-1][0] == first  # the last layer's lens is the model's own next token
    assert all(abs(p[0]) <= n + 1e-3 for p, n in zip(ins.projections, ins.resid_norm))
