"""The model adapter: canonical sites per family, layer validation, hooks that always restore."""

from __future__ import annotations

import pytest
import torch

from interp import adapter
from interp.adapter import LayerOutOfRangeError, UnknownSiteError, UnsupportedFamilyError


def test_sites_resolve_for_every_family(tiny_loaded):
    model = tiny_loaded.model
    assert adapter.n_layers(model) == 4 and adapter.d_model(model) == 64
    for site in adapter.SITES:
        for layer in range(4):
            module, end = adapter.site_module(model, site, layer)
            assert isinstance(module, torch.nn.Module) and end == "output"
    o_proj, down = adapter.output_projections(model, 2)
    assert o_proj.out_features == 64 and down.out_features == 64


@pytest.mark.parametrize("layers,expected", [([0, 3], [0, 3]), ([-1], [3]), (None, [0, 1, 2, 3]), ([2, 2], [2])])
def test_check_layers(tiny_qwen, layers, expected):
    assert adapter.check_layers(tiny_qwen.model, layers) == expected


@pytest.mark.parametrize("bad", [4, -5, 100])
def test_layer_out_of_range(tiny_qwen, bad):
    with pytest.raises(LayerOutOfRangeError, match="0..3"):
        adapter.check_layers(tiny_qwen.model, [bad])


def test_unknown_site(tiny_qwen):
    with pytest.raises(UnknownSiteError, match="resid_post"):
        adapter.site_module(tiny_qwen.model, "resid_mid", 0)


def test_unknown_family_lists_supported():
    # GPT-2 is adapted by discovery now (tests/test_any_family.py); a model with no decoder-layer
    # list is what remains unsupported.
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    model.transformer.h = torch.nn.Sequential(*model.transformer.h)
    with pytest.raises(UnsupportedFamilyError, match="qwen2"):
        adapter.spec_of(model)


def test_resid_pre_is_previous_resid_post(tiny_loaded):
    model = tiny_loaded.model
    ids = torch.randint(0, 200, (2, 7))
    hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    seen = {}

    def grab(name):
        def fn(x, layer):
            seen[(name, layer)] = x.detach().clone()
            return x
        return fn

    with adapter.site_hook(model, "resid_pre", [0, 2], grab("pre")), adapter.site_hook(model, "resid_post", [1], grab("post")):
        model(input_ids=ids)
    torch.testing.assert_close(seen[("pre", 0)], hs[0])
    torch.testing.assert_close(seen[("pre", 2)], hs[2])
    torch.testing.assert_close(seen[("pre", 2)], seen[("post", 1)])


def test_site_hook_restores_on_error(tiny_qwen):
    model = tiny_qwen.model
    ids = torch.randint(0, 200, (1, 5))
    before = model(input_ids=ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.site_hook(model, "resid_post", [1], lambda x, _l: x * 0):
            raise RuntimeError("boom")
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    with adapter.site_hook(model, "resid_post", [1], lambda x, _l: x * 0):
        changed = model(input_ids=ids).logits
    assert not torch.allclose(changed, before)


def test_base_model_unwraps_peft(tiny_qwen):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_qwen.model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert adapter.base_model(peft_model) is peft_model.get_base_model()
    assert adapter.family_of(peft_model) == "qwen2"
    module, _ = adapter.site_module(peft_model, "resid_post", 1)
    assert module is peft_model.get_base_model().model.layers[1]
