"""The concept gate: a LoRA update scaled per prompt by how much the prompt looks like the target.

``g = sigmoid((score − b)/T)``, ``score`` the base model's last-prompt-token stream at the gate's layer
projected on a target concept vector; every LoRA row of a prompt is multiplied by its ``g``
(:func:`gated`, through :func:`interp.adapter.lora_row_scale`). The gate is saved with every adapter
and snapshot it gates (:func:`gate_files`, :func:`adapter_gate`) so evaluation applies it too
(:func:`gated_adapter`); :func:`gate_accuracy` says how well it routes target vs untouched prompts.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.activations import stream_activations
from interp.adapter import check_layers, lora_row_scale
from interp.chat import format_prompts, iter_batches
from interp.direction import Direction, unit
from interp.gating import GateFn, row_gated_adapter
from interp.io import load_safetensors, read_json
from interp.loading import LoadedModel, adapter_disabled
from training.lora import ADAPTER_META, tensor_hash

__all__ = ["ConceptGate", "calibrate_gate", "gated", "GATE_FILE", "gate_files", "adapter_gate", "gated_adapter",
           "GateReport", "gate_accuracy", "vector_id"]


def vector_id(t: Tensor) -> str:
    """Content hash of a vector (or stack of vectors), what run keys and containment.json record."""
    return tensor_hash({"v": t.detach().float().cpu()})


@dataclass(frozen=True)
class ConceptGate:
    """``g = sigmoid((score − bias)/temperature)``, ``score`` = the base model's ``resid_post`` at
    ``layer`` and the last prompt token, projected on the unit concept ``vector``."""

    vector: Float[Tensor, " d_model"]
    """Unit concept vector (target − benign)."""
    layer: int
    """The (early) layer whose stream is scored."""
    bias: float
    """Score at which the gate is one half."""
    temperature: float
    """Score units per unit of logit: smaller is a sharper gate."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.bias) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"gate bias must be finite and temperature positive, got {self.bias}, {self.temperature}")

    @torch.no_grad()
    def scores(
        self,
        lm: LoadedModel,
        input_ids: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"],
        last: Int[Tensor, " batch"],
    ) -> Float[Tensor, " batch"]:
        """Projection of each row's stream at position ``last`` on the vector, under the base model
        (adapter disabled), so the gate depends on the prompt alone."""
        with adapter_disabled(lm):
            acts = stream_activations(lm.model, input_ids, attention_mask, [self.layer])[:, :, 0]
        rows = torch.arange(acts.shape[0], device=acts.device)
        at = acts[rows, last.to(acts.device)].float()
        return einops.einsum(at, self.vector.to(at.device, torch.float32), "batch d_model, d_model -> batch")

    def values(self, scores: Float[Tensor, " batch"]) -> Float[Tensor, " batch"]:
        return torch.sigmoid((scores - self.bias) / self.temperature)

    def describe(self) -> dict[str, Any]:
        return {"layer": self.layer, "bias": self.bias, "temperature": self.temperature,
                "vector_id": vector_id(self.vector)}

    def prompt_fn(self, lm: LoadedModel) -> GateFn:
        """The gate of left-padded prompt batches (:data:`interp.gating.GateFn`): each row scored
        at its last position, its last prompt token, as :func:`gated` scores a training row."""

        def gate(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
            last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1, device=input_ids.device)
            return self.values(self.scores(lm, input_ids, attention_mask, last))

        return gate

    @classmethod
    def from_direction(cls, direction: Direction, layer: int | None, bias: float, temperature: float,
                       model: torch.nn.Module | None = None) -> ConceptGate:
        """The gate of ``direction``'s vector at ``layer`` (``None``: a one-layer direction's own layer)."""
        if model is not None:
            direction.check_model(model)
        if layer is None:
            if not direction.is_global:
                raise ValueError(f"the concept vector {direction.name!r} has {len(direction.layers)} layers; "
                                 "choose one with gate_layer")
            layer = direction.layers[0]
        if model is not None:
            (layer,) = check_layers(model, [layer])
        return cls(unit(direction.vector_for(layer).float()), int(layer), float(bias), float(temperature))


def calibrate_gate(
    target_scores: Float[Tensor, " n_target"], untouched_scores: Float[Tensor, " n_untouched"], sharpness: float = 4.0
) -> tuple[float, float]:
    """``(bias, temperature)`` that put the gate at one half midway between the two mean scores and
    at ``sigmoid(±sharpness)`` (0.98 / 0.02 by default) at the means.

    Raises:
        ValueError: the target prompts do not score higher on average (the vector does not separate
            them in this direction; check its sign and layer).
    """
    mt, mu = float(target_scores.double().mean()), float(untouched_scores.double().mean())
    if not mt > mu:
        raise ValueError(f"the concept vector does not separate the prompts: mean score {mt:.4g} on the targets, "
                         f"{mu:.4g} on the untouched prompts; a gate needs the targets higher (check the vector's "
                         "sign and layer, or set gate_bias and gate_temperature)")
    return (mt + mu) / 2, (mt - mu) / (2 * sharpness)


