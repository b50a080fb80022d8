"""Interventions restore the model, ablation removes the direction everywhere, and weight
orthogonalization is the same function as hook ablation — across the four tiny families."""

from __future__ import annotations

import pytest
import torch

from interp.activations import collect_activations
from interp.adapter import SITES, embed_module, has_post_norms, output_projections, unembed_module
from interp.direction import Direction
from probes.interventions import (
    UnsupportedInterventionError,
    ablate_direction,
    active_interventions,
    add_activation,
    orthogonalize_weights,
    project_out,
    steer,
)

PROMPTS = ["hello there", "a much longer prompt, to force left padding in the batch", "x"]


def random_direction(d_model: int = 64, seed: int = 1) -> Direction:
    g = torch.Generator().manual_seed(seed)
    return Direction.from_vectors(torch.randn(d_model, generator=g), [0], name="r")


def grab(lm, site: str, prompts=PROMPTS) -> torch.Tensor:
    """Last-token stream at ``site`` for every layer, read by PyTorch hooks registered *after* any
    active intervention (nnsight reads a module's output before PyTorch forward hooks rewrite it, so
    a hooked site itself is checked this way; downstream sites are checked through nnsight)."""
    from interp.adapter import n_layers, site_hook
    from interp.chat import encode, format_prompts

    seen = {}

    def fn(x, layer):
        seen[layer] = x[:, -1].detach().float().clone()
        return x

    batch = encode(lm.tokenizer, format_prompts(lm.tokenizer, prompts))
    with site_hook(lm.model, site, range(n_layers(lm.model)), fn), torch.no_grad():
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    return torch.stack([seen[k] for k in sorted(seen)], dim=1)


def planted_direction(lm) -> Direction:
    """The model's own mean last-token stream at a middle layer: a direction it certainly uses."""
    acts = collect_activations(lm, PROMPTS, layers=[2])
    return Direction.from_vectors(acts[:, 0].mean(0), [0], name="planted")


def test_project_out_removes_component():
    r = torch.nn.functional.normalize(torch.randn(16), dim=0)
    x = torch.randn(5, 7, 16)
    y = project_out(x, r)
    assert (y @ r).abs().max() < 1e-5
    assert torch.allclose(y + (x @ r)[..., None] * r, x, atol=1e-5)


@pytest.mark.parametrize("site", SITES)
def test_ablation_zeroes_projection_at_every_layer(tiny_loaded, site):
    lm = tiny_loaded
    d = planted_direction(lm)
    r = d.vectors[0]
    read = (lambda: collect_activations(lm, PROMPTS, site=site)) if site == "resid_post" else (lambda: grab(lm, site))
    before = read() @ r
    with ablate_direction(lm, d):
        assert active_interventions(lm.model) == ["ablate:planted"]
        after = read() @ r
    assert before.abs().max() > 1e-3
    assert after.abs().max() < 1e-3 * before.abs().max(), (after.abs().max(), before.abs().max())
    assert active_interventions(lm.model) == []


def test_hooks_and_weight_orthogonalization_agree(tiny_loaded):
    lm = tiny_loaded
    d = planted_direction(lm)
    ids = torch.randint(0, 250, (2, 9))
    base = lm.model(input_ids=ids).logits
    with ablate_direction(lm, d):
        hooked = lm.model(input_ids=ids).logits
    if has_post_norms(lm.model):
        with pytest.raises(UnsupportedInterventionError, match="post-norms"):
            with orthogonalize_weights(lm, d):
                pass
        return
    with orthogonalize_weights(lm, d):
        assert active_interventions(lm.model) == ["orthogonalize:planted"]
        edited = lm.model(input_ids=ids).logits
        resid = collect_activations(lm, PROMPTS, site="resid_post") @ d.vectors[0]
    assert (hooked - base).abs().max() > 1e-3  # the direction mattered
    assert torch.allclose(hooked, edited, atol=1e-4, rtol=1e-4), (hooked - edited).abs().max()
    assert resid.abs().max() < 1e-4


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_weight_orthogonalization_restores_bit_exactly_even_on_error(tiny_loaded):
    lm = tiny_loaded
    if has_post_norms(lm.model):
        pytest.skip("weight orthogonalization is unsupported for post-norm families (tested above)")
    model = lm.model
    before = _snapshot(model)
    tied_before = unembed_module(model).weight is embed_module(model).weight
    embed_param = embed_module(model).weight
    with pytest.raises(RuntimeError, match="boom"):
        with orthogonalize_weights(lm, random_direction()):
            o_proj, _ = output_projections(model, 1)
            assert not torch.equal(o_proj.weight, before[[k for k in before if k.endswith("1.self_attn.o_proj.weight")][0]])
            if tied_before:  # only the input side is edited
                assert torch.equal(unembed_module(model).weight, before["lm_head.weight"] if "lm_head.weight" in before
                                   else before["model.embed_tokens.weight"])
                assert not torch.equal(embed_module(model).weight, unembed_module(model).weight)
            raise RuntimeError("boom")
    after = _snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert embed_module(model).weight is embed_param
    assert (unembed_module(model).weight is embed_module(model).weight) == tied_before
    assert active_interventions(model) == []


