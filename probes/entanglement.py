"""Entanglement of concept vectors with each other and with the refusal direction.

* :func:`similarity_matrix` — per layer, cosine similarity among concept vectors (+ refusal).
* :func:`refusal_projection` — each domain's concept vector projected on the refusal direction.
* :func:`drift` — how far each concept vector turned between two models (before/after unlearning).
* :func:`early_similarity` — per-domain mean similarity to a target over a depth band.

Cosines are computed in float64 from unit vectors, symmetrised and clipped to [-1, 1] with an
exact unit diagonal, so downstream code can rely on those properties.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from interp.direction import Direction
from probes.concepts import ConceptVectors

__all__ = [
    "BANDS",
    "Similarity",
    "similarity_matrix",
    "refusal_projection",
    "drift",
    "early_similarity",
    "depth_bands",
    "band_layers",
]

BANDS = {"early": (0.0, 1 / 3), "middle": (1 / 3, 2 / 3), "late": (2 / 3, 1.0)}
"""Thirds of the depth, as fractions ``[lo, hi)`` of the number of layers (the last includes 1.0)."""

Concepts = ConceptVectors | Mapping[str, Direction]


def _directions(concepts: Concepts) -> dict[str, Direction]:
    return concepts.as_directions() if isinstance(concepts, ConceptVectors) else dict(concepts)


def _n_layers(concepts: Concepts, n_layers: int | None) -> int:
    if n_layers is not None:
        return n_layers
    meta = concepts.meta if isinstance(concepts, ConceptVectors) else next(iter(concepts.values())).meta
    if "n_layers" in meta:
        return int(meta["n_layers"])
    layers = concepts.layers if isinstance(concepts, ConceptVectors) else next(iter(concepts.values())).layers
    return max(layers) + 1


def _common_layers(dirs: Sequence[Direction], layers: Sequence[int] | None) -> list[int]:
    per_layer = [set(d.layers) for d in dirs if not d.is_global]
    if not per_layer:
        if layers is None:
            raise ValueError("all directions are global; pass the layers to evaluate")
        return sorted(layers)
    common = set.intersection(*per_layer)
    if layers is not None:
        missing = sorted(set(layers) - common)
        if missing:
            raise KeyError(f"layers {missing} are missing from some directions; common layers: {sorted(common)}")
        return sorted(layers)
    if not common:
        raise ValueError("the directions share no layer")
    return sorted(common)


@dataclass
class Similarity:
    """``matrix[j, a, b]``: cosine between ``names[a]`` and ``names[b]`` at ``layers[j]``."""

    matrix: Float[Tensor, "layer concept concept"]
    names: list[str]
    layers: list[int]

    def at(self, layer: int) -> Float[Tensor, "concept concept"]:
        return self.matrix[self.layers.index(layer)]

    def to_dict(self) -> dict:
        return {"names": self.names, "layers": self.layers, "matrix": self.matrix.tolist()}


def _cosines(vecs: Float[Tensor, "layer concept d_model"]) -> Float[Tensor, "layer concept concept"]:
    v = vecs.double()
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    m = torch.einsum("lad,lbd->lab", v, v)
    m = ((m + m.transpose(1, 2)) / 2).clamp(-1.0, 1.0)
    m.diagonal(dim1=1, dim2=2).fill_(1.0)
    return m


def similarity_matrix(
    concepts: Concepts, refusal: Direction | None = None, layers: Sequence[int] | None = None,
    refusal_name: str = "refusal",
) -> Similarity:
    """Per-layer cosine-similarity matrix of the concept vectors, with the refusal direction
    appended as the last row/column when given (a global refusal direction is used at every layer)."""
    dirs = _directions(concepts)
    if refusal is not None:
        dirs[refusal_name] = refusal
    layers = _common_layers(list(dirs.values()), layers)
    vecs = torch.stack([torch.stack([d.vector_for(layer).double() for d in dirs.values()]) for layer in layers])
    return Similarity(_cosines(vecs), list(dirs), layers)


def refusal_projection(
    concepts: Concepts, refusal: Direction, normalize: bool = False, layers: Sequence[int] | None = None
) -> dict[str, list[float]]:
    """Per domain, per layer: the domain's raw concept vector (difference of means) projected on the
    unit refusal direction; with ``normalize`` the cosine instead. Layers: the concepts' layers."""
    dirs = _directions(concepts)
    layers = _common_layers([*dirs.values(), refusal], layers)
    out = {}
    for name, d in dirs.items():
        vals = []
        for layer in layers:
            cos = float(d.vector_for(layer).double() @ refusal.vector_for(layer).double())
            scale = 1.0 if normalize else float(d.norms[0 if d.is_global else d.layers.index(layer)])
            vals.append(max(-1.0, min(1.0, cos)) * scale)
        out[name] = vals
    return out


def drift(before: Concepts, after: Concepts, layers: Sequence[int] | None = None) -> dict[str, list[float]]:
    """Per domain, per layer: cosine between the concept vector before and after (1 = unchanged)."""
    b, a = _directions(before), _directions(after)
    if set(b) != set(a):
        raise ValueError(f"the two sets have different concepts: {sorted(b)} vs {sorted(a)}")
    layers = _common_layers([*b.values(), *a.values()], layers)
    return {name: [max(-1.0, min(1.0, float(b[name].vector_for(layer).double() @ a[name].vector_for(layer).double())))
                   for layer in layers] for name in b}


def band_layers(band: tuple[float, float] | Sequence[int] | range | str, n_layers: int) -> list[int]:
    """Resolve a depth band to layer indices.

    Args:
        band: a name in :data:`BANDS`, a ``(lo, hi)`` pair of depth fractions in [0, 1] (layers
            with ``lo ≤ layer/n_layers < hi``; ``hi = 1`` includes the last layer), or explicit layers.
    """
    if isinstance(band, str):
        if band not in BANDS:
            raise KeyError(f"unknown band {band!r}; bands: {', '.join(BANDS)}")
        band = BANDS[band]
    if isinstance(band, tuple) and len(band) == 2 and all(isinstance(x, float) for x in band):
        lo, hi = band
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"a fractional band needs 0 <= lo < hi <= 1, got {band}")
        out = [layer for layer in range(n_layers) if lo * n_layers <= layer < hi * n_layers]
        if hi == 1.0 and n_layers - 1 not in out:
            out.append(n_layers - 1)
    else:
        out = sorted(int(x) for x in band)
        bad = [x for x in out if not 0 <= x < n_layers]
        if bad:
            raise ValueError(f"layers {bad} are outside 0..{n_layers - 1}")
    if not out:
        raise ValueError(f"band {band} holds no layer of a {n_layers}-layer model")
    return out


def depth_bands(n_layers: int) -> dict[str, list[int]]:
    """The early / middle / late thirds of a model's layers."""
    return {name: band_layers(name, n_layers) for name in BANDS}


def early_similarity(
    concepts: Concepts,
    target: Direction | Float[Tensor, " d_model"],
    band: tuple[float, float] | Sequence[int] | str = (0.0, 1 / 3),
    n_layers: int | None = None,
) -> dict[str, float]:
    """Per domain, the mean cosine to ``target`` over the layers of ``band`` (default: first third).

    Layers of the band that the concept vectors lack are skipped; an empty overlap is an error.
    """
    dirs = _directions(concepts)
    if isinstance(target, Tensor):
        target = Direction.from_vectors(target, [0], "target")
    wanted = band_layers(band, _n_layers(concepts, n_layers))
    everything = [*dirs.values(), target]
    have = wanted if all(d.is_global for d in everything) else _common_layers(everything, None)
    layers = [layer for layer in wanted if layer in have]
    if not layers:
        raise ValueError(f"the band's layers {wanted} hold no concept vector (available: {have})")
    sims = drift(dirs, {name: target for name in dirs}, layers)
    return {name: sum(v) / len(v) for name, v in sims.items()}
