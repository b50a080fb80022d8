"""Refusal unlearning: NPO / GA / GradDiff / SimNPO / LoRA-SFT with an optional retain term (CE, KL,
representation or direction retain: :mod:`training.containment`), on a LoRA adapter (optionally
concept-gated) or all weights, resumable from atomic checkpoints.

The reference policy is the base model with the adapter disabled; NPO's reference log-probs are
computed once for the whole forget set and cached in the run directory, and the KL / repr / direction
retain terms' reference once for the whole retain set, in memory (:mod:`training.retain_reference`). A
run directory holds::

    config.json            the UnlearnConfig
    data_manifest.json     prompt ids, counts, judge drops of the forget / retain sets
    ref_logprobs.safetensors
    containment.json       content hashes of a given direction / concept vector, the calibrated gate
    metrics.jsonl          one row per step: loss, its components, diagnostics
    checkpoints/step-N/    latest resumable checkpoints (atomic)
    snapshots/step-N/      the adapter every ``snapshot_every`` steps and at the end (trajectories)
    adapter/               the finished adapter, standard PEFT format + emalab_adapter.json (a gated
                           run's adapters and snapshots also keep their gate: gate.safetensors)
    result.json            summary (steps, adapter id, seconds per step, peak RSS)

Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) the same loop runs data-parallel
(:mod:`training.distributed`): every rank takes its rows of each global batch, DDP averages the
gradients, rank 0 alone writes the run directory, and every rank reads it to resume.

This module sets a run up: it checks the model and config, locks and checks the run directory, reuses
a finished run, builds the data and the containment, and prepares the model. The loop that follows is
:mod:`training.loop`; one step is :mod:`training.step`, NPO's reference cache
:mod:`training.reference`, the retain terms' :mod:`training.retain_reference`, the run directory's other files (metrics, resume checks, snapshots, the
result) :mod:`training.run_files`, and the sets a config asks for :func:`training.data.build_data`.
Their public names are re-exported here.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch

from interp.io import atomic_write_json
from interp.loading import LoadedModel, resolve_dtype
from training.activation_memory import resolve_checkpointing
from training.checkpoint import latest_checkpoint, run_dir_lock
from training.config import UnlearnConfig
from training.containment import Containment, calibrate_concept_gate
from training.data import JudgeLike, UnlearnData, build_data
from training.distributed import DataParallel, check_parallel
from training.loop import train_loop
from training.lora import (
    attach_lora,
    detach_lora,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    has_adapter,
    load_adapter,
)
from training.losses import TrainStepOutput
from training.reference import reference_logprobs
from training.run_files import (
    CONTAINMENT_FILE,
    IncompatibleCheckpointError,
    UnlearnResult,
    check_containment,
    check_resume,
    default_run_dir,
    load_checkpoint_config,
    peak_rss_gb,
    read_metrics,
    run_id,
    snapshot_dir,
    snapshots,
)
from training.step import NonFiniteLossError, train_step

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
        cfg = _checked_config(lm, cfg)
        dp = DataParallel.from_environment(lm.device, full_finetune=not cfg.lora)
        if dp.enabled:
            check_parallel(cfg, dp)
            if lm.device != dp.device:
                lm.model.to(dp.device)
        ckpt_path = latest_checkpoint(run_dir) if resume else None
        if ckpt_path is not None:
            check_resume(cfg, load_checkpoint_config(ckpt_path), ckpt_path)
        finished = resume and (run_dir / "result.json").exists() and (run_dir / "adapter/adapter_config.json").exists()
        containment = Containment.resolve(cfg, containment, lm.model)
        if ckpt_path is not None or finished:
            check_containment(run_dir, containment)
        dp.barrier()  # every rank has read the run directory before rank 0 changes it
        if finished:
            return _finished_result(lm, cfg, run_dir)
        if not resume and dp.is_main:
            _clear_run(run_dir)
        if data is None:
            with dp.main_first():  # rank 0 generates and caches; the others read its cache
                data = build_data(lm, cfg, judge=judge, ablation_ctx=ablation_ctx, ablation_id=ablation_id,
                                  progress=progress and dp.is_main)
        if cfg.needs_retain_data and (data.retain is None or len(data.retain) == 0):
            raise ValueError(f"retain_mode={cfg.retain_mode!r}" + (" with a calibrated concept gate"
                                                                   if cfg.calibrates_gate else "") + " but no retain data")
        if cfg.calibrates_gate and containment.gate is None:
            containment = calibrate_concept_gate(lm, cfg, containment, data.forget, data.retain)
        if dp.is_main:
            cfg.save(run_dir / "config.json")
            atomic_write_json(run_dir / "data_manifest.json", data.manifest())
            if containment.identity():
                atomic_write_json(run_dir / CONTAINMENT_FILE, containment.record())
        return _train(lm, cfg, data, run_dir, ckpt_path, progress, on_step, dp, containment)


def _checked_config(lm: LoadedModel, cfg: UnlearnConfig) -> UnlearnConfig:
    """``cfg`` with ``dtype="auto"`` resolved, after checking that it matches the loaded model."""
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
    return cfg


def _finished_result(lm: LoadedModel, cfg: UnlearnConfig, run_dir: Path) -> UnlearnResult:
    """A finished run's result, with its adapter loaded onto ``lm`` instead of training again."""
    result_path, adapter_dir, metrics_path = run_dir / "result.json", run_dir / "adapter", run_dir / "metrics.jsonl"
    saved = json.loads(result_path.read_text())
    check_resume(cfg, saved["config"], result_path)
    load_adapter(lm, adapter_dir)
    return UnlearnResult(run_dir=run_dir, adapter_dir=adapter_dir, metrics_path=metrics_path, config=cfg,
                         steps=saved["steps"], adapter_id=lm.extra["adapter_id"],
                         history=read_metrics(metrics_path), seconds_per_step=saved["seconds_per_step"],
                         peak_rss_gb=saved["peak_rss_gb"], manifest=saved.get("manifest", {}),
                         resumed_from=saved["steps"])


def _clear_run(run_dir: Path) -> None:
    """Delete what an earlier run left in ``run_dir`` (starting over instead of resuming)."""
    for name in ("metrics.jsonl", "result.json", "ref_logprobs.safetensors", CONTAINMENT_FILE):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "adapter", ignore_errors=True)


def _train(lm: LoadedModel, cfg: UnlearnConfig, data: UnlearnData, run_dir: Path, ckpt_path: Path | None,
           progress: bool, on_step: Callable[[int, TrainStepOutput], None] | None, dp: DataParallel,
           containment: Containment) -> UnlearnResult:
    """Seed, make the model trainable and run :func:`training.loop.train_loop`; a failed run leaves the
    model as it came."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    cfg = resolve_checkpointing(lm, cfg, data)  # before the adapter: the estimate reads the base model's dtype
    params = _prepare_model(lm, cfg)
    use_cache = getattr(getattr(lm.model, "config", None), "use_cache", True)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    try:
        return train_loop(lm, cfg, data, params, run_dir, ckpt_path, progress, on_step, dp, containment=containment)
    except BaseException:
        if cfg.lora:
            detach_lora(lm)  # hand the model back as it came: base weights, no adapter
        raise
    finally:
        if cfg.gradient_checkpointing:
            disable_gradient_checkpointing(lm, use_cache=bool(use_cache))


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

