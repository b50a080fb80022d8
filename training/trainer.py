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
    adapter/               the finished adapter, standard PEFT format + emalab_adapter.json (a gated
                           run's adapters and snapshots also keep their gate: gate.safetensors)
    result.json            summary (steps, adapter id, seconds per step, peak RSS)

Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1) the same loop runs data-parallel
(:mod:`training.distributed`): every rank takes its rows of each global batch, DDP averages the
gradients, rank 0 alone writes the run directory, and every rank reads it to resume.

The loop lives here; one step is :mod:`training.step`, NPO's reference cache
:mod:`training.reference`, the run directory's other files (metrics, resume checks, snapshots, the
result) :mod:`training.run_files`, and the sets a config asks for :func:`training.data.build_data`.
Their public names are re-exported here.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.io import append_jsonl, atomic_write_json, atomic_write_text, git_commit
from interp.loading import LoadedModel, resolve_dtype
from training.checkpoint import (
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    run_dir_lock,
    save_checkpoint,
)
from training.collate import batch_order, collate_rows
from training.config import UnlearnConfig
from training.containment import Containment, calibrate_concept_gate, gate_files
from training.data import JudgeLike, UnlearnData, build_data
from training.distributed import DataParallel, check_parallel
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
from training.losses import TrainStepOutput
from training.reference import cached_reference_logprobs, reference_logprobs
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
    save_snapshot,
    snapshot_dir,
    snapshots,
)
from training.step import NonFiniteLossError, global_step_output, train_step

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
        check_parallel(cfg, dp)
        if lm.device != dp.device:
            lm.model.to(dp.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    adapter_dir = run_dir / "adapter"

    ckpt_path = latest_checkpoint(run_dir) if resume else None
    if ckpt_path is not None:
        check_resume(cfg, load_checkpoint_config(ckpt_path), ckpt_path)
    result_path = run_dir / "result.json"
    finished = resume and result_path.exists() and (adapter_dir / "adapter_config.json").exists()
    containment = Containment.resolve(cfg, containment, lm.model)
    if ckpt_path is not None or finished:
        check_containment(run_dir, containment)
    dp.barrier()  # every rank has read the run directory before rank 0 changes it
    if finished:
        saved = json.loads(result_path.read_text())
        check_resume(cfg, saved["config"], result_path)
        load_adapter(lm, adapter_dir)
        return UnlearnResult(run_dir=run_dir, adapter_dir=adapter_dir, metrics_path=metrics_path, config=cfg,
                             steps=saved["steps"], adapter_id=lm.extra["adapter_id"],
                             history=read_metrics(metrics_path), seconds_per_step=saved["seconds_per_step"],
                             peak_rss_gb=saved["peak_rss_gb"], manifest=saved.get("manifest", {}),
                             resumed_from=saved["steps"])
    if not resume and dp.is_main:
        for stale in (metrics_path, result_path, run_dir / "ref_logprobs.safetensors", run_dir / CONTAINMENT_FILE):
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
        containment = calibrate_concept_gate(lm, cfg, containment, data.forget, data.retain)
    manifest = data.manifest()
    if dp.is_main:
        cfg.save(run_dir / "config.json")
        atomic_write_json(run_dir / "data_manifest.json", manifest)
        if containment.identity():
            atomic_write_json(run_dir / CONTAINMENT_FILE, containment.record())

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
            logp_ref = cached_reference_logprobs(lm, cfg, data.forget, run_dir, write=dp.is_main)
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
        history = read_metrics(metrics_path, upto=start)
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
    gate = containment.gate if containment is not None else None
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
            fbatch = collate_rows(lm, cfg, data.forget, fmine, forget=True)
            rbatch = None
            rshare = 1.0
            if cfg.retain_mode != "none":
                ridx = batch_order(len(data.retain), cfg.retain_batch_size, step, cfg.seed + 1)
                rmine = dp.shard(ridx)
                rbatch = collate_rows(lm, cfg, data.retain, rmine, forget=False)
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
                out = global_step_output(out, cfg, dp, fshare, rshare)
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
                save_snapshot(lm, cfg, run_dir, step + 1, dp, gate)
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
            gate_meta, gate_tensors = gate_files(gate)  # the gate goes with the adapter it gates
            save_adapter(lm, adapter_dir, {**meta, **gate_meta}, gate_tensors)
        else:
            from interp.adapter import base_model

            base_model(lm.model).save_pretrained(str(adapter_dir))
    lm.extra["adapter_id"] = _final_adapter_id(lm)
    if gate is not None:
        lm.extra["adapter_gated"] = True  # merged_adapter refuses it
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
