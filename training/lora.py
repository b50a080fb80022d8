"""LoRA adapters on a :class:`~interp.loading.LoadedModel`: attach, save, load, merge for evaluation,
detach. The reference policy is always the same weights with the adapter disabled
(:func:`interp.loading.adapter_disabled`), never a second copy of the model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interp.adapter import base_model, layer_module, lora_target_types, unembed_module
from interp.io import atomic_save_safetensors, atomic_write_json, git_commit, read_json
from interp.loading import LoadedModel

__all__ = [
    "AdapterMismatchError",
    "ADAPTER_META",
    "resolve_lora_targets",
    "attach_lora",
    "detach_lora",
    "has_adapter",
    "merged_adapter",
    "trainable_state",
    "load_trainable_state",
    "tensor_hash",
    "adapter_id",
    "save_adapter",
    "load_adapter",
    "resolve_adapter_dir",
    "same_base",
    "enable_gradient_checkpointing",
    "disable_gradient_checkpointing",
]

ADAPTER_META = "emalab_adapter.json"


class AdapterMismatchError(ValueError):
    """An adapter was trained on different base weights than the model it is being loaded into."""


def has_adapter(lm: LoadedModel) -> bool:
    return hasattr(lm.model, "peft_config")


def resolve_lora_targets(
    model: nn.Module, targets: Sequence[str] = ("all-linear",), single_layer: int | None = None
) -> list[str]:
    """Fully qualified names of the linear modules to adapt.

    Args:
        targets: ``("all-linear",)`` for every linear layer except the unembedding, else module-name
            suffixes (``"o_proj"`` matches ``model.layers.3.self_attn.o_proj``).
        single_layer: restrict to this decoder layer (resolved through ``interp.adapter``).
    """
    base = base_model(model)
    unembed = unembed_module(base)
    scope = None if single_layer is None else {id(m) for m in layer_module(base, single_layer).modules()}
    every = "all-linear" in targets
    linear = lora_target_types()
    names, suffixes = [], set()
    for name, mod in base.named_modules():
        if not isinstance(mod, linear) or mod is unembed:
            continue
        if scope is not None and id(mod) not in scope:
            continue
        suffixes.add(name.rsplit(".", 1)[-1])
        if every or any(name == t or name.endswith("." + t) for t in targets):
            names.append(name)
    if not names:
        raise ValueError(f"no linear module matches {list(targets)}"
                         + (f" in layer {single_layer}" if single_layer is not None else "")
                         + f"; linear modules here end in {sorted(suffixes)}")
    return names


def attach_lora(
    lm: LoadedModel,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    targets: Sequence[str] = ("all-linear",),
    use_rslora: bool = False,
    single_layer: int | None = None,
) -> LoadedModel:
    """Wrap ``lm.model`` in a fresh PEFT LoRA model (B = 0, so outputs are unchanged) and freeze the
    base weights. Modifies ``lm`` in place and returns it."""
    from peft import LoraConfig, get_peft_model

    if has_adapter(lm):
        raise RuntimeError("the model already carries a PEFT adapter; detach_lora(lm) first")
    names = resolve_lora_targets(lm.model, targets, single_layer)
    base = base_model(lm.model)
    # GPT-2's Conv1D stores its weight as (in, out): PEFT must be told, or it warns and guesses.
    transposed = any(not isinstance(base.get_submodule(n), nn.Linear) for n in names)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names,
                     use_rslora=use_rslora, bias="none", task_type="CAUSAL_LM", fan_in_fan_out=transposed)
    lm.model = get_peft_model(lm.model, cfg)
    lm.extra.pop("adapter_id", None)
    return lm


def enable_gradient_checkpointing(lm: LoadedModel) -> LoadedModel:
    """Recompute decoder activations in the backward pass instead of storing them (7B LoRA at long
    sequences): about a third more compute for activation memory that no longer grows with depth.

    Non-reentrant checkpointing, so the frozen embedding needs no ``requires_grad`` trick. In place.
    """
    base = base_model(lm.model)
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False
    return lm


def disable_gradient_checkpointing(lm: LoadedModel, use_cache: bool = True) -> LoadedModel:
    """Undo :func:`enable_gradient_checkpointing` (generation wants its KV cache back). In place."""
    base = base_model(lm.model)
    base.gradient_checkpointing_disable()
    # transformers' enable also hooks the input embeddings (their outputs require grad) and its disable
    # leaves that hook behind: remove it, so the model is the clean base model again.
    if hasattr(base, "disable_input_require_grads"):
        base.disable_input_require_grads()
        base._require_grads_hooks = []
    base.config.use_cache = use_cache
    return lm


def detach_lora(lm: LoadedModel) -> LoadedModel:
    """Remove the adapter (without merging), restoring the plain base model. In place."""
    if has_adapter(lm):
        lm.model = lm.model.unload()
    lm.extra.pop("adapter_id", None)
    lm.extra.pop("adapter_gated", None)
    return lm


@contextmanager
def merged_adapter(lm: LoadedModel, backup_budget: int | None = None) -> Iterator[LoadedModel]:
    """Merge the adapter into the base weights for faster evaluation; on exit the base weights are
    restored bit-exactly (merge/unmerge in bf16 alone would leave rounding error behind).

    The exact restore needs a copy of every adapted base weight (about the model's size less its
    embeddings: 5.2 GB for a 1.5B model in float32). When that copy does not fit ``backup_budget``
    (bytes; default :func:`interp.batching.memory_budget` of the model's device, a quarter of the
    available RAM on CPU), the adapter stays unmerged: the same function, its low-rank update computed
    in each forward (a few percent slower in token-by-token generation, no extra memory).
    ``lm.extra["adapter_merged"]`` says which ran, inside the block.

    Raises:
        ValueError: the adapter was trained with a concept gate, which merged weights drop
            (evaluate it under :func:`training.containment.gated_adapter`).
    """
    if not has_adapter(lm):
        yield lm
        return
    if lm.extra.get("adapter_gated"):
        raise ValueError(f"adapter {lm.extra.get('adapter_dir')} is concept-gated and merging drops its gate; "
                         "evaluate it under training.containment.gated_adapter (Study.with_adapter does)")
    from peft.tuners.lora import LoraLayer

    from interp.batching import memory_budget

    layers = [m for m in lm.model.modules() if isinstance(m, LoraLayer)]
    need = sum(m.get_base_layer().weight.numel() * m.get_base_layer().weight.element_size() for m in layers)
    budget = memory_budget(lm.device) if backup_budget is None else backup_budget
    if need > budget:
        _say_unmerged(need, budget)
        lm.extra["adapter_merged"] = False
        try:
            yield lm
        finally:
            lm.extra.pop("adapter_merged", None)
        return
    backup = [m.get_base_layer().weight.detach().clone() for m in layers]
    lm.extra["adapter_merged"] = True
    try:
        lm.model.merge_adapter()
        yield lm
    finally:
        lm.extra.pop("adapter_merged", None)
        try:
            lm.model.unmerge_adapter()
        finally:
            with torch.no_grad():
                for m, w in zip(layers, backup, strict=True):
                    m.get_base_layer().weight.copy_(w)
            del backup


_said_unmerged = False


def _say_unmerged(need: int, budget: int) -> None:
    """Say once per process that adapters are evaluated unmerged, and why."""
    global _said_unmerged
    if not _said_unmerged:
        _said_unmerged = True
        print(f"adapters are evaluated unmerged: restoring merged weights exactly needs a {need / 1e9:.1f} GB "
              f"copy, over the {budget / 1e9:.1f} GB memory budget", file=sys.stderr)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (the LoRA weights, or everything for full fine-tuning)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = sorted(set(n for n, p in params.items() if p.requires_grad) - set(state))
    extra = sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def tensor_hash(state: dict[str, torch.Tensor], length: int = 16) -> str:
    """Content hash of named tensors (names, dtypes, shapes and bytes), independent of file format."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:length]


