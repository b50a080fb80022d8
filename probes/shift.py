"""Compliance-shift directions: what unlearning moved in the residual stream.

The shift of a model at a layer is the mean activation difference *unlearned − base* on the same
prompts (paired, so prompt content cancels), a :class:`~interp.direction.Direction` with one
vector per layer whose norms are the shift sizes. Several prompt sets (e.g. the seven domains) are
averaged with equal weight, so a large domain does not dominate.

* :func:`compliance_shift` — the per-layer shift direction.
* :func:`cross_layer_cosine` — cosine between the shift at every pair of layers (is it one
  direction carried through depth, or a different one per layer?).
* :func:`shift_cosines` — per layer, cosine of the shift with the refusal direction and with each
  concept vector (via :mod:`probes.entanglement`).
* :func:`random_like` — a seeded random direction with the same layers and norms, the control
  for ablation and steering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp.direction import Direction
from interp.types import LayerVectors, UnpairedActs
from probes.concepts import ConceptVectors
from probes.entanglement import refusal_projection

__all__ = ["compliance_shift", "cross_layer_cosine", "shift_cosines", "random_like"]

MeanableActs = UnpairedActs | LayerVectors
"""Activations of a batch (base and after may differ in number), or their mean already taken."""


def _mean(x: Tensor, name: str) -> Float[Tensor, "layer d_model"]:
    if x.ndim == 3:
        if x.shape[0] == 0:
            raise ValueError(f"{name}: no activations")
        return x.double().mean(0)
    if x.ndim == 2:
        return x.double()
    raise ValueError(f"{name}: expected (batch, layer, d_model) activations or a (layer, d_model) mean, "
                     f"got shape {tuple(x.shape)}")


def _pair_shift(base: Tensor, after: Tensor, name: str) -> Float[Tensor, "layer d_model"]:
    if base.shape != after.shape:
        raise ValueError(f"{name}: base {tuple(base.shape)} and unlearned {tuple(after.shape)} activations differ in "
                         "shape; the shift needs the same prompts under both models")
    if base.ndim == 3:
        return (after.double() - base.double()).mean(0)  # paired: per-prompt differences, then the mean
    return _mean(after, name) - _mean(base, name)


def compliance_shift(
    base: MeanableActs | Mapping[str, MeanableActs],
    after: MeanableActs | Mapping[str, MeanableActs],
    layers: Sequence[int] | None = None,
    name: str = "compliance_shift",
    meta: dict | None = None,
) -> Direction:
    """Per-layer direction of ``after − base`` on the same prompts (means in float64, result in the
    activations' dtype).

    Args:
        base, after: activations of the same prompts, ``(batch, layer, d_model)`` paired row by row,
            or per-layer means ``(layer, d_model)``; or mappings ``{set: …}`` with the same keys, whose
            shifts are averaged with equal weight.
        layers: model layer of each row of the layer axis (default ``0..L-1``).

    Returns:
        A :class:`Direction` with one unit vector per layer; ``norms`` are the shift sizes.

    Raises:
        ValueError: shapes or keys differ, or the shift is exactly zero at some layer (identical models).
    """
    if isinstance(base, Mapping) != isinstance(after, Mapping):
        raise ValueError("pass activations for both models, or mappings for both")
    if isinstance(base, Mapping):
        if set(base) != set(after) or not base:
            raise ValueError(f"the two models' prompt sets differ: {sorted(base)} vs {sorted(after)}")
        keys = sorted(base)
        dtype = base[keys[0]].dtype
        shift = torch.stack([_pair_shift(base[k], after[k], k) for k in keys]).mean(0)
        sets = keys
    else:
        shift = _pair_shift(base, after, name)
        dtype = base.dtype
        sets = None
    layers = list(range(shift.shape[0])) if layers is None else [int(x) for x in layers]
    if len(layers) != shift.shape[0]:
        raise ValueError(f"{len(layers)} layers for a shift with {shift.shape[0]} rows")
    info = {"builder": "compliance_shift", "sets": sets, **(meta or {})}
    # Accumulated in float64; handed back in the activations' working dtype.
    return Direction.from_vectors(shift.to(dtype if dtype.is_floating_point else torch.float32), layers, name=name,
                                  meta=info)


def cross_layer_cosine(direction: Direction) -> Float[Tensor, "layer layer"]:
    """``out[i, j]``: cosine between the direction's vectors at ``layers[i]`` and ``layers[j]``;
    symmetric, exact unit diagonal, clipped to [-1, 1] (float64)."""
    v = direction.vectors.double()
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    m = v @ v.T
    m = ((m + m.T) / 2).clamp(-1.0, 1.0)
    m.fill_diagonal_(1.0)
    return m


def shift_cosines(
    shift: Direction, refusal: Direction | None = None, concepts: ConceptVectors | Mapping[str, Direction] | None = None,
    layers: Sequence[int] | None = None,
) -> dict[str, list[float]]:
    """Per layer, cosine of ``shift`` with the refusal direction (key ``"refusal"``) and with each
    concept vector (keyed by concept). A global refusal direction is compared at every layer."""
    out: dict[str, list[float]] = {}
    if refusal is not None:
        out["refusal"] = refusal_projection({"shift": shift}, refusal, normalize=True, layers=layers)["shift"]
    if concepts is not None:
        dirs = concepts.as_directions() if isinstance(concepts, ConceptVectors) else dict(concepts)
        out.update(refusal_projection(dirs, shift, normalize=True, layers=layers))
    return out


def random_like(direction: Direction, seed: int = 0, name: str | None = None) -> Direction:
    """A seeded Gaussian random unit vector per layer, with ``direction``'s layers and norms."""
    gen = torch.Generator().manual_seed(int(seed))
    raw = torch.randn(direction.vectors.shape, generator=gen, dtype=torch.float64)
    unit = raw / raw.norm(dim=-1, keepdim=True)
    return Direction(unit.to(direction.vectors.dtype), list(direction.layers), direction.norms.clone(),
                     name or f"random-{seed}", {"builder": "random_like", "seed": int(seed), "like": direction.name,
                                                "n_layers": direction.meta.get("n_layers")})
