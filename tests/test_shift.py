"""Compliance-shift directions: planted recovery, cross-layer cosine properties, cosines with the
refusal direction and concepts, the random control, and the d_model check before ablation."""

from __future__ import annotations

import pytest
import torch

from interp.direction import Direction, DModelMismatchError
from probes.concepts import concept_vectors
from probes.shift import compliance_shift, cross_layer_cosine, random_like, shift_cosines

L, D = 4, 32


def _planted(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, L, D, generator=g)
    v = torch.randn(L, D, generator=g)
    v = v / v.norm(dim=-1, keepdim=True)
    size = torch.tensor([0.5, 1.0, 2.0, 4.0])
    after = base + size[None, :, None] * v[None] + 0.01 * torch.randn(n, L, D, generator=g)
    return base, after, v, size


def test_planted_shift_is_recovered():
    base, after, v, size = _planted()
    d = compliance_shift(base, after)
    cos = (d.vectors.double() * v.double()).sum(-1)
    assert (cos > 0.99).all()
    assert torch.allclose(d.norms.double(), size.double(), rtol=0.05)
    assert d.layers == list(range(L)) and d.meta["builder"] == "compliance_shift"


def test_means_and_mappings_agree():
    base, after, v, _ = _planted()
    from_means = compliance_shift(base.mean(0), after.mean(0))
    paired = compliance_shift(base, after)
    assert torch.allclose(from_means.vectors, paired.vectors, atol=1e-5)
    # two sets of very different size count equally
    b2, a2 = base[:5], base[:5] - 3 * v[None]  # opposite shift on a small set
    mixed = compliance_shift({"big": base, "small": b2}, {"big": after, "small": a2}, layers=[3, 4, 5, 6])
    expected = ((after - base).double().mean(0) + (a2 - b2).double().mean(0)) / 2
    assert torch.allclose(mixed.vectors.double(), expected / expected.norm(dim=-1, keepdim=True), atol=1e-6)
    assert mixed.layers == [3, 4, 5, 6] and mixed.meta["sets"] == ["big", "small"]


@pytest.mark.parametrize("base, after, match", [
    (torch.zeros(3, L, D), torch.zeros(4, L, D), "differ in shape"),
    ({"a": torch.zeros(L, D)}, {"b": torch.zeros(L, D)}, "prompt sets differ"),
    (torch.zeros(L, D), {"a": torch.zeros(L, D)}, "mappings for both"),
    (torch.zeros(L, D), torch.zeros(L, D), "zero vector"),
])
@pytest.mark.usefixtures("no_runtime_typecheck")
def test_bad_inputs(base, after, match):
    with pytest.raises(ValueError, match=match):
        compliance_shift(base, after)


def test_cross_layer_cosine_properties():
    base, after, _, _ = _planted()
    m = cross_layer_cosine(compliance_shift(base, after))
    assert m.shape == (L, L) and m.dtype == torch.float64
    assert torch.equal(m, m.T) and (m.abs() <= 1).all() and torch.equal(m.diagonal(), torch.ones(L, dtype=torch.float64))
    same = Direction.from_vectors(torch.ones(L, D), list(range(L)))
    assert torch.allclose(cross_layer_cosine(same), torch.ones(L, L, dtype=torch.float64))


def test_shift_cosines_with_refusal_and_concepts():
    base, after, v, _ = _planted()
    shift = compliance_shift(base, after)
    refusal = Direction.from_vectors(-v[2], [2])  # global, anti-aligned with the layer-2 shift
    g = torch.Generator().manual_seed(1)
    acts = {"cyber": torch.randn(8, L, D, generator=g) + 5 * v[None], "bias": torch.randn(8, L, D, generator=g)}
    concepts = concept_vectors(acts, torch.randn(8, L, D, generator=g))
    out = shift_cosines(shift, refusal, concepts)
    assert set(out) == {"refusal", "cyber", "bias"} and all(len(x) == L for x in out.values())
    assert out["refusal"][2] < -0.99
    assert all(-1 <= c <= 1 for xs in out.values() for c in xs)
    assert min(out["cyber"]) > max(abs(c) for c in out["bias"])


def test_random_like_is_seeded_and_matches_norms():
    base, after, _, _ = _planted()
    shift = compliance_shift(base, after)
    r0, r0b, r1 = random_like(shift, 0), random_like(shift, 0), random_like(shift, 1)
    assert torch.equal(r0.vectors, r0b.vectors) and not torch.equal(r0.vectors, r1.vectors)
    assert torch.equal(r0.norms, shift.norms) and r0.layers == shift.layers
    assert torch.allclose(r0.vectors.norm(dim=-1), torch.ones(L), atol=1e-6)
    assert (r0.vectors * shift.vectors).sum(-1).abs().max() < 0.7  # random in 32 dims: far from aligned


def test_ablating_a_foreign_width_is_refused(tiny_qwen):
    from probes.interventions import ablate_direction

    foreign = Direction.from_vectors(torch.ones(4, 48), [0, 1, 2, 3], name="other-model-shift")
    with pytest.raises(DModelMismatchError, match=r"d_model=48.*d_model=64"):
        with ablate_direction(tiny_qwen, foreign):
            pass


def test_ablating_the_shift_removes_it(tiny_qwen):
    """The per-layer shift ablated at every layer: each block's output stream has ~0 projection on it."""
    from interp.activations import collect_activations
    from probes.interventions import ablate_direction

    prompts = ["hello there", "tell me something", "another prompt"]
    acts = collect_activations(tiny_qwen, prompts, site="resid_post")
    fake_after = acts + torch.linspace(1, 2, acts.shape[1])[None, :, None] * torch.ones(acts.shape[-1])
    shift = compliance_shift(acts, fake_after)
    with ablate_direction(tiny_qwen, shift):
        ablated = collect_activations(tiny_qwen, prompts, site="resid_post")
    proj = torch.einsum("bld,ld->bl", ablated.double(), shift.vectors.double())
    assert proj.abs().max() < 1e-4
