"""Batch sizes from a memory budget instead of fixed CPU-sized numbers.

An estimate, not a measurement: activation bytes per row are counted from the model config (layers,
``d_model``, MLP width, heads, the logits actually kept, dtype), with a training factor for what
autograd saves. It errs high (eager attention's ``heads × pos²`` scores are counted even where a fused
kernel never materialises them), so the batch it returns leaves room rather than running out.
"""

from __future__ import annotations

from typing import Any

import torch

from interp.loading import LoadedModel

__all__ = ["AUTO", "MemoryBudgetError", "row_bytes", "memory_budget", "auto_batch_size", "check_batch_size",
           "resolve_batch_size", "CPU_MAX_BATCH", "GPU_MAX_BATCH"]

CPU_MAX_BATCH = 64
"""Upper bound on CPU: beyond it a forward is no faster per row, and a shared machine needs its memory."""
GPU_MAX_BATCH = 512
"""Upper bound on accelerators: past it padding waste outweighs any throughput gain."""


class MemoryBudgetError(MemoryError):
    """Not even one row fits the memory budget; the message names what to change."""


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def row_bytes(
    config: Any,
    seq_len: int,
    dtype: torch.dtype = torch.bfloat16,
    training: bool = False,
    logits_positions: int = 1,
    kv_cache: bool = False,
) -> int:
    """Estimated peak activation bytes of one row of ``seq_len`` tokens.

    Args:
        config: a transformers model config (or anything with its attribute names).
        seq_len: tokens per row (prompt plus generated/response tokens).
        training: count what the backward pass keeps: every layer's inputs to its matmuls, norms,
            attention probabilities and MLP activations, plus the float32 logits and their gradient.
        logits_positions: positions unembedded (1 for the logit score and generation; the response
            width for training's response-only unembedding).
        kv_cache: add the key/value cache of generation.
    """
    cfg = _text_config(config)
    d_model = int(cfg.hidden_size)
    d_mlp = int(getattr(cfg, "intermediate_size", None) or 4 * d_model)
    layers = int(cfg.num_hidden_layers)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or d_model // heads)
    d_vocab = int(cfg.vocab_size)
    b = torch.finfo(dtype).bits // 8
    attn = heads * seq_len * seq_len  # eager attention's score matrix; fused kernels need less
    # One layer's live tensors in a forward: residual, normed input, q/k/v/o, gate/up/act of the MLP.
    layer = seq_len * (4 * d_model + 2 * kv_heads * head_dim + 3 * d_mlp) + 2 * attn
    logits = logits_positions * d_vocab * (b + 4 + 4)  # model-dtype logits, their float32 copy and log-softmax
    if training:
        # Autograd keeps every layer's activations: the forward's tensors plus the MLP's fourth (the gated
        # product the down projection reads) and the float32 internals of the two RMSNorms (their input and
        # normalised copy); again one layer's worth for the grads at the layer being differentiated, and the
        # logits' float32 gradient. Checked on the 1.5B's retain-CE step (measured 6.9 GB of activations).
        saved = b * (layer + seq_len * d_mlp) + 2 * 2 * 4 * seq_len * d_model
        total = layers * saved + b * layer + logits + logits_positions * d_vocab * 4
    else:
        total = b * layer + logits
    if kv_cache:
        total += 2 * layers * kv_heads * head_dim * seq_len * b
    total += b * seq_len * d_model * 2  # embeddings in and the final norm
    return int(total)


def memory_budget(device: torch.device | str, fraction: float | None = None) -> int:
    """Bytes a batch may use on ``device``: free accelerator memory × 0.8, or available RAM × 0.25.

    The CPU share is small because the model itself, the tokenizer and other jobs live in the same RAM.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free * (0.8 if fraction is None else fraction))
    if dev.type == "mps":
        total = torch.mps.recommended_max_memory() if hasattr(torch.mps, "recommended_max_memory") else 0
        used = torch.mps.driver_allocated_memory() if hasattr(torch.mps, "driver_allocated_memory") else 0
        return int(max(total - used, 0) * (0.8 if fraction is None else fraction))
    import psutil

    return int(psutil.virtual_memory().available * (0.25 if fraction is None else fraction))


def auto_batch_size(
    lm: LoadedModel,
    seq_len: int,
    budget_bytes: int | None = None,
    training: bool = False,
    logits_positions: int = 1,
    kv_cache: bool = False,
    max_batch: int | None = None,
) -> int:
    """The largest batch whose estimated activations (:func:`row_bytes`) fit ``budget_bytes``.

    Args:
        seq_len: tokens per row, e.g. ``max_prompt_tokens + max_new_tokens``.
        budget_bytes: default :func:`memory_budget` of the model's device.
        max_batch: upper bound; default :data:`CPU_MAX_BATCH` on CPU, :data:`GPU_MAX_BATCH` elsewhere.

    Raises:
        MemoryBudgetError: one row alone does not fit.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    device = lm.device
    budget = memory_budget(device) if budget_bytes is None else int(budget_bytes)
    dtype = next(lm.model.parameters()).dtype
    per_row = row_bytes(lm.model.config, seq_len, dtype, training=training, logits_positions=logits_positions,
                        kv_cache=kv_cache)
    fits = budget // per_row
    if fits < 1:
        gib = 2**30
        raise MemoryBudgetError(
            f"one row of {seq_len} tokens needs about {per_row / gib:.2f} GiB of activations "
            f"({'training' if training else 'inference'}, {dtype}) but the budget is {budget / gib:.2f} GiB on "
            f"{device}; shorten the rows (max_prompt_tokens / max_new_tokens), "
            + ("turn on gradient_checkpointing, " if training else "")
            + "free memory on the device, or set a fixed batch size")
    cap = max_batch if max_batch is not None else (CPU_MAX_BATCH if device.type == "cpu" else GPU_MAX_BATCH)
    return int(max(1, min(fits, cap)))


AUTO = "auto"


def check_batch_size(value: Any, name: str = "batch_size") -> int | str:
    """``value`` as a batch-size setting: an integer >= 1, or ``"auto"``."""
    if value == AUTO:
        return AUTO
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str) and value.isdigit() and int(value) >= 1:
        return int(value)
    raise ValueError(f"{name} must be >= 1 (an integer) or 'auto' (fit the device's free memory), got {value!r}")


def resolve_batch_size(value: int | str, lm: LoadedModel, seq_len: int, **kwargs: Any) -> int:
    """A fixed batch size as given; ``"auto"`` through :func:`auto_batch_size` (``kwargs`` pass on)."""
    value = check_batch_size(value)
    return auto_batch_size(lm, seq_len, **kwargs) if value == AUTO else int(value)
