"""Residual-stream activation collection with nnsight, and an on-disk cache that resumes.

Every nnsight trace in emalab lives in ``interp`` (nnsight reads the with-block's source, so the
traces are in real functions of real files). Before/after unlearning come from the same code path:
a PEFT adapter attached to ``lm.model`` is traced like any other weights.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from interp.adapter import base_model, check_layers, check_site, site_capture, site_hook, site_value
from interp.chat import Batch, format_prompts, iter_batches, post_instruction_length
from interp.gating import gate_rows
from interp.io import atomic_save_safetensors, atomic_write_json, config_hash, ensure_writable_dir, read_json
from interp.loading import LoadedModel, position_ids_from_mask, state_id

__all__ = [
    "POSITIONS",
    "ActivationSet",
    "NaNActivationError",
    "nnsight_model",
    "trace_batch",
    "stream_activations",
    "collect_activations",
    "collect_cached",
    "ShardMismatchError",
    "shard_indices",
    "collect_shard",
    "merge_activation_shards",
]

POSITIONS = ("last", "post_instruction_mean", "all", "post_instruction")


class NaNActivationError(FloatingPointError):
    pass


@dataclass
class ActivationSet:
    """Activations of a prompt set at one site: ``acts[i, j]`` is prompt ``prompt_ids[i]`` at ``layers[j]``."""

    acts: Float[Tensor, "batch layer d_model"]
    prompt_ids: list[str]
    layers: list[int]
    site: str = "resid_post"
    position: str = "last"
    meta: dict = field(default_factory=dict)

    def at(self, layer: int) -> Float[Tensor, "batch d_model"]:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not collected; collected layers: {self.layers}")
        return self.acts[:, self.layers.index(layer)]

    def to(self, dtype_or_device) -> ActivationSet:
        return replace(self, acts=self.acts.to(dtype_or_device))


def nnsight_model(lm: LoadedModel):
    """The nnsight wrapper of ``lm`` (built once; wraps the base module so adapters stay in the path)."""
    from nnsight import TransformersModel

    module = base_model(lm.model)
    cached = lm.extra.get("_nnsight")
    if cached is None or cached[0] is not module:
        cached = (module, TransformersModel(module, tokenizer=lm.tokenizer, task="text-generation"))
        lm.extra["_nnsight"] = cached
    return cached[1]


def _check_finite(x: Tensor, layers: Sequence[int], site: str) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        layer = layers[int(bad.nonzero()[0][1])] if x.ndim >= 3 else layers[0]
        raise NaNActivationError(
            f"non-finite activations at {site} layer {layer}; the weights or adapter are broken "
            "(e.g. a diverged training run) — reload the model or use an earlier checkpoint"
        )


def trace_batch(
    nlm, batch: Batch, layers: Sequence[int], site: str = "resid_post", n_last: int = 1, remote: bool = False
) -> Float[Tensor, "batch pos layer d_model"]:
    """One nnsight trace: the stream at ``site`` for ``layers`` over the last ``n_last`` positions.

    The forward stops after the deepest requested layer, so the unembedding is never computed.
    """
    saved: list[Tensor] = []
    # use_cache=False: a single forward never reuses keys/values, so building a KV cache is wasted copies.
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "position_ids": position_ids_from_mask(batch.attention_mask)}
    with nlm.trace(inputs, remote=remote, use_cache=False) as tracer:
        for layer in layers:  # forward order
            saved.append(site_value(nlm, site, layer)[:, -n_last:, :].save())
        tracer.stop()
    return torch.stack([s.detach() for s in saved], dim=2)


class _StopForward(Exception):
    """Raised by a hook once the deepest requested layer has run (nothing later is needed)."""


def stream_activations(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    layers: Sequence[int],
    site: str = "resid_post",
) -> Float[Tensor, "batch pos layer d_model"]:
    """The stream at ``site`` for ``layers`` at every position of a token batch, from one plain
    forward of ``model`` (PEFT-wrapped or not) with hooks; ``layers`` in :func:`check_layers` order.

    Unlike :func:`collect_activations` the result keeps its autograd graph, so a training loss can
    be put on it (call under ``torch.no_grad()`` for a reference). The forward stops after the
    deepest layer; the hooks are gone before any backward pass (a gradient-checkpointed layer
    recomputes without them).
    """
    check_site(site)
    layers = check_layers(model, layers)
    if not layers:
        raise ValueError("name at least one layer")
    deepest = layers[-1]

    def stop_after(stream: Tensor, layer: int) -> Tensor:
        raise _StopForward

    with site_capture(model, site, layers) as store, site_hook(model, site, [deepest], stop_after):
        try:
            model(input_ids=input_ids, attention_mask=attention_mask,
                  position_ids=position_ids_from_mask(attention_mask), use_cache=False, logits_to_keep=1)
        except _StopForward:
            pass
    return torch.stack([store[layer] for layer in layers], dim=2)


@torch.inference_mode()
def collect_activations(
    lm: LoadedModel,
    prompts: Sequence[str],
    layers: Sequence[int] | None = None,
    site: str = "resid_post",
    position: str = "last",
    batch_size: int = 16,
    system: str | None = None,
    raw: bool = False,
    max_prompt_tokens: int | None = 512,
    formatted: bool = False,
    progress: bool = False,
    remote: bool = False,
) -> Float[Tensor, "batch layer d_model"] | Float[Tensor, "batch pos layer d_model"]:
    """Activations of ``prompts`` (input order) at ``site``, one trace per length-sorted batch.

    Args:
        position: ``last`` (last prompt token), ``post_instruction_mean`` (mean over the template
            tokens after the user message), ``post_instruction`` (each of those template tokens
            separately: the result is ``(batch, pos, layer, d_model)``, ``pos`` in prompt order, the
            last being the last prompt token), or ``all`` (use :func:`collect_cached`'s ragged form —
            not supported here).
        formatted: ``prompts`` are already chat-formatted texts.
        remote: forwarded to nnsight (NDIF remote execution for very large models).
    """
    check_site(site)
    if position not in ("last", "post_instruction_mean", "post_instruction"):
        raise ValueError(f"position must be one of {POSITIONS[:2] + POSITIONS[3:]} here, got {position!r}")
    if not prompts:
        raise ValueError("the prompt set is empty; nothing to collect")
    layers = check_layers(lm.model, layers)
    texts = list(prompts) if formatted else format_prompts(lm.tokenizer, prompts, system=system, raw=raw)
    n_last = 1 if position == "last" else post_instruction_length(lm.tokenizer, raw=raw)
    nlm = nnsight_model(lm)
    out: Tensor | None = None
    batches = list(iter_batches(lm.tokenizer, texts, batch_size, max_prompt_tokens))
    for batch in tqdm(batches, desc=f"activations {site}", unit="batch", disable=not progress, leave=False):
        batch = batch.to(lm.device)
        with gate_rows(lm, batch.input_ids, batch.attention_mask):  # a gated adapter: each row's gate
            acts = trace_batch(nlm, batch, layers, site, n_last, remote=remote)
        if position == "post_instruction":
            acts = acts.float()
            _check_finite(acts.flatten(0, 1), layers, site)
        else:
            acts = acts.float().mean(dim=1) if n_last > 1 else acts[:, 0].float()
            _check_finite(acts, layers, site)
        if out is None:
            out = torch.empty(len(texts), *acts.shape[1:])
        out[batch.index] = acts.cpu()
    return out


def collect_cached(
    lm: LoadedModel,
    prompts: Sequence[str],
    prompt_ids: Sequence[str],
    cache_dir: str | Path,
    layers: Sequence[int] | None = None,
    site: str = "resid_post",
    position: str = "last",
    batch_size: int = 16,
    shard_size: int = 64,
    system: str | None = None,
    raw: bool = False,
    progress: bool = True,
) -> ActivationSet:
    """:func:`collect_activations` with a resumable on-disk cache.

    The cache is keyed on the model state (weights and adapter), prompt ids and text, layers, site,
    position, dtype, shard size and the tracing code's version; shards are written atomically and a manifest that does not match is recomputed, never
    reused. An interrupted collection resumes at the first missing shard.
    """
    if len(prompts) != len(prompt_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt ids")
    if not prompts:
        raise ValueError("the prompt set is empty; nothing to collect")
    layers = check_layers(lm.model, layers)
    from interp.runs import code_version

    # Everything that changes a row: the prompts' text (not only their ids), how they are cut into
    # shards, and the code that traces them.
    key = {
        "model": lm.name, "state": state_id(lm), "prompt_ids": list(prompt_ids), "layers": layers,
        "site": site, "position": position, "system": system, "raw": raw,
        "dtype": str(next(lm.model.parameters()).dtype), "shard_size": shard_size,
        "prompts_sha256": hashlib.sha256("\x00".join(prompts).encode()).hexdigest()[:16],
        "code": code_version("activations"),
    }
    root = ensure_writable_dir(Path(cache_dir) / f"acts-{config_hash(key, 16)}", "activation cache")
    manifest_path = root / "manifest.json"
    manifest = read_json(manifest_path) if manifest_path.exists() else None
    if manifest is None or manifest.get("key") != key:
        manifest = {"key": key, "shards": {}}
    n_shards = math.ceil(len(prompts) / shard_size)
    from safetensors.torch import load_file

    parts = []
    for s in tqdm(range(n_shards), desc=f"activations {site}", unit="shard", disable=not progress or n_shards < 2):
        name = f"shard-{s:05d}.safetensors"
        lo, hi = s * shard_size, min((s + 1) * shard_size, len(prompts))
        if manifest["shards"].get(name) == [lo, hi] and (root / name).exists():
            parts.append(load_file(root / name)["acts"])
            continue
        acts = collect_activations(lm, prompts[lo:hi], layers, site, position, batch_size, system, raw)
        atomic_save_safetensors(root / name, {"acts": acts})
        manifest["shards"][name] = [lo, hi]
        atomic_write_json(manifest_path, manifest)
        parts.append(acts)
    return ActivationSet(torch.cat(parts), list(prompt_ids), layers, site, position,
                         meta={"cache": str(root), "state": key["state"]})


# -- sharding across processes ------------------------------------------------------------------

_SHARD_FORMAT = "emalab.activation_shard/v1"


class ShardMismatchError(ValueError):
    """Shards that do not form one collection (other model state, layers, sizes, or missing ranks)."""


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """The prompt indices process ``rank`` of ``world_size`` handles: a contiguous block of ``range(n)``.

    Blocks differ in size by at most one (the first ``n % world_size`` ranks take one more), are
    deterministic, and concatenated in rank order give ``range(n)``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return list(range(start, start + base + (rank < extra)))


