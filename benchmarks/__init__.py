"""emalab's benchmarks against plain PyTorch / Hugging Face baselines, timed in the same process.

One module per benchmark (``activations``, ``refusal``, ``unlearn``, ``probing``, ``e2e``, ``gpu_7b``, ``speed``),
each with ``run(lm, cfg) -> BenchResult`` and a ``measure(...)`` that does the timing; the shared
timing harness and result schema are in :mod:`benchmarks.harness`, the command line in
:mod:`benchmarks.cli`, and ``BENCHMARKS.md`` is rendered by :mod:`benchmarks.report`.
"""

__all__ = ["activations", "refusal", "unlearn", "probing", "e2e", "gpu_7b", "speed", "harness", "cli", "report"]
