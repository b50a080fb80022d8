"""Refusal unlearning: NPO / GA / GradDiff / SimNPO / LoRA-SFT with an optional retain term (CE, KL,
representation or direction retain: :mod:`training.containment`), on a LoRA adapter (optionally
concept-gated) or all weights, resumable from atomic checkpoints.

The reference policy is the base model with the adapter disabled; NPO's reference log-probs are
computed once for the whole forget set and cached in the run directory. A run directory holds::

    config.json            the UnlearnConfig
    data_manifest.json     prompt ids, counts, judge drops of the forget / retain sets
    ref_logprobs.safetensors
    containment.json       content hashes of a given direction / concept vector, the calibrated gate
    metrics.jsonl          one row per step: loss, its components, diagnostics
    checkpoints/step-N/    latest resumable checkpoints (atomic)
    snapshots/step-N/      the adapter every ``snapshot_every`` steps and at the end (trajectories)
    adapter/               the finished adapter, standard PEFT format + emalab_adapter.json
    result.json            summary (steps, adapter id, seconds per step, peak RSS)

Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) the same loop runs data-parallel
(:mod:`training.distributed`): every rank takes its rows of each global batch, DDP averages the
gradients, rank 0 alone writes the run directory, and every rank reads it to resume.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.activations import stream_activations
from interp.adapter import check_layers
from interp.io import append_jsonl, atomic_save_safetensors, atomic_write_json, atomic_write_text, git_commit
from interp.loading import LoadedModel, adapter_disabled, resolve_dtype, state_id
from training.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    run_dir_lock,
    save_checkpoint,
)
from training.config import RESUME_EXEMPT_FIELDS, UnlearnConfig, config_diff
from training.containment import (
    ConceptGate,
    Containment,
    calibrate_gate,
    gated,
    last_prompt_index,
    projection_loss,
    repr_loss,
    retain_token_scale,
)
from training.data import (
    DataSet,
    JudgeLike,
    TokenBatch,
    batch_order,
    build_compliance_set,
    build_forget_set,
    build_retain_set,
    collate,
)
from training.distributed import DataParallel
from training.lora import (
    adapter_id,
    attach_lora,
    detach_lora,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    has_adapter,
    load_adapter,
    load_trainable_state,
    save_adapter,
    tensor_hash,
    trainable_state,
)
from training.losses import (
    TrainStepOutput,
    ce_loss,
    combine_losses,
    forget_loss,
    kl_loss,
    response_logits,
    response_token_counts,
    sequence_logprobs,
)

__all__ = [
    "UnlearnData",
    "UnlearnResult",
    "NonFiniteLossError",
    "IncompatibleCheckpointError",
    "run_id",
    "default_run_dir",
    "build_data",
    "reference_logprobs",
    "train_step",
    "unlearn",
    "peak_rss_gb",
    "snapshot_dir",
    "snapshots",
]


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the run stopped and its last good checkpoint is kept."""


class IncompatibleCheckpointError(ValueError):
    """The run directory holds a checkpoint of a different config (or different data)."""


@dataclass
class UnlearnData:
    """The training sets: ``forget`` (refusals, or compliant responses for ``sft``) and ``retain``."""

    forget: DataSet
    retain: DataSet | None = None

    def manifest(self) -> dict[str, Any]:
        out = {"forget": {**self.forget.manifest, "n": len(self.forget), "fingerprint": self.forget.fingerprint()}}
        if self.retain is not None:
            out["retain"] = {**self.retain.manifest, "n": len(self.retain), "fingerprint": self.retain.fingerprint()}
        return out

    def fingerprint(self) -> str:
        return self.forget.fingerprint() + ("/" + self.retain.fingerprint() if self.retain is not None else "")


@dataclass
class UnlearnResult:
    """Where a run's artifacts are and how it went."""

    run_dir: Path
    adapter_dir: Path
    metrics_path: Path
    config: UnlearnConfig
    steps: int
    adapter_id: str
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds_per_step: float = float("nan")
    peak_rss_gb: float = float("nan")
    manifest: dict[str, Any] = field(default_factory=dict)
    resumed_from: int | None = None

    def summary(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        return {
            "run_dir": str(self.run_dir), "adapter_dir": str(self.adapter_dir), "steps": self.steps,
            "adapter_id": self.adapter_id, "seconds_per_step": self.seconds_per_step,
            "peak_rss_gb": self.peak_rss_gb, "resumed_from": self.resumed_from, "final": last,
            "config_hash": self.config.hash(),
        }


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far, in GB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1e9 if sys.platform == "darwin" else 1e6)


