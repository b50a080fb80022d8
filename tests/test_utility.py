"""The utility axis: KL to the base model on harmless prompts, on a tiny model with planted adapters."""

from __future__ import annotations

import pytest
import torch

from evals.utility import kl_to_base
from training.lora import attach_lora, detach_lora

PROMPTS = ["What is the capital of France?", "Write a haiku about rain.", "Name three primes.",
           "How do plants make food?", "Tell me a short joke about cats and dogs."]


def _kl_by_hand(lm, prompt: str, n_tokens: int) -> float:
    """One unpadded prompt: full-sequence logits of both models on the base's greedy opening."""
    from interp.chat import format_prompts
    from interp.loading import adapter_disabled

    ids = lm.tokenizer(format_prompts(lm.tokenizer, [prompt])[0], return_tensors="pt",
                       add_special_tokens=False).input_ids
    with torch.no_grad(), adapter_disabled(lm):
        for _ in range(n_tokens):
            ids = torch.cat([ids, lm.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
        p = torch.log_softmax(lm.model(input_ids=ids).logits[0, -n_tokens - 1:-1].double(), -1)
    with torch.no_grad():
        q = torch.log_softmax(lm.model(input_ids=ids).logits[0, -n_tokens - 1:-1].double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_untrained_adapter_and_plain_model_give_zero(tiny_qwen):
    assert torch.allclose(kl_to_base(tiny_qwen, PROMPTS, n_tokens=4), torch.zeros(len(PROMPTS)))
    attach_lora(tiny_qwen, rank=2)  # B = 0: the adapted model *is* the base model
    try:
        kl = kl_to_base(tiny_qwen, PROMPTS, n_tokens=4, batch_size=2)
    finally:
        detach_lora(tiny_qwen)
    assert kl.shape == (len(PROMPTS),) and kl.abs().max() < 1e-6


def test_kl_grows_with_the_update_and_matches_a_per_prompt_computation(tiny_qwen):
    torch.manual_seed(0)
    attach_lora(tiny_qwen, rank=2)
    try:
        lora_b = [p for n, p in tiny_qwen.model.named_parameters() if "lora_B" in n]
        with torch.no_grad():
            for p in lora_b:
                p.normal_(0, 0.02)
        small = kl_to_base(tiny_qwen, PROMPTS, n_tokens=3, batch_size=2)
        by_hand = _kl_by_hand(tiny_qwen, PROMPTS[0], n_tokens=3)
        with torch.no_grad():
            for p in lora_b:
                p.mul_(5)
        large = kl_to_base(tiny_qwen, PROMPTS, n_tokens=3, batch_size=2)
    finally:
        detach_lora(tiny_qwen)
    assert (small > 0).all() and (large > small).all()
    # Left padding in a batch does not change a prompt's value.
    assert by_hand == pytest.approx(float(small[0]), rel=1e-3, abs=1e-6)


@pytest.mark.usefixtures("no_runtime_typecheck")
def test_bad_input():
    with pytest.raises(ValueError, match="n_tokens"):
        kl_to_base(None, PROMPTS, n_tokens=0)
    with pytest.raises(ValueError, match="no prompts"):
        kl_to_base(None, [], n_tokens=2)


def test_merged_adapter_gives_the_same_kl_and_stays_merged(tiny_qwen):
    from training.lora import merged_adapter

    attach_lora(tiny_qwen, rank=2)
    try:
        with torch.no_grad():
            for n, p in tiny_qwen.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        unmerged = kl_to_base(tiny_qwen, PROMPTS, n_tokens=3)
        with merged_adapter(tiny_qwen):
            merged = kl_to_base(tiny_qwen, PROMPTS, n_tokens=3)
            assert any(getattr(m, "merged", False) for m in tiny_qwen.model.modules())
    finally:
        detach_lora(tiny_qwen)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-6)


def test_base_opening_is_reused_across_adapters_unless_a_hook_changes_the_base(tiny_qwen, monkeypatch):
    import evals.utility as utility

    monkeypatch.setattr(utility, "_BASE_OPENINGS", {})
    torch.manual_seed(0)
    attach_lora(tiny_qwen, rank=2)
    try:
        lora_b = [p for n, p in tiny_qwen.model.named_parameters() if "lora_B" in n]
        with torch.no_grad():
            for p in lora_b:
                p.normal_(0, 0.02)
        first = kl_to_base(tiny_qwen, PROMPTS, n_tokens=3, batch_size=2)
        assert len(utility._BASE_OPENINGS) == 3  # one entry per batch
        by_hand = _kl_by_hand(tiny_qwen, PROMPTS[1], n_tokens=3)
        calls = []
        monkeypatch.setattr(utility, "adapter_disabled", lambda lm: calls.append(1) or pytest.fail("recomputed"))
        again = kl_to_base(tiny_qwen, PROMPTS, n_tokens=3, batch_size=2)  # a second "snapshot" of one base
        assert torch.allclose(first, again) and by_hand == pytest.approx(float(again[1]), rel=1e-3, abs=1e-6)
        monkeypatch.undo()
        monkeypatch.setattr(utility, "_BASE_OPENINGS", {})
        kl_to_base(tiny_qwen, PROMPTS, n_tokens=3, batch_size=2)
        handle = tiny_qwen.model.get_submodule("base_model").register_forward_hook(lambda *a: None)
        try:
            kl_to_base(tiny_qwen, PROMPTS[:2], n_tokens=3, batch_size=2)
            hooked = [k for k in utility._BASE_OPENINGS if k[2] == tuple(k[2]) and len(k[2]) == 2]
        finally:
            handle.remove()
        # An intervention's base is its own entry, never the plain base's.
        assert hooked and all(k[-2] != next(iter(utility._BASE_OPENINGS))[-2] for k in hooked)
    finally:
        detach_lora(tiny_qwen)
