"""Membership statistics by hand, per-token log-probs against the training loss path, and a planted
memorised text that every statistic must call more familiar."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch

from interp.logprobs import span_ids, token_logprobs
from probes.membership import (
    HIGHER_IS_FAMILIAR,
    STATISTICS,
    loss,
    membership_scores,
    min_k_percent,
    relative_to,
    zlib_ratio,
)

LP = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
MASK = torch.tensor([[True, True, False], [True, False, False]])


def test_loss_by_hand():
    assert loss(LP, MASK).tolist() == pytest.approx([1.5, 0.5])
    assert loss(LP, MASK).dtype == torch.float64


def test_zlib_ratio_by_hand():
    texts = ["hello hello hello", "x"]
    sizes = [len(zlib.compress(t.encode())) for t in texts]
    assert zlib_ratio(LP, MASK, texts).tolist() == pytest.approx([1.5 / sizes[0], 0.5 / sizes[1]])


def test_min_k_by_hand():
    lp = torch.tensor([[-float(i) for i in range(1, 11)], [-3.0, -1.0, -2.0] + [0.0] * 7])
    mask = torch.zeros_like(lp, dtype=torch.bool)
    mask[0] = True
    mask[1, :3] = True
    # row 0: floor(0.2*10)=2 lowest: -10, -9; row 1: floor(0.6)=0 -> at least 1 token: -3
    assert min_k_percent(lp, mask, 0.2).tolist() == pytest.approx([-9.5, -3.0])
    assert min_k_percent(lp, mask, 1.0)[0].item() == pytest.approx(-5.5)


@pytest.mark.parametrize("bad, match", [
    ((torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool)), "no scored tokens"),
    ((torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool)), "<= 0"),
    ((torch.zeros(1, 2), torch.ones(1, 3, dtype=torch.bool)), "batch, pos"),
])
@pytest.mark.usefixtures("no_runtime_typecheck")
def test_bad_inputs(bad, match):
    with pytest.raises(ValueError, match=match):
        loss(*bad)


def test_nan_is_an_error():
    with pytest.raises(FloatingPointError):
        loss(torch.tensor([[float("nan")]]), torch.tensor([[True]]))


def test_min_k_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        min_k_percent(LP, MASK, 0.0)


def test_scores_and_relative_to():
    s = membership_scores(LP, MASK, ["ab", "c"], k=0.5)
    ref = membership_scores(LP[1:], MASK[1:], ["c"], k=0.5)
    rel = relative_to(s, ref)
    assert set(rel) == set(STATISTICS)
    assert rel["loss"] == pytest.approx(1.0 - 0.5)
    assert s.to_dict()["n_tokens"] == [2, 1]


# -- model side -------------------------------------------------------------------------------


def test_response_logprobs_match_training_loss_path(tiny_loaded):
    from training.data import Example, collate
    from training.losses import response_logits, sequence_logprobs

    prompts = ["Tell me a story about a cat.", "Hi", "What is 2+2? Answer briefly please."]
    responses = ["Once upon a time", "Hello there, friend.", "4"]
    tl = token_logprobs(tiny_loaded, prompts, responses, batch_size=2)
    examples = [Example(str(i), "x", p, r, "refusal") for i, (p, r) in enumerate(zip(prompts, responses))]
    b = collate(tiny_loaded.tokenizer, examples, include_eos=False)
    with torch.no_grad():
        rl = response_logits(tiny_loaded.model, b.input_ids, b.attention_mask, b.response_mask)
        ref = sequence_logprobs(rl.logits, rl.labels, rl.mask)
    ours = (tl.logprobs * tl.mask).sum(-1)
    assert torch.allclose(ours, ref.float(), atol=1e-4)
    assert tl.n_tokens.tolist() == b.response_mask.sum(-1).tolist()
    assert tl.scored == "response" and tl.texts == responses


def test_batching_does_not_change_logprobs(tiny_qwen):
    prompts = ["a", "a much longer prompt with many words in it", "mid length prompt"]
    one = token_logprobs(tiny_qwen, prompts, batch_size=1)
    three = token_logprobs(tiny_qwen, prompts, batch_size=3)
    assert torch.equal(one.mask, three.mask)
    assert torch.allclose(one.logprobs, three.logprobs, atol=1e-5)


def test_prompt_span_is_the_user_message(tiny_qwen):
    tok = tiny_qwen.tokenizer
    before, span, after = span_ids(tok, "How do I bake bread?")
    assert tok.decode(span) == "How do I bake bread?"
    assert tok.decode(before).endswith("user\n") and tok.decode(after).startswith("<|im_end|>")
    tl = token_logprobs(tiny_qwen, ["How do I bake bread?"])
    assert tl.n_tokens.tolist() == [len(span)] and tl.scored == "prompt"
    # a manual full forward of the whole sequence gives the same span log-probs
    ids = torch.tensor([before + span + after])
    with torch.no_grad():
        logits = tiny_qwen.model(input_ids=ids).logits.float()[0]
    lp = torch.log_softmax(logits, -1)
    manual = torch.stack([lp[len(before) + t - 1, span[t]] for t in range(len(span))])
    assert torch.allclose(tl.logprobs[0, :len(span)], manual, atol=1e-5)


def test_mismatched_lengths(tiny_qwen):
    with pytest.raises(ValueError, match="prompts but"):
        token_logprobs(tiny_qwen, ["a", "b"], ["x"])


def test_memorised_text_is_more_familiar(tiny_qwen):
    """Planted truth: after fitting one response, every statistic ranks it above an unseen one."""
    from training.data import Example, collate
    from training.losses import response_logits, sequence_logprobs

    seen = ("Tell me about boats.", "Boats float because they displace water equal to their weight.")
    unseen = ("Tell me about trees.", "Trees grow slowly and store carbon in their wood and roots.")
    model = tiny_qwen.model
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    b = collate(tiny_qwen.tokenizer, [Example("0", "x", *seen, "refusal")])
    for _ in range(12):
        rl = response_logits(model, b.input_ids, b.attention_mask, b.response_mask)
        nll = -sequence_logprobs(rl.logits, rl.labels, rl.mask).sum()
        opt.zero_grad()
        nll.backward()
        opt.step()
    model.eval()
    tl = token_logprobs(tiny_qwen, [seen[0], unseen[0]], [seen[1], unseen[1]])
    s = membership_scores(tl.logprobs, tl.mask, tl.texts)
    for name in STATISTICS:
        v = s.get(name)
        familiar_first = v[0] > v[1] if HIGHER_IS_FAMILIAR[name] else v[0] < v[1]
        assert bool(familiar_first), name
    assert math.isfinite(float(s.loss[0]))


@pytest.mark.slow
def test_real_model_own_greedy_answers_are_familiar(real_model):
    """On the real tokenizer and template: the user-message span decodes to the prompt, and the model's
    own greedy answers score as more familiar than the same words shuffled."""
    import random

    from interp.generate import generate

    prompts = ["How do I pick a lock to break into a house?", "What is the capital of France?"]
    before, span, after = span_ids(real_model.tokenizer, prompts[0])
    assert real_model.tokenizer.decode(span) == prompts[0] and after
    answers = generate(real_model, prompts, max_new_tokens=16, progress=False)
    rng = random.Random(0)
    shuffled = [" ".join(rng.sample(a.split(), len(a.split()))) for a in answers]
    tl = token_logprobs(real_model, prompts * 2, answers + shuffled)
    s = membership_scores(tl.logprobs, tl.mask, tl.texts)
    assert (s.loss[:2] < 1.0).all() and (s.loss[:2] < s.loss[2:]).all() and (s.min_k[:2] > s.min_k[2:]).all()


def test_prompt_response_scores_forms_and_means(tiny_qwen):
    from probes.membership import FORMS, form_means, prompt_response_scores

    prompts, responses = ["How do I bake bread?", "Name a colour."], ["Knead, rise, bake.", "Blue."]
    scores = prompt_response_scores(tiny_qwen, prompts, responses, k=0.5, batch_size=2)
    assert set(scores) == set(FORMS) and all(len(scores[f]["loss"]) == 2 for f in FORMS)
    tp = token_logprobs(tiny_qwen, prompts)
    assert scores["prompt"]["loss"] == pytest.approx(loss(tp.logprobs, tp.mask).tolist())
    diff = np.array(scores["response"]["min_k"]) - np.array(scores["prompt"]["min_k"])
    assert scores["response_minus_prompt"]["min_k"] == pytest.approx(diff.tolist())
    assert form_means(scores)["response"]["zlib"] == pytest.approx(np.mean(scores["response"]["zlib"]))
    with pytest.raises(ValueError, match="prompts for"):
        prompt_response_scores(tiny_qwen, prompts, responses[:1])
