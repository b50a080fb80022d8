"""Containment: keep what unlearning should not touch. Retain terms beyond CE/KL as pure losses, the
per-token weighting of the retain term, and the concept gate (a LoRA update scaled per prompt).

* per-token retain weight: NPO's forget term sums log-probs over a sequence and averages over the
  batch, so at the reference point each forget token carries weight ``1/B_forget``; the retain CE is
  a token mean (``1/N_retain`` per token). :func:`retain_token_scale` is the factor that gives every
  retain token the forget term's per-token weight, so that ``alpha = 1`` means equal weight.
* representation retain: the policy's residual stream stays at the base model's on retain prompts
  (:func:`repr_loss`, MSE or 1 − cosine over prompt and response positions).
* direction retain: each retain prompt's projection on a refusal direction at the last prompt token
  stays at its base value (:func:`projection_loss`).
* concept gate: ``g = sigmoid((score − b)/T)``, ``score`` the base model's last-prompt-token stream
  at an early layer projected on a concept vector (target − benign); the LoRA update of each row is
  multiplied by its ``g`` (:func:`gated`, through :func:`interp.adapter.lora_row_scale`). The gate is
  saved with the adapter (``gate.safetensors`` and ``emalab_adapter.json``'s ``gate``:
  :func:`gate_files`, :func:`adapter_gate`), and :func:`gated_adapter` applies it at evaluation time:
  every prompt of a generation, logit score, activation or KL measurement is gated by its own
  prompt, as in training (:mod:`interp.gating`).

Activations come from :func:`interp.activations.stream_activations`; the base model is the same
weights with the adapter disabled (:func:`interp.loading.adapter_disabled`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from interp.activations import stream_activations
from interp.adapter import check_layers, lora_row_scale
from interp.chat import format_prompts, iter_batches
from interp.direction import Direction, unit
from interp.gating import GateFn, row_gated_adapter
from interp.io import load_safetensors, read_json
from interp.loading import LoadedModel, adapter_disabled
from training.collate import collate_rows
from training.config import REPR_DISTANCES, UnlearnConfig
from training.dataset import DataSet
from training.lora import ADAPTER_META, tensor_hash

__all__ = [
    "retain_token_scale",
    "last_prompt_index",
    "repr_loss",
    "projection_loss",
    "ConceptGate",
    "calibrate_gate",
    "gated",
    "GATE_FILE",
    "gate_files",
    "adapter_gate",
    "gated_adapter",
    "GateReport",
    "gate_accuracy",
    "Containment",
    "direction_id",
    "calibrate_concept_gate",
]

# Sequence-summed forget objectives (each token weighs 1/B); the others are token means (1/N).
_SEQUENCE_SUMMED = ("npo",)


def retain_token_scale(
    method: str, forget_tokens: Float[Tensor, " batch"], retain_tokens: Float[Tensor, " rbatch"]
) -> float:
    """Factor on a token-mean retain term that gives each retain token the forget term's weight.

    ``npo`` sums log-probs over each sequence and averages over the ``B`` forget rows: at the
    reference point every forget token weighs ``1/B`` (NPO's weight then decays as a sequence
    becomes unlikely), so the factor is ``N_retain / B``. GA, GradDiff and SFT are token means
    (``1/N_forget`` per token) and SimNPO is length-normalised per row, about the same: the factor
    is ``N_retain / N_forget``.

    Args:
        forget_tokens: response tokens per forget row.
        retain_tokens: response tokens per retain row.
    """
    n_retain = float(retain_tokens.sum())
    per = float(len(forget_tokens)) if method in _SEQUENCE_SUMMED else float(forget_tokens.sum())
    if per <= 0 or n_retain <= 0:
        raise ValueError("per-token weighting needs response tokens in both batches")
    return n_retain / per


def last_prompt_index(response_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Position of each row's last prompt token: the one before its first response token."""
    has = response_mask.bool().any(-1)
    if not bool(has.all()):
        raise ValueError(f"{int((~has).sum())} row(s) have no response tokens")
    first = response_mask.to(torch.float32).argmax(-1).long()
    if bool((first < 1).any()):
        raise ValueError("a response starts at position 0; every row needs a prompt token before its response")
    return first - 1


def repr_loss(
    acts: Float[Tensor, "batch pos layer d_model"],
    ref_acts: Float[Tensor, "batch pos layer d_model"],
    mask: Int[Tensor, "batch pos"],
    distance: str = "mse",
) -> Float[Tensor, ""]:
    """Distance between the policy's and the base model's stream, averaged over masked positions
    and layers: ``mse`` is the mean squared difference per coordinate, ``cosine`` is ``1 − cos``.

    ``mse`` weighs each position by its squared distance, so large-norm positions (the first
    token's attention sink in real models) dominate it; ``cosine`` is scale-free.
    """
    if distance not in REPR_DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(REPR_DISTANCES)}")
    a, r = acts.float(), ref_acts.float()
    if distance == "mse":
        per = (a - r).pow(2).mean(-1)
    else:
        per = 1.0 - F.cosine_similarity(a, r, dim=-1, eps=1e-8)
    w = mask.to(per.dtype)[:, :, None].expand_as(per)
    if not bool(w.any()):
        return acts.sum() * 0.0
    return (per * w).sum() / w.sum()