def test_per_layer_direction_needs_hooks(tiny_qwen):
    d = Direction.from_vectors(torch.randn(4, 64), [0, 1, 2, 3], name="per-layer")
    with pytest.raises(UnsupportedInterventionError, match="global"):
        with orthogonalize_weights(tiny_qwen, d):
            pass
    with ablate_direction(tiny_qwen, d):  # hooks handle per-layer vectors
        acts = grab(tiny_qwen, "resid_pre")
    for j in range(4):
        assert (acts[:, j] @ d.at(j)).abs().max() < 1e-5


def test_hooks_are_removed_on_error(tiny_qwen):
    ids = torch.randint(0, 250, (1, 6))
    base = tiny_qwen.model(input_ids=ids).logits
    for cm in (ablate_direction(tiny_qwen, random_direction()), add_activation(tiny_qwen, torch.ones(64), 1, 3.0),
               steer(tiny_qwen, random_direction(), 5.0)):
        with pytest.raises(KeyError):
            with cm:
                raise KeyError("inside")
        assert torch.equal(tiny_qwen.model(input_ids=ids).logits, base)
    assert active_interventions(tiny_qwen.model) == []
    assert all(not m._forward_hooks for m in tiny_qwen.model.modules())


def test_add_activation_shifts_the_stream_by_the_raw_vector(tiny_qwen):
    d = Direction.from_vectors(torch.randn(1, 64) * 3.0, [2], name="v")
    base = grab(tiny_qwen, "resid_pre")
    with add_activation(tiny_qwen, d, layer=2, coeff=0.5):
        assert active_interventions(tiny_qwen.model) == ["add:v@2x0.5"]
        shifted = grab(tiny_qwen, "resid_pre")
    assert torch.allclose(shifted[:, :2], base[:, :2])  # upstream layers untouched
    assert torch.allclose(shifted[:, 2] - base[:, 2], (0.5 * d.raw(2)).expand(3, -1), atol=1e-5)
    assert not torch.allclose(shifted[:, 3], base[:, 3])  # and it propagates


def test_steer_adds_unit_direction_at_each_layer(tiny_qwen):
    d = Direction.from_vectors(torch.randn(2, 64), [1, 3], name="s")
    base = grab(tiny_qwen, "resid_post")
    with steer(tiny_qwen, d, coeff=2.0, site="resid_post", layers=[3]):
        last = grab(tiny_qwen, "resid_post")
    assert torch.allclose(last[:, :3], base[:, :3])
    assert torch.allclose(last[:, 3] - base[:, 3], (2.0 * d.at(3)).expand(3, -1), atol=1e-5)
    with steer(tiny_qwen, d, coeff=2.0, site="resid_post"):
        both = grab(tiny_qwen, "resid_post")
    assert torch.allclose(both[:, 1] - base[:, 1], (2.0 * d.at(1)).expand(3, -1), atol=1e-5)
    with pytest.raises(Exception, match="no vector at layer 2"):
        with steer(tiny_qwen, d, coeff=1.0, layers=[2]):
            pass


@pytest.mark.parametrize("site", SITES)
def test_ablation_of_one_site_and_layer(tiny_qwen, site):
    d = random_direction()
    base = grab(tiny_qwen, site) @ d.vectors[0]
    with ablate_direction(tiny_qwen, d, sites=(site,), layers=[1]):
        acts = grab(tiny_qwen, site) @ d.vectors[0]
    assert acts[:, 1].abs().max() < 1e-5 and base[:, 1].abs().max() > 1e-3
    assert torch.allclose(acts[:, 0], base[:, 0])
