"""Layer-by-layer inspection of one prompt: projections onto concept vectors and the refusal
direction, and a logit lens, from one nnsight trace. The result is pure JSON-able data for the
browser inspector.

An :class:`Inspection` records which interventions were active while it was taken, from the
registry of :mod:`probes.interventions` (read lazily: this module imports without probes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor, nn

from interp.adapter import check_layers, final_norm_module, n_layers, unembed_module
from interp.direction import Direction

__all__ = ["Inspection", "inspect_prompt", "logit_lens"]

@dataclass
class Inspection:
    """What the model's last prompt token carries at each layer (``layers[j]`` indexes every list)."""

    prompt: str
    model: str
    state: str
    """Weights plus active adapter (``interp.loading.state_id``)."""
    layers: list[int]
    concepts: list[str]
    projections: list[list[float | None]]
    """``[layer][concept]``: the last-token ``resid_post`` dotted with the concept's unit vector
    (residual-stream units); ``None`` where the concept has no vector at that layer."""
    refusal: list[float] | None
    """``[layer]``: projection onto the refusal direction, if one was given."""
    resid_norm: list[float]
    """``[layer]``: norm of the last-token stream, so a reader can turn projections into cosines."""
    lens_tokens: list[list[str]]
    """``[layer][k]``: top-k next tokens of the logit lens (final norm + unembedding of the stream)."""
    lens_ids: list[list[int]]
    lens_logprobs: list[list[float]]
    answer: str | None
    """Greedy answer (with any interventions active), if asked for."""
    interventions: list[str] = field(default_factory=list)
    n_prompt_tokens: int = 0

    @property
    def intervened(self) -> bool:
        return bool(self.interventions)

    def to_dict(self) -> dict:
        return {**asdict(self), "intervened": self.intervened}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: Mapping) -> Inspection:
        return cls(**{k: v for k, v in data.items() if k != "intervened"})


def _concept_directions(concepts, model: nn.Module) -> dict[str, Direction]:
    if concepts is None:
        return {}
    if isinstance(concepts, Mapping):
        return {name: d.check_model(model) for name, d in concepts.items()}
    if isinstance(concepts, Tensor):
        if concepts.ndim == 2:  # (concept, d_model): one global vector each
            return {f"concept_{i}": Direction.from_vectors(v, [0], f"concept_{i}").check_model(model)
                    for i, v in enumerate(concepts)}
        if concepts.ndim == 3:  # (concept, layer, d_model) over every layer of the model
            n = n_layers(model)
            if concepts.shape[1] != n:
                raise ValueError(f"concept tensor has {concepts.shape[1]} layers; the model has {n}")
            return {f"concept_{i}": Direction.from_vectors(v, list(range(n)), f"concept_{i}").check_model(model)
                    for i, v in enumerate(concepts)}
    raise TypeError("concepts must be a dict of Directions, a (concept, d_model) or (concept, layer, d_model) "
                    f"tensor, or None; got {type(concepts).__name__}")


def _project(d: Direction, acts: Tensor, layers: Sequence[int]) -> list[float | None]:
    out: list[float | None] = []
    for j, layer in enumerate(layers):
        if not d.is_global and layer not in d.layers:
            out.append(None)
            continue
        out.append(float(acts[j].double() @ d.vector_for(layer).double()))
    return out


@torch.inference_mode()
def logit_lens(
    model: nn.Module, streams: Float[Tensor, "layer d_model"], k: int = 5
) -> tuple[Tensor, Tensor]:
    """Top-``k`` next-token ids and log-probs of each stream through the final norm and unembedding.

    Family-specific output transforms after the unembedding (Gemma's logit soft-capping) are not
    applied: they are monotone, so the top-k tokens are the same.
    """
    param = next(model.parameters())
    h = final_norm_module(model)(streams.to(device=param.device, dtype=param.dtype)[None])[0]
    logprobs = torch.log_softmax(unembed_module(model)(h).float(), dim=-1)
    top = logprobs.topk(k, dim=-1)
    return top.indices.cpu(), top.values.cpu()


@torch.inference_mode()
def inspect_prompt(
    lm,
    prompt: str,
    concepts: Mapping[str, Direction] | Tensor | None = None,
    refusal: Direction | None = None,
    k: int = 5,
    layers: Sequence[int] | None = None,
    answer_tokens: int = 0,
    system: str | None = None,
    raw: bool = False,
) -> Inspection:
    """Inspect ``prompt``'s last token layer by layer (one trace; interventions on ``lm.model`` apply).

    Args:
        lm: a :class:`~interp.loading.LoadedModel`.
        concepts: named directions, or a ``(concept, d_model)`` / ``(concept, layer, d_model)`` tensor.
        refusal: the refusal direction (global or per layer).
        k: logit-lens tokens per layer.
        answer_tokens: if > 0, also generate a greedy answer of at most this many tokens.
    """
    from interp.activations import nnsight_model, trace_batch
    from interp.chat import encode, format_prompts
    from interp.loading import state_id
    from probes.interventions import active_interventions  # the registry lives with the interventions

    model = lm.model
    layers = check_layers(model, layers)
    dirs = _concept_directions(concepts, model)
    if refusal is not None:
        refusal.check_model(model)
    text = format_prompts(lm.tokenizer, [prompt], system=system, raw=raw)[0]
    batch = encode(lm.tokenizer, [text]).to(lm.device)
    acts = trace_batch(nnsight_model(lm), batch, layers, "resid_post", n_last=1)[0, 0].float().cpu()
    if not torch.isfinite(acts).all():
        raise FloatingPointError("non-finite activations; the weights or the active intervention are broken")
    ids, logprobs = logit_lens(model, acts, k)
    per_concept = [_project(d, acts, layers) for d in dirs.values()]
    answer = None
    if answer_tokens > 0:
        from interp.generate import generate

        answer = generate(lm, [prompt], max_new_tokens=answer_tokens, system=system, raw=raw, progress=False)[0]

    def clean(x: float | None) -> float | None:
        return None if x is None or not math.isfinite(x) else x

    return Inspection(
        prompt=prompt,
        model=lm.name,
        state=state_id(lm),
        layers=layers,
        concepts=list(dirs),
        projections=[[clean(per_concept[c][j]) for c in range(len(dirs))] for j in range(len(layers))],
        refusal=_project(refusal, acts, layers) if refusal is not None else None,
        resid_norm=acts.double().norm(dim=-1).tolist(),
        lens_tokens=[[lm.tokenizer.decode([i]) for i in row] for row in ids.tolist()],
        lens_ids=ids.tolist(),
        lens_logprobs=logprobs.tolist(),
        answer=answer,
        interventions=active_interventions(model),
        n_prompt_tokens=int(batch.attention_mask.sum()),
    )
