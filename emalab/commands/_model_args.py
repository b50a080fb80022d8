"""The device and model-source options every model-loading command shares (``--device`` and friends)."""

from __future__ import annotations

import argparse

__all__ = ["DEVICE_HELP", "add_model_source_arguments", "model_kwargs"]

DEVICE_HELP = "auto (default: CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps; a missing device is an error"


def add_model_source_arguments(parser: argparse.ArgumentParser, raw_prompts: bool = False) -> None:
    """``--device-map`` and ``--revision`` (and ``--raw-prompts``); ``--device`` stays with each command."""
    parser.add_argument("--device-map", default=None,
                        help="transformers device_map (e.g. auto) to shard the model over several GPUs; "
                             "overrides --device; layers it leaves on the CPU are warned about")
    parser.add_argument("--revision", default=None, help="hub branch, tag or commit of a hub --model")
    if raw_prompts:
        parser.add_argument("--raw-prompts", action="store_true",
                            help="feed prompts as plain text, without a chat template (base models)")


def model_kwargs(args: argparse.Namespace) -> dict:
    """``load_model`` keyword arguments from the parsed options."""
    return {"device": getattr(args, "device", "auto"), "device_map": getattr(args, "device_map", None),
            "revision": getattr(args, "revision", None)}
