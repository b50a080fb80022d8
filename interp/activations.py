"""Residual-stream activation collection with nnsight, and an on-disk cache that resumes.

Every nnsight trace in emalab lives in ``interp`` (nnsight reads the with-block's source, so the
traces are in real functions of real files). Before/after unlearning come from the same code path:
a PEFT adapter attached to ``lm.model`` is traced like any other weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.adapter import base_model, check_layers, check_site, envoy_for_site, stream
from interp.chat import Batch, format_prompts, iter_batches, post_instruction_length
from interp.io import atomic_save_safetensors, atomic_write_json, config_hash, ensure_writable_dir, read_json
from interp.loading import LoadedModel, state_id

__all__ = [
    "POSITIONS",
    "ActivationSet",
    "NaNActivationError",
    "nnsight_model",
    "trace_batch",
    "collect_activations",
    "collect_cached",
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
    with nlm.trace({"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}, remote=remote) as tracer:
        for layer in layers:  # forward order
            saved.append(stream(envoy_for_site(nlm, site, layer).output)[:, -n_last:, :].save())
        tracer.stop()
    return torch.stack([s.detach() for s in saved], dim=2)


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
        acts = trace_batch(nlm, batch.to(lm.device), layers, site, n_last, remote=remote)
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

    The cache is keyed on the model state (weights and adapter), prompt ids, layers, site, position
    and dtype; shards are written atomically and a manifest that does not match is recomputed, never
    reused. An interrupted collection resumes at the first missing shard.
    """
    if len(prompts) != len(prompt_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(prompt_ids)} prompt ids")
    if not prompts:
        raise ValueError("the prompt set is empty; nothing to collect")
    layers = check_layers(lm.model, layers)
    key = {
        "model": lm.name, "state": state_id(lm), "prompt_ids": list(prompt_ids), "layers": layers,
        "site": site, "position": position, "system": system, "raw": raw,
        "dtype": str(next(lm.model.parameters()).dtype),
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
        if name in manifest["shards"] and (root / name).exists():
            parts.append(load_file(root / name)["acts"])
            continue
        acts = collect_activations(lm, prompts[lo:hi], layers, site, position, batch_size, system, raw)
        atomic_save_safetensors(root / name, {"acts": acts})
        manifest["shards"][name] = [lo, hi]
        atomic_write_json(manifest_path, manifest)
        parts.append(acts)
    return ActivationSet(torch.cat(parts), list(prompt_ids), layers, site, position,
                         meta={"cache": str(root), "state": key["state"]})
