"""Which dtype to compute in: chosen by measurement, not by habit.

Two facts decide it (measured on the embedded 0.5B model, ``docs/numerics.md``):

- **Evaluation** of an unlearning adapter must run in float32. At the study's default regime the LoRA
  update is below bf16's resolution: merged into bf16 weights the adapter keeps about 77% of its
  effect on the refusal log-odds (mean error 0.41 against fp32), unmerged in bf16 about 85% (0.25);
  in float32 the two paths agree to 1e-5. :data:`EVAL_DTYPE` is therefore float32.
- **Training** gives the same seven-domain table in bf16 and fp32 (per-domain mean log-odds within
  0.03), so its dtype is a matter of speed, and speed differs by machine: a 256×896×4864 matmul ran
  at 145 GFLOP/s in bf16 and 56 in fp32 on a 2-core EPYC, while a 2-core Xeon with AVX512-BF16 was
  reported at 149 and 280. :func:`fastest_dtype` times that matmul in both dtypes, once per
  machine, and caches the answer.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from interp.io import atomic_write_json, read_json

__all__ = ["EVAL_DTYPE", "DTYPE_CHOICES", "fastest_dtype", "resolve_dtype_choice", "machine_key", "cpu_name",
           "measure_cpu_dtypes"]

EVAL_DTYPE = "float32"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")

# A bf16 win smaller than this is noise on a shared 2-core machine; fp32 is then also the exact choice.
_MIN_SPEEDUP = 1.15


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``; the platform's description elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What a CPU dtype measurement depends on: processor, torch build and thread count."""
    return f"{cpu_name()}|torch {torch.__version__}|{torch.get_num_threads()} threads"


def _cache_file() -> Path:
    root = Path(os.environ.get("EMALAB_CACHE", Path.home() / ".cache" / "emalab"))
    return root / "machine_dtype.json"


def _time_matmul(dtype: torch.dtype, m: int, k: int, n: int, reps: int) -> float:
    a = torch.randn(m, k).to(dtype)
    b = torch.randn(k, n).to(dtype)
    torch.matmul(a, b)  # warm-up: first-call kernel selection and allocation
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu_dtypes(m: int = 256, k: int = 896, n: int = 4864, rounds: int = 3, reps: int = 3) -> dict:
    """Best time of an ``m×k @ k×n`` matmul (the 0.5B model's MLP up-projection) in bf16 and fp32,
    interleaved round by round so that a load burst hits both."""
    times = {"bfloat16": float("inf"), "float32": float("inf")}
    for _ in range(rounds):
        for name in times:
            times[name] = min(times[name], _time_matmul(getattr(torch, name), m, k, n, reps))
    flops = 2 * m * k * n
    return {name: {"seconds": t, "gflops": flops / t / 1e9} for name, t in times.items()}


def fastest_dtype(device: str | torch.device = "cpu", refresh: bool = False) -> str:
    """The training dtype for ``device``: bf16 on CUDA and MPS; on CPU whichever of bf16 and fp32 the
    cached per-machine measurement found faster (fp32 unless bf16 wins by 15% or more)."""
    kind = torch.device(device).type
    if kind in ("cuda", "mps"):
        return "bfloat16"
    cache = _cache_file()
    key = machine_key()
    known = read_json(cache) if cache.exists() else {}
    if not refresh and key in known:
        return known[key]["choice"]
    timing = measure_cpu_dtypes()
    speedup = timing["float32"]["seconds"] / timing["bfloat16"]["seconds"]
    choice = "bfloat16" if speedup >= _MIN_SPEEDUP else "float32"
    try:
        atomic_write_json(cache, {**known, key: {"choice": choice, "bf16_speedup": speedup, **timing}})
    except OSError:
        pass  # an unwritable cache costs a re-measurement next time, never the run
    return choice


def resolve_dtype_choice(dtype: str, device: str | torch.device = "cpu") -> str:
    """``auto`` → :func:`fastest_dtype`; any other valid name is returned as it is.

    Raises:
        ValueError: an unknown dtype name (the message lists the valid ones).
    """
    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPE_CHOICES)}")
    return fastest_dtype(device) if dtype == "auto" else dtype
