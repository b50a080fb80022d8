"""Benchmark 6c (issue #15) — what a containment method costs per optimiser step over NPO + retain-CE.

On the forget / retain batches of :func:`benchmarks.speed.train_step` (LoRA r=8 on all linear layers,
cached NPO reference), one full optimiser step as that benchmark runs it
(:func:`training.trainer.train_step` with backward, gradient clipping, AdamW, ``zero_grad``) for each
method of H14 (:data:`METHODS`):

* ``ce``: NPO + retain-CE, the reference;
* ``kl``: retain KL to the base model;
* ``repr``: the residual stream kept at :data:`REPR_LAYERS` (clipped to the model's depth), cosine
  distance, as H14 runs it;
* ``direction``: each retain prompt's projection kept on a unit direction, here a random one at
  *every* layer: the cost does not depend on the vectors' values, and every layer is the most a
  direction can cost (the retain forwards stop after its deepest layer; H14's refusal direction has one);
* ``gate``: the concept-gated adapter (NPO, no retain term) at :data:`GATE_LAYER`, its concept vector a
  random unit vector (sign chosen so the forget prompts score higher) and its bias and temperature
  calibrated on the two batches with :func:`training.containment.calibrate_gate`, as the trainer
  calibrates it on the forget and retain sets.

``kl``, ``repr`` and ``direction`` compare with the base model. The trainer computes that side once per
run, for every retain row (:func:`training.retain_reference.retain_reference`: ``ceil(rows /
retain_batch_size)`` no-grad forwards before the first step) and passes it to every step; so does this
benchmark (:func:`method_references`, on its one retain batch), so a timed step is the trainer's step. The
one-off cost is reported beside each of them: ``reference_once_s`` (its wall time here, one forward of the
retain batch), ``reference_bytes`` (what it holds; for ``kl`` response tokens × vocabulary × bytes).

All of them and ``forward`` (one no-grad forward of the retain batch through the base model, adapter
disabled: the reference forward a step of ``kl`` ran before the per-run precompute) alternate in one process
(:func:`benchmarks.harness.time_alternating`). The issue's bar: each method adds at most one forward,
``(t_method − t_ce) / t_forward ≤ 1`` on the medians (:func:`extra_forwards`). ``lm`` is left as it came:
adapter detached, no hook left, training mode and ``requires_grad`` flags restored.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from benchmarks.data import step_batches
from benchmarks.harness import (
    BenchConfig,
    BenchResult,
    Variant,
    make_result,
    model_state,
    ratio,
    restore_model_state,
    synchronize,
    time_alternating,
)
from interp.adapter import d_model, n_layers
from interp.direction import Direction
from interp.loading import LoadedModel, adapter_disabled
from interp.resources import peak_rss_gb
from training.collate import TokenBatch
from training.config import UnlearnConfig
from training.containment import ConceptGate, Containment, calibrate_gate, last_prompt_index
from training.loop import lr_schedule, optimizer_update
from training.losses import response_logits
from training.retain_reference import REFERENCE_MODES, RetainReference, batches_reference
from training.trainer import train_step

__all__ = ["METHODS", "REFERENCE", "FORWARD", "REPR_LAYERS", "GATE_LAYER", "MAX_EXTRA_FORWARDS", "LORA_RANK",
           "clipped_layers", "method_configs", "random_direction", "method_containments", "method_references",
           "extra_forwards", "containment_step"]

METHODS = ("ce", "kl", "repr", "direction", "gate")
"""Timed methods: ``retain_mode`` ce / kl / repr / direction, and ``gate`` (concept gate, no retain term)."""
REFERENCE = "ce"
"""The method every other is compared with (NPO + retain-CE)."""
FORWARD = "forward"
"""The variant timing one no-grad base forward of the retain batch, the unit of the extra-forward check."""
REPR_LAYERS = (4, 8, 12)
"""H14's representation-retain layers (``Config.repr_layers``)."""
GATE_LAYER = 4
"""H14's gate layer (``Config.gate_layer``)."""
MAX_EXTRA_FORWARDS = 1.0
"""Issue #15's bar: a containment method adds at most one forward per step over NPO + retain-CE."""
LORA_RANK = 8


