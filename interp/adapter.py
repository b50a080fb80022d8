"""The one model adapter: canonical sites (``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out``)
× layer, mapped to each family's module paths.

No other module in emalab spells out ``model.model.layers[...]``: nnsight traces and PyTorch hooks
both resolve sites here. Six families (Qwen 2/3, Llama, Mistral, Gemma 2/3) are tested fast paths with
written-out paths; any other Hugging Face causal LM gets a :class:`FamilySpec` discovered from its module
tree (:func:`discover_spec`): the decoder-layer list, the final norm, the embedding and unembedding, and
each block's attention and MLP.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

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


@runtime_checkable
class ModuleTree(Protocol):
    """An ``nn.Module``, or an nnsight envoy over one: the lookups below only walk attribute paths,
    so traces in ``interp`` pass the envoy and get envoys back."""

    def named_modules(self, *args: Any, **kwargs: Any) -> Any: ...

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out")


@dataclass(frozen=True)
class FamilySpec:
    """Module paths of one architecture family, relative to the ``*ForCausalLM`` model."""

    layers: str
    embed: str
    final_norm: str
    unembed: str
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_out_proj: str = "self_attn.o_proj"
    mlp_out_proj: str = "mlp.down_proj"
    attn_write: str | None = None
    """Module whose output is *added to the stream* by attention, when it is not ``attn`` itself
    (Gemma 2/3 normalise the attention output with ``post_attention_layernorm`` before adding it)."""
    mlp_write: str | None = None
    """Likewise for the MLP (Gemma 2/3: ``post_feedforward_layernorm``)."""
    embed_is_stream: bool = True
    """Whether the embedding's output *is* the stream entering layer 0. Not so where the model adds
    position embeddings (GPT-2) or scales outside the embedding module (Granite): then ``resid_pre`` at
    layer 0 is read from the input of layer 0."""
    discovered: bool = False
    """Found by :func:`discover_spec` rather than written out (a family without a tested fast path)."""


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


class UnsupportedFamilyError(ValueError):
    pass


class LayerOutOfRangeError(IndexError, ValueError):
    pass


class UnknownSiteError(ValueError):
    pass


def base_model(model: ModuleTree) -> nn.Module:
    """Unwrap PEFT and nnsight wrappers to the underlying ``*ForCausalLM`` module."""
    inner = getattr(model, "_module", None)  # nnsight envoy
    if isinstance(inner, nn.Module):
        model = inner
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def family_of(model: ModuleTree) -> str:
    model_type = getattr(base_model(model).config, "model_type", None)
    if model_type == "gemma3":  # multimodal wrapper config; the text stack is what we trace
        model_type = "gemma3_text"
    return model_type



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


_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_ATTN_PROJ_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "o")
_MLP_PROJ_NAMES = ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2", "fc_out")
# Per model instance (weakly held): a structure edited after loading is rediscovered on a new model.
_DISCOVERED: weakref.WeakKeyDictionary[nn.Module, FamilySpec] = weakref.WeakKeyDictionary()


def _path_of(root: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    return next((name for name, mod in root.named_modules() if mod is target and name), None)


def _child(block: nn.Module, names: tuple[str, ...], class_word: str) -> str | None:
    children = dict(block.named_children())
    for name in names:
        if name in children:
            return name
    return next((n for n, m in children.items() if class_word in type(m).__name__.lower()), None)


def _linear_like(mod: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) is a linear layer with a transposed weight.
    return isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D"


def _out_proj(module: nn.Module, names: tuple[str, ...]) -> str | None:
    children = dict(module.named_children())
    for name in names:
        if name in children and _linear_like(children[name]):
            return name
    linears = [n for n, m in children.items() if _linear_like(m)]
    return linears[-1] if linears else None


def discover_spec(model: ModuleTree) -> FamilySpec:
    """Find the module paths of any Hugging Face causal LM from its module tree (cached per model).

    The decoder-layer list is the ``nn.ModuleList`` of ``num_hidden_layers`` blocks of one class (the
    shallowest, if several); the embedding and unembedding come from ``get_input_embeddings`` /
    ``get_output_embeddings``; the final norm is the first ``*Norm*`` module registered after the layer
    list outside it; attention and MLP are the block's children by usual name or class name. A block
    with a ``post_feedforward_layernorm`` normalises both writes before adding them (Gemma 2/3, OLMo-2).

    Raises:
        UnsupportedFamilyError: naming the part that was not found.
    """
    base = base_model(model)
    fam = family_of(base)
    if base in _DISCOVERED:
        return _DISCOVERED[base]

    def missing(what: str) -> UnsupportedFamilyError:
        return UnsupportedFamilyError(
            f"cannot adapt model family {fam!r} ({type(base).__name__}): {what}. emalab's tested fast paths are "
            f"{', '.join(sorted(FAMILIES))}; add this family's module paths to interp.adapter.FAMILIES."
        )

    cfg = getattr(getattr(base, "config", None), "text_config", None) or getattr(base, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    if n is None:
        raise missing("its config has no num_hidden_layers")
    lists = [(name, m) for name, m in base.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) == n and n > 0 and len({type(c) for c in m}) == 1]
    if not lists:
        raise missing(f"no decoder-layer list (an nn.ModuleList of num_hidden_layers={n} blocks of one class) was found")
    layers, layer_list = min(lists, key=lambda nm: nm[0].count("."))
    embed = _path_of(base, base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None)
    if embed is None:
        raise missing("no input embedding (get_input_embeddings() is not a submodule)")
    unembed = _path_of(base, base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None)
    if unembed is None:
        raise missing("no unembedding (get_output_embeddings() is None or not a submodule)")
    final_norm, after = None, False
    for name, mod in base.named_modules():
        if name == layers:
            after = True
        elif after and not name.startswith(layers + ".") and "norm" in type(mod).__name__.lower():
            final_norm = name
            break
    if final_norm is None:
        raise missing(f"no final norm (a *Norm* module registered after {layers!r}, outside it)")
    block = layer_list[0]
    attn = _child(block, _ATTN_NAMES, "attention")
    mlp = _child(block, _MLP_NAMES, "mlp")
    if attn is None or mlp is None:
        kids = ", ".join(n for n, _ in block.named_children())
        raise missing(f"no {'attention' if attn is None else 'MLP'} module in a decoder block (children: {kids})")
    attn_proj = _out_proj(get_module(block, attn), _ATTN_PROJ_NAMES)
    mlp_proj = _out_proj(get_module(block, mlp), _MLP_PROJ_NAMES)
    children = dict(block.named_children())
    post = "post_feedforward_layernorm" in children
    position_embeds = any(k in dict(base.named_modules()) for k in ("transformer.wpe", "wpe"))
    scaled = getattr(cfg, "embedding_multiplier", 1.0) not in (None, 1, 1.0)
    spec = FamilySpec(
        layers=layers, embed=embed, final_norm=final_norm, unembed=unembed, attn=attn, mlp=mlp,
        attn_out_proj=f"{attn}.{attn_proj}" if attn_proj else "", mlp_out_proj=f"{mlp}.{mlp_proj}" if mlp_proj else "",
        attn_write="post_attention_layernorm" if post and "post_attention_layernorm" in children else None,
        mlp_write="post_feedforward_layernorm" if post else None,
        embed_is_stream=not (position_embeds or scaled), discovered=True,
    )
    _DISCOVERED[base] = spec
    return spec


def get_module(root: ModuleTree, path: str) -> ModuleTree:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


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
def lora_row_scale(model: nn.Module, scale: Tensor) -> Iterator[int]:
    """Scale every LoRA update per batch row for the forwards inside the block: row ``b`` of a LoRA
    layer computes ``W x + scale[b] · B A x`` (a concept gate: 0 is the base model, 1 the adapter).

    Hooks the output of each (unmerged) LoRA layer's ``lora_B``; ``scale`` is ``(batch,)`` and is
    not trained through. Yields the number of hooked modules; hooks are removed on exit.

    Raises:
        ValueError: the model has no unmerged LoRA layer, or a forward's batch is not ``len(scale)``.
    """
    if scale.ndim != 1:
        raise ValueError(f"scale must be one factor per row (batch,), got shape {tuple(scale.shape)}")
    factors = scale.detach()
    handles = []

    def hook(_module, _inputs, output: Tensor) -> Tensor:
        if output.shape[0] != factors.shape[0]:
            raise ValueError(f"a forward of {output.shape[0]} rows under a LoRA row scale of {factors.shape[0]} rows")
        return output * factors.to(output.device, output.dtype).view(-1, *([1] * (output.ndim - 1)))

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
