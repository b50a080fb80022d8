"""Module paths of a Hugging Face causal LM without a tested fast path, discovered from its module
tree (:func:`discover_spec`): the decoder-layer list, the final norm, the embedding and unembedding,
and each block's attention and MLP."""

from __future__ import annotations

import weakref

from torch import nn

from interp.module_tree import (
    FamilySpec,
    ModuleTree,
    UnsupportedFamilyError,
    base_model,
    family_of,
    get_module,
)

__all__ = ["discover_spec"]


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
        from interp.adapter import FAMILIES  # the fast paths' table; the adapter imports this module

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
