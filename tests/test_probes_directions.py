"""Direction objects and builders: planted-direction recovery, persistence, model checks."""

from __future__ import annotations

import pytest
import torch
from jaxtyping import TypeCheckError

from interp.activations import ActivationSet
from interp.direction import Direction, DModelMismatchError, MissingLayerError
from probes.directions import DirectionBuilder, logistic, mean_difference, pca


def planted(n: int = 1000, layers: int = 3, d: int = 32, shift: float = 5.0, paired: bool = False):
    """Two Gaussian clouds that differ along a known unit vector per layer."""
    g = torch.Generator().manual_seed(0)
    truth = torch.randn(layers, d, generator=g)
    truth = truth / truth.norm(dim=-1, keepdim=True)
    neg = torch.randn(n, layers, d, generator=g)
    pos = (neg if paired else torch.randn(n, layers, d, generator=g)) + shift * truth
    if paired:
        pos = pos + 0.3 * torch.randn(n, layers, d, generator=g)
    return pos, neg, truth


@pytest.mark.parametrize("builder", [mean_difference(), pca(), pca(paired=True), logistic()],
                         ids=["mean_difference", "pca", "pca_paired", "logistic"])
def test_builders_recover_planted_direction(builder):
    pos, neg, truth = planted(paired=builder.params.get("paired", False))
    d = builder(pos, neg, layers=[4, 5, 6], name="planted")
    assert isinstance(builder, DirectionBuilder) and d.layers == [4, 5, 6]
    cos = torch.einsum("ld,ld->l", d.vectors.double(), truth.double())
    threshold = 0.99 if builder.kind != "logistic" else 0.9  # a regularised probe trades some alignment
    assert (cos > threshold).all(), cos
    assert torch.allclose(d.vectors.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_mean_difference_matches_float64_means_and_keeps_norm():
    pos, neg, _ = planted()
    d = mean_difference()(pos, neg)
    raw = pos.double().mean(0) - neg.double().mean(0)
    assert torch.allclose(d.norms.double(), raw.norm(dim=-1), rtol=1e-5)
    assert torch.allclose(d.raw(1).double(), raw[1], atol=1e-5)
    assert d.meta["builder"] == "mean_difference" and d.meta["n_pos"] == 1000


def test_builder_accepts_activation_sets_and_checks_layers():
    pos, neg, _ = planted()
    a = ActivationSet(pos, [f"p{i}" for i in range(len(pos))], [2, 5, 7])
    b = ActivationSet(neg, [f"n{i}" for i in range(len(neg))], [2, 5, 7])
    assert mean_difference()(a, b).layers == [2, 5, 7]
    with pytest.raises(ValueError, match="differ"):
        mean_difference()(a, ActivationSet(neg, b.prompt_ids, [1, 2, 3]))
    with pytest.raises((ValueError, TypeCheckError)):  # TypeCheckError under --jaxtyping-packages
        mean_difference()(pos, neg[:, :2])
    assert mean_difference()(pos, neg[:10]).meta["n_neg"] == 10  # unequal set sizes are fine


def test_direction_access_select_and_to():
    d = Direction.from_vectors(torch.randn(3, 8), [1, 3, 5], name="x")
    assert d.at(3).shape == (8,) and not d.is_global
    with pytest.raises(MissingLayerError, match="layers: \\[1, 3, 5\\]"):
        d.at(2)
    g = d.select(3)
    assert g.is_global and torch.equal(g.vector_for(17), d.at(3)) and g.meta["source_layer"] == 3
    h = d.to(torch.float64)
    assert h.vectors.dtype == torch.float64 and d.vectors.dtype == torch.float32
    with pytest.raises(ValueError, match="zero vector"):
        Direction.from_vectors(torch.zeros(2, 8), [0, 1])


def test_save_load_roundtrip_and_d_model_check(tmp_path, tiny_qwen):
    d = Direction.from_vectors(torch.randn(2, 64), [0, 3], name="refusal", meta={"model": "tiny", "k": [1, 2]})
    path = d.save(tmp_path / "sub" / "d.safetensors")
    e = Direction.load(path, model=tiny_qwen.model)
    assert torch.equal(e.vectors, d.vectors) and torch.equal(e.norms, d.norms)
    assert e.layers == [0, 3] and e.name == "refusal" and e.meta == d.meta
    wrong = Direction.from_vectors(torch.randn(1, 896), [0], name="big", meta={"model": "qwen-0.5b"})
    with pytest.raises(DModelMismatchError, match="d_model=896.*d_model=64"):
        wrong.check_model(tiny_qwen.model)
    with pytest.raises(MissingLayerError, match="4 layers"):
        Direction.from_vectors(torch.randn(1, 64), [9]).check_model(tiny_qwen.model)
    with pytest.raises(FileNotFoundError):
        Direction.load(tmp_path / "missing.safetensors")
