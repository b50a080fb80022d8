"""Walking a model's module tree: unwrap PEFT / nnsight wrappers, name the family, follow attribute
paths, and :class:`FamilySpec`, the module paths of one family. :mod:`interp.adapter` holds the
families' specs and maps the canonical sites onto them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from torch import nn

__all__ = ["ModuleTree", "FamilySpec", "UnsupportedFamilyError", "base_model", "family_of", "get_module"]


@runtime_checkable
class ModuleTree(Protocol):
    """An ``nn.Module``, or an nnsight envoy over one: the lookups below only walk attribute paths,
    so traces in ``interp`` pass the envoy and get envoys back."""

    def named_modules(self, *args: Any, **kwargs: Any) -> Any: ...


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


class UnsupportedFamilyError(ValueError):
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


def get_module(root: ModuleTree, path: str) -> ModuleTree:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod
