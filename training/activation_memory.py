"""How much memory one training step's activations take, and the rule behind
``gradient_checkpointing="auto"``: recompute activations when storing them would not fit.

The estimate is :func:`interp.batching.row_bytes` (training) at the longest forget and retain rows the
run will see, times the rows a step holds, times :data:`ALLOCATOR_SLACK`. It is deliberately the worst
step: checkpointing costs time (about a fifth more per step on a 2-core CPU, measured on the 1.5B) but
gives the same weights bit for bit, so erring toward it changes no result.
"""

from __future__ import annotations

import torch

from interp.batching import row_bytes
from interp.loading import LoadedModel
from training.collate import collate_rows
from training.config import UnlearnConfig
from training.data import UnlearnData

__all__ = ["step_activation_bytes", "kl_reference_bytes", "training_headroom", "checkpointing_needed", "resolve_checkpointing",
           "ALLOCATOR_SLACK", "RESIDENT_FRACTION"]

ALLOCATOR_SLACK = 2.0
"""Resident bytes a run holds per estimated activation byte. Measured on the 1.5B on a CPU: sixteen NPO
steps grew the resident set by 5.7 GB for an estimated 3.4 (the allocator keeps freed blocks whose sizes
the next batch cannot reuse), a two-step retain-CE run by 6.9 GB for 6.6."""

RESIDENT_FRACTION = 2 / 3
"""On a CPU, the share of the machine's RAM that one study process may hold; the rest is the OS's, the
page cache's and the machine's other work (16 GB of a 24 GB machine)."""


def step_activation_bytes(lm: LoadedModel, cfg: UnlearnConfig, data: UnlearnData) -> int:
    """Estimated activation bytes of the largest training step: a full forget batch and, with a retain
    term, a full retain batch, every row as long as the longest of its set."""
    dtype = next(lm.model.parameters()).dtype
    sets = [(data.forget, cfg.batch_size, True)]
    if cfg.retain_mode != "none" and data.retain is not None and len(data.retain):
        sets.append((data.retain, cfg.retain_batch_size, False))
    total = 0
    for ds, batch_size, forget in sets:
        batch = collate_rows(lm, cfg, ds, list(range(len(ds))), forget)
        width = int(batch.input_ids.shape[1])
        response = int(batch.response_mask.sum(-1).max()) + 1  # the response-only unembedding's positions
        rows = min(batch_size, len(ds))
        total += rows * row_bytes(lm.model.config, width, dtype, training=True, logits_positions=response)
    return total


def kl_reference_bytes(lm: LoadedModel, cfg: UnlearnConfig, data: UnlearnData) -> int:
    """Host bytes of the ``kl`` retain term's per-run reference (:mod:`training.retain_reference`): every
    retain row's response-predicting logits, Σ R_i × d_vocab × bytes; 0 for the other modes, whose
    references are megabytes at most."""
    if cfg.retain_mode != "kl" or data.retain is None or not len(data.retain):
        return 0
    batch = collate_rows(lm, cfg, data.retain, list(range(len(data.retain))), False)
    element = torch.finfo(next(lm.model.parameters()).dtype).bits // 8
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    return int(batch.response_mask.sum()) * vocab * element


def training_headroom(device: torch.device | str) -> int:
    """Bytes a training step may add: on CUDA, free device memory × 0.8; elsewhere, :data:`RESIDENT_FRACTION`
    of the machine's RAM less what this process holds now (freed blocks handed back first)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * 0.8)
    import psutil

    from interp.resources import release_freed_memory

    release_freed_memory()
    return int(RESIDENT_FRACTION * psutil.virtual_memory().total - psutil.Process().memory_info().rss)


def checkpointing_needed(lm: LoadedModel, cfg: UnlearnConfig, data: UnlearnData,
                         headroom_bytes: int | None = None) -> bool:
    """True when the largest step would hold more than ``headroom_bytes`` (default :func:`training_headroom`):
    estimated activations × :data:`ALLOCATOR_SLACK`, plus the ``kl`` reference the run is about to hold."""
    headroom = training_headroom(lm.device) if headroom_bytes is None else int(headroom_bytes)
    held = step_activation_bytes(lm, cfg, data) * ALLOCATOR_SLACK + kl_reference_bytes(lm, cfg, data)
    return held > headroom


def resolve_checkpointing(lm: LoadedModel, cfg: UnlearnConfig, data: UnlearnData) -> UnlearnConfig:
    """``cfg`` with ``gradient_checkpointing="auto"`` decided for this model, data and device."""
    if cfg.gradient_checkpointing != "auto":
        return cfg
    return cfg.replace(gradient_checkpointing=checkpointing_needed(lm, cfg, data))