def collect_shard(
    lm: LoadedModel,
    prompts: Sequence[str],
    prompt_ids: Sequence[str],
    out_dir: str | Path,
    rank: int,
    world_size: int,
    layers: Sequence[int] | None = None,
    site: str = "resid_post",
    position: str = "last",
    batch_size: int = 16,
    system: str | None = None,
    raw: bool = False,
) -> Path:
    """Collect this process's shard of ``prompts`` (:func:`shard_indices`) and write it to ``out_dir`` as
    ``shard-<rank>-of-<world_size>.safetensors`` plus a JSON manifest (written last, atomically).

    Every process passes the full prompt list; :func:`merge_activation_shards` restores input order.

    Returns:
        The manifest path.
    """
    if len(prompts) != len(prompt_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt ids")
    layers = check_layers(lm.model, layers)
    idx = shard_indices(len(prompts), rank, world_size)
    root = ensure_writable_dir(out_dir, "activation shard directory")
    stem = f"shard-{rank:05d}-of-{world_size:05d}"
    manifest = {
        "format": _SHARD_FORMAT, "rank": rank, "world_size": world_size, "n_total": len(prompts), "indices": idx,
        "prompt_ids": [prompt_ids[i] for i in idx], "layers": layers, "site": site, "position": position,
        "model": lm.name, "state": state_id(lm), "dtype": str(next(lm.model.parameters()).dtype),
        "system": system, "raw": raw, "file": None,
    }
    if idx:
        acts = collect_activations(lm, [prompts[i] for i in idx], layers, site, position, batch_size, system, raw)
        atomic_save_safetensors(root / f"{stem}.safetensors", {"acts": acts})
        manifest["file"] = f"{stem}.safetensors"
    return atomic_write_json(root / f"{stem}.json", manifest)


def merge_activation_shards(paths: Sequence[str | Path] | str | Path) -> ActivationSet:
    """Concatenate the shards written by :func:`collect_shard` back into input order.

    Args:
        paths: Shard manifests (``shard-*-of-*.json``), or one directory holding them.

    Raises:
        ShardMismatchError: The shards disagree on model state, layers, site, position, size or
            world size, or a rank is missing or duplicated.
    """
    from safetensors.torch import load_file

    if isinstance(paths, (str, Path)):
        paths = sorted(Path(paths).glob("shard-*-of-*.json")) if Path(paths).is_dir() else [Path(paths)]
    manifests = [(Path(p), read_json(p)) for p in paths]
    if not manifests:
        raise ShardMismatchError("no shard manifests given (or none in the directory)")
    keys = ("world_size", "n_total", "layers", "site", "position", "model", "state", "dtype", "system", "raw")
    first = manifests[0][1]
    for path, m in manifests:
        if m.get("format") != _SHARD_FORMAT:
            raise ShardMismatchError(f"{path} is not an emalab activation shard manifest")
        diff = [k for k in keys if m.get(k) != first.get(k)]
        if diff:
            raise ShardMismatchError(f"{path} differs from {manifests[0][0]} in {diff}; shards of one collection "
                                     "must share the model state, layers, site, position and world size")
    ranks = sorted(m["rank"] for _, m in manifests)
    if ranks != list(range(first["world_size"])):
        missing = sorted(set(range(first["world_size"])) - set(ranks))
        raise ShardMismatchError(f"expected ranks 0..{first['world_size'] - 1} once each; got {ranks}"
                                 + (f" (missing {missing})" if missing else ""))
    n = first["n_total"]
    order = [i for _, m in sorted(manifests, key=lambda pm: pm[1]["rank"]) for i in m["indices"]]
    if sorted(order) != list(range(n)):
        raise ShardMismatchError(f"the shards' prompt indices do not cover 0..{n - 1} exactly once")
    acts: Tensor | None = None
    ids: list[str | None] = [None] * n
    for path, m in manifests:
        for i, pid in zip(m["indices"], m["prompt_ids"], strict=True):
            ids[i] = pid
        if not m["indices"]:
            continue
        part = load_file(path.parent / m["file"])["acts"]
        if acts is None:
            acts = torch.empty(n, *part.shape[1:], dtype=part.dtype)
        acts[m["indices"]] = part
    if acts is None:
        raise ShardMismatchError("every shard is empty")
    return ActivationSet(acts, ids, list(first["layers"]), first["site"], first["position"],
                         meta={"state": first["state"], "shards": [str(p) for p, _ in manifests]})
