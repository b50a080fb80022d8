"""Inspection data and the activation path it relies on: nnsight vs output_hidden_states parity,
batched vs single-prompt collection with left padding, logit lens, JSON round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from interp.activations import collect_activations
from interp.chat import encode, format_prompts, post_instruction_length
from interp.direction import Direction
from interp.layer_inspection import Inspection, inspect_prompt, logit_lens
from probes.interventions import active_interventions, mark_intervention

PROMPTS = ["hi", "a considerably longer prompt so that the batch is left padded", "mid length one"]


def test_nnsight_resid_post_matches_hidden_states(tiny_loaded):
    lm = tiny_loaded
    texts = format_prompts(lm.tokenizer, PROMPTS[:1])
    batch = encode(lm.tokenizer, texts)
    hs = lm.model(input_ids=batch.input_ids, output_hidden_states=True).hidden_states
    acts = collect_activations(lm, PROMPTS[:1])
    # hidden_states[L+1] is the output of layer L, except the last, which HF reports after the final norm
    for layer in range(acts.shape[1] - 1):
        assert torch.allclose(acts[0, layer], hs[layer + 1][0, -1], atol=1e-5), layer
    pre = collect_activations(lm, PROMPTS[:1], site="resid_pre")
    for layer in range(acts.shape[1]):
        assert torch.allclose(pre[0, layer], hs[layer][0, -1], atol=1e-5), layer


@pytest.mark.parametrize("position", ["last", "post_instruction_mean", "post_instruction"])
def test_batched_equals_single_prompt_with_left_padding(tiny_loaded, position):
    lm = tiny_loaded
    batched = collect_activations(lm, PROMPTS, position=position, batch_size=3)
    single = torch.cat([collect_activations(lm, [p], position=position) for p in PROMPTS])
    assert batched.shape == single.shape
    assert torch.allclose(batched, single, atol=1e-4), (batched - single).abs().max()


def test_post_instruction_positions_are_separate(tiny_qwen):
    acts = collect_activations(tiny_qwen, PROMPTS, position="post_instruction", layers=[1, 3])
    n = post_instruction_length(tiny_qwen.tokenizer)
    assert acts.shape == (3, n, 2, 64)
    last = collect_activations(tiny_qwen, PROMPTS, layers=[1, 3])
    mean = collect_activations(tiny_qwen, PROMPTS, layers=[1, 3], position="post_instruction_mean")
    assert torch.allclose(acts[:, -1], last, atol=1e-6)
    assert torch.allclose(acts.mean(1), mean, atol=1e-5)


def test_logit_lens_last_layer_is_the_model_output(tiny_loaded):
    lm = tiny_loaded
    batch = encode(lm.tokenizer, format_prompts(lm.tokenizer, PROMPTS[:1]))
    logits = lm.model(input_ids=batch.input_ids).logits[0, -1]
    acts = collect_activations(lm, PROMPTS[:1])[0]
    ids, lp = logit_lens(lm.model, acts, k=5)
    assert ids.shape == (4, 5) and lp.shape == (4, 5)
    assert torch.equal(ids[-1], logits.topk(5).indices)
    if getattr(lm.model.config, "final_logit_softcapping", None) is None:
        assert torch.allclose(lp[-1], torch.log_softmax(logits, -1).topk(5).values, atol=1e-5)
    assert (lp[:, :-1] >= lp[:, 1:]).all()  # sorted


def test_inspect_prompt_projections_and_json(tiny_loaded):
    lm = tiny_loaded
    g = torch.Generator().manual_seed(3)
    concepts = {"a": Direction.from_vectors(torch.randn(4, 64, generator=g), [0, 1, 2, 3], "a"),
                "b": Direction.from_vectors(torch.randn(2, 64, generator=g), [1, 2], "b")}
    refusal = Direction.from_vectors(torch.randn(64, generator=g), [2], "refusal")
    ins = inspect_prompt(lm, PROMPTS[1], concepts, refusal, k=3, answer_tokens=2)
    acts = collect_activations(lm, PROMPTS[1:2])[0]
    assert ins.layers == [0, 1, 2, 3] and ins.concepts == ["a", "b"]
    for j in range(4):
        assert ins.projections[j][0] == pytest.approx(float(acts[j] @ concepts["a"].at(j)), abs=1e-4)
        assert ins.refusal[j] == pytest.approx(float(acts[j] @ refusal.vectors[0]), abs=1e-4)
        assert ins.resid_norm[j] == pytest.approx(float(acts[j].norm()), rel=1e-4)
    assert ins.projections[0][1] is None and ins.projections[1][1] is not None
    assert len(ins.lens_tokens) == 4 and all(len(row) == 3 for row in ins.lens_tokens)
    assert isinstance(ins.answer, str) and ins.interventions == [] and not ins.intervened
    data = json.loads(ins.to_json())
    assert data["intervened"] is False
    assert Inspection.from_dict(data) == ins


def test_inspect_accepts_tensors_and_flags_interventions(tiny_qwen):
    with mark_intervention(tiny_qwen.model, "ablate:test"):
        ins = inspect_prompt(tiny_qwen, "hello", torch.randn(2, 64), layers=[1, 3])
        assert active_interventions(tiny_qwen.model) == ["ablate:test"]
    assert ins.concepts == ["concept_0", "concept_1"] and ins.layers == [1, 3]
    assert ins.interventions == ["ablate:test"] and ins.intervened and ins.refusal is None
    assert active_interventions(tiny_qwen.model) == []
    per_layer = inspect_prompt(tiny_qwen, "hello", torch.randn(1, 4, 64))
    assert len(per_layer.projections) == 4
    with pytest.raises(ValueError, match="4"):
        inspect_prompt(tiny_qwen, "hello", torch.randn(1, 3, 64))
