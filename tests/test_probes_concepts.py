"""Concept vectors and probes on planted domain structure."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from interp.activations import ActivationSet
from probes.concepts import ConceptVectors, concept_vectors, probe_accuracy

D, L = 48, 3


def planted_domains(n: int = 60, shift: float = 4.0, seed: int = 0):
    """Three domains, each = benign cloud + (shared harm axis) + (its own axis)."""
    g = torch.Generator().manual_seed(seed)
    axes = torch.linalg.qr(torch.randn(D, 4, generator=g)).Q.T  # orthonormal: harm, a, b, c
    benign = torch.randn(n, L, D, generator=g)
    domains = {name: torch.randn(n, L, D, generator=g) + shift * (axes[0] + axes[i + 1])
               for i, name in enumerate(["a", "b", "c"])}
    return domains, benign, axes


def test_benign_contrast_recovers_harm_plus_domain_axis():
    domains, benign, axes = planted_domains(n=400)
    cv = concept_vectors(domains, benign)
    assert cv.vectors.shape == (3, L, D) and cv.concepts == ["a", "b", "c"] and cv.contrast == "benign"
    for i, name in enumerate(cv.concepts):
        truth = (axes[0] + axes[i + 1]) / 2 ** 0.5
        assert (cv.vectors[i] @ truth > 0.99).all()
    assert torch.allclose(cv.norms, torch.full((3, L), 4.0 * 2 ** 0.5), rtol=0.05)


def test_rest_contrast_removes_the_shared_axis():
    domains, benign, axes = planted_domains(n=400)
    cv = concept_vectors(domains, contrast="rest")
    for i in range(3):
        assert (cv.vectors[i] @ axes[0]).abs().max() < 0.1  # shared harm cancels
        truth = axes[i + 1] - (axes[1:].sum(0) - axes[i + 1]) / 2
        assert (cv.vectors[i] @ (truth / truth.norm()) > 0.99).all()


def test_rest_uses_pooled_other_domains_in_float64():
    domains, _, _ = planted_domains(n=10)
    domains["b"] = domains["b"][:4]  # unequal sizes: pooled, not mean of means
    cv = concept_vectors(domains, contrast="rest")
    rest = torch.cat([domains["b"], domains["c"]]).double().mean(0)
    raw = domains["a"].double().mean(0) - rest
    assert torch.allclose(cv.vectors[0].double(), raw / raw.norm(dim=-1, keepdim=True), atol=1e-6)


def test_activation_sets_layers_and_errors():
    domains, benign, _ = planted_domains(n=8)
    sets = {k: ActivationSet(v, [str(i) for i in range(len(v))], [3, 7, 11]) for k, v in domains.items()}
    cv = concept_vectors(sets, ActivationSet(benign, [str(i) for i in range(8)], [3, 7, 11]))
    assert cv.layers == [3, 7, 11] and cv.at(7).shape == (3, D)
    with pytest.raises(ValueError, match="benign"):
        concept_vectors(domains)
    with pytest.raises(ValueError, match="two domains"):
        concept_vectors({"a": domains["a"]}, contrast="rest")
    with pytest.raises(ValueError, match="contrast"):
        concept_vectors(domains, benign, contrast="other")


def test_save_load_and_directions(tmp_path):
    domains, benign, _ = planted_domains(n=8)
    cv = concept_vectors(domains, benign, meta={"model": "planted"})
    back = ConceptVectors.load(cv.save(tmp_path / "cv.safetensors"))
    assert torch.equal(back.vectors, cv.vectors) and back.concepts == cv.concepts and back.meta == cv.meta
    d = back.direction("b")
    assert d.layers == [0, 1, 2] and torch.equal(d.vectors, cv.vectors[1]) and d.name == "b"
    assert set(back.as_directions()) == {"a", "b", "c"}
    with pytest.raises(KeyError, match="unknown concept"):
        back.direction("z")


@pytest.mark.parametrize("method", ["batched", "logistic"])
def test_probe_accuracy_separable_vs_noise(method):
    domains, benign, _ = planted_domains(n=40, shift=3.0)
    res = probe_accuracy(domains, benign, method=method, n_folds=4)
    acc = res.as_array()
    assert acc.shape == (3, L) and (acc > 0.85).all()
    if method == "logistic":
        return  # the reference fitter is slow on noise; agreement with it is tested below
    noise = {k: torch.randn_like(v) for k, v in domains.items()}
    res_noise = probe_accuracy(noise, torch.randn_like(benign), method=method, n_folds=4)
    assert abs(res_noise.as_array().mean() - 0.5) < 0.15
    summary = res.summary()
    assert set(summary) == {"a", "b", "c"} and summary["a"]["chance"] == 0.5


def test_batched_matches_sklearn_logistic():
    domains, benign, _ = planted_domains(n=40, shift=0.6, seed=1)
    fast = probe_accuracy(domains, benign, method="batched", n_folds=5).as_array()
    logit = probe_accuracy(domains, benign, method="logistic", n_folds=5).as_array()
    assert np.abs(fast - logit).max() <= 0.02, (fast, logit)


def test_probe_rest_contrast_and_folds_are_seeded():
    domains, _, _ = planted_domains(n=30, shift=3.0)
    a = probe_accuracy(domains, contrast="rest", seed=3)
    b = probe_accuracy(domains, contrast="rest", seed=3)
    assert a.accuracy == b.accuracy and a.n_neg["a"] == 60 and (a.as_array() > 0.8).all()


def test_split_half_reliability_is_high_for_a_planted_axis_and_low_for_noise():
    from probes.concepts import concept_reliability

    domains, benign, _ = planted_domains(n=200, shift=4.0)
    rel = concept_reliability(domains, benign)
    assert rel.concepts == ["a", "b", "c"] and rel.corrected.shape == (3, L) and rel.n_halves["benign"] == [100, 100]
    assert rel.mean() > 0.95 and (rel.corrected >= rel.split_half).all()  # Spearman-Brown raises r in (0, 1)
    noise = {k: torch.randn(200, L, D) for k in ("a", "b", "c")}
    low = concept_reliability(noise, torch.randn(200, L, D))
    assert abs(low.mean()) < 0.3 and len(low.per_layer()) == L
    # The halves share nothing: shifting only the odd benign items moves the two halves apart.
    odd = benign.clone()
    odd[1::2] += 50.0 * torch.linalg.qr(torch.randn(D, 1)).Q.T[0]
    assert concept_reliability(domains, odd).mean() < rel.mean() - 0.5


def test_split_half_reliability_rest_contrast_and_layers():
    from probes.concepts import concept_reliability

    domains, _, _ = planted_domains(n=200)
    rel = concept_reliability(domains, contrast="rest")
    assert rel.mean() > 0.9 and "benign" not in rel.n_halves
    assert rel.mean([0]) == pytest.approx(float(rel.corrected[:, 0].mean()))
