"""Data-parallel unlearning steps across processes with ``torch.distributed``.

Launch with ``torchrun --nproc-per-node N script.py`` or ``accelerate launch --num_processes N
script.py``: both set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``,
which :func:`init_distributed` reads (gloo on CPU, NCCL on GPUs). Each process holds a full copy of
the model and its LoRA adapter, takes its rows of every global batch (:func:`shard_examples`), and
:func:`data_parallel_step` sums the row-weighted gradients across processes before the identical
optimiser step on every rank, so the adapters stay bit-identical.

Exactness: the loss of rank ``r`` is weighted by ``n_r / N`` (its share of the global batch's rows), so
for row-mean objectives (NPO, SimNPO) the step equals a one-process step on the global batch up to
float summation order, for any split. Token-mean terms (GA, CE, KL) are row-weighted too, as
``DistributedDataParallel`` does; they are exact when every rank holds the same number of response
tokens. See ``docs/scaling.md`` for the recipe.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from interp.activations import shard_indices
from interp.loading import LoadedModel
from training.config import UnlearnConfig
from training.data import TokenBatch
from training.losses import TrainStepOutput
from training.trainer import train_step

__all__ = [
    "DistContext",
    "init_distributed",
    "shard_examples",
    "broadcast_parameters",
    "all_reduce_gradients",
    "data_parallel_step",
]

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """More than one process, with an initialised process group."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None, backend: str | None = None) -> DistContext:
    """Join the process group described by the launcher's environment variables.

    Without ``WORLD_SIZE`` (or with 1) this is a single-process context and nothing is initialised,
    so the same script runs with and without a launcher.

    Args:
        device: ``cpu`` or ``cuda``; default ``cuda`` when available. Each process takes GPU
            ``LOCAL_RANK``.
        backend: default ``nccl`` for CUDA, ``gloo`` for CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(f"cuda:{local}") if kind == "cuda" else torch.device(kind)
    if kind == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if kind == "cuda" else "gloo"), rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def shard_examples(items: Sequence[T], ctx: DistContext) -> list[T]:
    """This rank's contiguous block of a global batch (see :func:`interp.activations.shard_indices`)."""
    return [items[i] for i in shard_indices(len(items), ctx.rank, ctx.world_size)]


@torch.no_grad()
def broadcast_parameters(params: Sequence[torch.nn.Parameter], ctx: DistContext, src: int = 0) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank (e.g. a freshly initialised adapter)."""
    if not ctx.enabled:
        return
    for p in params:
        dist.broadcast(p.data, src=src)


@torch.no_grad()
def all_reduce_gradients(params: Sequence[torch.nn.Parameter], ctx: DistContext) -> None:
    """Sum the gradients of ``params`` over ranks, in one float32 all-reduce (a missing gradient counts as 0)."""
    if not ctx.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n


def _global_sum(values: list[float], ctx: DistContext) -> list[float]:
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def data_parallel_step(
    lm: LoadedModel,
    cfg: UnlearnConfig,
    forget_batch: TokenBatch,
    params: Sequence[torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    ctx: DistContext,
    logp_ref: torch.Tensor | None = None,
    retain_batch: TokenBatch | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> TrainStepOutput:
    """One optimiser step on this rank's shard of a global batch, gradients summed over ranks.

    Same objective and order of operations as the trainer's loop (``train_step``, backward, clip at
    ``cfg.max_grad_norm``, step). With one process it is exactly that step.

    Returns:
        The global (row-weighted) loss, its components and metrics; ``metrics["grad_norm"]`` is the
        norm of the summed gradient. The returned ``loss`` is detached.
    """
    n_local = float(len(forget_batch))
    (n_global,) = _global_sum([n_local], ctx)
    weight = n_local / n_global
    # backward=False: the rank's loss is weighted by its row share before backpropagating.
    out = train_step(lm, cfg, forget_batch, logp_ref, retain_batch, backward=False)
    if not torch.isfinite(out.loss):
        raise FloatingPointError(f"rank {ctx.rank}: loss became {float(out.loss.detach())}; stopping all ranks is "
                                 "the launcher's job (it tears the group down when a process exits)")
    (out.loss * weight).backward()
    all_reduce_gradients(params, ctx)
    clip = cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    names = sorted(out.losses)
    mnames = sorted(out.metrics)
    summed = _global_sum([float(out.loss.detach()) * weight] + [out.losses[k] * weight for k in names]
                         + [out.metrics[k] * weight for k in mnames], ctx)
    loss = torch.tensor(summed[0])
    losses = dict(zip(names, summed[1:1 + len(names)], strict=True))
    metrics = dict(zip(mnames, summed[1 + len(names):], strict=True))
    metrics.update(grad_norm=grad_norm, world_size=float(ctx.world_size))
    return TrainStepOutput(loss=loss, losses=losses, metrics=metrics)