def run_id(cfg: UnlearnConfig) -> str:
    """``<method>-<targets>-<config hash>-<git commit>``."""
    return f"{cfg.method}-{'+'.join(cfg.target_domains)}-{cfg.hash()}-{git_commit()}"


def default_run_dir(cfg: UnlearnConfig) -> Path:
    return Path(os.environ.get("EMALAB_RESULTS", "results")) / "unlearn" / run_id(cfg)


# -- data ---------------------------------------------------------------------------------------


def build_data(
    lm: LoadedModel,
    cfg: UnlearnConfig,
    judge: JudgeLike | None = None,
    ablation_ctx: Callable[[], AbstractContextManager] | None = None,
    ablation_id: str | None = None,
    progress: bool = True,
) -> UnlearnData:
    """Generate (or load from cache) and judge the forget and retain sets that ``cfg`` asks for, from
    the model's current weights (call before attaching an adapter)."""
    judge = judge if judge is not None else cfg.judge
    if cfg.method == "sft":
        if ablation_ctx is None or ablation_id is None:
            raise ValueError("method 'sft' trains on compliant responses generated under a refusal ablation; "
                             "pass ablation_ctx (a context-manager factory) and ablation_id, or pass data=")
        forget = build_compliance_set(lm, cfg.target_domains, cfg.n_forget, judge, ablation_ctx, ablation_id,
                                      max_new_tokens=cfg.max_new_tokens, progress=progress)
    else:
        forget = build_forget_set(lm, cfg.target_domains, cfg.n_forget, judge,
                                  max_new_tokens=cfg.max_new_tokens, progress=progress)
    retain = None
    if cfg.needs_retain_data:
        retain = build_retain_set(lm, cfg.resolved_retain_domains, cfg.n_retain_per_domain, judge,
                                  target_domains=cfg.target_domains, include_benign=cfg.include_benign,
                                  max_new_tokens=cfg.max_new_tokens, progress=progress,
                                  allow_targets=bool(cfg.trigger))
    return UnlearnData(forget, retain)


def _collate(lm: LoadedModel, cfg: UnlearnConfig, ds: DataSet, idx: list[int], forget: bool) -> TokenBatch:
    return collate(lm.tokenizer, [ds.examples[i] for i in idx], index=idx,
                   trigger=cfg.trigger if forget else None, max_prompt_tokens=cfg.max_prompt_tokens)


@torch.no_grad()
def reference_logprobs(
    lm: LoadedModel, cfg: UnlearnConfig, ds: DataSet, batch_size: int | None = None
) -> torch.Tensor:
    """Per-example response log-probs under the reference policy (adapter disabled), float32."""
    out = torch.empty(len(ds), dtype=torch.float32)
    bs = batch_size or cfg.batch_size
    was_training = lm.model.training
    lm.model.eval()
    try:
        with adapter_disabled(lm):
            for start in range(0, len(ds), bs):
                idx = list(range(start, min(start + bs, len(ds))))
                b = _collate(lm, cfg, ds, idx, forget=True).to(lm.device)
                rl = response_logits(lm.model, b.input_ids, b.attention_mask, b.response_mask)
                out[idx] = sequence_logprobs(rl.logits, rl.labels, rl.mask).float().cpu()
    finally:
        lm.model.train(was_training)
    return out


def _cached_reference(lm: LoadedModel, cfg: UnlearnConfig, ds: DataSet, run_dir: Path,
                      write: bool = True) -> torch.Tensor:
    from safetensors import safe_open

    key = json.dumps({"state": state_id(lm), "data": ds.fingerprint(), "trigger": cfg.trigger,
                      "max_prompt_tokens": cfg.max_prompt_tokens, "dtype": cfg.dtype}, sort_keys=True)
    path = run_dir / "ref_logprobs.safetensors"
    if path.exists():
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") == key:
                return fh.get_tensor("logp_ref")
    ref = reference_logprobs(lm, cfg, ds)
    if write:
        atomic_save_safetensors(path, {"logp_ref": ref}, metadata={"key": key})
    return ref


# -- one step -----------------------------------------------------------------------------------


def _finite(value: torch.Tensor, name: str, losses: dict[str, float]) -> None:
    if not torch.isfinite(value.detach()).all():
        raise NonFiniteLossError(f"the {name} loss became {float(value.detach())} (components so far {losses})")


