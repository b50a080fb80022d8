"""The study's model and its cached stages: evaluation, unlearning runs, activations, concept
vectors, the refusal direction. Every stage lives under ``results/stages/<name>/<hash of its key>/``
and is skipped when complete, so experiments share work and an interrupted pipeline resumes where it
stopped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from evals.evaluate import EvalConfig, EvalReport, PromptRecord, evaluate
from evals.suite import DOMAINS, check_domain, load_prompts
from interp.config import JsonConfig
from interp.io import read_json, read_jsonl
from interp.loading import LoadedModel, load_model
from interp.registry import DEFAULT_MODEL, EMBEDDED_MODELS
from interp.runs import Stage

__all__ = ["StudyConfig", "Study", "adapter_id_of"]


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
    n_forget: int = 24
    """Forget prompts (target domain, unlearn split) per run."""
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


@dataclass
class Study:
    """A loaded model plus the cached stages of one :class:`StudyConfig`."""

    cfg: StudyConfig
    _lm: LoadedModel | None = field(default=None, repr=False)
    _train_lm: LoadedModel | None = field(default=None, repr=False)
    _eval_batch_size: int | None = field(default=None, repr=False)

    @property
    def results(self) -> Path:
        return Path(self.cfg.results)

    @property
    def train_dtype(self) -> str:
        """The training dtype, with ``auto`` resolved for this machine (cached per machine)."""
        from interp.loading import resolve_device
        from interp.precision import resolve_dtype_choice

        if not hasattr(self, "_train_dtype"):
            # Only the kind of device matters here; a named one is checked when the model loads.
            device = resolve_device("auto") if self.cfg.device == "auto" else self.cfg.device.split(":")[0]
            self._train_dtype = resolve_dtype_choice(self.cfg.dtype, device)
        return self._train_dtype

    def _load(self, dtype: str) -> LoadedModel:
        return load_model(self.cfg.model, dtype=dtype, device=self.cfg.device, device_map=self.cfg.device_map,
                          revision=self.cfg.revision)

    @property
    def lm(self) -> LoadedModel:
        """The measurement model (``eval_dtype``): every evaluation, trace and intervention runs on it."""
        if self._lm is None:
            if self._train_lm is not None and self.train_dtype == self.cfg.eval_dtype:
                self._lm = self._train_lm
            else:
                self._lm = self._load(self.cfg.eval_dtype)
        return self._lm

    @property
    def train_lm(self) -> LoadedModel:
        """The training model (``dtype``); the same object as :attr:`lm` when the dtypes agree."""
        if self._train_lm is None:
            if self.train_dtype == self.cfg.eval_dtype:
                self._train_lm = self.lm
            else:
                self._train_lm = self._load(self.train_dtype)
        return self._train_lm

    @property
    def snapshot_every(self) -> int:
        """Snapshot interval of trajectory runs: every scored step and the operating point are snapshots."""
        import math

        return math.gcd(self.cfg.trajectory_every, self.cfg.steps) if self.cfg.trajectory_steps else 0

    @property
    def weights_id(self) -> str:
        """Identifies the base weights; without loading them for embedded models and local directories."""
        if self.cfg.model in EMBEDDED_MODELS:
            return EMBEDDED_MODELS[self.cfg.model].sha256
        if self._lm is None and Path(self.cfg.model).expanduser().is_dir():
            from interp.weights_id import local_weights_id

            with contextlib.suppress(FileNotFoundError):
                return local_weights_id(Path(self.cfg.model).expanduser())
        return self.lm.weights_id

    def run_record(self, lm: LoadedModel | None = None) -> dict:
        """Where a model ran (default: the measurement model): device, dtype and attention kernel,
        recorded with each stage (and the batch size ``auto`` chose)."""
        lm = lm if lm is not None else self._lm
        if lm is None:
            return {}
        out = {k: lm.extra[k] for k in ("device", "dtype", "attn_implementation") if k in lm.extra}
        if self._eval_batch_size is not None:
            out["eval_batch_size"] = self._eval_batch_size
        return out

    @property
    def eval_batch_size(self) -> int:
        """``cfg.eval_batch_size``, with ``auto`` resolved once from the loaded model's device memory."""
        if self.cfg.eval_batch_size != "auto":
            return int(self.cfg.eval_batch_size)
        if self._eval_batch_size is None:
            from interp.batching import auto_batch_size

            # Evaluation prompts are cut at EvalConfig's max_prompt_tokens; generation adds its KV cache.
            seq = EvalConfig.max_prompt_tokens + self.cfg.max_new_tokens
            self._eval_batch_size = auto_batch_size(self.lm, seq, kv_cache=True)
        return self._eval_batch_size

    def eval_config(self) -> EvalConfig:
        return EvalConfig(limit=self.cfg.eval_limit, max_new_tokens=self.cfg.max_new_tokens,
                          batch_size=self.eval_batch_size, judge=self.cfg.judge, raw=self.cfg.raw_prompts)

    # -- evaluation ---------------------------------------------------------------------------
    def evaluate(self, condition: str = "base", adapter: Path | None = None,
                 intervention: contextlib.AbstractContextManager | None = None,
                 intervention_id: str | None = None) -> tuple[EvalReport, list[PromptRecord]]:
        """Seven-domain evaluation of the base model, an adapter, or the base under an intervention."""
        ecfg = self.eval_config()
        key = {"model": self.cfg.model, "weights": self.weights_id, "dtype": self.cfg.eval_dtype,
               "adapter": adapter_id_of(adapter), "intervention": intervention_id, "eval": ecfg.to_dict()}
        stage = Stage(self.results, "eval", key)
        if not stage.done:
            path = stage.open()
            with self.with_adapter(adapter), (intervention or contextlib.nullcontext()):
                report = evaluate(self.lm, ecfg)
            report.save(path / "report.json")
            report.save_records(path / "records.jsonl")
            stage.complete({"condition": condition, **self.run_record()})
        report = EvalReport.load(stage.path / "report.json")
        records = [PromptRecord(**r) for r in read_jsonl(stage.path / "records.jsonl")]
        return report, records

    @contextlib.contextmanager
    def with_adapter(self, adapter: Path | None) -> Iterator[LoadedModel]:
        """The measurement model with ``adapter`` merged in (the base weights for ``None``), restored
        bit-exactly on exit."""
        if adapter is None:
            yield self.lm
            return
        from training.lora import detach_lora, load_adapter, merged_adapter

        load_adapter(self.lm, adapter)
        try:
            # Merged LoRA weights run at base-model speed; unmerging restores the base bit-exactly.
            with merged_adapter(self.lm):
                yield self.lm
        finally:
            detach_lora(self.lm)

    _weights = with_adapter  # the old private name, kept for callers outside experiments/

    # -- representations ---------------------------------------------------------------------
    def activations(self, adapter: Path | None = None) -> Path:
        """Last-token resid_post at every layer for the probe split of each domain and the benign set.

        Stored as ``acts.safetensors`` (``<set>`` → batch × layer × d_model) in the stage directory.
        """
        from interp.activations import collect_activations
        from interp.io import atomic_save_safetensors

        key = {"weights": self.weights_id, "dtype": self.cfg.eval_dtype, "adapter": adapter_id_of(adapter),
               "limit": self.cfg.probe_limit, "site": "resid_post", "position": "last", "split": "probe"}
        if self.cfg.raw_prompts:
            key["raw"] = True
        stage = Stage(self.results, "activations", key)
        if not stage.done:
            path = stage.open()
            acts = {}
            with self.with_adapter(adapter):
                for name in (*DOMAINS, "benign"):
                    prompts = [p.text for p in load_prompts(name, "probe", limit=self.cfg.probe_limit)]
                    acts[name] = collect_activations(self.lm, prompts, batch_size=self.eval_batch_size,
                                                     raw=self.cfg.raw_prompts)
            atomic_save_safetensors(path / "acts.safetensors", acts)
            stage.complete(self.run_record())
        return stage.path / "acts.safetensors"

    def concepts(self, adapter: Path | None = None, contrast: str = "benign"):
        """Difference-of-means concept vectors (domain − benign, or domain − rest) at every layer."""
        from safetensors.torch import load_file

        from probes.concepts import concept_vectors

        acts = load_file(self.activations(adapter))
        benign = acts.pop("benign")
        return concept_vectors({d: acts[d] for d in DOMAINS}, benign, contrast=contrast)

    def domain_means(self, adapter: Path | None = None) -> dict:
        """Mean probe-split activation per domain: ``{domain: layer × d_model}``."""
        from safetensors.torch import load_file

        return {k: v.double().mean(0) for k, v in load_file(self.activations(adapter)).items()}

    def refusal_direction(self):
        """The base model's refusal direction, selected as in Arditi et al. (cached stage)."""
        from probes.refusal_direction import (
            NoValidCandidateError,
            RefusalDirectionConfig,
            cached_refusal_direction,
        )

        rcfg = RefusalDirectionConfig(
            layer_step=self.cfg.direction_layer_step,
            positions=list(self.cfg.direction_positions) if self.cfg.direction_positions else None)
        direction, path = cached_refusal_direction(self.lm, rcfg, self.results, progress=True)
        if direction is None:
            raise NoValidCandidateError(f"no refusal-direction candidate passed the filters; see {path}/candidates.json")
        return direction

    def refusal_direction_file(self) -> Path:
        """The base refusal direction's safetensors file (for training terms that keep it)."""
        from probes.refusal_direction import RefusalDirectionConfig, cached_refusal_direction

        self.refusal_direction()
        rcfg = RefusalDirectionConfig(
            layer_step=self.cfg.direction_layer_step,
            positions=list(self.cfg.direction_positions) if self.cfg.direction_positions else None)
        return cached_refusal_direction(self.lm, rcfg, self.results, progress=False)[1] / "direction.safetensors"

    def ablation(self):
        """``(context-manager factory, id)`` that ablates the base refusal direction at every layer.

        The factory ablates in :attr:`lm` by default; ``factory(model)`` ablates in another one (the
        training model, when SFT data are generated under the ablation)."""
        from probes.interventions import ablate_direction

        direction = self.refusal_direction()
        ident = f"ablate-refusal-{direction.meta.get('layer')}-{direction.meta.get('position')}"
        return (lambda lm=None: ablate_direction(lm or self.lm, direction)), ident

    # -- unlearning ---------------------------------------------------------------------------
    def unlearn(self, target: str, method: str = "npo", retain_domains: tuple[str, ...] | None = (),
                seed: int = 0, trigger: str | None = None, ablation=None, ablation_id: str | None = None,
                steps: int | None = None, n_retain_per_domain: int | None = None,
                alpha: float | None = None, snapshot_every: int = 0, lr: float | None = None,
                retain_mode: str | None = None, **unlearn_fields) -> Path:
        """Train (or reuse) an unlearning adapter; returns the stage directory (adapter under ``adapter/``).

        Args:
            retain_domains: ``()`` for no retain loss; ``None`` for every domain except the target;
                else the retain domains for the retain cross-entropy.
            retain_mode: the retain term (``UnlearnConfig.retain_mode``); default ``ce`` with retain
                domains, else ``none``.
            **unlearn_fields: further ``UnlearnConfig`` fields, e.g. the containment settings
                ``retain_weighting``, ``repr_layers``, ``repr_distance``, ``retain_direction``,
                ``concept_gate``, ``gate_vector``, ``gate_layer`` (paths may be ``Path``).
        """
        from training.config import UnlearnConfig
        from training.lora import detach_lora
        from training.trainer import unlearn

        check_domain(target, allow_extra=False)
        if retain_domains is None:
            retain_domains = tuple(d for d in DOMAINS if d != target)
        if retain_mode not in (None, "none") and not retain_domains:
            raise ValueError(f"retain_mode={retain_mode!r} needs retain domains (None: every domain but the target)")
        extra = {k: str(v) if isinstance(v, Path) else v for k, v in unlearn_fields.items()}
        ucfg = UnlearnConfig(
            target_domains=(target,), method=method, beta=self.cfg.beta,
            alpha=self.cfg.alpha if alpha is None else alpha,
            retain_mode=retain_mode or ("ce" if retain_domains else "none"),
            retain_domains=tuple(retain_domains) or None,
            n_forget=self.cfg.n_forget, n_retain_per_domain=n_retain_per_domain or self.cfg.n_retain_per_domain,
            steps=steps or self.cfg.steps, batch_size=self.cfg.batch_size, lr=lr or self.cfg.lr,
            dtype=self.train_dtype, seed=seed, trigger=trigger, judge=self.cfg.judge, model=self.cfg.model,
            snapshot_every=snapshot_every, **extra,
        )
        key = {"weights": self.weights_id, "unlearn": ucfg.to_dict(), "ablation": ablation_id}
        stage = Stage(self.results, "unlearn", key)
        if not stage.done:
            path = stage.open()
            # SFT data are generated under the ablation, by the model that trains on them.
            ctx = (lambda: ablation(self.train_lm)) if ablation is not None else None
            try:
                result = unlearn(self.train_lm, ucfg, out_dir=path, ablation_ctx=ctx, ablation_id=ablation_id)
            finally:
                detach_lora(self.train_lm)
            stage.complete({"adapter_id": result.adapter_id, "steps": result.steps,
                            "seconds_per_step": result.seconds_per_step, "peak_rss_gb": result.peak_rss_gb,
                            **self.run_record(self.train_lm)})
        return stage.path


def adapter_id_of(adapter: Path | None) -> str | None:
    """What identifies an adapter in a stage key: the ``adapter_id`` of the run that wrote it, the
    content hash of a foreign PEFT adapter, else its path; ``None`` for the base weights."""
    if adapter is None:
        return None
    done = Path(adapter).parent / "DONE.json"
    if done.exists():
        return read_json(done).get("adapter_id")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):  # a foreign PEFT adapter: its content
        if (Path(adapter) / name).exists():
            from interp.io import sha256_file

            return sha256_file(Path(adapter) / name)[:16]
    return str(adapter)
