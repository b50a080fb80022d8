"""Data-parallel unlearning across processes, through accelerate.

Launched under ``torchrun --nproc-per-node N`` or ``accelerate launch --num_processes N`` (the
launcher sets ``WORLD_SIZE`` > 1), :func:`training.trainer.unlearn` runs data-parallel by itself:
:meth:`DataParallel.from_environment` builds an ``accelerate.Accelerator`` (gloo on CPU, NCCL on
GPUs, GPU ``LOCAL_RANK`` per process) and wraps the model in ``DistributedDataParallel``. Every rank
builds the same global batch from ``batch_order`` (a pure function of the step), keeps its
contiguous block of rows (:func:`shard_examples`) and backpropagates its loss scaled by
``world_size · n_rank / n_global``; DDP's gradient mean then equals the row-weighted sum, so for
row-mean objectives (NPO, SimNPO) a step on N processes equals a one-process step on the global batch
up to float summation order, for any split. Token-mean terms (GA, CE, KL) are row-weighted too, as DDP
does; they are exact when every rank holds as many response tokens. LoRA dropout draws each rank's
masks from its own stream, so with dropout > 0 the trajectory is a valid one but not the one-process
one.

Without a launcher (``WORLD_SIZE`` unset or 1) :class:`DataParallel` is a one-process stand-in that
does nothing, and no accelerate object is created: the single-process trainer is unchanged.
See ``docs/scaling.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from interp.activations import shard_indices
from training.config import UnlearnConfig

__all__ = [
    "DistContext",
    "DataParallel",
    "launched_world_size",
    "init_distributed",
    "shard_examples",
    "check_parallel",
]

T = TypeVar("T")


def launched_world_size() -> int:
    """Processes in the job, from the launcher's ``WORLD_SIZE`` (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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
    """Join the process group described by the launcher's environment variables (no accelerate).

    For commands that only need ranks and collectives (sharded evaluation and activation
    collection). Without ``WORLD_SIZE`` (or with 1) this is a single-process context and nothing is
    initialised, so the same script runs with and without a launcher.

    Args:
        device: ``cpu`` or ``cuda``; default ``cuda`` when available. Each process takes GPU
            ``LOCAL_RANK``.
        backend: default ``nccl`` for CUDA, ``gloo`` for CPU.
    """
    world = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(f"cuda:{local}") if kind == "cuda" else torch.device(kind)
    if kind == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if kind == "cuda" else "gloo"), rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev)


def shard_examples(items: Sequence[T], ctx: DistContext | DataParallel) -> list[T]:
    """This rank's contiguous block of a global batch (see :func:`interp.activations.shard_indices`)."""
    return [items[i] for i in shard_indices(len(items), ctx.rank, ctx.world_size)]


class DataParallel:
    """The trainer's view of the job: one process (every method trivial) or accelerate's DDP.

    Only rank 0 writes files (:attr:`is_main`); collectives (:meth:`sum`, :meth:`gather_object`,
    :meth:`barrier`) must be called by every rank in the same order.
    """

    def __init__(self, accelerator: Any = None) -> None:
        self.accelerator = accelerator

    @classmethod
    def from_environment(cls, device: torch.device, full_finetune: bool = False) -> DataParallel:
        """One process without a launcher; else an ``Accelerator`` on ``device``'s kind (CPU: gloo).

        Args:
            device: where the model lives (its type picks CPU or GPU processes).
            full_finetune: all weights train. Each rank then holds a full copy of the weights and
                of AdamW's state (DDP); models that do not fit that way need FSDP, which is not wired
                (see ``docs/scaling.md``).

        Raises:
            NotImplementedError: the launcher asks for FSDP or DeepSpeed (``accelerate launch
                --use_fsdp`` / ``--use_deepspeed``): the trainer's checkpoints and adapter saving read
                whole, unsharded parameters.
        """
        if launched_world_size() <= 1:
            return cls()
        for flag, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
            if os.environ.get(flag, "false").lower() == "true":
                raise NotImplementedError(
                    f"{name} is not wired into training.trainer.unlearn: its checkpoints, resume and adapter saving "
                    "read whole parameters. Launch without --use_fsdp/--use_deepspeed (DDP: every rank holds a "
                    f"full copy{' of the weights and optimiser state' if full_finetune else ''}).")
        from accelerate import Accelerator

        return cls(Accelerator(cpu=device.type == "cpu"))

    # -- where this process is ---------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return self.accelerator is not None and self.accelerator.num_processes > 1

    @property
    def rank(self) -> int:
        return self.accelerator.process_index if self.accelerator is not None else 0

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes if self.accelerator is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """This process's device (``None`` in one process: wherever the model already is)."""
        return self.accelerator.device if self.accelerator is not None else None

    @staticmethod
    def is_main_process() -> bool:
        """Rank 0 of the launched job (or the only process), from the launcher's ``RANK``."""
        return int(os.environ.get("RANK", "0")) == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous block of ``items``."""
        return shard_examples(items, self)

    # -- model ------------------------------------------------------------------------------------

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run training forwards through: ``model`` itself, or its DDP wrapper.

        ``model`` keeps its identity (the wrapper holds it), so adapter saving, ``disable_adapter``
        for the reference policy and checkpointing keep working on the unwrapped module. DDP
        broadcasts rank 0's weights at construction, so every rank starts from the same adapter.
        """
        if not self.enabled:
            return model
        return self.accelerator.prepare_model(model)

    # -- collectives ------------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.enabled:
            self.accelerator.wait_for_everyone()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (and fills caches); the others run it after rank 0 is done."""
        if not self.enabled:
            yield
            return
        with self.accelerator.main_process_first():
            yield

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks (float64)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.accelerator.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def clip_grad_norm_(self, params: Sequence[torch.nn.Parameter], max_norm: float | None) -> float:
        """Clip the (already synchronised) gradient's norm; returns the norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else math.inf))


def check_parallel(cfg: UnlearnConfig, dp: DataParallel) -> None:
    """Raise ``ValueError`` where ``cfg`` cannot run data-parallel over ``dp``'s processes."""
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