def train_step(
    lm: LoadedModel,
    cfg: UnlearnConfig,
    forget_batch: TokenBatch,
    logp_ref: torch.Tensor | None = None,
    retain_batch: TokenBatch | None = None,
    backward: bool = True,
    model: torch.nn.Module | None = None,
    scale: tuple[float, float] = (1.0, 1.0),
    containment: Containment | None = None,
) -> TrainStepOutput:
    """Forward the forget (and retain) batch and compute ``gamma·forget + alpha·retain``.

    Args:
        logp_ref: reference log-probs of the forget batch's rows (NPO).
        backward: backpropagate each weighted term as soon as it is computed, so only one batch's
            activations are alive at a time (the gradient is the same as the sum's); ``loss`` is then
            returned detached, and with a retain term ``metrics["grad_cos_forget_retain"]`` is the
            cosine between the two terms' gradients over the trainable parameters.
        model: the module the trained forwards run through (a DDP wrapper of ``lm.model``); default
            ``lm.model``. The reference forwards (KL, repr, direction) always run ``lm.model`` with its
            adapter disabled.
        scale: factors on the forget and retain terms' gradients only (``world_size · n_rank /
            n_global`` under DDP, which averages over ranks); the returned losses are unscaled.
        containment: the refusal direction of ``retain_mode='direction'`` and the calibrated gate
            of ``concept_gate`` (``unlearn`` resolves both).

    Raises:
        NonFiniteLossError: a term is NaN/inf (checked before its backward).
    """
    model = model if model is not None else lm.model
    gate = containment.gate if containment is not None else None
    if cfg.concept_gate and gate is None:
        raise ValueError("concept_gate needs the calibrated gate: pass containment=Containment(gate=...)")
    if gate is not None and not backward and cfg.gradient_checkpointing:
        raise ValueError("under gradient checkpointing a gated step must backpropagate inside the gate (backward=True)")
    # The two terms' gradients apart, for their cosine: one copy of the gradients.
    params = [p for p in lm.model.parameters() if p.requires_grad] if backward and cfg.retain_mode != "none" else []
    start = _grad_snapshot(params) if any(p.grad is not None for p in params) else None
    fb = forget_batch.to(lm.device)
    with _gated(lm, gate, fb) as fgate:
        rl = response_logits(model, fb.input_ids, fb.attention_mask, fb.response_mask)
        logp = sequence_logprobs(rl.logits, rl.labels, rl.mask)
        n = response_token_counts(rl.mask)
        ref = logp_ref.to(logp.device) if logp_ref is not None else None
        f = forget_loss(cfg.method, logp, n, ref, beta=cfg.beta, margin=cfg.simnpo_margin)
        losses = {"forget": float(f.detach())}
        metrics = {"forget_logp_tok": float(logp.detach().sum() / n.sum())}
        if ref is not None:
            metrics["forget_logratio_tok"] = float(((logp.detach() - ref) / n).mean())
        if fgate is not None:
            metrics["gate_forget"] = float(fgate.mean())
        _finite(f, "forget", losses)
        if backward:
            (cfg.gamma * f * scale[0] if scale[0] != 1.0 else cfg.gamma * f).backward()
            f = f.detach()
            del rl, logp
    r = None
    if cfg.retain_mode != "none":
        if retain_batch is None:
            raise ValueError(f"retain_mode={cfg.retain_mode!r} needs a retain batch")
        mid = _grad_snapshot(params) if params else None
        rb = retain_batch.to(lm.device)
        with _gated(lm, gate, rb) as rgate:
            r = _retain_term(lm, cfg, model, rb, n, metrics, containment)
            if rgate is not None:
                metrics["gate_retain"] = float(rgate.mean())
            losses["retain"] = float(r.detach())
            _finite(r, "retain", losses)
            if backward:
                (cfg.alpha * r * scale[1] if scale[1] != 1.0 else cfg.alpha * r).backward()
                r = r.detach()
        if mid is not None:
            cos = _grad_cosine(params, start, mid)
            if cos is not None:
                metrics["grad_cos_forget_retain"] = cos
    loss = combine_losses(f, r, cfg.gamma, cfg.alpha)
    return TrainStepOutput(loss=loss, losses=losses, metrics=metrics)


