"""Entanglement measures: similarity matrices are symmetric, unit-diagonal and bounded; planted
geometry comes back out; bands resolve as documented."""

from __future__ import annotations

import pytest
import torch

from interp.direction import Direction
from probes.concepts import ConceptVectors
from probes.entanglement import (
    band_layers,
    depth_bands,
    drift,
    early_similarity,
    refusal_projection,
    similarity_matrix,
)

N_LAYERS, D = 6, 32


def random_concepts(n: int = 4, seed: int = 0) -> ConceptVectors:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, N_LAYERS, D, generator=g)
    return ConceptVectors(raw / raw.norm(dim=-1, keepdim=True), raw.norm(dim=-1), [f"c{i}" for i in range(n)],
                          list(range(N_LAYERS)), meta={"n_layers": N_LAYERS})


def test_similarity_matrix_properties():
    cv = random_concepts()
    refusal = Direction.from_vectors(torch.randn(D), [3], "refusal")
    sim = similarity_matrix(cv, refusal)
    m = sim.matrix
    assert sim.names == ["c0", "c1", "c2", "c3", "refusal"] and sim.layers == list(range(N_LAYERS))
    assert m.shape == (N_LAYERS, 5, 5)
    assert torch.equal(m, m.transpose(1, 2))
    assert torch.equal(m.diagonal(dim1=1, dim2=2), torch.ones(N_LAYERS, 5, dtype=m.dtype))
    assert m.abs().max() <= 1.0
    j = 2
    expected = float(cv.vectors[1, j].double() @ cv.vectors[2, j].double())
    assert sim.at(j)[1, 2] == pytest.approx(expected, abs=1e-6)
    assert sim.at(j)[0, 4] == pytest.approx(float(cv.vectors[0, j].double() @ refusal.vectors[0].double()), abs=1e-6)


def test_planted_geometry_and_clipping():
    v = torch.nn.functional.normalize(torch.randn(D), dim=0)
    w = torch.nn.functional.normalize(torch.randn(D), dim=0)
    dirs = {"a": Direction.from_vectors(torch.stack([v, v]), [0, 1], "a"),
            "a_again": Direction.from_vectors(torch.stack([v * 3, v * 1e-3]), [0, 1], "a_again"),
            "neg": Direction.from_vectors(torch.stack([-v, w]), [0, 1], "neg")}
    m = similarity_matrix(dirs).matrix
    assert torch.allclose(m[:, 0, 1], torch.ones(2, dtype=m.dtype))
    assert m[0, 0, 2] == pytest.approx(-1.0) and m.abs().max() <= 1.0


def test_refusal_projection_and_drift():
    cv = random_concepts()
    refusal = Direction.from_vectors(cv.vectors[0] * 2.0, list(range(N_LAYERS)), "refusal")  # = concept c0
    cos = refusal_projection(cv, refusal, normalize=True)
    raw = refusal_projection(cv, refusal)
    assert cos["c0"] == pytest.approx([1.0] * N_LAYERS)
    assert raw["c0"] == pytest.approx(cv.norms[0].tolist(), rel=1e-5)
    assert all(-1.0 <= x <= 1.0 for vals in cos.values() for x in vals)
    assert drift(cv, cv)["c2"] == pytest.approx([1.0] * N_LAYERS)
    flipped = ConceptVectors(-cv.vectors, cv.norms, cv.concepts, cv.layers)
    assert drift(cv, flipped)["c1"] == pytest.approx([-1.0] * N_LAYERS)
    with pytest.raises(ValueError, match="different concepts"):
        drift(cv, random_concepts(n=3))


def test_early_similarity_uses_the_band_only():
    v = torch.nn.functional.normalize(torch.randn(D), dim=0)
    w = torch.nn.functional.normalize(torch.randn(D) - (torch.randn(D) @ v) * v, dim=0)
    w = torch.nn.functional.normalize(w - (w @ v) * v, dim=0)  # orthogonal to v
    vecs = torch.stack([v, v, w, w, w, w])  # aligned with v only in layers 0-1 (the first third)
    concepts = {"x": Direction.from_vectors(vecs, list(range(N_LAYERS)), "x", {"n_layers": N_LAYERS})}
    target = Direction.from_vectors(v, [0], "target")
    assert early_similarity(concepts, target)["x"] == pytest.approx(1.0)
    assert early_similarity(concepts, target, band="late")["x"] == pytest.approx(0.0, abs=1e-6)
    assert early_similarity(concepts, target, band=[0, 2])["x"] == pytest.approx(0.5, abs=1e-6)
    assert early_similarity(concepts, v, band=(0.0, 0.5))["x"] == pytest.approx(2 / 3, abs=1e-6)


@pytest.mark.parametrize("n", [6, 24, 28, 3])
def test_bands_partition_the_layers(n):
    bands = depth_bands(n)
    flat = bands["early"] + bands["middle"] + bands["late"]
    assert sorted(flat) == list(range(n)) and len(set(flat)) == n
    assert bands["early"][0] == 0 and bands["late"][-1] == n - 1


def test_band_errors():
    assert band_layers((0.5, 1.0), 24) == list(range(12, 24))
    assert band_layers(range(3, 6), 24) == [3, 4, 5]
    with pytest.raises(KeyError, match="early"):
        band_layers("deep", 24)
    with pytest.raises(ValueError, match="0 <= lo < hi <= 1"):
        band_layers((0.6, 0.2), 24)
    with pytest.raises(ValueError, match="outside"):
        band_layers([30], 24)
