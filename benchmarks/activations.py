"""Benchmark 1 — activation collection: last-token residuals (``resid_post``) at every layer.

Variants, on the same prompts and the same length-sorted batches, alternating in one process:

* ``emalab``: :func:`interp.activations.collect_activations` (nnsight trace, stops after the last layer);
* ``hf_hidden_states``: a plain forward with ``output_hidden_states=True`` (``logits_to_keep=1``,
  ``use_cache=False``: the strong baseline a careful researcher writes);
* ``torch_hooks``: forward hooks on the decoder layers keeping each output's last position.

Every variant starts from the raw prompt strings (chat template, tokenisation, padding are timed)
and returns a ``(batch, layer, d_model)`` float32 tensor in input order. Target: emalab ≥ 0.95× the
plain forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from benchmarks.data import varied_prompts
from benchmarks.harness import BenchConfig, BenchResult, Variant, make_result, ratio, time_alternating
from interp.activations import collect_activations
from interp.adapter import base_model, d_model, layer_module, n_layers, stream
from interp.chat import format_prompts, iter_batches
from interp.loading import LoadedModel

__all__ = ["TARGET", "hf_hidden_states", "torch_hooks", "measure", "run"]

TARGET = 0.95


def _batches(lm: LoadedModel, prompts: Sequence[str], batch_size: int):
    return list(iter_batches(lm.tokenizer, format_prompts(lm.tokenizer, prompts), batch_size, max_length=512))


@torch.inference_mode()
def hf_hidden_states(lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int], batch_size: int) -> Tensor:
    """Baseline: ``output_hidden_states=True``; ``hidden_states[l + 1]`` is layer ``l``'s output (the last
    one after the final norm in HF, so it is not comparable at the last layer)."""
    out = torch.empty(len(prompts), len(layers), d_model(lm.model))
    for b in _batches(lm, prompts, batch_size):
        b = b.to(lm.device)
        hs = lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True,
                      logits_to_keep=1, use_cache=False).hidden_states
        out[b.index] = torch.stack([hs[layer + 1][:, -1] for layer in layers], dim=1).float().cpu()
    return out


@torch.inference_mode()
def torch_hooks(lm: LoadedModel, prompts: Sequence[str], layers: Sequence[int], batch_size: int) -> Tensor:
    """Baseline: a forward hook per decoder layer that keeps the last position of its output."""
    out = torch.empty(len(prompts), len(layers), d_model(lm.model))
    saved: dict[int, Tensor] = {}

    def make(layer: int):
        def hook(_module, _inputs, output):
            saved[layer] = stream(output)[:, -1]
        return hook

    model = base_model(lm.model)
    handles = [layer_module(model, layer).register_forward_hook(make(layer)) for layer in layers]
    try:
        for b in _batches(lm, prompts, batch_size):
            b = b.to(lm.device)
            lm.model(input_ids=b.input_ids, attention_mask=b.attention_mask, logits_to_keep=1, use_cache=False)
            out[b.index] = torch.stack([saved[layer] for layer in layers], dim=1).float().cpu()
    finally:
        for h in handles:
            h.remove()
    return out


def _rel_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def measure(
    lm: LoadedModel, prompts: Sequence[str], batch_size: int, reps: int, warmup: int = 1,
    layers: Sequence[int] | None = None,
) -> tuple[dict[str, Variant], dict[str, dict], dict[str, float]]:
    """Time the three variants; returns ``(variants, ratios, checks)``."""
    layers = list(range(n_layers(lm.model))) if layers is None else list(layers)
    batches = _batches(lm, prompts, batch_size)
    work = {"prompts": len(prompts), "tokens": sum(int(b.attention_mask.sum()) for b in batches),
            "padded_tokens": sum(b.input_ids.numel() for b in batches)}
    fns = {
        "emalab": lambda: collect_activations(lm, prompts, layers, batch_size=batch_size),
        "hf_hidden_states": lambda: hf_hidden_states(lm, prompts, layers, batch_size),
        "torch_hooks": lambda: torch_hooks(lm, prompts, layers, batch_size),
    }
    times = time_alternating(fns, reps, warmup, device=lm.device)
    desc = {"emalab": "interp.activations.collect_activations (nnsight trace, stops after the last layer)",
            "hf_hidden_states": "model(..., output_hidden_states=True, logits_to_keep=1, use_cache=False)",
            "torch_hooks": "register_forward_hook on every decoder layer, full forward (logits_to_keep=1)"}
    variants = {k: Variant(times[k], work, desc[k]) for k in fns}
    ratios = {"emalab/hf_hidden_states": ratio(variants, "emalab", "hf_hidden_states", TARGET),
              "emalab/torch_hooks": ratio(variants, "emalab", "torch_hooks", TARGET)}
    ours, hooks, hf = fns["emalab"](), fns["torch_hooks"](), fns["hf_hidden_states"]()
    checks = {"max_rel_diff_vs_hooks": _rel_diff(ours, hooks),
              "max_rel_diff_vs_hidden_states_excl_last_layer": _rel_diff(ours[:, :-1], hf[:, :-1])}
    return variants, ratios, checks


def run(lm: LoadedModel, cfg: BenchConfig) -> BenchResult:
    prompts = varied_prompts(cfg.n_prompts)
    variants, ratios, checks = measure(lm, prompts, cfg.batch_size, cfg.reps, cfg.warmup)
    config = {"model": lm.name, "dtype": str(next(lm.model.parameters()).dtype), "device": str(lm.device),
              "n_prompts": len(prompts), "batch_size": cfg.batch_size, "reps": cfg.reps, "warmup": cfg.warmup,
              "layers": "all", "site": "resid_post", "position": "last"}
    notes = ["ratio = median baseline time / median emalab time (>1: emalab faster); paired_ratio = median over "
             "rounds of the same ratio within a round; the target is checked on paired_ratio",
             "checks are max |Δ| relative to the largest activation; they are 0 on unpadded rows. On left-padded rows "
             "nnsight passes position ids counted from the first real token, the plain forwards count the padding; "
             "RoPE is shift-invariant, so only bf16 rounding differs (< 1e-5 in float32, tested)"]
    return make_result("activations", variants, ratios, config, lm.device, checks, notes)
