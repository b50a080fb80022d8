"""The study's model and its cached stages: evaluation, unlearning runs, activations, concept
vectors, the refusal direction. Every stage lives under ``results/stages/<name>/<hash of its key>/``
and is skipped when complete, so experiments share work and an interrupted pipeline resumes where it
stopped. The settings are :class:`study.config.StudyConfig` (re-exported here).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from evals.evaluate import EvalConfig, EvalReport, PromptRecord, evaluate
from evals.suite import DOMAINS, check_domain, load_prompts
from interp.io import config_hash, read_json, read_jsonl
from interp.loading import LoadedModel, load_model
from interp.registry import EMBEDDED_MODELS
from interp.runs import Stage
from study.config import StudyConfig
from study.model_memory import freeable, release_memory, still_held

__all__ = ["StudyConfig", "Study", "adapter_id_of", "unlearn_stage_fields", "UNLEARN_FILE_FIELDS"]


@dataclass
class Study:
    """A loaded model plus the cached stages of one :class:`StudyConfig`."""

    cfg: StudyConfig
    _lm: LoadedModel | None = field(default=None, repr=False)
    _train_lm: LoadedModel | None = field(default=None, repr=False)
    _eval_batch_size: int | None = field(default=None, repr=False)
    _adapter_merged: bool | None = field(default=None, repr=False)
    _owns_lm: bool = field(default=False, repr=False)
    _owns_train_lm: bool = field(default=False, repr=False)
    _freed: dict = field(default_factory=dict, repr=False)  # weak references to the models freed, by role

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
            elif (held := still_held(self._freed, "lm")) is not None:
                self._lm = held  # someone kept the freed model alive: use it rather than load a second copy
            else:
                self._lm = self._load(self.cfg.eval_dtype)
                self._owns_lm = True  # loaded here from its checkpoint, so it can be loaded again
        return self._lm

    @contextlib.contextmanager
    def training_model(self) -> Iterator[LoadedModel]:
        """The training model for one run. A large model the study can make again is freed while the other
        works (:func:`study.model_memory.freeable`): the float32 measurement model during the run, the training
        model after it; each comes back when next used (loaded or cast again: the same weights; or the same
        object, if something else kept it alive). Why: side by side they took a 1.5B quick study to 17.75 GB
        in retain-CE training, over its 16 GB bar (a three-step probe: 14.85 GB kept, 12.6 GB freed)."""
        train_lm = self.train_lm  # cast from the measurement model before that is freed
        if self._lm is not train_lm and freeable(self._lm, self._owns_lm):
            self._freed["lm"], self._lm = weakref.ref(self._lm), None
            release_memory()
        try:
            yield train_lm
        finally:
            if self._lm is not train_lm and freeable(train_lm, self._owns_train_lm):
                self._freed["train_lm"], self._train_lm = weakref.ref(train_lm), None
                train_lm = None
                release_memory()

    @property
    def train_lm(self) -> LoadedModel:
        """The training model (``dtype``); the same object as :attr:`lm` when the dtypes agree."""
        if self._train_lm is None and (held := still_held(self._freed, "train_lm")) is not None:
            self._train_lm = held
        if self._train_lm is None:
            if self.train_dtype == self.cfg.eval_dtype:
                self._train_lm = self.lm
            elif self.cfg.device_map is None and self.cfg.eval_dtype == "float32":
                from interp.recast import cast_copy

                # Cast from the measurement model's weights (loaded lazily, memory-mapped) rather than map the
                # files a second time: the same tensors, without a transient second copy of the checkpoint.
                try:
                    self._train_lm = cast_copy(self.lm, self.train_dtype)
                except ValueError:  # the measurement model carries an adapter right now: read the files
                    self._train_lm = self._load(self.train_dtype)
            else:
                self._train_lm = self._load(self.train_dtype)
            self._owns_train_lm = self._train_lm is not self._lm  # made here, so it can be made again
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
        if self._adapter_merged is not None:  # the last adapter measured: merged, or unmerged for memory
            out["adapter_merged"] = self._adapter_merged
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
        bit-exactly on exit. A concept-gated adapter (its gate saved with it) stays unmerged and
        runs through its gate: each prompt's LoRA update scaled by that prompt's gate
        (:func:`training.containment.gated_adapter`)."""
        if adapter is None:
            yield self.lm
            return
        from training.containment import adapter_gate, gated_adapter
        from training.lora import detach_lora, load_adapter, merged_adapter

        gate = adapter_gate(adapter)
        load_adapter(self.lm, adapter)
        try:
            # Merged LoRA weights run at base-model speed; unmerging restores the base bit-exactly.
            with gated_adapter(self.lm, gate) if gate is not None else merged_adapter(self.lm):
                self._adapter_merged = self.lm.extra.get("adapter_merged", False)
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

    def concept_file(self, domain: str, contrast: str = "benign") -> Path:
        """The base model's concept vector of ``domain`` at every layer as a Direction file (what a
        concept gate reads: ``UnlearnConfig.gate_vector``), derived from the activations stage and
        kept beside it."""
        check_domain(domain, allow_extra=False)
        acts = self.activations()
        path = acts.parent / f"concept-{domain}-{contrast}.safetensors"
        if not path.exists():
            self.concepts(contrast=contrast).direction(domain).save(path)
        return path

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
            n_forget=self.cfg.n_forget, forget_size="candidates" if method == "sft" else self.cfg.forget_size,
            n_retain_per_domain=n_retain_per_domain or self.cfg.n_retain_per_domain,
            steps=steps or self.cfg.steps, batch_size=self.cfg.batch_size, lr=lr or self.cfg.lr,
            dtype=self.train_dtype, seed=seed, trigger=trigger, judge=self.cfg.judge, model=self.cfg.model,
            snapshot_every=snapshot_every, **extra,
        )
        key = {"weights": self.weights_id, "ablation": ablation_id, "unlearn": unlearn_stage_fields(ucfg)}
        stage = Stage(self.results, "unlearn", key)
        if not stage.done:
            path = stage.open()
            with self.training_model() as train_lm:
                # SFT data are generated under the ablation, by the model that trains on them.
                ctx = (lambda: ablation(train_lm)) if ablation is not None else None
                try:
                    result = unlearn(train_lm, ucfg, out_dir=path, ablation_ctx=ctx, ablation_id=ablation_id)
                finally:
                    detach_lora(train_lm)
                record = self.run_record(train_lm)
            stage.complete({"adapter_id": result.adapter_id, "steps": result.steps,
                            "seconds_per_step": result.seconds_per_step, "peak_rss_gb": result.peak_rss_gb,
                            "gradient_checkpointing": result.config.gradient_checkpointing, **record})
        return stage.path


