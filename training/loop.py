"""The optimisation loop of :func:`training.trainer.unlearn`: the learning-rate schedule, the
optimizer, resuming from a checkpoint, the steps (one is :func:`training.step.train_step`) with their
metrics, checkpoints and snapshots, and the finished adapter and ``result.json``.

:func:`train_loop` takes a prepared run: the model carries its trainable parameters, the data is
built, the run directory is locked and checked (all done by :func:`training.trainer.unlearn`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from interp.io import append_jsonl, atomic_write_json, atomic_write_text, git_commit
from interp.loading import LoadedModel
from training.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from training.collate import batch_order, collate_rows
from training.config import UnlearnConfig
from training.containment import Containment, gate_files
from training.data import UnlearnData
from training.distributed import DataParallel
from training.lora import (
    adapter_id,
    has_adapter,
    load_trainable_state,
    save_adapter,
    tensor_hash,
    trainable_state,
)
from training.losses import TrainStepOutput
from training.reference import cached_reference_logprobs
from training.retain_reference import retain_reference
from training.run_files import (
    IncompatibleCheckpointError,
    UnlearnResult,
    peak_rss_gb,
    read_metrics,
    save_snapshot,
)
from training.step import NonFiniteLossError, PhaseClock, global_step_output, train_step

__all__ = ["UPDATE_PHASES", "lr_schedule", "optimizer_update", "train_loop"]

UPDATE_PHASES = ("clip", "adamw", "zero_grad")
"""The phases :func:`optimizer_update` reports to its clock, in order."""


def lr_schedule(cfg: UnlearnConfig) -> Callable[[int], float]:
    """The learning-rate multiplier per step for ``LambdaLR``: linear warm-up over ``cfg.warmup_steps``,
    then constant, linear or cosine decay to zero at ``cfg.steps`` (``cfg.scheduler``)."""

    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.scheduler == "constant":
            return 1.0
        span = max(cfg.steps - cfg.warmup_steps, 1)
        frac = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
        return 1.0 - frac if cfg.scheduler == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return fn


def optimizer_update(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                     scheduler: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float | None,
                     dp: DataParallel | None = None, clock: PhaseClock | None = None) -> tuple[float, float]:
    """The update after a step's backward: clip the gradient norm, step AdamW and the schedule, zero the
    gradients.

    Args:
        params: the trainable parameters (their gradients already averaged over ranks under DDP).
        max_grad_norm: the clipping norm; ``None``: the norm is measured, not clipped.
        dp: the job (:meth:`training.distributed.DataParallel.clip_grad_norm_`); default one process.
        clock: called with ``clip``, ``adamw`` (the optimizer and the schedule) and ``zero_grad`` as
            each ends (:data:`UPDATE_PHASES`); ``None``: nothing is called.

    Returns:
        ``(grad_norm, lr)``: the norm before clipping and the learning rate the step used.

    Raises:
        NonFiniteLossError: the gradient norm is NaN/inf; nothing was updated.
    """
    grad_norm = (dp or DataParallel()).clip_grad_norm_(params, max_grad_norm)
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(f"gradient norm became {grad_norm}")
    if clock is not None:
        clock("clip")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    if clock is not None:
        clock("adamw")
    optimizer.zero_grad(set_to_none=True)
    if clock is not None:
        clock("zero_grad")
    return grad_norm, lr


def _final_adapter_id(lm: LoadedModel) -> str:
    return adapter_id(lm) if has_adapter(lm) else tensor_hash(trainable_state(lm.model))


def train_loop(
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
    """Train ``params`` for ``cfg.steps`` steps (from ``ckpt_path`` when given), write the run directory
    (metrics, checkpoints, snapshots, the adapter or full model, ``result.json``) and return the result.

    Raises:
        IncompatibleCheckpointError: ``ckpt_path`` was trained on other data.
        NonFiniteLossError: the loss or gradient became NaN/inf.
    """
    dp = dp or DataParallel()
    metrics_path, adapter_dir, result_path = run_dir / "metrics.jsonl", run_dir / "adapter", run_dir / "result.json"
    manifest = data.manifest()
    logp_ref = None
    if cfg.method == "npo":
        with dp.main_first():  # rank 0 computes and caches the reference once; the others read its file
            logp_ref = cached_reference_logprobs(lm, cfg, data.forget, run_dir, write=dp.is_main)
    # The retain term's base-model side (kl / repr / direction), once per run and in memory: every rank
    # computes it, and a resume recomputes it (training.retain_reference says why).
    retain_ref = retain_reference(lm, cfg, data.retain, containment)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg))

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
                                 model=forward_model, scale=scale, containment=containment, retain_ref=retain_ref)
                grad_norm, lr = optimizer_update(params, optimizer, scheduler, cfg.max_grad_norm, dp)
            except NonFiniteLossError as err:
                raise NonFiniteLossError(f"{err} at step {step + 1}; stopped before the update, {where}. "
                                         "Lower the learning rate or use float32.") from None
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
