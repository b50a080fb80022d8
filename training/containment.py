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
* concept gate (:mod:`training.concept_gate`, re-exported here): ``g = sigmoid((score − b)/T)``, ``score`` the base model's last-prompt-token stream
  at an early layer projected on a concept vector (target − benign); the LoRA update of each row is
  multiplied by its ``g`` (:func:`gated`, through :func:`interp.adapter.lora_row_scale`). The gate is
  saved with the adapter (``gate.safetensors`` and ``emalab_adapter.json``'s ``gate``:
  :func:`gate_files`, :func:`adapter_gate`), and :func:`gated_adapter` applies it at evaluation time:
  every prompt of a generation, logit score, activation or KL measurement is gated by its own
  prompt, as in training (:mod:`interp.gating`).

Activations come from :func:`interp.activations.stream_activations`; the base model is the same
weights with the adapter disabled (:func:`interp.loading.adapter_disabled`).

The base model's side of the ``kl``, ``repr`` and ``direction`` terms is computed once per run, before
the first step, for every retain row (:mod:`training.retain_reference`: ``ceil(rows /
retain_batch_size)`` no-grad forwards), not by a reference forward of the retain batch at every step;
so these terms add no forward per step over retain-CE. It is held in host memory in the model's dtype:
``kl`` keeps the logits at each row's response-predicting positions, Σ_rows R_i × d_vocab × bytes
(Qwen2.5, 36 rows × 48 response tokens in bf16: 0.53 GB); ``repr`` the stream at its layers over every
token, Σ_rows T_i × layers × d_model × bytes; ``direction`` one last-prompt-token vector per row and layer.
It is not written to the run directory; a resume recomputes it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from interp.direction import Direction
from interp.loading import LoadedModel
from training.collate import collate_rows
from training.concept_gate import (  # noqa: E402  re-exported: the gate was part of this module
    GATE_FILE,
    ConceptGate,
    GateReport,
    adapter_gate,
    calibrate_gate,
    gate_accuracy,
    gate_files,
    gated,
    gated_adapter,
    vector_id,
)
from training.config import REPR_DISTANCES, UnlearnConfig
from training.dataset import DataSet

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


# -- what a run gets beyond its config ------------------------------------------------------------


def direction_id(direction: Direction) -> str:
    """Content hash of a direction's vectors and layers."""
    return f"{vector_id(direction.vectors)}@{','.join(map(str, direction.layers))}"


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
