"""Timing harness shared by every benchmark: alternating repetitions, medians and ratios, machine
and version provenance, and the result schema written to ``benchmarks/results/<machine>/<bench>.json``.

Why alternate: the CPU is shared with other jobs, so load drifts over a run. Timing emalab's path
and its baseline in turn, within one process and with the order rotated every repetition, makes
contention hit both alike; the paired ratio (median over repetitions of baseline/emalab of the
same round) is then the most robust comparison, and the ratio of medians is reported next to it.
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from interp.config import JsonConfig
from interp.io import atomic_write_json, git_commit, read_json
from interp.precision import cpu_name
from interp.registry import DEFAULT_MODEL

__all__ = [
    "SCHEMA",
    "SUITES",
    "DEFAULT_SUITES",
    "SPEED_RESULTS",
    "result_suite",
    "BenchConfig",
    "Variant",
    "BenchResult",
    "time_alternating",
    "ratio",
    "synchronize",
    "machine_info",
    "machine_name",
    "library_versions",
    "make_result",
    "write_result",
    "read_results",
    "results_root",
]

SCHEMA = "emalab.bench/v1"
SUITES = ("activations", "refusal", "unlearn", "probes", "e2e", "gpu7b", "speed")
DEFAULT_SUITES = ("activations", "refusal", "unlearn", "probes", "e2e")
SPEED_RESULTS = ("matmul_peak", "scoring", "generation", "train_step", "train_phases", "containment_step")
"""The speed suite's results, in the order it runs them (one file each)."""


def result_suite(name: str) -> str:
    """The suite that writes result ``name`` (``gpu7b`` stands for all of that suite's results)."""
    if name in SPEED_RESULTS:
        return "speed"
    if name in SUITES and name != "speed":
        return name
    raise ValueError(f"unknown result {name!r}; choose from {', '.join((*SUITES[:-1], *SPEED_RESULTS))}")


