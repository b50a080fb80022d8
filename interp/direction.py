"""A :class:`Direction`: one unit vector per layer (a concept vector, a refusal direction), saved as
safetensors with JSON metadata.

It lives in ``interp`` (not ``probes``) so that inspection can project onto directions without the
library's lower layer importing the upper one; ``probes.directions`` re-exports it with the builders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from interp.io import atomic_save_safetensors, load_safetensors

__all__ = ["Direction", "DModelMismatchError", "MissingLayerError", "unit"]

_FORMAT = "emalab.direction/v1"


class DModelMismatchError(ValueError):
    """A direction's width does not match the model's residual stream."""


class MissingLayerError(KeyError):
    """A layer was asked of a direction that has no vector for it."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def unit(x: Float[Tensor, "... d_model"], eps: float = 1e-12) -> Float[Tensor, "... d_model"]:
    """``x / ||x||`` along the last dimension, computed in float64 and returned in ``x``'s dtype."""
    x64 = x.double()
    return (x64 / x64.norm(dim=-1, keepdim=True).clamp_min(eps)).to(x.dtype)


@dataclass
class Direction:
    """A unit vector per layer: ``vectors[j]`` is the direction at ``layers[j]``.

    A direction with a single layer is a *global* direction (e.g. the refusal direction picked at one
    layer and ablated everywhere, as in Arditi et al.): :meth:`vector_for` returns it for any layer.
    """

    vectors: Float[Tensor, "layer d_model"]
    """Unit vectors, one row per entry of ``layers``."""
    layers: list[int]
    """Model layer of each row, ascending."""
    norms: Float[Tensor, " layer"]
    """Norm of each vector before normalising (e.g. the size of a difference of means), so the raw
    vector used for activation addition is ``norms[j] * vectors[j]``."""
    name: str = "direction"
    meta: dict = field(default_factory=dict)
    """JSON-able provenance (builder, model, prompt sets, site, position, n_layers...)."""

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise ValueError(f"vectors must be (layer, d_model), got shape {tuple(self.vectors.shape)}")
        self.layers = [int(x) for x in self.layers]
        if len(self.layers) != self.vectors.shape[0]:
            raise ValueError(f"{len(self.layers)} layers for {self.vectors.shape[0]} vectors")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"duplicate layers in {self.layers}")
        if self.norms.shape != (len(self.layers),):
            raise ValueError(f"norms must have shape ({len(self.layers)},), got {tuple(self.norms.shape)}")
        if not torch.isfinite(self.vectors).all():
            raise FloatingPointError(f"direction {self.name!r} has non-finite entries")

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_vectors(
        cls,
        vectors: Float[Tensor, "layer d_model"] | Float[Tensor, " d_model"],
        layers: Sequence[int],
        name: str = "direction",
        meta: dict | None = None,
    ) -> Direction:
        """Normalise raw vectors (keeping their norms). A 1-D vector is one global direction at ``layers[0]``."""
        if vectors.ndim == 1:
            vectors = vectors[None]
        raw = vectors.detach().double()
        norms = raw.norm(dim=-1)
        if (norms == 0).any():
            bad = [layers[i] for i in (norms == 0).nonzero()[:, 0].tolist()]
            raise ValueError(f"zero vector at layer(s) {bad}; a direction needs a non-zero vector")
        dtype = vectors.dtype if vectors.is_floating_point() else torch.float32
        return cls((raw / norms[:, None]).to(dtype), list(layers), norms.to(dtype), name, dict(meta or {}))

    # -- access ----------------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[-1])

    @property
    def is_global(self) -> bool:
        return len(self.layers) == 1

    def at(self, layer: int) -> Float[Tensor, " d_model"]:
        """The unit vector stored for ``layer`` (exactly that layer)."""
        if layer not in self.layers:
            raise MissingLayerError(f"direction {self.name!r} has no vector at layer {layer}; layers: {self.layers}")
        return self.vectors[self.layers.index(layer)]

    def raw(self, layer: int) -> Float[Tensor, " d_model"]:
        """The vector at ``layer`` at its original size (``norm * unit``), for activation addition."""
        vec = self.at(layer)
        return vec * self.norms[self.layers.index(layer)]

    def vector_for(self, layer: int) -> Float[Tensor, " d_model"]:
        """The unit vector to use at ``layer``: the global vector, or the one stored for ``layer``."""
        return self.vectors[0] if self.is_global else self.at(layer)

    def select(self, layer: int) -> Direction:
        """A global direction made of this direction's vector at ``layer``."""
        self.at(layer)  # raises with the available layers
        j = self.layers.index(layer)
        return replace(self, vectors=self.vectors[j:j + 1].clone(), layers=[layer], norms=self.norms[j:j + 1].clone(),
                       meta={**self.meta, "source_layer": layer})

    def to(self, dtype_or_device) -> Direction:
        return replace(self, vectors=self.vectors.to(dtype_or_device), norms=self.norms.to(dtype_or_device))

    def check_model(self, model) -> Direction:
        """Raise :class:`DModelMismatchError` unless this direction fits ``model``'s residual stream."""
        from interp.adapter import d_model, n_layers

        width = d_model(model)
        if width != self.d_model:
            raise DModelMismatchError(
                f"direction {self.name!r} has d_model={self.d_model} but the model's residual stream has "
                f"d_model={width}; it was computed on a different model ({self.meta.get('model', 'unknown')})"
            )
        n = n_layers(model)
        if self.layers and max(self.layers) >= n:
            raise MissingLayerError(
                f"direction {self.name!r} has a vector at layer {max(self.layers)} but the model has {n} layers"
            )
        return self

    # -- persistence -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path`` (safetensors, atomic); layers, name and meta go in the JSON metadata."""
        header = {"format": _FORMAT, "name": self.name, "layers": json.dumps(self.layers),
                  "meta": json.dumps(self.meta, default=str)}
        return atomic_save_safetensors(path, {"vectors": self.vectors, "norms": self.norms}, metadata=header)

    @classmethod
    def load(cls, path: str | Path, model=None) -> Direction:
        """Read a direction written by :meth:`save`; with ``model``, also check that it fits."""
        tensors, header = load_safetensors(path, _FORMAT, "direction",
                                           "; compute it first (e.g. `emalab direction`)")
        out = cls(tensors["vectors"], json.loads(header["layers"]), tensors["norms"],
                  header.get("name", "direction"), json.loads(header.get("meta", "{}")))
        return out.check_model(model) if model is not None else out
