"""Shared-prefix KV cache: every chat prompt opens with the same system turn and template tokens, so
their keys and values are computed once and every batch row continues from them.

Layout. A batch row is ``[prefix | padding | suffix]``: the prefix's cache (batch 1) is repeated
over the batch, each row's suffix (its tokens after the prefix) is left-padded to the batch width,
the attention mask is ``[1]·P + suffix mask`` and the suffix's position ids count on from ``P`` at
its first real token. Padding between prefix and suffix is masked, and no real token's position
counts it, so each row computes what it computes alone and unpadded (equality is tested on several
families, batched against single prompts). Where that would not hold, the batch runs uncached:

* a row whose tokens do not start with the prefix (a tokenizer that merges across the boundary);
* sliding-window attention over a span longer than the window (the window is measured in cache
  slots, so padding between prefix and suffix would move it).

Scope: the cache is built once per call (per model state: a call never changes the weights) and
reused for all of its batches. It is not kept across calls, because weights can change under the
same :func:`interp.loading.state_id`: optimiser steps before the run's adapter id is set, and
in-place ``.data`` edits of weight-orthogonalisation, which no version counter sees. A rebuilt
prefix costs one forward of ``P`` tokens, against ``P`` tokens per row saved.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interp.chat import Batch, format_prompts
from interp.loading import LoadedModel, hook_state, position_ids_from_mask, state_id

__all__ = ["PREFIX_CACHE_ENV", "prefix_cache_enabled", "shared_prefix_ids", "PrefixKV", "build_prefix",
           "PrefixedBatch", "split_prefix", "prefixed_inputs"]

PREFIX_CACHE_ENV = "EMALAB_PREFIX_CACHE"
"""Set to ``0`` to turn the shared-prefix cache off everywhere (the ``prefix_cache=`` arguments win)."""

_PROBES = ("x", "Q 7", "\u00e9!")


def prefix_cache_enabled(flag: bool | None = None) -> bool:
    """``flag`` when given, else on unless ``$EMALAB_PREFIX_CACHE`` is ``0``/``false``/``off``."""
    if flag is not None:
        return bool(flag)
    return os.environ.get(PREFIX_CACHE_ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def shared_prefix_ids(tokenizer, system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids every chat-formatted prompt starts with (system turn and user header): the longest
    common prefix of probe prompts with different openings. Empty for raw prompts."""
    if raw:
        return []
    texts = format_prompts(tokenizer, list(_PROBES), system=system, allow_empty=True)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = 0
    while all(len(x) > n for x in ids) and len({x[n] for x in ids}) == 1:
        n += 1
    return list(ids[0][:n])


@dataclass
class PrefixKV:
    """The prefix's tokens and their KV cache (batch 1), for one model state."""

    ids: list[int]
    cache: Any
    key: tuple

    @property
    def length(self) -> int:
        return len(self.ids)


def sliding_window(model) -> int | None:
    """The sliding-attention window of ``model``'s layers, ``None`` when no layer slides."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None)
    if not window:
        return None
    if types is not None and "sliding_attention" not in types:
        return None
    if getattr(cfg, "use_sliding_window", True) is False:
        return None
    return int(window)


@torch.inference_mode()
def build_prefix(lm: LoadedModel, system: str | None = None, raw: bool = False,
                 model: torch.nn.Module | None = None) -> PrefixKV | None:
    """The shared prefix's KV cache under the model's current weights and hooks, or ``None`` when
    there is no shared prefix (raw prompts).

    Args:
        model: the module to run (default ``lm.model``; e.g. nnsight's wrapped base module).
    """
    ids = shared_prefix_ids(lm.tokenizer, system, raw)
    if not ids:
        return None
    model = model if model is not None else lm.model
    x = torch.tensor([ids], device=lm.device)
    out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=True, logits_to_keep=1)
    if getattr(out, "past_key_values", None) is None:
        return None
    key = (state_id(lm), hook_state(lm.model), lm.model.training, system, raw)
    return PrefixKV(ids, out.past_key_values, key)


@dataclass
class PrefixedBatch:
    """A batch's suffixes (left-padded) to run after the prefix cache, in :class:`Batch`'s row order."""

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch prefix_and_pos"]
    """Over prefix + suffix: ``[1]·P`` then the suffix mask (so ``P`` wider than ``input_ids``)."""
    position_ids: Int[Tensor, "batch pos"]
    """Of the suffix tokens, counted from ``P`` at each row's first real suffix token."""
    index: list[int]
    prefix_length: int
    suffix_lengths: list[int]


def split_prefix(batch: Batch, prefix: PrefixKV | None, model=None) -> PrefixedBatch | None:
    """``batch`` (left-padded full prompts) as prefix + suffixes, or ``None`` when it must run uncached
    (no prefix; a row not starting with it or with no token after it; a sliding window too short)."""
    if prefix is None:
        return None
    p = prefix.length
    pid = torch.tensor(prefix.ids, dtype=batch.input_ids.dtype)
    rows, lengths = [], []
    for i in range(batch.input_ids.shape[0]):
        real = batch.input_ids[i][batch.attention_mask[i].bool()].cpu()
        if real.numel() <= p or not torch.equal(real[:p], pid):
            return None
        rows.append(real[p:])
        lengths.append(int(real.numel() - p))
    width = max(lengths)
    window = sliding_window(model) if model is not None else None
    if window is not None and p + width > window:
        return None
    ids = torch.full((len(rows), width), int(batch.input_ids[0, 0]), dtype=batch.input_ids.dtype)
    mask = torch.zeros((len(rows), width), dtype=batch.attention_mask.dtype)
    for i, r in enumerate(rows):
        ids[i, width - r.numel():] = r
        mask[i, width - r.numel():] = 1
    dev = batch.input_ids.device
    full_mask = torch.cat([torch.ones(len(rows), p, dtype=mask.dtype), mask], dim=1)
    return PrefixedBatch(ids.to(dev), full_mask.to(dev), (p + position_ids_from_mask(mask)).to(dev),
                         list(batch.index), p, lengths)


def expand_cache(prefix: PrefixKV, batch_size: int):
    """A fresh copy of the prefix cache repeated over ``batch_size`` rows (forwards append to it)."""
    cache = copy.deepcopy(prefix.cache)
    if batch_size > 1:
        cache.batch_repeat_interleave(batch_size)
    return cache


def prefixed_inputs(pb: PrefixedBatch, prefix: PrefixKV) -> dict[str, Any]:
    """Forward keyword arguments of a :class:`PrefixedBatch`: suffix ids, full mask, positions, cache."""
    return {"input_ids": pb.input_ids, "attention_mask": pb.attention_mask, "position_ids": pb.position_ids,
            "past_key_values": expand_cache(prefix, pb.input_ids.shape[0])}


def check_rows(batches: Sequence[PrefixedBatch | None]) -> float:
    """Fraction of batches that ran with the prefix cache (for timings and tests)."""
    return sum(b is not None for b in batches) / max(len(batches), 1)


__all__ += ["expand_cache", "check_rows", "sliding_window"]
