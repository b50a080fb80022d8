"""When the study frees a model it can make again: its float32 measurement model while a separate
training model trains, and the training model after its run (:meth:`study.core.Study.training_model`).
A model is freed only when its weights take a large share of the memory it lives in."""

from __future__ import annotations

from interp.loading import LoadedModel

__all__ = ["PARK_FRACTION", "freeable", "release_memory", "share_of_memory", "still_held"]

PARK_FRACTION = 0.1
"""A model whose weights take more than this share of the machine's memory (RAM, or the device's on
an accelerator) is freed while the other one works (:meth:`Study.training_model`): on a 24 GB machine
the 1.5B's float32 (6.2 GB, 26%) and bf16 (3.1 GB, 13%) weights are, the 0.5B's (2.0 / 1.0 GB) are not."""


def release_memory() -> None:
    """Collect what was just dropped and hand the freed blocks back to the OS."""
    import gc

    from interp.resources import release_freed_memory

    gc.collect()
    release_freed_memory()


def share_of_memory(lm: LoadedModel) -> float:
    """The share of its device's memory that ``lm``'s weights take."""
    import torch

    held = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    device = torch.device(lm.device)
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        import psutil

        total = psutil.virtual_memory().total
    return held / total


def freeable(lm: LoadedModel | None, owned: bool) -> bool:
    """``lm`` may be freed and made again: the study made it (``owned``), it carries no adapter or
    hooks, and its weights take more than :data:`PARK_FRACTION` of their device's memory."""
    from interp.recast import is_clean

    return lm is not None and owned and is_clean(lm) and share_of_memory(lm) > PARK_FRACTION


def still_held(freed: dict, role: str) -> LoadedModel | None:
    """The model freed in ``role`` (``freed[role]``: a weak reference, taken out) if something outside
    the study still holds it, so that it is resident: using it beats loading a second copy."""
    ref = freed.pop(role, None)
    return ref() if ref is not None else None
