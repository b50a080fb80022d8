"""How much memory one training step's activations take, and the rule behind
``gradient_checkpointing="auto"``: recompute activations when storing them would not fit.

The estimate is :func:`interp.batching.row_bytes` (training) at the longest forget and retain rows the
run will see, times the rows a step holds. It is deliberately the worst step, not the typical one:
checkpointing costs time (about a fifth more per step on a 2-core CPU, measured on the 1.5B) but gives
the same gradients, so erring toward it changes no result.
"""

from __future__ import annotations

from interp.batching import memory_budget, row_bytes
from interp.loading import LoadedModel
from training.collate import collate_rows
from training.config import UnlearnConfig
from training.data import UnlearnData

__all__ = ["step_activation_bytes", "checkpointing_needed", "resolve_checkpointing"]


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


def checkpointing_needed(lm: LoadedModel, cfg: UnlearnConfig, data: UnlearnData, budget_bytes: int | None = None) -> bool:
    """True when the largest step's activations exceed ``budget_bytes`` (default: the device's
    :func:`interp.batching.memory_budget`, a quarter of available RAM on a CPU, measured now, with the
    models already resident)."""
    budget = memory_budget(lm.device) if budget_bytes is None else int(budget_bytes)
    return step_activation_bytes(lm, cfg, data) > budget


def resolve_checkpointing(lm: LoadedModel, cfg: UnlearnConfig, data: UnlearnData) -> UnlearnConfig:
    """``cfg`` with ``gradient_checkpointing="auto"`` decided for this model, data and device."""
    if cfg.gradient_checkpointing != "auto":
        return cfg
    return cfg.replace(gradient_checkpointing=checkpointing_needed(lm, cfg, data))
