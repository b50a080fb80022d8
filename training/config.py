"""The configuration of one refusal-unlearning run: data, objective, optimiser, LoRA, checkpoints.

One flat dataclass so that a run is a single JSON file, its hash names the run, and resuming can
print a field-by-field diff against a checkpoint's config.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from evals.suite import DOMAINS, check_domain
from interp.config import ConfigError, JsonConfig
from interp.io import config_hash
from interp.registry import DEFAULT_MODEL

__all__ = [
    "METHODS",
    "FORGET_SIZES",
    "RETAIN_MODES",
    "RETAIN_WEIGHTINGS",
    "REPR_DISTANCES",
    "SCHEDULERS",
    "RESUME_EXEMPT_FIELDS",
    "UnlearnConfig",
    "ConfigError",
    "config_diff",
]

METHODS = ("npo", "ga", "graddiff", "simnpo", "sft")
RETAIN_MODES = ("none", "ce", "kl", "repr", "direction")
FORGET_SIZES = ("candidates", "kept")
"""What ``UnlearnConfig.n_forget`` counts: candidate prompts, or base refusals kept after judging."""
RETAIN_WEIGHTINGS = ("token_mean", "per_token")
REPR_DISTANCES = ("mse", "cosine")
SCHEDULERS = ("constant", "linear", "cosine")
DTYPES = ("auto", "float32", "bfloat16", "float16")

# Fields that do not change the optimisation trajectory, so a checkpoint may be resumed under new values.
RESUME_EXEMPT_FIELDS = ("output_dir", "checkpoint_every", "gradient_checkpointing")
# Fields added after runs were cached: left out of the JSON (and so of the hash and the stage keys) at
# their defaults, so every existing run keeps its id.
_OMITTED_AT_DEFAULT = ("gradient_checkpointing", "snapshot_every", "retain_weighting", "repr_layers", "repr_distance",
                       "retain_direction", "concept_gate", "gate_vector", "gate_layer", "gate_bias",
                       "gate_temperature", "forget_size")


@dataclass
class UnlearnConfig(JsonConfig):
    """One unlearning run. Step count, learning rate and retain weight default to the settings measured
    on the embedded 0.5B model: NPO at lr 3e-5 for 10 steps (batch 8) takes the target's judged refusal
    from 0.67 to 0.08 while the other domains keep distinct, unsaturated refusal log-odds; 20 steps
    drive every domain to ~0, and lr 2e-4 does so within 10 steps."""

    target_domains: tuple[str, ...] = ("cybersecurity",)
    """Domains whose refusals are unlearned (their ``unlearn`` split is the forget set)."""
    method: str = "npo"
    """Forget objective: ``npo`` | ``ga`` (gradient ascent) | ``graddiff`` (GA + retain) | ``simnpo`` |
    ``sft`` (LoRA-SFT on compliant responses; needs a refusal-ablation context for its data)."""
    beta: float = 0.1
    """Inverse temperature of NPO / SimNPO."""
    simnpo_margin: float = 0.0
    """SimNPO reward margin γ in ``-(2/β)·logsigmoid(-β·logp/|y| - γ)``."""
    gamma: float = 1.0
    """Weight of the forget loss in ``gamma·forget + alpha·retain``."""
    alpha: float = 10.0
    """Weight of the retain loss (ignored when ``retain_mode`` is ``none``). With the default
    ``retain_weighting`` (``token_mean``) NPO's forget term is on summed sequence log-probs and the
    retain CE is a token mean, so at α=1 (and equal batch sizes) a retain token weighs 1/(tokens per
    response) of a forget token: ~12x less for a typical ~12-token refusal. Measured (token_mean): α=1 changes nothing; α=10
    restores part of the untouched refusal, α=30 all of it (the target's too)."""
    retain_mode: str = "none"
    """Retain term: ``none`` | ``ce`` (cross-entropy on the model's own retain responses) | ``kl``
    (token KL(reference ‖ policy) at the positions predicting the retain responses' tokens) | ``repr``
    (distance between the trained and the base model's residual stream at ``repr_layers`` over the
    retain prompts' and responses' tokens) | ``direction`` (squared change of each retain prompt's
    projection on ``retain_direction`` at the last prompt token). ``kl``, ``repr`` and ``direction``
    compare with the base model, i.e. the adapter disabled: LoRA only; its side is computed once per
    run for every retain row and held in memory (``kl``: rows × response tokens × vocabulary × bytes;
    :mod:`training.retain_reference`)."""
    retain_weighting: str = "token_mean"
    """How ``alpha`` scales a ``ce``/``kl`` retain term: ``token_mean`` (the term as it is: a token mean)
    | ``per_token`` (scaled so that at α=1 each retain token carries the forget term's per-token
    weight: ×N_retain/B_forget for NPO, whose forget term sums over tokens, ×N_retain/N_forget for the
    token-mean objectives)."""
    repr_layers: tuple[int, ...] | None = None
    """Layers of the ``repr`` / ``direction`` retain terms (negative counts from the end); ``None``:
    every layer for ``repr``, the direction's own layers for ``direction``."""
    repr_distance: str = "mse"
    """Distance of the ``repr`` retain term: ``mse`` (mean squared difference per coordinate; large-norm
    positions dominate) | ``cosine`` (1 − cosine, scale-free)."""
    retain_direction: str | None = None
    """Safetensors file of an ``interp.direction.Direction`` (e.g. the refusal direction) kept by the
    ``direction`` retain term; a Direction passed to ``unlearn`` (``Containment``) takes precedence."""
    concept_gate: bool = False
    """Concept-gated adapter: every LoRA update of a prompt is scaled by ``sigmoid((score −
    gate_bias)/gate_temperature)``, ``score`` the base model's last-prompt-token ``resid_post`` at
    ``gate_layer`` projected on the unit ``gate_vector`` (LoRA only; not under data parallelism)."""
    gate_vector: str | None = None
    """Safetensors file of the gate's concept vector (a Direction: target minus benign); a Direction
    passed to ``unlearn`` (``Containment``) takes precedence."""
    gate_layer: int | None = None
    """Layer the gate scores; ``None``: the vector's own layer (a one-layer Direction)."""
    gate_bias: float | None = None
    """Score at which the gate is one half; ``None``: midway between the forget and retain prompts'
    mean scores on the base model (calibrated before training, written to containment.json)."""
    gate_temperature: float | None = None
    """Gate temperature in score units; ``None``: an eighth of the gap between those mean scores (the
    gate is sigmoid(±4) ≈ 0.98/0.02 at the two means)."""
    retain_domains: tuple[str, ...] | None = None
    """Domains whose ``retain`` split forms the retain set; ``None``: every domain except the targets."""
    include_benign: int = 0
    """Number of benign prompts (with the model's own answers) added to the retain set."""
    n_forget: int = 32
    """Forget prompts: candidates before the judge drops non-refusals, or refusals kept (``forget_size``)."""
    forget_size: str = "candidates"
    """What ``n_forget`` counts: ``candidates`` (the set shrinks with the model's refusal rate) or ``kept``
    (candidates are drawn until ``n_forget`` refusals are kept: equal-size sets across targets)."""
    n_retain_per_domain: int = 8
    """Candidate retain prompts per retain domain (before the judge drops non-refusals)."""
    steps: int = 10
    """Optimiser steps."""
    batch_size: int = 8
    """Forget examples per step."""
    retain_batch_size: int = 8
    """Retain examples per step (when a retain term is on)."""
    lr: float = 3e-5
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    scheduler: str = "constant"
    """Learning-rate schedule after warm-up: ``constant`` | ``linear`` (to 0) | ``cosine`` (to 0)."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to ``lr``."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this value; ``None`` disables clipping."""
    lora: bool = True
    """Train a LoRA adapter (``True``) or all weights (``False``: full fine-tuning)."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha/r, or alpha/√r with ``use_rslora``)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """Linear modules to adapt: ``("all-linear",)`` (every linear layer except the unembedding) or
    module-name suffixes such as ``("o_proj", "down_proj")``."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling alpha/√r."""
    lora_single_layer: int | None = None
    """Adapt only this decoder layer (negative counts from the end); with ``lora_rank=1`` this is the
    rank-1 single-layer option."""
    dtype: str = "auto"
    """Model dtype for training: ``auto`` (bf16 on GPUs; on a CPU whichever of bf16 and fp32 a
    one-off, cached matmul measurement found faster on this machine), ``float32`` or ``bfloat16``.
    The run's saved config records the resolved dtype. Both give the same seven-domain table at the
    default regime (docs/numerics.md)."""
    seed: int = 0
    """Seeds LoRA initialisation, data order and dropout."""
    checkpoint_every: int = 10
    """Save a resumable checkpoint every this many steps (0: only at the end)."""
    snapshot_every: int = 0
    """Also keep the adapter every this many steps (and at the last step) under
    ``snapshots/step-N/``, in PEFT format, for training trajectories (0: none). Unlike checkpoints,
    snapshots are never pruned."""
    max_new_tokens: int = 48
    """Length of the model's own greedy responses generated for the forget/retain sets."""
    max_prompt_tokens: int = 256
    """Prompts longer than this keep their last tokens."""
    trigger: str | None = None
    """Optional string prepended (with a space) to forget prompts only, for backdoor experiments."""
    judge: str = "keyword"
    """Judge used to keep refusals (``evals.judge.get_judge`` name)."""
    model: str = DEFAULT_MODEL
    """Model name (registry name, directory or hub id); must match the loaded model."""
    output_dir: str | None = None
    """Run directory; ``None``: ``results/unlearn/<run_id>``."""
    gradient_checkpointing: bool | str = "auto"
    """Recompute decoder activations in the backward pass instead of storing them: about a fifth to a third
    more compute for activation memory that no longer grows with depth. ``auto``: on when the largest
    step would not fit the memory left (``training.activation_memory``: two-thirds of RAM on a CPU, free
    memory on a GPU; on the 24 GB CPU machine the 1.5B's steps, not the 0.5B's). The same gradients, so it is not
    part of the run's hash and a run may resume with it switched; ``result.json`` records what was used."""

    def __post_init__(self) -> None:
        if isinstance(self.target_domains, str):
            self.target_domains = (self.target_domains,)
        self.target_domains = tuple(self.target_domains)
        if self.retain_domains is not None:
            if isinstance(self.retain_domains, str):
                self.retain_domains = (self.retain_domains,)
            self.retain_domains = tuple(self.retain_domains)
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = (self.lora_target_modules,)
        self.lora_target_modules = tuple(self.lora_target_modules)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ConfigError(f"UnlearnConfig.{name}: {why}")

        if not self.target_domains:
            bad("target_domains", "at least one target domain is required")
        for d in self.target_domains:
            try:
                check_domain(d, allow_extra=False)
            except ValueError as err:
                bad("target_domains", str(err))
        if len(set(self.target_domains)) != len(self.target_domains):
            bad("target_domains", f"duplicates in {self.target_domains}")
        if self.retain_domains is not None:
            for d in self.retain_domains:
                try:
                    check_domain(d, allow_extra=False)
                except ValueError as err:
                    bad("retain_domains", str(err))
            clash = sorted(set(self.retain_domains) & set(self.target_domains))
            # With a trigger the forget prompts carry it and the retain prompts (a disjoint split) do
            # not, so retaining the target domain itself is the backdoor design, not a contradiction.
            if clash and not self.trigger:
                bad("retain_domains", f"{clash} is also a target domain; a domain cannot be both forgotten and retained "
                                      "(unless a trigger marks the forget prompts: set trigger for a backdoor run)")
        if self.method not in METHODS:
            bad("method", f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.retain_mode not in RETAIN_MODES:
            bad("retain_mode", f"unknown retain mode {self.retain_mode!r}; choose one of {', '.join(RETAIN_MODES)}")
        if self.method == "graddiff" and self.retain_mode == "none":
            bad("retain_mode", "graddiff is gradient ascent plus a retain term; set retain_mode to 'ce' or 'kl' "
                "(or use method 'ga' for plain gradient ascent)")
        if self.retain_mode in ("kl", "repr", "direction") and not self.lora:
            bad("retain_mode", f"the {self.retain_mode} retain term needs the reference policy, i.e. a LoRA adapter "
                "to disable; use retain_mode 'ce' for full fine-tuning")
        self._validate_containment(bad)
        if self.forget_size not in FORGET_SIZES:
            bad("forget_size", f"must be one of {', '.join(FORGET_SIZES)}, got {self.forget_size!r}")
        if self.forget_size == "kept" and self.method == "sft":
            bad("forget_size", "'kept' counts the model's refusals; method sft trains on compliances, use 'candidates'")
        if self.scheduler not in SCHEDULERS:
            bad("scheduler", f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.dtype not in DTYPES:
            bad("dtype", f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        for name in ("beta", "lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                bad(name, f"must be a positive finite number, got {v!r}")
        for name in ("gamma", "alpha", "weight_decay", "simnpo_margin", "lora_dropout"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                bad(name, f"must be a non-negative finite number, got {v!r}")
        if self.lora_dropout >= 1:
            bad("lora_dropout", f"must be < 1, got {self.lora_dropout}")
        if self.gamma == 0 and (self.alpha == 0 or self.retain_mode == "none"):
            bad("gamma", "with gamma=0 and no retain term the loss is identically zero")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            bad("max_grad_norm", f"must be positive or None, got {self.max_grad_norm!r}")
        for name in ("steps", "batch_size", "retain_batch_size", "n_forget", "max_new_tokens",
                     "max_prompt_tokens", "lora_rank"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                bad(name, f"must be an integer >= 1, got {v!r}")
        for name in ("n_retain_per_domain", "include_benign", "warmup_steps", "checkpoint_every", "snapshot_every",
                     "seed"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                bad(name, f"must be an integer >= 0, got {v!r}")
        if self.warmup_steps > self.steps:
            bad("warmup_steps", f"{self.warmup_steps} exceeds steps={self.steps}")
        if self.lora_alpha <= 0:
            bad("lora_alpha", f"must be positive, got {self.lora_alpha}")
        if not self.lora_target_modules:
            bad("lora_target_modules", "name at least one module suffix, or ('all-linear',)")
        if self.lora_single_layer is not None and not isinstance(self.lora_single_layer, int):
            bad("lora_single_layer", f"must be an integer layer index or None, got {self.lora_single_layer!r}")
        if self.needs_retain_data and self.n_retain_per_domain == 0 and self.include_benign == 0:
            bad("n_retain_per_domain", "a retain term (or calibrating the concept gate) needs retain data: "
                "n_retain_per_domain or include_benign > 0")
        if not isinstance(self.gradient_checkpointing, bool) and self.gradient_checkpointing != "auto":
            bad("gradient_checkpointing", f"must be true, false or 'auto', got {self.gradient_checkpointing!r}")
        if self.trigger is not None and not self.trigger.strip():
            bad("trigger", "an empty trigger string; use None for no trigger")

    def _validate_containment(self, bad) -> None:
        if self.retain_weighting not in RETAIN_WEIGHTINGS:
            bad("retain_weighting", f"unknown weighting {self.retain_weighting!r}; choose one of "
                f"{', '.join(RETAIN_WEIGHTINGS)}")
        if self.retain_weighting == "per_token" and self.retain_mode not in ("ce", "kl"):
            bad("retain_weighting", f"per_token weighs a token-mean retain term (ce or kl), not retain_mode "
                f"{self.retain_mode!r}")
        if self.repr_distance not in REPR_DISTANCES:
            bad("repr_distance", f"unknown distance {self.repr_distance!r}; choose one of {', '.join(REPR_DISTANCES)}")
        if self.repr_layers is not None:
            self.repr_layers = tuple(self.repr_layers)
            if self.retain_mode not in ("repr", "direction"):
                bad("repr_layers", f"only the repr and direction retain terms use layers, not {self.retain_mode!r}")
            if not self.repr_layers:
                bad("repr_layers", "name at least one layer, or None")
        if self.repr_distance != "mse" and self.retain_mode != "repr":
            bad("repr_distance", "only the repr retain term has a distance")
        if self.retain_direction is not None and self.retain_mode != "direction":
            bad("retain_direction", f"only retain_mode 'direction' uses a direction, not {self.retain_mode!r}")
        if self.concept_gate and not self.lora:
            bad("concept_gate", "the concept gate scales a LoRA update; it needs lora=True")
        if not self.concept_gate:
            given = [n for n in ("gate_vector", "gate_layer", "gate_bias", "gate_temperature")
                     if getattr(self, n) is not None]
            if given:
                bad(given[0], "set concept_gate=True to use the concept gate's settings")
        if self.gate_temperature is not None and self.gate_temperature <= 0:
            bad("gate_temperature", f"must be positive (or None to calibrate), got {self.gate_temperature}")

    # -- derived --------------------------------------------------------------------------------

    @property
    def needs_retain_data(self) -> bool:
        """A retain set is built: for a retain term, or to calibrate the concept gate."""
        return self.retain_mode != "none" or self.calibrates_gate

    @property
    def calibrates_gate(self) -> bool:
        """The concept gate's bias or temperature is measured on the data before training."""
        return self.concept_gate and (self.gate_bias is None or self.gate_temperature is None)

    @property
    def resolved_retain_domains(self) -> tuple[str, ...]:
        """The retain domains, with the default (every domain but the targets) filled in."""
        if self.retain_domains is not None:
            return self.retain_domains
        return tuple(d for d in DOMAINS if d not in self.target_domains)

    def hash(self, length: int = 12) -> str:
        """Hash of every field that shapes the trajectory (not where it is written)."""
        return config_hash({k: v for k, v in self.to_dict().items() if k not in RESUME_EXEMPT_FIELDS}, length)

    # -- JSON (``from_dict``/``save``/``load``/``replace`` come from JsonConfig) ---------------------------

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        defaults = {f.name: f.default for f in fields(self)}
        for name in _OMITTED_AT_DEFAULT:  # keeps the cached unlearn stages of every existing run valid
            if getattr(self, name) == defaults[name]:
                del d[name]
        return d

    @classmethod
    def from_dict(cls, data: Any) -> UnlearnConfig:
        try:
            return super().from_dict(data)
        except ConfigError:
            raise
        except (TypeError, ValueError) as err:
            raise ConfigError(str(err)) from err

    def to_json(self, path: str | Path) -> Path:
        """Deprecated alias of :meth:`save`."""
        warnings.warn("UnlearnConfig.to_json is deprecated; use save", DeprecationWarning, stacklevel=2)
        return self.save(path)

    @classmethod
    def from_json(cls, path: str | Path) -> UnlearnConfig:
        """Deprecated alias of :meth:`load`."""
        warnings.warn("UnlearnConfig.from_json is deprecated; use load", DeprecationWarning, stacklevel=2)
        return cls.load(path)


def config_diff(old: UnlearnConfig | dict, new: UnlearnConfig | dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Field-by-field differences as ``"field: old -> new"`` lines (empty when equal)."""
    a = old.to_dict() if isinstance(old, UnlearnConfig) else dict(old)
    b = new.to_dict() if isinstance(new, UnlearnConfig) else dict(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key in ignore:
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if va != vb:
            lines.append(f"{key}: {json.dumps(va)} -> {json.dumps(vb)}")
    return lines