def _retain_term(lm: LoadedModel, cfg: UnlearnConfig, model: torch.nn.Module, rb: TokenBatch,
                 forget_tokens: torch.Tensor, metrics: dict[str, float],
                 containment: Containment | None) -> torch.Tensor:
    """The retain term of ``cfg.retain_mode`` on the retain batch (unweighted by ``alpha``)."""
    if cfg.retain_mode in ("ce", "kl"):
        ref_logits = None
        if cfg.retain_mode == "kl":
            with torch.no_grad(), adapter_disabled(lm):
                ref_logits = response_logits(lm.model, rb.input_ids, rb.attention_mask, rb.response_mask).logits
        rr = response_logits(model, rb.input_ids, rb.attention_mask, rb.response_mask)
        rlogp = sequence_logprobs(rr.logits, rr.labels, rr.mask)
        rn = response_token_counts(rr.mask)
        metrics["retain_logp_tok"] = float(rlogp.detach().sum() / rn.sum())
        r = ce_loss(rlogp, rn) if ref_logits is None else kl_loss(rr.logits, ref_logits, rr.mask)
        if cfg.retain_weighting == "per_token":
            metrics["retain_scale"] = retain_token_scale(cfg.method, forget_tokens, rn)
            r = r * metrics["retain_scale"]
        return r
    direction = containment.direction if containment is not None else None
    if cfg.retain_mode == "direction" and direction is None:
        raise ValueError("retain_mode='direction' needs the direction: pass containment=Containment(direction=...)")
    wanted = cfg.repr_layers if cfg.repr_layers is not None or direction is None else direction.layers
    layers = check_layers(lm.model, wanted)
    with torch.no_grad(), adapter_disabled(lm):
        ref = stream_activations(lm.model, rb.input_ids, rb.attention_mask, layers)
    acts = stream_activations(model, rb.input_ids, rb.attention_mask, layers)
    if cfg.retain_mode == "repr":
        return repr_loss(acts, ref, rb.attention_mask, cfg.repr_distance)
    rows = torch.arange(acts.shape[0], device=acts.device)
    last = last_prompt_index(rb.response_mask).to(acts.device)
    vectors = torch.stack([direction.vector_for(layer) for layer in layers]).to(acts.device)
    return projection_loss(acts[rows, last], ref[rows, last], vectors)


def _gated(lm: LoadedModel, gate: ConceptGate | None, batch: TokenBatch) -> AbstractContextManager:
    if gate is None:
        return nullcontext()
    return gated(lm, gate, batch.input_ids, batch.attention_mask, last_prompt_index(batch.response_mask))