def adapter_id(lm: LoadedModel) -> str:
    """Hash of the active adapter's weights (PEFT's saved state dict)."""
    from peft import get_peft_model_state_dict

    if not has_adapter(lm):
        raise ValueError("the model carries no adapter")
    return tensor_hash(get_peft_model_state_dict(lm.model))


def save_adapter(lm: LoadedModel, directory: str | Path, meta: dict[str, Any] | None = None,
                 tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Save the adapter in standard PEFT format (``save_pretrained``) plus ``emalab_adapter.json``
    (base model, base weights id, adapter id, git commit and ``meta``), atomically.

    Args:
        tensors: further safetensors files written beside it, ``{file name: {name: tensor}}`` (a
            concept gate's vector).
    """
    if not has_adapter(lm):
        raise ValueError("the model carries no adapter to save")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        lm.model.save_pretrained(str(tmp))
        aid = adapter_id(lm)
        atomic_write_json(tmp / ADAPTER_META, {
            "base_model": lm.name, "base_weights_id": lm.weights_id, "adapter_id": aid,
            "git_commit": git_commit(), **(meta or {}),
        })
        for name, content in (tensors or {}).items():
            atomic_save_safetensors(tmp / name, content)
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def resolve_adapter_dir(adapter: str | Path, revision: str | None = None) -> Path:
    """A local adapter directory, or a hub adapter id fetched (or found in the hub cache) to one.

    Raises:
        FileNotFoundError: neither a local directory nor a reachable/cached hub id.
    """
    path = Path(adapter).expanduser()
    if path.exists() or "/" not in str(adapter) or str(adapter).startswith((".", "/", "~")):
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(adapter), revision=revision,
                                      local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except Exception as err:  # network, auth, or not cached offline: one clear line, not a traceback
        raise FileNotFoundError(
            f"adapter {str(adapter)!r} is not a local directory and could not be fetched from the hub "
            f"({type(err).__name__}); download it and pass the directory") from err


def same_base(declared: str | None, lm: LoadedModel) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names the loaded model (by id or last path part).

    An adapter that does not say is accepted: there is nothing to check it against.
    """
    if not declared:
        return True
    from interp.registry import EMBEDDED_MODELS

    names = {lm.name, str(getattr(base_model(lm.model).config, "_name_or_path", "") or "")}
    if lm.name in EMBEDDED_MODELS:
        names.add(EMBEDDED_MODELS[lm.name].hf_equivalent)
    tail = {Path(n.rstrip("/")).name.lower() for n in names if n}
    return declared.rstrip("/") in names or Path(declared.rstrip("/")).name.lower() in tail


def load_adapter(lm: LoadedModel, directory: str | Path, trainable: bool = False) -> LoadedModel:
    """Load an adapter onto ``lm`` (in place) and set ``lm.extra["adapter_id"]`` (its weights' hash).

    Accepts emalab's own adapters (checked against the base *weights* id in ``emalab_adapter.json``) and
    any standard PEFT adapter directory or hub id (checked against the base model its
    ``adapter_config.json`` names).

    Raises:
        AdapterMismatchError: the adapter was trained on another base model or does not fit this one.
        FileNotFoundError: ``directory`` holds no adapter.
    """
    from peft import PeftModel

    directory = resolve_adapter_dir(directory)
    meta_path = directory / ADAPTER_META
    cfg_path = directory / "adapter_config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{directory} holds no emalab adapter or PEFT adapter (expected adapter_config.json); "
                                "pass the 'adapter' directory of an unlearning run or a PEFT save_pretrained directory")
    meta = read_json(meta_path) if meta_path.exists() else None
    if meta is not None and meta.get("base_weights_id") != lm.weights_id:
        raise AdapterMismatchError(
            f"adapter {directory} was trained on {meta.get('base_model')!r} (weights {meta.get('base_weights_id')}) "
            f"but the loaded model is {lm.name!r} (weights {lm.weights_id}); load the matching base model"
        )
    if meta is None:
        declared = read_json(cfg_path).get("base_model_name_or_path")
        if not same_base(declared, lm):
            raise AdapterMismatchError(
                f"adapter {directory} was trained on base model {declared!r} but the loaded model is {lm.name!r}; "
                f"pass --model {declared} (or a local copy of it)")
    if has_adapter(lm):
        raise RuntimeError("the model already carries a PEFT adapter; detach_lora(lm) first")
    try:
        lm.model = PeftModel.from_pretrained(lm.model, str(directory), is_trainable=trainable)
    except (ValueError, RuntimeError, KeyError) as err:
        # Target modules missing or tensor shapes off: the adapter belongs to another architecture.
        raise AdapterMismatchError(f"adapter {directory} does not fit {lm.name!r}: {str(err).splitlines()[0][:300]}") from err
    aid = adapter_id(lm)
    if meta is not None and meta.get("adapter_id") and meta["adapter_id"] != aid:
        raise ValueError(f"{directory}: adapter weights hash {aid} != recorded {meta['adapter_id']}; the files "
                         "were modified or are corrupt")
    lm.extra["adapter_id"] = aid
    lm.extra["adapter_dir"] = str(directory)
    if meta is not None and (meta.get("gate") or (meta.get("config") or {}).get("concept_gate")):
        lm.extra["adapter_gated"] = True  # merged_adapter refuses it: merging would drop the gate
    return lm