@contextmanager
def gated(
    lm: LoadedModel,
    gate: ConceptGate | None,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    last: Int[Tensor, " batch"],
) -> Iterator[Tensor | None]:
    """Within the block, each row's LoRA update is scaled by its gate value (yielded); a ``None``
    gate changes nothing and yields ``None``. Run the backward inside the block too when gradient
    checkpointing recomputes the forward."""
    if gate is None:
        yield None
        return
    g = gate.values(gate.scores(lm, input_ids, attention_mask, last))
    with lora_row_scale(lm.model, g):
        yield g


GATE_FILE = "gate.safetensors"
"""The gate's concept vector, beside a gated adapter (its settings are ``emalab_adapter.json``'s ``gate``)."""


def gate_files(gate: ConceptGate | None) -> tuple[dict[str, Any], dict[str, dict[str, Tensor]]]:
    """``(meta, tensors)`` that :func:`training.lora.save_adapter` writes with a gated adapter (empty
    for ``None``)."""
    if gate is None:
        return {}, {}
    return {"gate": {**gate.describe(), "file": GATE_FILE}}, {GATE_FILE: {"vector": gate.vector.float()}}


def adapter_gate(directory: str | Path) -> ConceptGate | None:
    """The concept gate saved with an adapter, ``None`` for an ungated one.

    Raises:
        ValueError: the adapter was trained with a concept gate that was not saved with it (trained
            before gates were saved), or its gate file does not match the recorded gate.
    """
    meta_path = Path(directory) / ADAPTER_META
    meta = read_json(meta_path) if meta_path.exists() else {}
    record = meta.get("gate")
    if record is None:
        if (meta.get("config") or {}).get("concept_gate"):
            raise ValueError(f"adapter {directory} was trained with a concept gate that was not saved with it; "
                             "retrain it to evaluate it with its gate")
        return None
    tensors, _ = load_safetensors(Path(directory) / record["file"], what="concept gate")
    gate = ConceptGate(tensors["vector"].float(), int(record["layer"]), float(record["bias"]),
                       float(record["temperature"]))
    if gate.describe() != {k: v for k, v in record.items() if k != "file"}:
        raise ValueError(f"adapter {directory}: {record['file']} does not match the gate recorded in {ADAPTER_META}")
    return gate


def gated_adapter(lm: LoadedModel, gate: ConceptGate) -> AbstractContextManager[LoadedModel]:
    """Evaluate ``lm``'s loaded (unmerged) adapter through ``gate``: within the block every forward of
    the measurement paths (generation, logit score, activations, KL to base) scales each row's LoRA
    update by its prompt's gate, computed on the base model at the gate's layer and the last prompt
    token, as in training; a path that cannot carry a per-row gate raises
    :class:`interp.gating.UngatedForwardError`."""
    return row_gated_adapter(lm, gate.prompt_fn(lm))


@dataclass
class GateReport:
    """How a gate splits two prompt sets."""

    target_mean: float
    untouched_mean: float
    accuracy: float
    """Fraction of prompts on the right side of one half (targets above, untouched below)."""
    n_target: int
    n_untouched: int
    target_accuracy: float = float("nan")
    """Fraction of target prompts whose gate is above one half (open)."""
    untouched_accuracy: float = float("nan")
    """Fraction of untouched prompts whose gate is below one half (shut)."""


def gate_accuracy(
    lm: LoadedModel,
    gate: ConceptGate,
    target_prompts: Sequence[str],
    untouched_prompts: Sequence[str],
    batch_size: int = 16,
    max_prompt_tokens: int | None = 256,
    raw: bool = False,
) -> GateReport:
    """The gate's mean value on target and untouched prompts (chat-formatted, base model)."""
    if not target_prompts or not untouched_prompts:
        raise ValueError("need at least one target and one untouched prompt")

    def values(prompts: Sequence[str]) -> Tensor:
        texts = format_prompts(lm.tokenizer, prompts, raw=raw)
        out = torch.empty(len(texts))
        for b in iter_batches(lm.tokenizer, texts, batch_size, max_prompt_tokens):
            b = b.to(lm.device)
            last = torch.full((len(b.index),), b.input_ids.shape[1] - 1, device=lm.device)  # left-padded
            out[b.index] = gate.values(gate.scores(lm, b.input_ids, b.attention_mask, last)).float().cpu()
        return out

    t, u = values(target_prompts), values(untouched_prompts)
    opened, shut = int((t > 0.5).sum()), int((u < 0.5).sum())
    return GateReport(float(t.mean()), float(u.mean()), (opened + shut) / (len(t) + len(u)), len(t), len(u),
                      opened / len(t), shut / len(u))