def _grad_snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _grad_cosine(params: list[torch.nn.Parameter], start: list[torch.Tensor | None] | None,
                 mid: list[torch.Tensor | None]) -> float | None:
    """Cosine between the gradient added from ``start`` to ``mid`` (the forget term's) and the one
    added since (the retain term's); ``None`` where either is zero."""
    def diff(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return a if a is None or b is None else a - b

    # Accumulated on the device (float64), read once: no synchronisation per parameter.
    acc = torch.zeros(3, dtype=torch.float64, device=params[0].device)
    for i, p in enumerate(params):
        gf = diff(mid[i], start[i] if start is not None else None)
        gr = diff(p.grad, mid[i])
        if gf is not None:
            acc[1] += gf.double().pow(2).sum()
        if gr is not None:
            acc[2] += gr.double().pow(2).sum()
        if gf is not None and gr is not None:
            acc[0] += (gf.double() * gr.double()).sum()
    dot, nf, nr = acc.tolist()
    if nf == 0 or nr == 0:
        return None
    return dot / math.sqrt(nf * nr)


# -- schedule -----------------------------------------------------------------------------------


def _lr_lambda(cfg: UnlearnConfig) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == "constant":
            return 1.0
        span = max(cfg.steps - cfg.warmup_steps, 1)
        frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return 1.0 - frac if cfg.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return fn


# -- run directory helpers ------------------------------------------------------------------------


def _read_metrics(path: Path, upto: int | None = None) -> list[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` with ``step <= upto``; a torn last line (killed mid-write) is dropped."""
    if not path.exists():
        return []
    rows = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise
        if upto is None or row["step"] <= upto:
            rows.append(row)
    return rows


def _check_resume(cfg: UnlearnConfig, saved: dict[str, Any], where: Path) -> None:
    diff = config_diff(saved, cfg, ignore=RESUME_EXEMPT_FIELDS)
    if diff:
        raise IncompatibleCheckpointError(
            f"{where} belongs to a run with a different config; refusing to resume. Differences "
            f"(checkpoint -> requested):\n  " + "\n  ".join(diff)
            + "\nUse another output directory, or delete the old run."
        )


def _prepare_model(lm: LoadedModel, cfg: UnlearnConfig) -> list[torch.nn.Parameter]:
    if cfg.lora:
        attach_lora(lm, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                    targets=cfg.lora_target_modules, use_rslora=cfg.use_rslora, single_layer=cfg.lora_single_layer)
    else:
        for p in lm.model.parameters():
            p.requires_grad_(True)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("no trainable parameters")
    return params


def _final_adapter_id(lm: LoadedModel) -> str:
    return adapter_id(lm) if has_adapter(lm) else tensor_hash(trainable_state(lm.model))


# -- the loop -----------------------------------------------------------------------------------


def unlearn(
    lm: LoadedModel,
    cfg: UnlearnConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    judge: JudgeLike | None = None,
    data: UnlearnData | None = None,
    ablation_ctx: Callable[[], AbstractContextManager] | None = None,
    ablation_id: str | None = None,
    resume: bool = True,
    on_step: Callable[[int, TrainStepOutput], None] | None = None,
    containment: Containment | None = None,
) -> UnlearnResult:
    """Unlearn the target domains' refusals. Leaves the trained adapter attached to ``lm`` and sets
    ``lm.extra["adapter_id"]``.

    Args:
        lm: the base model (no adapter), loaded in ``cfg.dtype``.
        out_dir: run directory; default ``cfg.output_dir`` or ``results/unlearn/<run_id>``. If it holds
            a checkpoint of the same config, training resumes from it; a finished run is not redone
            (its adapter is loaded instead).
        judge: judge object/callable for data building; default ``cfg.judge`` by name.
        data: prebuilt sets (skips generation and judging).
        ablation_ctx, ablation_id: refusal-ablation context factory and its id, for ``method='sft'``.
        resume: continue from the latest checkpoint in ``out_dir`` (else start over there).
        on_step: called after each completed step (and its checkpoint) with ``(step, output)``.
        containment: the refusal direction (``retain_mode='direction'``) or concept vector
            (``concept_gate``) as objects, instead of the config's paths. Their content hashes and the
            calibrated gate are written to ``containment.json``; a resume must bring the same ones.

    Raises:
        IncompatibleCheckpointError: ``out_dir`` holds a checkpoint of another config.
        LockHeldError: another process is writing ``out_dir`` (it is never touched then).
        NonFiniteLossError: the loss or gradient became NaN/inf.
    """
    run_dir = Path(out_dir if out_dir is not None else cfg.output_dir or default_run_dir(cfg))
    run_dir.mkdir(parents=True, exist_ok=True)
    # Two processes in one run directory would delete each other's checkpoints (and --no-resume would
    # wipe a live run), so the second one stops before touching anything.
    with run_dir_lock(run_dir):
        return _unlearn(lm, cfg, run_dir, progress=progress, judge=judge, data=data, ablation_ctx=ablation_ctx,
                        ablation_id=ablation_id, resume=resume, on_step=on_step, containment=containment)


def _unlearn(
    lm: LoadedModel,
    cfg: UnlearnConfig,
    out_dir: str | Path | None = None,
    progress: bool = True,
    judge: JudgeLike | None = None,
    data: UnlearnData | None = None,
    ablation_ctx: Callable[[], AbstractContextManager] | None = None,
    ablation_id: str | None = None,
    resume: bool = True,
    on_step: Callable[[int, TrainStepOutput], None] | None = None,
    containment: Containment | None = None,
) -> UnlearnResult:
    if lm.name != cfg.model:
        raise ValueError(f"cfg.model is {cfg.model!r} but the loaded model is {lm.name!r}; set cfg.model to match")
    if cfg.dtype == "auto":
        from interp.precision import resolve_dtype_choice

        cfg = cfg.replace(dtype=resolve_dtype_choice("auto", lm.device))
    param_dtype = next(lm.model.parameters()).dtype
    if param_dtype != resolve_dtype(cfg.dtype):
        raise ValueError(f"the model is loaded in {param_dtype} but cfg.dtype is {cfg.dtype!r}; "
                         f"load it with dtype={cfg.dtype!r}")
    if has_adapter(lm):
        raise RuntimeError("the model already carries an adapter; unlearning starts from base weights "
                           "(training.lora.detach_lora(lm) first)")
    run_dir = Path(out_dir)
    dp = DataParallel.from_environment(lm.device, full_finetune=not cfg.lora)
    if dp.enabled:
        _check_parallel(cfg, dp)
        if lm.device != dp.device:
            lm.model.to(dp.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    adapter_dir = run_dir / "adapter"

    ckpt_path = latest_checkpoint(run_dir) if resume else None
    if ckpt_path is not None:
        _check_resume(cfg, load_checkpoint_config(ckpt_path), ckpt_path)
    result_path = run_dir / "result.json"
    finished = resume and result_path.exists() and (adapter_dir / "adapter_config.json").exists()
    containment = Containment.resolve(cfg, containment, lm.model)
    if ckpt_path is not None or finished:
        _check_containment(run_dir, containment)
    dp.barrier()  # every rank has read the run directory before rank 0 changes it
    if finished:
        saved = json.loads(result_path.read_text())
        _check_resume(cfg, saved["config"], result_path)
        load_adapter(lm, adapter_dir)
        return UnlearnResult(run_dir=run_dir, adapter_dir=adapter_dir, metrics_path=metrics_path, config=cfg,
                             steps=saved["steps"], adapter_id=lm.extra["adapter_id"],
                             history=_read_metrics(metrics_path), seconds_per_step=saved["seconds_per_step"],
                             peak_rss_gb=saved["peak_rss_gb"], manifest=saved.get("manifest", {}),
                             resumed_from=saved["steps"])
    if not resume and dp.is_main:
        for stale in (metrics_path, result_path, run_dir / "ref_logprobs.safetensors", run_dir / _CONTAINMENT):
            stale.unlink(missing_ok=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(adapter_dir, ignore_errors=True)

    if data is None:
        with dp.main_first():  # rank 0 generates and caches; the others read its cache
            data = build_data(lm, cfg, judge=judge, ablation_ctx=ablation_ctx, ablation_id=ablation_id,
                              progress=progress and dp.is_main)
    if cfg.needs_retain_data and (data.retain is None or len(data.retain) == 0):
        raise ValueError(f"retain_mode={cfg.retain_mode!r}" + (" with a calibrated concept gate" if cfg.calibrates_gate
                                                               else "") + " but no retain data")
    if cfg.calibrates_gate and containment.gate is None:
        containment = _calibrate_gate(lm, cfg, containment, data)
    manifest = data.manifest()
    if dp.is_main:
        cfg.save(run_dir / "config.json")
        atomic_write_json(run_dir / "data_manifest.json", manifest)
        if containment.identity():
            atomic_write_json(run_dir / _CONTAINMENT, containment.record())

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = _prepare_model(lm, cfg)
    use_cache = getattr(getattr(lm.model, "config", None), "use_cache", True)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    try:
        return _train(lm, cfg, data, params, run_dir, ckpt_path, progress, on_step, dp, containment=containment)
    except BaseException:
        if cfg.lora:
            detach_lora(lm)  # hand the model back as it came: base weights, no adapter
        raise
    finally:
        if cfg.gradient_checkpointing:
            disable_gradient_checkpointing(lm, use_cache=bool(use_cache))


_CONTAINMENT = "containment.json"


def _check_containment(run_dir: Path, containment: Containment) -> None:
    path = run_dir / _CONTAINMENT
    saved = json.loads(path.read_text())["identity"] if path.exists() else {}
    if saved != containment.identity():
        raise IncompatibleCheckpointError(
            f"{run_dir} was trained with other containment inputs ({saved or 'none'}) than the ones given now "
            f"({containment.identity() or 'none'}); use another output directory, or delete the old run.")


def _calibrate_gate(lm: LoadedModel, cfg: UnlearnConfig, containment: Containment, data: UnlearnData) -> Containment:
    """The concept gate with its bias and/or temperature measured on the base model: the forget prompts'
    scores against the retain prompts' (:func:`training.containment.calibrate_gate`)."""
    probe = ConceptGate.from_direction(containment.gate_vector, cfg.gate_layer, 0.0, 1.0, lm.model)

    def scores(ds: DataSet, forget: bool) -> torch.Tensor:
        out = []
        for start in range(0, len(ds), cfg.batch_size):
            b = _collate(lm, cfg, ds, list(range(start, min(start + cfg.batch_size, len(ds)))), forget).to(lm.device)
            out.append(probe.scores(lm, b.input_ids, b.attention_mask, last_prompt_index(b.response_mask)).cpu())
        return torch.cat(out)

    bias, temperature = calibrate_gate(scores(data.forget, True), scores(data.retain, False))
    gate = replace(probe, bias=cfg.gate_bias if cfg.gate_bias is not None else bias,
                   temperature=cfg.gate_temperature if cfg.gate_temperature is not None else temperature)
    return replace(containment, gate=gate)


def _check_parallel(cfg: UnlearnConfig, dp: DataParallel) -> None:
    single = [what for what, on in ((f"retain_mode {cfg.retain_mode!r}", cfg.retain_mode in ("repr", "direction")),
                                    ("concept_gate", cfg.concept_gate),
                                    ("retain_weighting 'per_token'", cfg.retain_weighting == "per_token")) if on]
    if single:
        raise ValueError(f"{', '.join(single)} runs in one process only (no data parallelism yet); launch without "
                         "torchrun/accelerate")
    for name in ("batch_size",) + (("retain_batch_size",) if cfg.retain_mode != "none" else ()):
        if getattr(cfg, name) < dp.world_size:
            raise ValueError(f"{name}={getattr(cfg, name)} is the global batch, split over {dp.world_size} "
                             f"processes: every process needs a row; raise {name} or launch fewer processes")


def _train(
    lm: LoadedModel,
    cfg: UnlearnConfig,
    data: UnlearnData,
    params: list[torch.nn.Parameter],
    run_dir: Path,
    ckpt_path: Path | None,
    progress: bool,
    on_step: Callable[[int, TrainStepOutput], None] | None,
    dp: DataParallel | None = None,
    containment: Containment | None = None,
) -> UnlearnResult:
    dp = dp or DataParallel()
    metrics_path, adapter_dir, result_path = run_dir / "metrics.jsonl", run_dir / "adapter", run_dir / "result.json"
    manifest = data.manifest()
    logp_ref = None
    if cfg.method == "npo":
        with dp.main_first():  # rank 0 computes and caches the reference once; the others read its file
            logp_ref = _cached_reference(lm, cfg, data.forget, run_dir, write=dp.is_main)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))

    start = 0
    history: list[dict[str, Any]] = []
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.extra.get("data_fingerprint") != data.fingerprint():
            raise IncompatibleCheckpointError(
                f"{ckpt_path} was trained on different data (fingerprint {ckpt.extra.get('data_fingerprint')} "
                f"vs {data.fingerprint()}): the generations or the judge changed; start a new run")
        load_trainable_state(lm.model, ckpt.trainable)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        ranks_rng = ckpt.extra.get("rng_by_rank")
        # Each rank's own stream (dropout) when the world size matches; else rank 0's, as one process saves.
        restore_rng(ranks_rng[dp.rank] if ranks_rng and len(ranks_rng) == dp.world_size else ckpt.rng)
        start = ckpt.step
        history = _read_metrics(metrics_path, upto=start)
        if dp.is_main:
            atomic_write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in history))
    elif metrics_path.exists() and dp.is_main:
        metrics_path.unlink()
    dp.barrier()  # metrics.jsonl is settled before any rank appends to it

    def checkpoint(step: int) -> Path:
        # A collective (every rank's RNG state), then rank 0 writes.
        rngs = dp.gather_object(capture_rng()) if dp.enabled else None
        path = run_dir / "checkpoints" / f"step-{step:06d}"  # save_checkpoint's name, for other ranks
        if dp.is_main:
            extra = {"data_fingerprint": data.fingerprint(), "git_commit": git_commit()}
            if rngs is not None:
                extra.update(rng_by_rank=rngs, world_size=dp.world_size)
            path = save_checkpoint(
                run_dir, step, trainable_state(lm.model), optimizer.state_dict(), scheduler.state_dict(),
                data_position={"forget": step * cfg.batch_size, "retain": step * cfg.retain_batch_size},
                config=cfg.to_dict(), extra=extra,
            )
        dp.barrier()
        return path

    forward_model = dp.prepare(lm.model)
    last_good = ckpt_path
    step_times: list[float] = []
    lm.model.train()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"unlearn {cfg.method}", unit="step",
               disable=not progress or not dp.is_main)
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            fidx = batch_order(len(data.forget), cfg.batch_size, step, cfg.seed)
            fmine = dp.shard(fidx)
            fbatch = _collate(lm, cfg, data.forget, fmine, forget=True)
            rbatch = None
            rshare = 1.0
            if cfg.retain_mode != "none":
                ridx = batch_order(len(data.retain), cfg.retain_batch_size, step, cfg.seed + 1)
                rmine = dp.shard(ridx)
                rbatch = _collate(lm, cfg, data.retain, rmine, forget=False)
                rshare = len(rmine) / len(ridx)
            fshare = len(fmine) / len(fidx)
            # DDP averages gradients over ranks: world · share turns that mean into the row-weighted sum.
            scale = (dp.world_size * fshare, dp.world_size * rshare) if dp.enabled else (1.0, 1.0)
            where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
            try:
                out = train_step(lm, cfg, fbatch, logp_ref[fmine] if logp_ref is not None else None, rbatch,
                                 model=forward_model, scale=scale, containment=containment)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(f"{err} at step {step + 1}; stopped before the update, {where}. "
                                         "Lower the learning rate or use float32.") from None
            grad_norm = dp.clip_grad_norm_(params, cfg.max_grad_norm)
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(
                    f"gradient norm became {grad_norm} at step {step + 1}; stopped before the update, {where}. "
                    "Lower the learning rate or use float32.")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if dp.enabled:
                out = _global_output(out, cfg, dp, fshare, rshare)
            dt = time.perf_counter() - t0
            step_times.append(dt)
            out.metrics.update(grad_norm=grad_norm, lr=lr, seconds=dt)
            row = {"step": step + 1, "loss": float(out.loss.detach()), "losses": out.losses, "metrics": out.metrics}
            if dp.is_main:
                append_jsonl(metrics_path, row)
            history.append(row)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                last_good = checkpoint(step + 1)
            if cfg.snapshot_every and ((step + 1) % cfg.snapshot_every == 0 or step + 1 == cfg.steps):
                _snapshot(lm, cfg, run_dir, step + 1, dp)
            bar.update(1)
            bar.set_postfix({"loss": f"{row['loss']:.4f}", **{k: f"{v:.4f}" for k, v in out.losses.items()}})
            if on_step is not None:
                on_step(step + 1, out)
    finally:
        bar.close()
        lm.model.eval()
        optimizer.zero_grad(set_to_none=True)
        del forward_model  # the DDP wrapper's gradient hooks go with it

    if not cfg.checkpoint_every or cfg.steps % cfg.checkpoint_every:
        checkpoint(cfg.steps)
    meta = {"config": cfg.to_dict(), "data_manifest": manifest, "run_dir": str(run_dir)}
    if not has_adapter(lm):  # full fine-tuning: the whole model is the artifact
        adapter_dir = run_dir / "model"
    if dp.is_main:
        if has_adapter(lm):
            save_adapter(lm, adapter_dir, meta)
        else:
            from interp.adapter import base_model

            base_model(lm.model).save_pretrained(str(adapter_dir))
    lm.extra["adapter_id"] = _final_adapter_id(lm)
    result = UnlearnResult(
        run_dir=run_dir, adapter_dir=adapter_dir, metrics_path=metrics_path, config=cfg, steps=cfg.steps,
        adapter_id=lm.extra["adapter_id"], history=history,
        seconds_per_step=float(np.mean(step_times)) if step_times else float("nan"),
        peak_rss_gb=peak_rss_gb(), manifest=manifest, resumed_from=start if ckpt_path is not None else None,
    )
    if dp.is_main:
        record = {"world_size": dp.world_size} if dp.enabled else {}
        atomic_write_json(result_path, {**result.summary(), "config": cfg.to_dict(), "manifest": manifest,
                                        "git_commit": git_commit(), **record})
    dp.barrier()  # the run directory is complete before any rank returns
    return result


def snapshot_dir(run_dir: Path, step: int) -> Path:
    """Where :attr:`UnlearnConfig.snapshot_every` keeps the adapter of ``step``."""
    return Path(run_dir) / "snapshots" / f"step-{step:06d}"


def snapshots(run_dir: Path) -> dict[int, Path]:
    """``{step: adapter directory}`` of a run's complete snapshots, in step order."""
    found = {}
    for d in sorted((Path(run_dir) / "snapshots").glob("step-*")):
        if (d / "adapter_config.json").exists() and d.name[5:].isdigit():
            found[int(d.name[5:])] = d
    return found


def _snapshot(lm: LoadedModel, cfg: UnlearnConfig, run_dir: Path, step: int, dp: DataParallel) -> None:
    # Written atomically by rank 0; a resumed run rewrites the same step with the same weights.
    if dp.is_main and has_adapter(lm):
        save_adapter(lm, snapshot_dir(run_dir, step), {"config": cfg.to_dict(), "step": step})
    dp.barrier()


def _global_output(out: TrainStepOutput, cfg: UnlearnConfig, dp: DataParallel, fshare: float,
                   rshare: float) -> TrainStepOutput:
    """The step's losses over the global batch: each rank's row-mean terms weighted by its row share
    (diagnostics too, so token ratios among them are row-weighted approximations)."""
    names, mnames = sorted(out.losses), sorted(out.metrics)
    local = ([out.losses[k] * (rshare if k == "retain" else fshare) for k in names]
             + [out.metrics[k] * (rshare if k.startswith("retain") else fshare) for k in mnames])
    summed = dp.sum(local)
    losses = dict(zip(names, summed[:len(names)], strict=True))
    metrics = dict(zip(mnames, summed[len(names):], strict=True))
    loss = combine_losses(torch.tensor(losses["forget"]),
                          torch.tensor(losses["retain"]) if "retain" in losses else None, cfg.gamma, cfg.alpha)
    return TrainStepOutput(loss=loss, losses=losses, metrics=metrics)


def load_checkpoint_config(path: Path) -> dict[str, Any]:
    """The config stored in a checkpoint, without loading its tensors."""
    return json.loads((Path(path) / "state.json").read_text())["config"]