def projection_loss(
    acts: Float[Tensor, "batch layer d_model"],
    ref_acts: Float[Tensor, "batch layer d_model"],
    vectors: Float[Tensor, "layer d_model"],
) -> Float[Tensor, ""]:
    """Mean over rows and layers of ``((acts − ref_acts) · v_layer)²``: how far each projection on
    the (unit) direction moved from its base value."""
    v = vectors.to(torch.float32)
    proj = einops.einsum(acts.float(), v, "batch layer d_model, layer d_model -> batch layer")
    ref = einops.einsum(ref_acts.float(), v, "batch layer d_model, layer d_model -> batch layer")
    return (proj - ref).pow(2).mean()


# -- the concept gate --------------------------------------------------------------------------


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
                "vector_id": _tensor_id(self.vector)}

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


# -- what a run gets beyond its config ------------------------------------------------------------


def _tensor_id(t: Tensor) -> str:
    return tensor_hash({"v": t.detach().float().cpu()})


def direction_id(direction: Direction) -> str:
    """Content hash of a direction's vectors and layers."""
    return f"{_tensor_id(direction.vectors)}@{','.join(map(str, direction.layers))}"


@dataclass
class Containment:
    """The inputs of the containment terms that a config names only by path: a refusal direction
    (``retain_mode='direction'``) and a concept vector (``concept_gate``), given as objects or loaded
    from the config's paths; ``gate`` is the resolved (calibrated) gate the trainer uses."""

    direction: Direction | None = None
    """Refusal direction kept by the direction retain term (overrides ``retain_direction``)."""
    gate_vector: Direction | None = None
    """Concept vector of the gate (overrides ``gate_vector``)."""
    gate: ConceptGate | None = None
    """The gate itself, calibrated on the base model before training."""

    @classmethod
    def resolve(cls, cfg: Any, given: Containment | None, model: torch.nn.Module) -> Containment:
        """Fill in what ``cfg`` needs from ``given`` or from the config's paths, checked against
        ``model`` (no calibration yet)."""
        given = given or cls()
        direction, vector = given.direction, given.gate_vector
        if cfg.retain_mode == "direction" and direction is None:
            if cfg.retain_direction is None:
                raise ValueError("retain_mode='direction' needs a refusal direction: set retain_direction (a "
                                 "safetensors path) or pass Containment(direction=...)")
            direction = Direction.load(Path(cfg.retain_direction), model)
        if cfg.concept_gate and vector is None and given.gate is None:
            if cfg.gate_vector is None:
                raise ValueError("concept_gate needs a concept vector: set gate_vector (a safetensors path) or "
                                 "pass Containment(gate_vector=...)")
            vector = Direction.load(Path(cfg.gate_vector), model)
        if direction is not None:
            direction.check_model(model)
        gate = given.gate
        if cfg.concept_gate and gate is None and cfg.gate_bias is not None and cfg.gate_temperature is not None:
            gate = ConceptGate.from_direction(vector, cfg.gate_layer, cfg.gate_bias, cfg.gate_temperature, model)
        return cls(direction if cfg.retain_mode == "direction" else None,
                   vector if cfg.concept_gate else None, gate if cfg.concept_gate else None)

    def identity(self) -> dict[str, Any]:
        """Content hashes of the inputs (what must match to resume a run); a gate given ready-made
        (without its vector) counts with its settings."""
        out: dict[str, Any] = {}
        if self.direction is not None:
            out["direction"] = direction_id(self.direction)
        if self.gate_vector is not None:
            out["gate_vector"] = direction_id(self.gate_vector)
        elif self.gate is not None:
            out["gate"] = self.gate.describe()
        return out

    def record(self) -> dict[str, Any]:
        """What ``containment.json`` holds: the identity and the resolved gate."""
        out: dict[str, Any] = {"identity": self.identity()}
        if self.gate is not None:
            out["gate"] = self.gate.describe()
        return out


def calibrate_concept_gate(lm: LoadedModel, cfg: UnlearnConfig, containment: Containment, forget: DataSet,
                           retain: DataSet) -> Containment:
    """The concept gate with its bias and/or temperature measured on the base model: the forget prompts'
    scores against the retain prompts' (:func:`calibrate_gate`)."""
    probe = ConceptGate.from_direction(containment.gate_vector, cfg.gate_layer, 0.0, 1.0, lm.model)

    def scores(ds: DataSet, is_forget: bool) -> torch.Tensor:
        out = []
        for start in range(0, len(ds), cfg.batch_size):
            rows = list(range(start, min(start + cfg.batch_size, len(ds))))
            b = collate_rows(lm, cfg, ds, rows, is_forget).to(lm.device)
            out.append(probe.scores(lm, b.input_ids, b.attention_mask, last_prompt_index(b.response_mask)).cpu())
        return torch.cat(out)

    bias, temperature = calibrate_gate(scores(forget, True), scores(retain, False))
    gate = replace(probe, bias=cfg.gate_bias if cfg.gate_bias is not None else bias,
                   temperature=cfg.gate_temperature if cfg.gate_temperature is not None else temperature)
    return replace(containment, gate=gate)
