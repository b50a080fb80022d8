"""A loaded model cast to a narrower dtype from its resident weights (the training copy of the
measurement model), instead of reading the checkpoint a second time."""

from __future__ import annotations

import copy

import torch
from torch import nn

from interp.loading import LoadedModel, resolve_dtype

__all__ = ["cast_copy"]


def cast_copy(lm: LoadedModel, dtype: str | torch.dtype) -> LoadedModel:
    """A second copy of ``lm`` in ``dtype``, cast from its resident weights instead of re-read from disk.

    Loading the same checkpoint again in another dtype maps the weight files a second time while the
    first model's pages are resident: on a 1.5B model in float32 that doubles 6.2 GB of resident pages
    for the length of the load (VmHWM 17.1 GB against 10.1 GB after it). Casting the resident float32
    tensors builds the same parameters (the same rounding as ``from_pretrained(dtype=...)``; tested bit
    for bit in every supported family) with no transient copy. Buffers get the dtypes a fresh load gives
    them; tied weights stay tied.

    Raises:
        ValueError: ``lm`` carries an adapter or hooks (cast the clean base model), or ``dtype`` would
            widen the weights (a float32 copy of bfloat16 weights is not the float32 checkpoint: load it).
    """
    torch_dtype = resolve_dtype(dtype)
    source = next(lm.model.parameters()).dtype
    if torch.finfo(torch_dtype).bits > torch.finfo(source).bits:
        raise ValueError(f"a {torch_dtype} copy of {source} weights would not be the checkpoint's {torch_dtype} "
                         "weights; load the model in that dtype instead")
    if not is_clean(lm):
        raise ValueError("cast_copy needs the clean base model; detach its adapter and hooks first")
    # deepcopy with every parameter pre-seeded in the memo: the module tree, config and buffers are copied,
    # each parameter is replaced by its cast (shared parameters, e.g. a tied unembedding, map to one cast).
    memo: dict[int, object] = {}
    with torch.no_grad():
        for p in lm.model.parameters():
            if id(p) not in memo and p.is_floating_point():
                memo[id(p)] = nn.Parameter(p.detach().to(torch_dtype), requires_grad=p.requires_grad)
    model = copy.deepcopy(lm.model, memo)
    # Buffers take the dtypes a fresh load in ``dtype`` gives them (read off a weightless skeleton): most stay
    # as they are (rotary frequencies are float32 either way), some follow the load dtype (Gemma's embed_scale).
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(lm.model.config), dtype=torch_dtype)
    want = {name: b.dtype for name, b in skeleton.named_buffers()}
    for module_name, module in model.named_modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            full = f"{module_name}.{name}" if module_name else name
            if full in want and buf.dtype != want[full]:
                module._buffers[name] = buf.to(want[full])
    model.config.dtype = torch_dtype
    out = LoadedModel(model=model, tokenizer=lm.tokenizer, name=lm.name, weights_id=lm.weights_id, chat=lm.chat,
                      extra=dict(lm.extra))
    out.extra["dtype"] = str(torch_dtype).removeprefix("torch.")
    return out


def is_clean(lm: LoadedModel) -> bool:
    """``lm`` is the base model as loaded: no adapter, no hooks (the unembedding's contiguity pre-hook
    is part of every model)."""
    hooked = any(m._forward_hooks or (m._forward_pre_hooks and not getattr(m, "_emalab_contiguous", False))
                 for m in lm.model.modules())
    return not ("adapter_id" in lm.extra or hasattr(lm.model, "peft_config") or hooked)
