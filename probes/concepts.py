"""Concept vectors per domain per layer, and their split-half reliability.

A domain's concept vector is a difference of means of last-token activations:
``contrast="benign"`` — the domain's harmful prompts minus benign prompts; ``contrast="rest"`` —
the domain minus the pooled other domains (what is specific to the domain, not to harm in general).

Split-half reliability (:func:`concept_reliability`): each set is split into two deterministic
halves, concept vectors are built from each half, and the per-layer cosine between the halves'
vectors, Spearman-Brown corrected, says how well the full set pins the vector down. A layer whose
vectors are not reliable cannot carry a claim about their geometry.

Linear-probe accuracy per domain per layer is :mod:`probes.linear_probe` (re-exported here), the
checks on the activation sets :mod:`probes.domain_acts`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from interp.direction import Direction, DModelMismatchError
from interp.io import atomic_save_safetensors, load_safetensors
from probes.directions import ActsLike
from probes.domain_acts import CONTRASTS, acts_tensor, check_domain_acts, shared_layers
from probes.linear_probe import ProbeAccuracy, probe_accuracy

__all__ = [
    "CONTRASTS",
    "ConceptVectors",
    "ProbeAccuracy",
    "Reliability",
    "concept_vectors",
    "concept_reliability",
    "probe_accuracy",
]

_FORMAT = "emalab.concepts/v1"


@dataclass
class ConceptVectors:
    """Unit concept vectors: ``vectors[c, j]`` is concept ``concepts[c]`` at layer ``layers[j]``."""

    vectors: Float[Tensor, "concept layer d_model"]
    norms: Float[Tensor, "concept layer"]
    """Norm of each difference of means before normalising."""
    concepts: list[str]
    layers: list[int]
    contrast: str = "benign"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vectors.shape[:2] != (len(self.concepts), len(self.layers)):
            raise ValueError(f"vectors {tuple(self.vectors.shape)} do not match {len(self.concepts)} concepts × "
                             f"{len(self.layers)} layers")
        if self.norms.shape != self.vectors.shape[:2]:
            raise ValueError(f"norms {tuple(self.norms.shape)} must be (concept, layer)")

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[-1])

    def at(self, layer: int) -> Float[Tensor, "concept d_model"]:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} not in {self.layers}")
        return self.vectors[:, self.layers.index(layer)]

    def direction(self, concept: str) -> Direction:
        if concept not in self.concepts:
            raise KeyError(f"unknown concept {concept!r}; concepts: {self.concepts}")
        c = self.concepts.index(concept)
        return Direction(self.vectors[c].clone(), list(self.layers), self.norms[c].clone(), concept,
                         {**self.meta, "contrast": self.contrast})

    def as_directions(self) -> dict[str, Direction]:
        return {c: self.direction(c) for c in self.concepts}

    def to(self, dtype_or_device) -> ConceptVectors:
        return replace(self, vectors=self.vectors.to(dtype_or_device), norms=self.norms.to(dtype_or_device))

    def check_model(self, model) -> ConceptVectors:
        from interp.adapter import d_model

        if d_model(model) != self.d_model:
            raise DModelMismatchError(f"concept vectors have d_model={self.d_model} but the model has "
                                      f"d_model={d_model(model)}")
        return self

    def save(self, path: str | Path) -> Path:
        header = {"format": _FORMAT, "concepts": json.dumps(self.concepts), "layers": json.dumps(self.layers),
                  "contrast": self.contrast, "meta": json.dumps(self.meta, default=str)}
        return atomic_save_safetensors(path, {"vectors": self.vectors, "norms": self.norms}, metadata=header)

    @classmethod
    def load(cls, path: str | Path) -> ConceptVectors:
        t, h = load_safetensors(path, _FORMAT, "concept-vector")
        return cls(t["vectors"], t["norms"], json.loads(h["concepts"]), json.loads(h["layers"]), h["contrast"],
                   json.loads(h["meta"]))


def concept_vectors(
    harmful: Mapping[str, ActsLike],
    benign: ActsLike | None = None,
    contrast: str = "benign",
    layers: Sequence[int] | None = None,
    meta: dict | None = None,
) -> ConceptVectors:
    """Difference-of-means concept vector per domain per layer (means accumulated in float64).

    Args:
        harmful: ``{domain: activations (batch, layer, d_model)}``.
        benign: the benign activations (needed for ``contrast="benign"``).
        contrast: ``"benign"`` (domain − benign) or ``"rest"`` (domain − pooled other domains).
    """
    check_domain_acts(harmful, benign, contrast)
    layers = shared_layers(harmful, benign, layers)
    names = list(harmful)
    sums = torch.stack([acts_tensor(harmful[n]).double().sum(0) for n in names])  # concept layer d_model
    counts = torch.tensor([len(acts_tensor(harmful[n])) for n in names], dtype=torch.float64)
    means = sums / counts[:, None, None]
    if contrast == "benign":
        ref = acts_tensor(benign).double().mean(0)[None]
    else:
        ref = (sums.sum(0)[None] - sums) / (counts.sum() - counts)[:, None, None]
    diff = means - ref
    norms = diff.norm(dim=-1)
    if (norms == 0).any():
        raise ValueError("a domain's mean equals its contrast's mean exactly; duplicate activation sets?")
    dtype = acts_tensor(harmful[names[0]]).dtype
    info = {"n": {n: int(c) for n, c in zip(names, counts.tolist(), strict=True)}, **(meta or {})}
    if contrast == "benign":
        info["n_benign"] = len(acts_tensor(benign))
    return ConceptVectors((diff / norms[..., None]).to(dtype), norms.to(dtype), names, layers, contrast, info)


@dataclass
class Reliability:
    """Split-half reliability of concept vectors: ``corrected[c, j]`` for ``concepts[c]`` at ``layers[j]``."""

    split_half: Float[Tensor, "concept layer"]
    """Cosine between the unit vectors built from the two halves (float64)."""
    corrected: Float[Tensor, "concept layer"]
    """The same, Spearman-Brown corrected to the full set's size."""
    concepts: list[str]
    layers: list[int]
    n_halves: dict[str, list[int]]
    """Items in each half, per set (benign included for ``contrast="benign"``)."""

    def mean(self, layers: Sequence[int] | None = None) -> float:
        """Mean corrected reliability over ``layers`` (default: all) and every concept."""
        cols = [self.layers.index(layer) for layer in (self.layers if layers is None else layers)]
        return float(self.corrected[:, cols].mean())

    def per_layer(self) -> list[float]:
        """Mean corrected reliability over concepts, per layer."""
        return self.corrected.mean(0).tolist()


def concept_reliability(
    harmful: Mapping[str, ActsLike], benign: ActsLike | None = None, contrast: str = "benign",
    layers: Sequence[int] | None = None,
) -> Reliability:
    """Split-half reliability of :func:`concept_vectors` per concept per layer.

    Every set (each domain, and benign) is split into its even and odd items
    (:func:`evals.grouped_stats.split_half`, so deterministic); concept vectors are built from the first
    halves and from the second halves alone (so the two share no item, the contrast's included),
    and their per-layer cosine is corrected with Spearman-Brown (:func:`evals.grouped_stats.spearman_brown`).
    """
    from evals.grouped_stats import spearman_brown, split_half

    check_domain_acts(harmful, benign, contrast)
    layers = shared_layers(harmful, benign, layers)
    sets = {**{n: acts_tensor(a) for n, a in harmful.items()}, **({"benign": acts_tensor(benign)} if benign is not None
                                                             and contrast == "benign" else {})}
    halves = {n: split_half(len(t)) for n, t in sets.items()}
    vecs = []
    for k in (0, 1):
        part = {n: sets[n][torch.as_tensor(halves[n][k])] for n in harmful}
        ref = sets["benign"][torch.as_tensor(halves["benign"][k])] if "benign" in sets else None
        vecs.append(concept_vectors(part, ref, contrast, layers).vectors.double())
    cos = (vecs[0] * vecs[1]).sum(-1).clamp(-1.0, 1.0)
    return Reliability(cos, torch.as_tensor(spearman_brown(cos.numpy()), dtype=torch.float64), list(harmful),
                       list(layers), {n: [len(h[0]), len(h[1])] for n, h in halves.items()})
