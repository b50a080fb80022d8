"""The one model adapter: canonical sites (``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out``)
× layer, mapped to each family's module paths.

No other module in emalab spells out ``model.model.layers[...]``: nnsight traces and PyTorch hooks
both resolve sites here. Six families (Qwen 2/3, Llama, Mistral, Gemma 2/3) are tested fast paths with
written-out paths; any other Hugging Face causal LM gets a :class:`FamilySpec` discovered from its module
tree (:func:`discover_spec`): the decoder-layer list, the final norm, the embedding and unembedding, and
each block's attention and MLP.

The module-tree basics (:class:`FamilySpec`, :func:`base_model`, :func:`get_module`) are
:mod:`interp.module_tree` and the discovery :mod:`interp.family_discovery`; both are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from interp.family_discovery import discover_spec
from interp.module_tree import (
    FamilySpec,
    ModuleTree,
    UnsupportedFamilyError,
    base_model,
    family_of,
    get_module,
)

__all__ = [
    "ModuleTree",
    "SITES",
    "FamilySpec",
    "FAMILIES",
    "discover_spec",
    "UnsupportedFamilyError",
    "LayerOutOfRangeError",
    "UnknownSiteError",
    "base_model",
    "family_of",
    "spec_of",
    "n_layers",
    "d_model",
    "check_site",
    "check_layers",
    "get_module",
    "layer_module",
    "site_module",
    "embed_module",
    "final_norm_module",
    "unembed_module",
    "output_projections",
    "site_hook",
]


SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")


_DECODER = FamilySpec(layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head")
# Gemma 2/3 put an RMSNorm after attention and after the MLP; the sites ``attn_out``/``mlp_out`` are
# what is added to the residual stream, i.e. those norms' outputs (as TransformerLens's hook_attn_out).
_POST_NORM_DECODER = FamilySpec(layers="model.layers", embed="model.embed_tokens", final_norm="model.norm",
                                unembed="lm_head", attn_write="post_attention_layernorm",
                                mlp_write="post_feedforward_layernorm")

FAMILIES: dict[str, FamilySpec] = {
    "qwen2": _DECODER,
    "qwen3": _DECODER,
    "llama": _DECODER,
    "mistral": _DECODER,
    "gemma2": _POST_NORM_DECODER,
    "gemma3_text": _POST_NORM_DECODER,
}


class LayerOutOfRangeError(IndexError, ValueError):
    pass


class UnknownSiteError(ValueError):
    pass


def spec_of(model: ModuleTree) -> FamilySpec:
    """The module paths of ``model``: a tested fast path for the six known families, else discovered.

    Raises:
        UnsupportedFamilyError: the structure has no recognisable decoder-layer list, embedding,
            unembedding, final norm, attention or MLP; the message names what was not found.
    """
    fam = family_of(model)
    if fam in FAMILIES:
        return FAMILIES[fam]
    return discover_spec(model)

def _config(model: ModuleTree):
    cfg = base_model(model).config
    return getattr(cfg, "text_config", cfg)


def n_layers(model: ModuleTree) -> int:
    return int(_config(model).num_hidden_layers)


def d_model(model: ModuleTree) -> int:
    return int(_config(model).hidden_size)


def check_site(site: str) -> str:
    if site not in SITES:
        raise UnknownSiteError(f"unknown site {site!r}; sites are {', '.join(SITES)}")
    return site


def check_layers(model: ModuleTree, layers: Iterable[int] | None) -> list[int]:
    """Validate layer indices (negative indices count from the end); ``None`` means all layers."""
    n = n_layers(model)
    if layers is None:
        return list(range(n))
    out = []
    for layer in layers:
        idx = layer + n if layer < 0 else layer
        if not 0 <= idx < n:
            raise LayerOutOfRangeError(f"layer {layer} is out of range for a model with {n} layers (0..{n - 1})")
        out.append(int(idx))
    return sorted(set(out))


def layer_module(model: nn.Module, layer: int) -> nn.Module:
    (layer,) = check_layers(model, [layer])
    return get_module(base_model(model), spec_of(model).layers)[layer]


def embed_module(model: nn.Module) -> nn.Module:
    return get_module(base_model(model), spec_of(model).embed)


def final_norm_module(model: nn.Module) -> nn.Module:
    return get_module(base_model(model), spec_of(model).final_norm)


def unembed_module(model: nn.Module) -> nn.Module:
    return get_module(base_model(model), spec_of(model).unembed)


def site_module(model: nn.Module, site: str, layer: int) -> tuple[nn.Module, str]:
    """The module whose output is ``site`` at ``layer``, and which end of it carries the stream.

    Returns:
        ``(module, "output")``. ``resid_pre`` at layer L is the output of layer L-1 (or of the
        embedding for L=0), which is exactly the input of layer L. Where the embedding's output is not
        yet the stream (``FamilySpec.embed_is_stream``), ``resid_pre`` at layer 0 is
        ``(layer 0, "input")``.
    """
    check_site(site)
    spec = spec_of(model)
    (layer,) = check_layers(model, [layer])
    if site == "resid_pre":
        if layer == 0 and not spec.embed_is_stream:
            return layer_module(model, 0), "input"
        return (embed_module(model) if layer == 0 else layer_module(model, layer - 1)), "output"
    block = layer_module(model, layer)
    if site == "resid_post":
        return block, "output"
    return get_module(block, _write_path(spec, site)), "output"


def _write_path(spec: FamilySpec, site: str) -> str:
    if site == "attn_out":
        return spec.attn_write or spec.attn
    return spec.mlp_write or spec.mlp


def has_post_norms(model: nn.Module) -> bool:
    """Whether attention/MLP outputs pass through a norm before joining the stream (Gemma 2/3).

    Then no edit of ``o_proj``/``down_proj`` weights can remove a direction from the stream.
    """
    spec = spec_of(model)
    return spec.attn_write is not None or spec.mlp_write is not None


def output_projections(model: nn.Module, layer: int) -> tuple[nn.Linear, nn.Linear]:
    """The attention-output and MLP-down projections of ``layer`` (they write into the stream)."""
    spec = spec_of(model)
    block = layer_module(model, layer)
    projs = []
    for what, path in (("attention output projection", spec.attn_out_proj), ("MLP down projection", spec.mlp_out_proj)):
        mod = get_module(block, path) if path else None
        if not isinstance(mod, nn.Linear):
            raise UnsupportedFamilyError(
                f"family {family_of(model)!r} has no nn.Linear {what} (found {type(mod).__name__ if mod else 'none'}); "
                "weight edits need one; use hook-based interventions (ablate_direction) instead")
        projs.append(mod)
    return projs[0], projs[1]


def _stream_of(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def site_hook(
    model: nn.Module, site: str, layers: Iterable[int], fn: Callable[[Tensor, int], Tensor]
) -> Iterator[None]:
    """Temporarily rewrite the stream at ``site`` for ``layers`` with ``fn(stream, layer) -> stream``.

    Hooks are always removed on exit, also when the body raises.
    """
    handles = []

    def make(layer: int):
        def hook(_module, _inputs, output):
            new = fn(_stream_of(output), layer)
            if isinstance(output, tuple):
                return (new, *output[1:])
            return new

        return hook

    def make_pre(layer: int):
        def pre_hook(_module, args, kwargs):
            if args:
                return (fn(args[0], layer), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"], layer)}

        return pre_hook

    try:
        for layer in check_layers(model, layers):
            module, end = site_module(model, site, layer)
            if end == "input":
                handles.append(module.register_forward_pre_hook(make_pre(layer), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(make(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def site_capture(model: nn.Module, site: str, layers: Iterable[int]) -> Iterator[dict[int, Tensor]]:
    """Record the stream at ``site`` for ``layers`` during the forwards run inside the block.

    Unlike the nnsight traces, the tensors keep their autograd graph (training losses on
    activations). Yields ``{layer: stream}`` (layers as :func:`check_layers` resolves them), filled
    by each forward and overwritten by the next. Hooks are removed on exit.
    """
    store: dict[int, Tensor] = {}

    def keep(stream: Tensor, layer: int) -> Tensor:
        store[layer] = stream
        return stream

    with site_hook(model, site, layers, keep):
        yield store


@contextmanager
def lora_row_scale(model: nn.Module, scale: Tensor | Callable[[int], Tensor]) -> Iterator[int]:
    """Scale every LoRA update per batch row for the forwards inside the block: row ``b`` of a LoRA
    layer computes ``W x + scale[b] · B A x`` (a concept gate: 0 is the base model, 1 the adapter).

    Hooks the output of each (unmerged) LoRA layer's ``lora_B``; ``scale`` is ``(batch,)`` and is
    not trained through, or a callable ``scale(n_rows) -> (n_rows,)`` asked at every LoRA call (the
    rows of a forward can change from one forward to the next: :mod:`interp.gating`). The hooks only
    run while the adapter is enabled, so they never change the base model (``adapter_only``). Yields
    the number of hooked modules; hooks are removed on exit.

    Raises:
        ValueError: the model has no unmerged LoRA layer, or a forward's batch is not ``len(scale)``.
    """
    if callable(scale):
        factors_for = scale
    else:
        if scale.ndim != 1:
            raise ValueError(f"scale must be one factor per row (batch,), got shape {tuple(scale.shape)}")
        fixed = scale.detach()

        def factors_for(n_rows: int) -> Tensor:
            if n_rows != fixed.shape[0]:
                raise ValueError(f"a forward of {n_rows} rows under a LoRA row scale of {fixed.shape[0]} rows")
            return fixed

    handles = []

    def hook(_module, _inputs, output: Tensor) -> Tensor:
        factors = factors_for(output.shape[0])
        return output * factors.to(output.device, output.dtype).view(-1, *([1] * (output.ndim - 1)))

    hook.adapter_only = True  # type: ignore[attr-defined]
    try:
        for module in model.modules():
            lora_b = getattr(module, "lora_B", None)
            if not isinstance(lora_b, nn.ModuleDict):
                continue
            if getattr(module, "merged", False):
                raise ValueError("a LoRA layer is merged into its base weights; a per-row scale needs the "
                                 "adapter unmerged (outside merged_adapter)")
            handles.extend(sub.register_forward_hook(hook) for sub in lora_b.values())
        if not handles:
            raise ValueError("the model has no LoRA layers to scale; attach or load an adapter first")
        yield len(handles)
    finally:
        for h in handles:
            h.remove()


def envoy_for_site(lm, site: str, layer: int):
    """The nnsight envoy whose ``.output`` is ``site`` at ``layer`` (used by traces in ``interp``)."""
    check_site(site)
    spec = spec_of(lm)
    (layer,) = check_layers(lm, [layer])
    if site == "resid_pre":
        if layer == 0 and not spec.embed_is_stream:
            return get_module(lm, spec.layers)[0]
        return get_module(lm, spec.embed) if layer == 0 else get_module(lm, spec.layers)[layer - 1]
    block = get_module(lm, spec.layers)[layer]
    if site == "resid_post":
        return block
    return get_module(block, _write_path(spec, site))


def site_value(lm, site: str, layer: int) -> Tensor:
    """Inside an nnsight trace: the stream tensor at ``site`` × ``layer`` (batch × pos × d_model).

    Reads the envoy's ``.output``, or its ``.input`` where ``resid_pre`` at layer 0 is the input of
    layer 0 (``FamilySpec.embed_is_stream`` is false).
    """
    envoy = envoy_for_site(lm, site, layer)
    if site == "resid_pre" and layer in (0, -n_layers(lm)) and not spec_of(lm).embed_is_stream:
        return _stream_of(envoy.input)
    return _stream_of(envoy.output)


def stream(output) -> Tensor:
    """The residual-stream tensor of a module output (decoder layers may return tuples)."""
    return _stream_of(output)


def lora_target_types() -> tuple[type, ...]:
    """Module classes that count as linear layers for LoRA (``nn.Linear`` and GPT-2's ``Conv1D``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


__all__ += ["envoy_for_site", "stream", "has_post_norms", "site_value", "lora_target_types", "site_capture",
            "lora_row_scale"]
