"""The settings shared by every experiment of one study (:class:`StudyConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from interp.config import JsonConfig
from interp.registry import DEFAULT_MODEL

__all__ = ["StudyConfig"]


@dataclass
class StudyConfig(JsonConfig):
    """Settings shared by every experiment of one study (model, evaluation and training budget)."""

    model: str = DEFAULT_MODEL
    """Embedded model name, hub id or local directory."""
    dtype: str = "auto"
    """Training dtype: auto (bf16 on GPUs; on a CPU whichever of bf16 and fp32 a one-off matmul
    measurement on this machine found faster), float32 or bfloat16. Training in either gives the same
    table (docs/numerics.md); the resolved dtype is recorded in every stage key."""
    eval_dtype: str = "float32"
    """Dtype of every measurement: evaluation, activations, the refusal direction, interventions.
    Adapters are merged into weights of this dtype. float32 is exact; merged into bf16 weights the
    default adapter keeps ~77% of its effect on the refusal log-odds (docs/numerics.md)."""
    results: str = "results"
    """Root directory of results and cached stages."""
    eval_limit: int | None = 24
    """Eval prompts per domain (None: the whole eval split)."""
    max_new_tokens: int = 32
    """Greedy tokens generated per eval prompt for the refusal judge."""
    probe_limit: int | None = 24
    """Probe-split prompts per domain used for concept vectors."""
    seeds: tuple[int, ...] = (0,)
    """Training seeds; metrics average over them."""
    steps: int = 10
    """The fixed operating point: conditions are judged at this step (the adapter snapshot of the
    trajectory run, identical to a run of this many steps under the constant learning rate)."""
    trajectory_steps: int = 16
    """Steps of every unlearning run of a condition; the trajectory (:mod:`study.trajectory`) scores
    its snapshots, and the selectivity frontier reads them at matched target refusal. 0: plain runs of
    ``steps`` steps without snapshots."""
    trajectory_every: int = 4
    """Score every n-th step's snapshot along a trajectory (the logit score on every eval prompt)."""
    operating_level: float | None = 0.10
    """Choose each run's operating point on the dev split: the first scored snapshot at which the
    target's mean refusal probability on its *probe* prompts (never the eval prompts that decide the
    claims) is at or below this level; the last step if it never gets there. None: ``steps``."""
    judged_seeds: int | None = None
    """Judge generations for the first n seeds of a condition only (None: every seed). The logit
    score and the trajectories cover every seed; judged generation is the study's costliest step."""
    lr: float = 3e-5
    """Unlearning learning rate (LoRA). Measured on the 0.5B default (NPO on cybersecurity, 16 eval
    prompts/domain): 2e-4 drives every domain's refusal log-odds below -4 within 10 steps; 3e-5 × 20
    steps takes every domain to ~0 judged refusal; 3e-5 × 10 steps brings the target to 0.06 while the
    others keep 0.06-0.25 judged refusal and distinct log-odds (-0.1 to -1.9): room to compare."""
    beta: float = 0.1
    """NPO inverse temperature."""
    alpha: float = 10.0
    """Weight of the retain cross-entropy when retain-CE is on. NPO's forget term is on summed sequence
    log-probs, the retain CE is a token mean, so at α=1 a retain token weighs 1/(tokens per response)
    of a forget token: ~12x less for a typical ~12-token refusal (UnlearnConfig.retain_weighting
    per_token removes the factor). Measured: α=1 does nothing (cybersecurity, 10 steps); α=10
    restores part of the refusal, α=30 restores all of it, the target's included."""
    n_forget: int = 16
    """Forget prompts (target domain, unlearn split) per run: refusals kept or candidates (``forget_size``)."""
    forget_size: str = "kept"
    """What ``n_forget`` counts (``UnlearnConfig.forget_size``): ``kept`` draws candidates until that many
    base refusals are kept, so the targets' forget sets are equal in size (C3 compares them); a target
    whose unlearn split holds fewer refusals gets a smaller set, with a warning, and the report says
    so. ``candidates``: the set shrinks with the base refusal rate (cybersecurity kept 19 of 24,
    safety 13 of 24 on the 0.5B model). SFT runs always count candidates."""
    n_retain_per_domain: int = 6
    """Retain prompts per retain domain (retain split)."""
    batch_size: int = 8
    """Training batch size."""
    eval_batch_size: int | str = 16
    """Batch size of evaluation forwards, generation and activation collection, or auto: the largest
    batch whose estimated activations fit the device's free memory (interp.batching.auto_batch_size;
    on CPU a quarter of the available RAM, at most 64), recorded with each stage."""
    judge: str = "keyword"
    """Refusal judge for generations: keyword | model."""
    direction_layer_step: int = 2
    """Refusal-direction candidates at every n-th layer (1 = all layers, as in Arditi et al.)."""
    direction_positions: tuple[int, ...] | None = (-1,)
    """Post-instruction positions tried for the refusal direction (None = all of them)."""
    device: str = "auto"
    """Device of the model: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps. A named device
    that is missing is an error."""
    device_map: str | None = None
    """transformers device_map (e.g. auto) to shard a model over several GPUs; overrides device."""
    revision: str | None = None
    """Hub branch, tag or commit of a hub model; its resolved commit keys every cached stage."""
    raw_prompts: bool = False
    """Feed prompts without a chat template (base models that have none)."""

    def __post_init__(self) -> None:
        if self.eval_limit is not None and self.eval_limit < 4:
            raise ValueError("eval_limit must be at least 4 prompts per domain (or None for all)")
        if not self.seeds:
            raise ValueError("seeds must name at least one training seed")
        if self.steps < 1 or self.lr <= 0:
            raise ValueError("steps must be >= 1 and lr > 0")
        if self.trajectory_steps and self.trajectory_steps < self.steps:
            raise ValueError(f"trajectory_steps ({self.trajectory_steps}) must be 0 or at least steps ({self.steps}): "
                             "the operating point is a snapshot of the trajectory run")
        if self.operating_level is not None and not 0 < self.operating_level < 1:
            raise ValueError(f"operating_level must be in (0, 1) or None, got {self.operating_level}")
        if self.trajectory_every < 1:
            raise ValueError("trajectory_every must be >= 1")
        from training.config import FORGET_SIZES

        if self.forget_size not in FORGET_SIZES:
            raise ValueError(f"StudyConfig.forget_size: must be one of {', '.join(FORGET_SIZES)}, "
                             f"got {self.forget_size!r}")
        if self.judged_seeds is not None and self.judged_seeds < 1:
            raise ValueError("judged_seeds must be >= 1 (or None for every seed)")
        from interp.batching import check_batch_size
        from interp.precision import DTYPE_CHOICES

        self.eval_batch_size = check_batch_size(self.eval_batch_size, "eval_batch_size")
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"StudyConfig.dtype: unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
        if self.eval_dtype not in DTYPE_CHOICES[1:]:
            raise ValueError(f"StudyConfig.eval_dtype: unknown dtype {self.eval_dtype!r}; choose one of "
                             f"{', '.join(DTYPE_CHOICES[1:])} (float32 is exact, docs/numerics.md)")