@dataclass
class BenchConfig(JsonConfig):
    """What to benchmark, on which model and hardware, and how many times."""

    suite: tuple[str, ...] = DEFAULT_SUITES
    """Benchmarks to run: activations, refusal, unlearn, probes, e2e, gpu7b (gpu7b builds 7B models: GPU only
    unless --tiny), speed (matmul peak, MFU, prefix cache, judge-aware generation, NPO + retain-CE step)."""
    model: str = DEFAULT_MODEL
    """Model for the CPU benchmarks (embedded name, local directory or hub id)."""
    device: str = "cpu"
    """cpu | cuda | mps."""
    dtype: str = "bfloat16"
    """Weights dtype: bfloat16 (fastest on this CPU and on GPUs) or float32."""
    reps: int = 7
    """Timed repetitions per variant (after warm-up), alternating the variants (refusal uses at most 5,
    probes and unlearn at most 3: their slow baselines take 10-60 s a call on a shared 2-core CPU)."""
    warmup: int = 1
    """Untimed warm-up calls per variant."""
    n_prompts: int = 16
    """Prompts for the activation and refusal benchmarks, length-varied, drawn from the suite."""
    batch_size: int = 16
    """Prompts per forward for activations and refusal scoring."""
    train_batch: int = 4
    """Sequences per training step in the unlearning benchmark."""
    train_response_tokens: int = 32
    """Response tokens per training sequence (the loss covers these)."""
    max_new_tokens: int = 32
    """Generated tokens per prompt in the refusal benchmark's generation + judge baseline."""
    probe_per_domain: int = 16
    """Harmful prompts per domain in the probe benchmark (benign: twice that)."""
    probe_folds: int = 3
    """Cross-validation folds in the probe benchmark."""
    eval_limit: int | None = None
    """speed: prompts per set of the eval split for scoring and generation (None: all, ~540)."""
    gen_prompts: int = 64
    """speed: at most this many of those prompts for the generation comparison."""
    cache_activations: bool = True
    """probes: cache the (untimed) input activations under the emalab cache, keyed on the model state."""
    tiny: bool = False
    """gpu7b: run the tiny configs of the same architectures (CPU-sized) instead of the 7B ones."""
    gpu_batch: int = 32
    """gpu7b: sequences per batch."""
    gpu_seq: int = 256
    """gpu7b: tokens per sequence."""
    gpu_micro_batch: int = 8
    """gpu7b: sequences per training micro-batch (gradient accumulation up to gpu_batch keeps memory bounded)."""
    out_dir: str = "benchmarks/results"
    """Root of the result files; each machine gets a subdirectory."""
    machine: str | None = None
    """Machine name for the result directory; default derived from the CPU/GPU model and core count."""
    pipeline_json: str | None = None
    """e2e: the main job's pipeline.json (default $EMALAB_RESULTS/pipeline.json or results/pipeline.json)."""
    only: tuple[str, ...] | None = None
    """Produce only these results, by name: a suite's name, or one of the speed suite's (matmul_peak, scoring,
    generation, train_step, train_phases, containment_step). The suites that write them run instead of --suite; the matmul peak is
    measured whenever a speed result needs it and written only when named."""

    def __post_init__(self) -> None:
        self.suite = _names(self.suite)
        if self.only is not None:
            self.only = _names(self.only)
            if not self.only:
                raise ValueError("only: name at least one result, or leave it unset")
            suites = {result_suite(n) for n in self.only}
            self.suite = tuple(s for s in SUITES if s in suites)
        unknown = [s for s in self.suite if s not in SUITES]
        if unknown or not self.suite:
            raise ValueError(f"unknown benchmark(s) {unknown or '(none given)'}; choose from {', '.join(SUITES)}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1 or None, got {self.eval_limit}")
        for name in ("reps", "n_prompts", "gen_prompts", "batch_size", "train_batch", "train_response_tokens", "max_new_tokens",
                     "gpu_batch", "gpu_seq", "gpu_micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.probe_per_domain < 4 or self.probe_folds < 2:
            raise ValueError("probe_per_domain must be >= 4 and probe_folds >= 2 for cross-validation")
        if self.gpu_batch % self.gpu_micro_batch:
            raise ValueError(f"gpu_batch {self.gpu_batch} must be a multiple of gpu_micro_batch {self.gpu_micro_batch}")


def _names(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``"a,b"`` or ``["a", "b,c"]`` as a tuple of stripped names."""
    parts = [value] if isinstance(value, str) else list(value)
    return tuple(s.strip() for part in parts for s in part.split(",") if s.strip())


@dataclass
class Variant:
    """One timed code path: its per-repetition wall times and the work one call does."""

    times_s: list[float]
    work: dict[str, float]
    """Units of work per call, e.g. ``{"prompts": 32, "tokens": 1480}``; throughput is work / median time."""
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def throughput(self) -> dict[str, float]:
        return {f"{unit}_per_s": amount / self.median_s for unit, amount in self.work.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"description": self.description, "times_s": self.times_s, "median_s": self.median_s,
                "min_s": min(self.times_s), "work": self.work, "throughput": self.throughput(), **self.extra}


@dataclass
class BenchResult:
    """A benchmark's result file (schema :data:`SCHEMA`)."""

    bench: str
    variants: dict[str, Variant]
    ratios: dict[str, dict[str, Any]]
    """``"a/b"`` → speed of ``a`` relative to ``b`` (>1: ``a`` is faster), with the target if one is set."""
    config: dict[str, Any]
    checks: dict[str, Any] = field(default_factory=dict)
    """Correctness checks run alongside the timing (e.g. max |Δ| between emalab's and the baseline's outputs)."""
    notes: list[str] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    status: str = "measured"
    """``measured``, ``partial`` (e.g. e2e from a run that reused cached stages) or ``not_measured``."""

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["variants"] = {k: v.to_dict() for k, v in self.variants.items()}
        return {"schema": SCHEMA, **out}


def synchronize(device: str | torch.device) -> None:
    """Wait for queued GPU work, so that wall time covers it."""
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize()
    elif kind == "mps":
        torch.mps.synchronize()


def time_alternating(
    fns: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1, device: str | torch.device = "cpu",
    on_rep: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Wall time of each function over ``reps`` rounds; every round calls each function once, the
    order rotated by one per round so no variant always runs first (or right after a given other)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
            synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            synchronize(device)
            t0 = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
        if on_rep is not None:
            on_rep(r)
    return times


def ratio(variants: Mapping[str, Variant], fast: str, slow: str, target: float | None = None) -> dict[str, Any]:
    """Speed of ``fast`` relative to ``slow``: ``median(slow) / median(fast)`` and the median paired ratio."""
    a, b = variants[fast].times_s, variants[slow].times_s
    out: dict[str, Any] = {
        "ratio": statistics.median(b) / statistics.median(a),
        "paired_ratio": statistics.median(tb / ta for ta, tb in zip(a, b, strict=True)),
    }
    if target is not None:
        out["target"] = target
        out["met"] = out["paired_ratio"] >= target
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_name(device: str | torch.device = "cpu") -> str:
    """A stable directory name for this hardware: the GPU model for CUDA runs, else CPU model + cores."""
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        return _slug(torch.cuda.get_device_name(0))
    return f"cpu-{_slug(cpu_name())}-{os.cpu_count()}c"


def machine_info(device: str | torch.device = "cpu") -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default: active)"),
    }
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        info["mem_total_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_mem_gb=round(props.total_memory / 1e9, 1), cuda=torch.version.cuda)
    return info


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "peft", "nnsight", "accelerate", "scikit-learn", "numpy", "emalab"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def make_result(
    bench: str, variants: dict[str, Variant], ratios: dict[str, dict[str, Any]], config: dict[str, Any],
    device: str | torch.device = "cpu", checks: dict[str, Any] | None = None, notes: Sequence[str] = (),
    status: str = "measured",
) -> BenchResult:
    env = {"machine": machine_info(device), "versions": library_versions(), "git_commit": git_commit(),
           "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return BenchResult(bench, variants, ratios, config, dict(checks or {}), list(notes), env, status)


def results_root(out_dir: str | Path = "benchmarks/results") -> Path:
    """``out_dir`` resolved against the repository when relative (so the CLI works from any directory)."""
    path = Path(out_dir)
    if path.is_absolute() or path.exists():
        return path
    return Path(__file__).resolve().parent.parent / path


def write_result(result: BenchResult, out_dir: str | Path, machine: str) -> Path:
    """Write ``<out_dir>/<machine>/<bench>.json`` atomically."""
    return atomic_write_json(results_root(out_dir) / machine / f"{result.bench}.json", result.to_dict())


def read_results(out_dir: str | Path = "benchmarks/results") -> dict[str, dict[str, dict[str, Any]]]:
    """``{machine: {bench: result dict}}`` for every result file under ``out_dir``."""
    root = results_root(out_dir)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(root.glob("*/*.json")):
        data = read_json(path)
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            out.setdefault(path.parent.name, {})[data["bench"]] = data
    return out


def model_state(lm) -> tuple[bool, dict[str, bool]]:
    """The training mode and every parameter's ``requires_grad``: what attaching LoRA changes and
    detaching it does not restore (``attach_lora`` freezes the base weights)."""
    return lm.model.training, {n: p.requires_grad for n, p in lm.model.named_parameters()}


def restore_model_state(lm, state: tuple[bool, dict[str, bool]]) -> None:
    """Put back what :func:`model_state` recorded, so a bench leaves ``lm`` as it came."""
    training, flags = state
    lm.model.train(training)
    for n, p in lm.model.named_parameters():
        p.requires_grad_(flags[n])
