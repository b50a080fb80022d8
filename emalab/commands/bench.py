"""Benchmark emalab against plain PyTorch / Hugging Face baselines (same inputs, same process).

  emalab bench                                  # activations, refusal, unlearn, probes, e2e on the default model
  emalab bench --suite activations --reps 5
  emalab bench --suite gpu7b --device cuda      # Mistral-7B / Qwen2.5-7B architectures, random weights
  emalab bench --write-md                       # regenerate BENCHMARKS.md from benchmarks/results/

Results go to ``benchmarks/results/<machine>/<bench>.json``. Same as ``python -m benchmarks``.
"""

from __future__ import annotations

NAME = "bench"
HELP = "benchmark emalab's paths against plain PyTorch/HF baselines; writes benchmarks/results and BENCHMARKS.md"


def add_arguments(parser) -> None:
    from benchmarks.cli import add_arguments as add

    add(parser)


def run(args) -> int:
    from benchmarks.cli import run as run_bench

    return run_bench(args)
