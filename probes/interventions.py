"""Interventions on the residual stream, each a context manager that restores the model in ``finally``.

* :func:`ablate_direction` — directional ablation ``x - (x·r̂) r̂`` at every site that writes the
  stream (Arditi et al. 2024), by hooks.
* :func:`orthogonalize_weights` — the same edit baked into the weights (embedding, attention
  output and MLP down projections), restored bit-exactly on exit.
* :func:`add_activation` — add a raw vector at one layer (activation addition, Turner et al.).
* :func:`steer` — add ``coeff`` × a unit direction at several layers.
* :func:`weight_noise` — Gaussian noise on every weight matrix, a deliberately degraded model
  (for judge calibration), restored bit-exactly on exit.

Sites and weights come from :mod:`interp.adapter`; nothing here names a module path. Each
intervention marks itself active on the model while it runs (:func:`mark_intervention`);
:func:`active_interventions` lists them, so inspections (:mod:`interp.layer_inspection`) can flag them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interp.adapter import (
    base_model,
    check_layers,
    check_site,
    embed_module,
    has_post_norms,
    n_layers,
    output_projections,
    site_hook,
    unembed_module,
)
from interp.direction import Direction
from interp.loading import LoadedModel

__all__ = [
    "mark_intervention",
    "active_interventions",
    "ABLATION_SITES",
    "UnsupportedInterventionError",
    "ablate_direction",
    "orthogonalize_weights",
    "add_activation",
    "steer",
    "project_out",
    "weight_noise",
]


_ACTIVE = "_emalab_interventions"  # attribute of the base model: labels of the active interventions


@contextmanager
def mark_intervention(model: nn.Module, label: str) -> Iterator[None]:
    """Record ``label`` as active on ``model`` for the duration (removed in ``finally``)."""
    active = base_model(model).__dict__.setdefault(_ACTIVE, [])
    active.append(label)
    try:
        yield
    finally:
        active.remove(label)


def active_interventions(model: nn.Module) -> list[str]:
    """Labels of the interventions active on ``model``, outermost first."""
    return list(base_model(model).__dict__.get(_ACTIVE, []))


ABLATION_SITES = ("resid_pre", "attn_out", "mlp_out")
"""Every place the stream is written: the block input (embedding for layer 0), and each block's
attention and MLP contributions. Ablating all three at every layer keeps the direction out of the
stream everywhere, which is what weight orthogonalization does."""


class UnsupportedInterventionError(ValueError):
    """The intervention cannot be applied to this model as asked; the message says what to do instead."""


def _module(lm_or_model: LoadedModel | nn.Module) -> nn.Module:
    return lm_or_model.model if isinstance(lm_or_model, LoadedModel) else lm_or_model


def _as_direction(direction: Direction | Tensor, name: str = "vector") -> Direction:
    if isinstance(direction, Direction):
        return direction
    if direction.ndim != 1:
        raise ValueError(f"pass a Direction or one (d_model,) vector, got shape {tuple(direction.shape)}")
    return Direction.from_vectors(direction, [0], name=name)


def project_out(x: Float[Tensor, "... d_model"], r: Float[Tensor, " d_model"]) -> Float[Tensor, "... d_model"]:
    """``x - (x·r) r`` for a unit ``r``, computed in float32 and returned in ``x``'s dtype (bf16 dot
    products would leave a visible residual projection)."""
    x32 = x.float()
    return (x32 - (x32 @ r)[..., None] * r).to(x.dtype)


def _param_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def ablate_direction(
    lm_or_model: LoadedModel | nn.Module,
    direction: Direction | Float[Tensor, " d_model"],
    layers: Sequence[int] | None = None,
    sites: Sequence[str] = ABLATION_SITES,
) -> Iterator[None]:
    """Remove ``direction`` from the stream at ``sites`` × ``layers`` (default: all layers).

    A global direction (one vector) is ablated at every layer; a per-layer direction uses its own
    vector at each layer and must cover ``layers``.
    """
    model = _module(lm_or_model)
    d = _as_direction(direction).check_model(model)
    layers = check_layers(model, layers if layers is not None else (None if d.is_global else d.layers))
    device = _param_device(model)
    vecs = {layer: d.vector_for(layer).to(device=device, dtype=torch.float32) for layer in layers}

    def fn(x: Tensor, layer: int) -> Tensor:
        return project_out(x, vecs[layer])

    with ExitStack() as stack:
        for site in sites:
            stack.enter_context(site_hook(model, check_site(site), layers, fn))
        stack.enter_context(mark_intervention(model, f"ablate:{d.name}"))
        yield


@contextmanager
def add_activation(
    lm_or_model: LoadedModel | nn.Module,
    vector: Direction | Float[Tensor, " d_model"],
    layer: int,
    coeff: float = 1.0,
    site: str = "resid_pre",
) -> Iterator[None]:
    """Add ``coeff * vector`` to the stream at ``site``/``layer``, at every position (prompt and
    generated tokens alike).

    A :class:`Direction` contributes its *raw* vector (``norm × unit``, e.g. the difference of
    means itself), taken at ``layer`` or from its single global layer.
    """
    model = _module(lm_or_model)
    (layer,) = check_layers(model, [layer])
    if isinstance(vector, Direction):
        vector.check_model(model)
        src = layer if layer in vector.layers else vector.layers[0]
        if not vector.is_global and layer not in vector.layers:
            vector.at(layer)  # raises, naming the available layers
        raw, label = vector.raw(src), vector.name
    else:
        raw, label = vector, "vector"
    delta = (coeff * raw.detach().float()).to(_param_device(model))

    def fn(x: Tensor, _layer: int) -> Tensor:
        return (x.float() + delta).to(x.dtype)

    with site_hook(model, check_site(site), [layer], fn), mark_intervention(model, f"add:{label}@{layer}x{coeff:g}"):
        yield


@contextmanager
def steer(
    lm_or_model: LoadedModel | nn.Module,
    direction: Direction | Float[Tensor, " d_model"],
    coeff: float,
    layers: Sequence[int] | None = None,
    site: str = "resid_pre",
) -> Iterator[None]:
    """Add ``coeff`` × the *unit* direction at each of ``layers`` (default: the direction's own
    layers, or every layer for a global direction). ``coeff`` is in residual-stream units."""
    model = _module(lm_or_model)
    d = _as_direction(direction).check_model(model)
    layers = check_layers(model, layers if layers is not None else (None if d.is_global else d.layers))
    device = _param_device(model)
    deltas = {layer: coeff * d.vector_for(layer).float().to(device) for layer in layers}

    def fn(x: Tensor, layer: int) -> Tensor:
        return (x.float() + deltas[layer]).to(x.dtype)

    with site_hook(model, check_site(site), layers, fn), mark_intervention(model, f"steer:{d.name}x{coeff:g}"):
        yield


def _check_plain_linear(module: nn.Module, what: str) -> None:
    if hasattr(module, "base_layer") and not getattr(module, "disable_adapters", False) and not getattr(module, "merged", False):
        raise UnsupportedInterventionError(
            f"the {what} carries an active (unmerged) PEFT adapter, whose output a weight edit would not "
            "cover; use ablate_direction (hooks), merge the adapter first, or wrap in adapter_disabled(lm)"
        )


@contextmanager
def orthogonalize_weights(
    lm_or_model: LoadedModel | nn.Module, direction: Direction | Float[Tensor, " d_model"]
) -> Iterator[None]:
    """Orthogonalize every matrix that writes the stream against a global direction ``r̂``.

    ``W_E ← W_E - (W_E r̂) r̂ᵀ`` on the embedding rows, and ``W ← W - r̂ (r̂ᵀ W)`` (plus the bias)
    on each attention-output and MLP-down projection, in place; the originals are restored
    bit-exactly on exit. Equivalent to :func:`ablate_direction` over all layers.

    Tied embeddings: only the *input* side is orthogonalized. The embedding gets its own edited
    copy for the duration (the unembedding keeps the original matrix), and the tie is restored on
    exit.

    Raises:
        UnsupportedInterventionError: the direction is per-layer (weight edits need one vector),
            the family normalises attention/MLP outputs before adding them (Gemma 2/3: no weight
            edit removes a direction there — use :func:`ablate_direction`), or a PEFT adapter is active.
    """
    model = _module(lm_or_model)
    d = _as_direction(direction).check_model(model)
    if not d.is_global:
        raise UnsupportedInterventionError(
            f"direction {d.name!r} has vectors at {len(d.layers)} layers; weight orthogonalization needs one "
            "global vector (use direction.select(layer)), or use ablate_direction for per-layer ablation"
        )
    if has_post_norms(model):
        raise UnsupportedInterventionError(
            "this family normalises attention and MLP outputs (post-norms) before adding them to the stream, "
            "so no edit of o_proj/down_proj removes a direction; use ablate_direction (hooks) instead"
        )
    embed = embed_module(model)
    targets: list[tuple[nn.Module, str]] = []
    for layer in range(n_layers(model)):
        o_proj, down = output_projections(model, layer)
        targets += [(o_proj, "attention output projection"), (down, "MLP down projection")]
    for module, what in targets:
        _check_plain_linear(module, what)

    saved: list[tuple[Tensor, Tensor]] = []  # (live tensor, original copy)
    orig_embed = embed.weight
    tied = any(p is orig_embed for p in unembed_module(model).parameters())
    try:
        with torch.no_grad():
            r = d.vectors[0].to(device=orig_embed.device, dtype=torch.float32)
            new_embed = orig_embed.float() - (orig_embed.float() @ r)[:, None] * r[None, :]
            if tied:
                embed.weight = nn.Parameter(new_embed.to(orig_embed.dtype), requires_grad=orig_embed.requires_grad)
            else:
                saved.append((orig_embed.data, orig_embed.data.clone()))
                orig_embed.data.copy_(new_embed.to(orig_embed.dtype))
            for module, _ in targets:
                for p in (module.weight, getattr(module, "bias", None)):
                    if p is None:
                        continue
                    saved.append((p.data, p.data.clone()))
                    w = p.data.float()
                    rr = r.to(w.device)
                    edited = w - rr[:, None] * (rr @ w)[None, :] if w.ndim == 2 else w - (w @ rr) * rr
                    p.data.copy_(edited.to(p.dtype))
        with mark_intervention(model, f"orthogonalize:{d.name}"):
            yield
    finally:
        with torch.no_grad():
            for live, original in saved:
                live.copy_(original)
            if tied:
                embed.weight = orig_embed


@contextmanager
def weight_noise(lm_or_model: LoadedModel | nn.Module, scale: float, seed: int = 0) -> Iterator[None]:
    """Add ``N(0, (scale · std(W))²)`` to every 2-D weight ``W`` (embeddings and projections), seeded.

    Noise relative to each matrix's own spread degrades every layer alike; ``scale`` around 0.05-0.2
    takes a small chat model from fluent to broken. The original weights are copied to the CPU and
    copied back in ``finally``, so the model is restored bit-exactly.
    """
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    model = _module(lm_or_model)
    gen = torch.Generator().manual_seed(seed)
    saved: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim != 2 or name in saved:
                    continue
                saved[name] = p.detach().to("cpu", copy=True)
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * (scale * p.float().std().item())
                p.add_(noise.to(device=p.device, dtype=p.dtype))
        with mark_intervention(model, f"weight_noise:{scale}"):
            yield
    finally:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, w in saved.items():
                params[name].copy_(w.to(params[name].device))