def clipped_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    """``layers`` with each index past the model's last layer moved to it (duplicates dropped)."""
    return tuple(sorted({min(int(layer), depth - 1) for layer in layers}))


def method_configs(lm: LoadedModel, lr: float) -> dict[str, UnlearnConfig]:
    """The :class:`UnlearnConfig` of each method, as H14 builds it (NPO, LoRA r=8)."""
    depth = n_layers(lm.model)
    base = dict(method="npo", model=lm.name, lora_rank=LORA_RANK, lr=lr)
    return {"ce": UnlearnConfig(**base, retain_mode="ce"),
            "kl": UnlearnConfig(**base, retain_mode="kl"),
            "repr": UnlearnConfig(**base, retain_mode="repr", repr_layers=clipped_layers(REPR_LAYERS, depth),
                                  repr_distance="cosine"),
            "direction": UnlearnConfig(**base, retain_mode="direction"),
            "gate": UnlearnConfig(**base, retain_mode="none", concept_gate=True,
                                  gate_layer=clipped_layers([GATE_LAYER], depth)[0])}


def random_direction(lm: LoadedModel, layers: Sequence[int], seed: int = 0, name: str = "random") -> Direction:
    """A unit Gaussian direction at each of ``layers`` (fixed by ``seed``), for timing only."""
    g = torch.Generator().manual_seed(seed)
    vectors = torch.randn(len(layers), d_model(lm.model), generator=g)
    return Direction.from_vectors(vectors, list(layers), name=name, meta={"builder": "random", "seed": seed})


def _gate(lm: LoadedModel, cfg: UnlearnConfig, fb: TokenBatch, rb: TokenBatch) -> Containment:
    """The concept gate of ``cfg`` on a random vector, calibrated as :func:`calibrate_concept_gate` does
    (forget prompts' base-model scores against the retain prompts'), on the two batches."""
    vec = random_direction(lm, [cfg.gate_layer], seed=1, name="random-concept")
    given = Containment.resolve(cfg, Containment(gate_vector=vec), lm.model)

    def scores(gate: ConceptGate, b: TokenBatch) -> torch.Tensor:
        return gate.scores(lm, b.input_ids, b.attention_mask, last_prompt_index(b.response_mask)).cpu()

    probe = ConceptGate.from_direction(given.gate_vector, cfg.gate_layer, 0.0, 1.0, lm.model)
    if float(scores(probe, fb).mean()) < float(scores(probe, rb).mean()):
        vec = replace(vec, vectors=-vec.vectors)
        probe = ConceptGate.from_direction(vec, cfg.gate_layer, 0.0, 1.0, lm.model)
    bias, temperature = calibrate_gate(scores(probe, fb), scores(probe, rb))
    return Containment(gate_vector=vec, gate=replace(probe, bias=bias, temperature=temperature))


def method_containments(lm: LoadedModel, cfgs: Mapping[str, UnlearnConfig], fb: TokenBatch,
                        rb: TokenBatch) -> dict[str, Containment | None]:
    """What the trainer would resolve for each method: a direction for ``direction`` (random, every
    layer), the calibrated gate for ``gate``, nothing for the others."""
    out: dict[str, Containment | None] = {}
    for m, c in cfgs.items():
        if c.retain_mode == "direction":
            every = random_direction(lm, range(n_layers(lm.model)), name="random-direction")
            out[m] = Containment.resolve(c, Containment(direction=every), lm.model)
        elif c.concept_gate:
            out[m] = _gate(lm, c, fb, rb)
        else:
            out[m] = None
    return out


