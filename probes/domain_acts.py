"""The per-domain activation sets that concept vectors (:mod:`probes.concepts`) and linear probes
(:mod:`probes.linear_probe`) are built from: the contrasts a domain is set against, the checks on the
sets, and the layers they share.

A domain's harmful prompts are contrasted with ``"benign"`` prompts or with the pooled other domains
(``"rest"``: what is specific to the domain, not to harm in general).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from interp.activations import ActivationSet
from probes.directions import ActsLike

__all__ = ["CONTRASTS", "acts_tensor", "shared_layers", "check_domain_acts"]

CONTRASTS = ("benign", "rest")
"""What a domain's activations are contrasted with: benign prompts, or the other domains pooled."""


def acts_tensor(acts: ActsLike) -> Tensor:
    """The activations tensor of ``acts`` (an :class:`~interp.activations.ActivationSet` or a tensor)."""
    return acts.acts if isinstance(acts, ActivationSet) else acts


def shared_layers(harmful: Mapping[str, ActsLike], benign: ActsLike | None, layers: Sequence[int] | None) -> list[int]:
    """The layers every activation set was collected at: ``layers`` if given (and consistent), else those
    the :class:`~interp.activations.ActivationSet` s carry, else ``0 .. n_layer - 1``.

    Raises:
        ValueError: the sets were collected at different layers, or not at ``layers``.
    """
    found = [list(a.layers) for a in [*harmful.values(), benign] if isinstance(a, ActivationSet)]
    if found and any(f != found[0] for f in found):
        raise ValueError(f"activation sets were collected at different layers: {found}")
    if layers is not None:
        if found and list(layers) != found[0]:
            raise ValueError(f"layers {list(layers)} differ from the activation sets' layers {found[0]}")
        return list(layers)
    if found:
        return found[0]
    return list(range(acts_tensor(next(iter(harmful.values()))).shape[1]))


def check_domain_acts(harmful: Mapping[str, ActsLike], benign: ActsLike | None, contrast: str) -> None:
    """Check per-domain activations for a contrast: a known contrast, its reference present (benign, or
    two domains at least for ``"rest"``), one ``(layer, d_model)`` shape for every set, no empty domain.

    Raises:
        ValueError: naming what is wrong.
    """
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast must be one of {CONTRASTS}, got {contrast!r}")
    if not harmful:
        raise ValueError("no domains given")
    if contrast == "benign" and benign is None:
        raise ValueError("contrast='benign' needs benign activations")
    if contrast == "rest" and len(harmful) < 2:
        raise ValueError("contrast='rest' needs at least two domains")
    shapes = {name: tuple(acts_tensor(a).shape[1:]) for name, a in harmful.items()}
    if benign is not None:
        shapes["benign"] = tuple(acts_tensor(benign).shape[1:])
    if len(set(shapes.values())) != 1:
        raise ValueError(f"activation sets disagree in (layer, d_model): {shapes}")
    empty = [name for name, a in harmful.items() if len(acts_tensor(a)) == 0]
    if empty:
        raise ValueError(f"no activations for domain(s) {empty}")
