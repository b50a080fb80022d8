"""The one model adapter: canonical sites (``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out``)
× layer, mapped to each family's module paths.

No other module in emalab spells out ``model.model.layers[...]``: nnsight traces and PyTorch hooks
both resolve sites here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

__all__ = [
    "SITES",
    "FamilySpec",
    "FAMILIES",
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


def base_model(model: nn.Module) -> nn.Module:
    """Unwrap PEFT and nnsight wrappers to the underlying ``*ForCausalLM`` module."""
    inner = getattr(model, "_module", None)  # nnsight envoy
    if isinstance(inner, nn.Module):
        model = inner
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def family_of(model: nn.Module) -> str:
    model_type = getattr(base_model(model).config, "model_type", None)
    if model_type == "gemma3":  # multimodal wrapper config; the text stack is what we trace
        model_type = "gemma3_text"
    return model_type


def spec_of(model: nn.Module) -> FamilySpec:
    fam = family_of(model)
    if fam not in FAMILIES:
        raise UnsupportedFamilyError(
            f"model family {fam!r} is not supported by emalab's adapter; supported: {', '.join(sorted(FAMILIES))}. "
            "Add its module paths to interp.adapter.FAMILIES."
        )
    return FAMILIES[fam]


def get_module(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


def _config(model: nn.Module):
    cfg = base_model(model).config
    return getattr(cfg, "text_config", cfg)


def n_layers(model: nn.Module) -> int:
    return int(_config(model).num_hidden_layers)


def d_model(model: nn.Module) -> int:
    return int(_config(model).hidden_size)


def check_site(site: str) -> str:
    if site not in SITES:
        raise UnknownSiteError(f"unknown site {site!r}; sites are {', '.join(SITES)}")
    return site


def check_layers(model: nn.Module, layers: Iterable[int] | None) -> list[int]:
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
        embedding for L=0), which is exactly the input of layer L.
    """
    check_site(site)
    spec = spec_of(model)
    (layer,) = check_layers(model, [layer])
    if site == "resid_pre":
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
    return get_module(block, spec.attn_out_proj), get_module(block, spec.mlp_out_proj)


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

    try:
        for layer in check_layers(model, layers):
            module, _ = site_module(model, site, layer)
            handles.append(module.register_forward_hook(make(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


def envoy_for_site(lm, site: str, layer: int):
    """The nnsight envoy whose ``.output`` is ``site`` at ``layer`` (used by traces in ``interp``)."""
    check_site(site)
    spec = spec_of(lm)
    (layer,) = check_layers(lm, [layer])
    if site == "resid_pre":
        return get_module(lm, spec.embed) if layer == 0 else get_module(lm, spec.layers)[layer - 1]
    block = get_module(lm, spec.layers)[layer]
    if site == "resid_post":
        return block
    return get_module(block, _write_path(spec, site))


def stream(output) -> Tensor:
    """The residual-stream tensor of a module output (decoder layers may return tuples)."""
    return _stream_of(output)


__all__ += ["envoy_for_site", "stream", "has_post_norms"]