UNLEARN_FILE_FIELDS = ("retain_direction", "gate_vector")
"""``UnlearnConfig`` fields that name an input file: a stage key holds the file's content hash."""


def unlearn_stage_fields(ucfg) -> dict:
    """What identifies an unlearning run in its stage key: its config, with each input file named by
    its content (``{"sha256": …}``), not its path, so the same run under another results directory (or
    a moved one) is the same stage; without ``gradient_checkpointing``, which recomputes the same forward.

    Raises:
        ValueError: a named input file does not exist (one line, naming the field).
    """
    from interp.io import sha256_file

    fields = {k: v for k, v in ucfg.to_dict().items() if k != "gradient_checkpointing"}
    for name in UNLEARN_FILE_FIELDS:
        if fields.get(name) is not None:
            path = Path(fields[name])
            if not path.is_file():
                raise ValueError(f"UnlearnConfig.{name}={str(path)!r} is not a file; compute it first "
                                 f"(Study.refusal_direction_file / Study.concept_file) or pass an existing path")
            fields[name] = {"sha256": sha256_file(path)[:16]}
    return fields


def adapter_id_of(adapter: Path | None) -> str | None:
    """What identifies an adapter in a stage key: the ``adapter_id`` of the run that wrote it, the
    content hash of a foreign PEFT adapter, else its path; ``None`` for the base weights. A gated
    adapter's id carries its gate's settings and vector hash (the same weights gated otherwise
    measure otherwise)."""
    if adapter is None:
        return None
    meta = Path(adapter) / "emalab_adapter.json"
    gate = read_json(meta).get("gate") if meta.exists() else None
    found = _weights_id_of(Path(adapter))
    return found if gate is None else f"{found}+gate-{config_hash(gate, 12)}"


def _weights_id_of(adapter: Path) -> str:
    done = Path(adapter).parent / "DONE.json"
    if done.exists():
        return read_json(done).get("adapter_id")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):  # a foreign PEFT adapter: its content
        if (Path(adapter) / name).exists():
            from interp.io import sha256_file

            return sha256_file(Path(adapter) / name)[:16]
    return str(adapter)
