"""Compute and save a model's refusal direction (Arditi et al.), and print the selection table.

  emalab direction                                  # default model, bf16, every layer
  emalab direction --layer-step 2 --n-val 8         # quicker on a CPU
  emalab direction --model my/local-model --force   # recompute even if the stage exists

The result goes to results/stages/refusal_direction/<hash>/ (direction.safetensors,
candidates.json with every candidate's scores, candidate_vectors.safetensors); a finished stage
with the same model, dtype and config is reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

NAME = "direction"
HELP = "compute/save the refusal direction of a model and print the candidate selection table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from interp.config import add_config_arguments
    from interp.registry import DEFAULT_MODEL
    from probes.refusal_direction import RefusalDirectionConfig

    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded name, hub id or directory (default: {DEFAULT_MODEL})")
    parser.add_argument("--dtype", default="float32",
                        help="float32 (default: the study's measurement dtype, docs/numerics.md) or bfloat16")
    from emalab.commands._model_args import DEVICE_HELP, add_model_source_arguments

    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    add_model_source_arguments(parser)
    parser.add_argument("--results", type=Path, default=Path("results"), help="results root (default: results)")
    parser.add_argument("--config", type=Path, default=None, help="a RefusalDirectionConfig JSON; flags override it")
    parser.add_argument("--force", action="store_true", help="recompute even if a matching stage exists")
    parser.add_argument("--top", type=int, default=12, help="rows of the selection table (default: 12)")
    add_config_arguments(parser, RefusalDirectionConfig)


def run(args: argparse.Namespace) -> int:
    from interp.config import config_from_args
    from interp.io import ensure_writable_dir, read_json
    from interp.loading import load_model
    from probes.refusal_direction import RefusalDirectionConfig, cached_refusal_direction, format_table

    base = RefusalDirectionConfig.load(args.config) if args.config else None
    cfg = config_from_args(RefusalDirectionConfig, args, base)
    ensure_writable_dir(args.results, "results directory (--results)")
    from emalab.commands._model_args import model_kwargs

    lm = load_model(args.model, dtype=args.dtype, **model_kwargs(args))
    direction, path = cached_refusal_direction(lm, cfg, args.results, force=args.force)
    record = read_json(path / "candidates.json")
    print(format_table(record["candidates"], record["baseline"], args.top))
    timings = record["timings"]
    print(f"\nscored {timings['n_scored']} candidates in {timings['total_s']:.0f}s "
          f"(candidates {timings['candidates_s']:.0f}s, scoring {timings['scoring_s']:.0f}s)")
    if direction is None:
        print(f"no candidate passed the filters; all scores are in {path / 'candidates.json'}")
        return 1
    m = direction.meta
    print(f"selected: layer {m['layer']}, position {m['position']} ({m['token']!r}), bypass {m['bypass_score']:.3f}, "
          f"induce {m['induce_score']:.3f}, kl {m['kl']:.4f}")
    print(f"saved: {path / 'direction.safetensors'}")
    return 0