def method_references(lm: LoadedModel, cfgs: Mapping[str, UnlearnConfig], held: Mapping[str, Containment | None],
                      rb: TokenBatch) -> dict[str, tuple[RetainReference, float]]:
    """Per method that compares with the base model (``kl``, ``repr``, ``direction``): its reference of the
    retain batch's rows, computed as the trainer computes it once per run, and the seconds that took."""
    out = {}
    for m, c in cfgs.items():
        if c.retain_mode in REFERENCE_MODES:
            synchronize(lm.device)
            t0 = time.perf_counter()
            ref = batches_reference(lm, c, [rb], held[m])
            synchronize(lm.device)
            out[m] = (ref, time.perf_counter() - t0)
    return out


def extra_forwards(times: Mapping[str, Sequence[float]], reference: str = REFERENCE, forward: str = FORWARD,
                   bar: float = MAX_EXTRA_FORWARDS) -> dict[str, dict[str, Any]]:
    """Per method (every key but ``reference`` and ``forward``): ``extra_forwards_vs_ce`` =
    ``(median(t_method) − median(t_reference)) / median(t_forward)``, the same per round
    (``paired``: the median over rounds, each round's times from one rotation), and ``pass``
    (``extra_forwards_vs_ce ≤ bar``)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    if med[forward] <= 0:
        raise ValueError(f"the forward time must be positive, got {med[forward]}")
    out = {}
    for m in times:
        if m in (reference, forward):
            continue
        x = (med[m] - med[reference]) / med[forward]
        paired = statistics.median((a - b) / f for a, b, f in zip(times[m], times[reference], times[forward],
                                                                  strict=True))
        out[m] = {"extra_forwards_vs_ce": x, "paired": paired, "pass": bool(x <= bar)}
    return out


def _peak_memory(fn: Callable[[], None], device: torch.device, into: dict[str, float], name: str) -> Callable[[], None]:
    """``fn`` that records its peak allocated GPU memory (GB, max over calls) in ``into[name]`` (CUDA only)."""
    if device.type != "cuda":
        return fn

    def tracked() -> None:
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        into[name] = max(into.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 1e9)

    return tracked


def containment_step(lm: LoadedModel, cfg: BenchConfig, peaks: dict | None = None) -> BenchResult:
    """One optimiser step per containment method against NPO + retain-CE (see the module docstring)."""
    from benchmarks.unlearn import LR, reference_logp
    from training.lora import attach_lora, detach_lora

    fb, rb = (b.to(lm.device) for b in step_batches(lm.tokenizer, cfg.train_batch, cfg.train_response_tokens))
    cfgs = method_configs(lm, LR)
    reps = min(cfg.reps, 3)
    state = model_state(lm)
    gpu_peak: dict[str, float] = {}
    attach_lora(lm, rank=LORA_RANK, alpha=16.0, targets=("all-linear",))
    try:
        params = [p for p in lm.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(cfgs[REFERENCE]))
        lm.model.train()
        ref = reference_logp(lm, fb)
        held = method_containments(lm, cfgs, fb, rb)
        refs = method_references(lm, cfgs, held, rb)

        def step_of(m: str) -> Callable[[], None]:
            ucfg, containment = cfgs[m], held[m]
            retain = rb if ucfg.retain_mode != "none" else None
            retain_ref = refs[m][0] if m in refs else None

            def fn() -> None:
                train_step(lm, ucfg, fb, ref, retain, containment=containment, retain_ref=retain_ref)
                optimizer_update(params, opt, sched, ucfg.max_grad_norm)  # the trainer's clip, AdamW, zero_grad

            return fn

        @torch.no_grad()
        def forward() -> None:
            with adapter_disabled(lm):
                response_logits(lm.model, rb.input_ids, rb.attention_mask, rb.response_mask)

        fns = {FORWARD: forward, **{m: step_of(m) for m in METHODS}}
        fns = {k: _peak_memory(fn, lm.device, gpu_peak, k) for k, fn in fns.items()}
        times = time_alternating(fns, reps, cfg.warmup, device=lm.device)
        gates = {m: c.gate.describe() for m, c in held.items() if c is not None and c.gate is not None}
    finally:
        detach_lora(lm)
        restore_model_state(lm, state)
    extra = extra_forwards(times)
    work = {"sequences": len(fb) + len(rb), "tokens": int(fb.attention_mask.sum() + rb.attention_mask.sum())}
    what = {"ce": "NPO + retain-CE (the reference)", "kl": "NPO + retain KL to the base model",
            "repr": f"NPO + representation retain, cosine, layers {list(cfgs['repr'].repr_layers)}",
            "direction": "NPO + direction retain, a random unit direction at every layer",
            "gate": f"NPO, concept-gated adapter at layer {cfgs['gate'].gate_layer} (random vector, calibrated)"}
    variants = {FORWARD: Variant(times[FORWARD], {"sequences": len(rb), "tokens": int(rb.attention_mask.sum())},
                                 "no-grad forward of the retain batch, adapter disabled (the unit of extra forwards)")}
    for m in METHODS:
        x = {"extra_forwards_vs_ce": extra[m]["extra_forwards_vs_ce"], "pass": extra[m]["pass"]} if m in extra else {}
        if m in refs:
            x.update(reference_once_s=refs[m][1], reference_bytes=refs[m][0].nbytes)
        variants[m] = Variant(times[m], work, f"{what[m]}: training.trainer.train_step + clip + AdamW + zero_grad",
                              extra=x)
    for k, gb in gpu_peak.items():
        variants[k].extra["peak_gpu_mem_gb"] = gb
    ratios = {f"{REFERENCE}/{m}": ratio(variants, REFERENCE, m) for m in METHODS if m != REFERENCE}
    checks: dict[str, Any] = {}
    for m, e in extra.items():
        checks.update({f"{m}_extra_forwards_vs_ce": e["extra_forwards_vs_ce"], f"{m}_extra_forwards_paired": e["paired"],
                       f"{m}_within_one_forward": e["pass"]})
    checks["all_within_one_forward"] = all(e["pass"] for e in extra.values())
    checks["peak_rss_gb"] = peak_rss_gb()
    config = {"model": lm.name, "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
              "device": str(lm.device), "train_batch": len(fb), "retain_batch": len(rb),
              "response_tokens_per_seq": cfg.train_response_tokens, "lora_rank": LORA_RANK, "reps": reps,
              "warmup": cfg.warmup, "methods": list(METHODS), "reference": REFERENCE,
              "repr_layers": list(cfgs["repr"].repr_layers), "gate_layer": cfgs["gate"].gate_layer,
              "direction_layers": n_layers(lm.model), "max_extra_forwards": MAX_EXTRA_FORWARDS, "gates": gates}
    notes = ["ratio ce/<method> = median(method) / median(ce): the method's step in retain-CE steps (>1: slower)",
             "extra forwards = (median(method) − median(ce)) / median(forward), forward = one no-grad forward of the "
             "retain batch through the base model (the reference forward a kl step ran before the per-run "
             "precompute); pass: ≤ 1 (issue #15). *_paired: the same per round, median over rounds",
             "kl, repr, direction: their base-model reference is computed once per run, as the trainer does "
             "(training.retain_reference; here on the one retain batch) and every timed step reads it; the one-off "
             "cost is reference_once_s (one timing, here one forward of the retain batch; a run pays "
             "ceil(retain rows / retain_batch_size) of them) and what it holds, reference_bytes (kl: response "
             "tokens × vocabulary × bytes)",
             "direction: a random unit vector at every layer, not a refusal direction: the cost does not depend on "
             "the vectors, and every layer is the most it can cost (its forwards stop after the deepest layer; "
             "H14's refusal direction has one layer)",
             "gate: random unit concept vector (sign: forget prompts score higher), bias and temperature from "
             "training.containment.calibrate_gate on the forget vs retain batch; it has no retain term, so its "
             "step skips the retain batch (a negative extra-forward count is a saving)",
             "peak_rss_gb: this process's peak resident memory so far (model load included), not per method"
             + ("; peak_gpu_mem_gb per variant: max allocated during its calls" if gpu_peak else "")]
    return make_result("containment_step", variants, ratios, config, lm.device, checks, notes)
