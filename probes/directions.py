"""Direction builders: factories returning one shared callable type, ``(pos, neg) -> Direction``.

Each builder works per layer on two activation sets (positive = has the concept, e.g. harmful;
negative = lacks it) and returns a :class:`~interp.direction.Direction` with one unit vector per
layer, oriented so that positives project higher. Modelled on steering-vectors' ``aggregators.py``.

    build = mean_difference()
    refusal_like = build(harmful_acts, harmless_acts, name="harmful-vs-harmless")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from interp.activations import ActivationSet
from interp.direction import Direction, DModelMismatchError, MissingLayerError, unit
from interp.types import LayerVectors, UnpairedActs

__all__ = [
    "Direction",
    "DModelMismatchError",
    "MissingLayerError",
    "unit",
    "LayerFn",
    "ActsLike",
    "DirectionBuilder",
    "mean_difference",
    "pca",
    "logistic",
    "class_means",
]

LayerFn = Callable[[UnpairedActs, UnpairedActs], LayerVectors]
"""Maps positive and negative activations to one raw (unnormalised) vector per layer."""

ActsLike = UnpairedActs | ActivationSet
"""Activations as a tensor or an :class:`~interp.activations.ActivationSet` (which carries its layers);
positives and negatives may differ in number."""


def _unpack(acts: ActsLike, layers: Sequence[int] | None) -> tuple[Tensor, list[int] | None]:
    if isinstance(acts, ActivationSet):
        return acts.acts, list(acts.layers)
    if acts.ndim == 2:  # a single layer
        acts = acts[:, None]
    if acts.ndim != 3:
        raise ValueError(f"activations must be (batch, layer, d_model), got shape {tuple(acts.shape)}")
    return acts, (list(layers) if layers is not None else None)


@dataclass(frozen=True)
class DirectionBuilder:
    """A named direction builder. Call it with ``(pos, neg)`` activations to get a :class:`Direction`."""

    kind: str
    fn: LayerFn
    params: dict

    def __call__(
        self,
        pos: ActsLike,
        neg: ActsLike,
        layers: Sequence[int] | None = None,
        name: str | None = None,
        meta: dict | None = None,
    ) -> Direction:
        """Build the direction.

        Args:
            pos: positive activations ``(batch, layer, d_model)`` or an :class:`ActivationSet`.
            neg: negative activations with the same layers and width.
            layers: model layer of each column; taken from an ``ActivationSet``, else ``0..L-1``.
        """
        pos_t, pos_layers = _unpack(pos, layers)
        neg_t, neg_layers = _unpack(neg, layers)
        if pos_layers is not None and neg_layers is not None and pos_layers != neg_layers:
            raise ValueError(f"positive layers {pos_layers} differ from negative layers {neg_layers}")
        if pos_t.shape[1:] != neg_t.shape[1:]:
            raise ValueError(f"positive acts {tuple(pos_t.shape)} and negative acts {tuple(neg_t.shape)} "
                             "must agree in (layer, d_model)")
        if len(pos_t) < 1 or len(neg_t) < 1:
            raise ValueError(f"need at least one positive and one negative example, got {len(pos_t)} and {len(neg_t)}")
        out_layers = pos_layers or neg_layers or list(range(pos_t.shape[1]))
        if len(out_layers) != pos_t.shape[1]:
            raise ValueError(f"{len(out_layers)} layers given for {pos_t.shape[1]} activation columns")
        raw = self.fn(pos_t, neg_t)
        info = {"builder": self.kind, **self.params, "n_pos": len(pos_t), "n_neg": len(neg_t)}
        return Direction.from_vectors(raw.to(pos_t.dtype), out_layers, name or self.kind, {**info, **(meta or {})})


def class_means(
    pos: Float[Tensor, "_batch layer d_model"], neg: Float[Tensor, "_batch layer d_model"]
) -> tuple[Float[Tensor, "layer d_model"], Float[Tensor, "layer d_model"]]:
    """Per-layer means of both sets, accumulated in float64 (returned in float64)."""
    return pos.double().mean(0), neg.double().mean(0)


def mean_difference() -> DirectionBuilder:
    """``mean(pos) - mean(neg)`` per layer (Arditi et al.; Rimsky et al. CAA). Means in float64."""

    def fn(pos: Tensor, neg: Tensor) -> Tensor:
        mu_pos, mu_neg = class_means(pos, neg)
        return mu_pos - mu_neg

    return DirectionBuilder("mean_difference", fn, {})


def pca(paired: bool = False) -> DirectionBuilder:
    """First principal component, oriented so that ``pos`` projects higher.

    Args:
        paired: ``pos[i]`` and ``neg[i]`` are a contrast pair; use the uncentred PCA of the
            differences ``pos[i] - neg[i]`` (as steering-vectors / RepE). Otherwise, PCA of the
            pooled activations centred on the midpoint of the two class means, so the component is
            the axis of largest spread including the between-class one.
    """

    def fn(pos: Tensor, neg: Tensor) -> Tensor:
        mu_pos, mu_neg = class_means(pos, neg)
        if paired:
            if len(pos) != len(neg):
                raise ValueError(f"paired PCA needs as many positives as negatives, got {len(pos)} and {len(neg)}")
            data = (pos.double() - neg.double()).transpose(0, 1)  # layer batch d_model
        else:
            mid = (mu_pos + mu_neg) / 2
            data = torch.cat([pos.double(), neg.double()]).transpose(0, 1) - mid[:, None]
        # Right singular vectors of (layer, batch, d_model): the top one per layer is the component.
        _, _, vh = torch.linalg.svd(data, full_matrices=False)
        comp = vh[:, 0]
        sign = torch.sign(torch.einsum("ld,ld->l", comp, mu_pos - mu_neg))
        sign[sign == 0] = 1
        # Keep the class separation as the vector's size so activation addition has a natural scale.
        size = torch.einsum("ld,ld->l", comp * sign[:, None], mu_pos - mu_neg).abs().clamp_min(1e-12)
        return comp * (sign * size)[:, None]

    return DirectionBuilder("pca", fn, {"paired": paired})


def logistic(C: float = 1.0, max_iter: int = 1000, seed: int = 0) -> DirectionBuilder:
    """The weight vector of an L2 logistic-regression probe per layer (scikit-learn, lbfgs).

    Features are standardised for the fit and the weights mapped back to activation space
    (``w / scale``), so the direction lives in the residual stream, not in z-scores. Its size is
    the projection of the class-mean difference on it.
    """

    def fn(pos: Tensor, neg: Tensor) -> Tensor:
        from sklearn.linear_model import LogisticRegression

        x_all = torch.cat([pos, neg]).double().numpy()
        y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
        out = []
        for j in range(x_all.shape[1]):
            x = x_all[:, j]
            mu, sd = x.mean(0), x.std(0)
            sd[sd == 0] = 1.0
            clf = LogisticRegression(C=C, max_iter=max_iter, random_state=seed).fit((x - mu) / sd, y)
            w = torch.from_numpy(clf.coef_[0] / sd)
            diff = torch.from_numpy(x[y == 1].mean(0) - x[y == 0].mean(0))
            out.append(unit(w) * (unit(w) @ diff).abs().clamp_min(1e-12))
        return torch.stack(out)

    return DirectionBuilder("logistic", fn, {"C": C, "max_iter": max_iter, "seed": seed})
