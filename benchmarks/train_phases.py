"""Benchmark 6b (issue #17, item 5) — where one unlearning optimiser step spends its time.

On the forget / retain batches of :func:`benchmarks.speed.train_step` (LoRA r=8 on all linear layers,
cached NPO reference), for NPO alone (``retain_mode='none'``) and NPO + retain-CE, the step the trainer
runs (:func:`training.loop.train_loop`: :func:`training.step.train_step`, then
:func:`training.loop.optimizer_update`: clip, AdamW + schedule, zero_grad) is timed phase by phase
through the library's own phase clock (both functions' ``clock``, a device-synchronised lap), in the
trainer's order (:data:`PHASES`; ``grad_snapshot`` adds the step's two snapshot points, before the
forget forward and after the forget backward).

Three totals per mode, alternating within each round: ``step`` (the same two calls without a clock,
timed whole), ``phased_step`` (the clocked calls, timed whole) and ``sum_of_phases``. The clocked step is
checked against the unclocked one on the same batch and weights: max |Δ| of the loss, its terms, the
flattened LoRA gradients and the gradient cosine (``checks``), so the clock does not change the step.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from benchmarks.data import step_batches
from benchmarks.harness import (
    BenchConfig,
    BenchResult,
    Variant,
    make_result,
    model_state,
    restore_model_state,
    synchronize,
    time_alternating,
)
from interp.flops import ModelShape, forward_flops, lora_params, model_shape, train_flops
from interp.loading import LoadedModel
from training.collate import TokenBatch
from training.config import UnlearnConfig
from training.loop import UPDATE_PHASES, lr_schedule, optimizer_update
from training.step import PhaseClock, train_step

__all__ = ["PHASES", "MODES", "LORA_RANK", "phased_step", "whole_step", "step_difference", "phase_flops",
           "train_phases"]

PHASES = ("forget_forward", "forget_backward", "grad_snapshot", "retain_forward", "retain_backward", "grad_cosine",
          *UPDATE_PHASES)
"""The phases of one step, in the order the trainer runs them (``grad_snapshot`` runs at two points)."""
MODES = {"npo": "none", "npo_retain_ce": "ce"}
"""Variant prefix → ``retain_mode``."""
LORA_RANK = 8
FORWARD_PHASES = {"forget_forward": "forget", "retain_forward": "retain"}
BACKWARD_PHASES = {"forget_backward": "forget", "retain_backward": "retain"}


class _Clock:
    """Seconds per phase of one call (a phase met twice adds up); the device is synchronised at each
    boundary so queued GPU work is charged to the phase that queued it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        synchronize(device)
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        synchronize(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._t
        self._t = now


def phased_step(lm: LoadedModel, cfg: UnlearnConfig, fb: TokenBatch, ref: torch.Tensor | None,
                rb: TokenBatch | None, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler) -> dict[str, float]:
    """One optimiser step through the library with its phase clock; returns seconds per phase."""
    clock = _Clock(lm.device)
    train_step(lm, cfg, fb, ref, rb, clock=clock.lap)
    optimizer_update(params, opt, sched, cfg.max_grad_norm, clock=clock.lap)
    return clock.seconds


def whole_step(lm: LoadedModel, cfg: UnlearnConfig, fb: TokenBatch, ref: torch.Tensor | None,
               rb: TokenBatch | None, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
               sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One optimiser step through the library without a clock: :func:`training.step.train_step`, then
    :func:`training.loop.optimizer_update`."""
    train_step(lm, cfg, fb, ref, rb)
    optimizer_update(params, opt, sched, cfg.max_grad_norm)


def _flat_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double()
                      for p in params])


def step_difference(lm: LoadedModel, cfg: UnlearnConfig, fb: TokenBatch, ref: torch.Tensor | None,
                    rb: TokenBatch | None, params: list[torch.nn.Parameter],
                    clock: PhaseClock | None = None) -> dict[str, float]:
    """Max |Δ| between :func:`training.step.train_step` with a phase clock and without one, from the same
    weights and batch: of the loss, its components, the flattened gradient and the gradient cosine
    (``grad_max_abs`` gives the gradient's scale). Leaves the gradients unset.

    Args:
        clock: the clock of the clocked step; default the bench's device-synchronised lap.
    """
    clock = clock if clock is not None else _Clock(lm.device).lap
    outs, grads = [], []
    for c in (clock, None):
        for p in params:
            p.grad = None
        outs.append(train_step(lm, cfg, fb, ref, rb, clock=c))
        grads.append(_flat_grads(params))
    for p in params:
        p.grad = None
    (a, b), (ga, gb) = outs, grads
    out = {"max_abs_diff_loss": abs(float(a.loss) - float(b.loss)),
           "max_abs_diff_grad": float((ga - gb).abs().max()), "grad_max_abs": float(gb.abs().max()),
           "max_abs_diff_losses": max(abs(a.losses.get(k, math.nan) - v) for k, v in b.losses.items())}
    if set(a.losses) != set(b.losses):
        out["max_abs_diff_losses"] = math.inf
    if "grad_cos_forget_retain" in b.metrics:
        out["abs_diff_grad_cos"] = abs(a.metrics.get("grad_cos_forget_retain", math.nan)
                                       - b.metrics["grad_cos_forget_retain"])
    return out


def _keep(batch: TokenBatch) -> int:
    """Positions :func:`training.losses.response_logits` unembeds per row."""
    width = batch.input_ids.shape[1]
    return min(max(int(width - int(batch.response_mask.float().argmax(-1).min()) + 1), 2), width)


def phase_flops(shape: ModelShape, batch: TokenBatch, rank: int = LORA_RANK) -> tuple[float, float]:
    """``(forward, backward)`` FLOPs of one LoRA training pass over ``batch``: the forward is
    :func:`interp.flops.forward_flops` plus the adapters' ``2·lora_params·tokens``; the backward is
    the rest of :func:`interp.flops.train_flops` (frozen matmuls 1×, adapters 2×, attention 2× the forward)."""
    rows = [(int(n), 0) for n in batch.attention_mask.sum(-1).tolist()]
    positions = _keep(batch) * len(rows)
    tokens = sum(n for n, _ in rows)
    fwd = forward_flops(shape, rows, positions) + 2.0 * lora_params(shape, rank) * tokens
    return fwd, train_flops(shape, rows, positions, lora_rank=rank) - fwd


def _dtype(lm: LoadedModel) -> str:
    return str(next(lm.model.parameters()).dtype).removeprefix("torch.")


def _variants(mode: str, records: list[dict[str, float]], steps: dict[str, list[float]], flops: dict[str, float],
              tokens: dict[str, int], peak_flops: float) -> tuple[dict[str, Variant], dict[str, float]]:
    """The variants of one mode: each phase that ran, ``sum_of_phases``, ``phased_step`` and ``step``."""
    phases = [p for p in PHASES if p in records[0]]
    per = {p: [r[p] for r in records] for p in phases}
    total = sum(statistics.median(t) for t in per.values())
    out: dict[str, Variant] = {}
    for p in phases:
        batch = FORWARD_PHASES.get(p) or BACKWARD_PHASES.get(p)
        v = Variant(per[p], {"tokens": tokens[batch]} if batch else {}, f"{mode}: {p}",
                    extra={"phase": p, "fraction": statistics.median(per[p]) / total})
        if batch:
            f = flops[f"{batch}_{'forward' if p in FORWARD_PHASES else 'backward'}"]
            v.extra.update(flops=f, mfu=f / v.median_s / peak_flops)
        out[f"{mode}.{p}"] = v
    work = {"tokens": sum(tokens.values())}
    step_flops = sum(flops.values())
    sums = [sum(r.values()) for r in records]
    for name, times, what in (("sum_of_phases", sums, "sum of the phases, per round"),
                              ("phased_step", steps["phased"], "the step with its phase clock, timed whole"),
                              ("step", steps["whole"], "training.step.train_step + optimizer_update (clip, AdamW, "
                                                       "zero_grad), timed whole")):
        out[f"{mode}.{name}"] = Variant(times, work, f"{mode}: {what}",
                                        extra={"flops": step_flops, "mfu": step_flops / statistics.median(times)
                                               / peak_flops})
    return out, {f"{mode}_sum_of_phases_over_step": statistics.median(sums) / statistics.median(steps["whole"])}


def train_phases(lm: LoadedModel, cfg: BenchConfig, peaks: dict) -> BenchResult:
    """The phase breakdown of one NPO and one NPO + retain-CE step (see the module docstring)."""
    from benchmarks.unlearn import LR, reference_logp
    from training.lora import attach_lora, detach_lora

    fb, rb = (b.to(lm.device) for b in step_batches(lm.tokenizer, cfg.train_batch, cfg.train_response_tokens))
    ucfgs = {m: UnlearnConfig(method="npo", model=lm.name, lora_rank=LORA_RANK, lr=LR, retain_mode=r)
             for m, r in MODES.items()}
    shape, peak_flops = model_shape(lm.model), peaks[_dtype(lm)]["peak_flops"]
    state = model_state(lm)
    attach_lora(lm, rank=LORA_RANK, alpha=16.0, targets=("all-linear",))
    records: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    checks: dict[str, float] = {}
    reps = min(cfg.reps, 3)
    try:
        params = [p for p in lm.model.parameters() if p.requires_grad]
        lm.model.train()
        ref = reference_logp(lm, fb)
        fns = {}
        for m, ucfg in ucfgs.items():
            retain = rb if ucfg.retain_mode != "none" else None
            for kind in ("phased", "whole"):
                opt = torch.optim.AdamW(params, lr=ucfg.lr, weight_decay=ucfg.weight_decay)
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(ucfg))
                if kind == "phased":
                    fns[f"{m}.phased"] = (lambda u=ucfg, r=retain, o=opt, s=sched, m=m:
                                          records[m].append(phased_step(lm, u, fb, ref, r, params, o, s)))
                else:
                    fns[f"{m}.whole"] = lambda u=ucfg, r=retain, o=opt, s=sched: whole_step(lm, u, fb, ref, r,
                                                                                           params, o, s)
        times = time_alternating(fns, reps, cfg.warmup, device=lm.device)
        for m, ucfg in ucfgs.items():  # after the steps, so the adapter is no longer B = 0
            diff = step_difference(lm, ucfg, fb, ref, rb if ucfg.retain_mode != "none" else None, params)
            checks.update({f"{m}_{k}": v for k, v in diff.items()})
    finally:
        detach_lora(lm)
        restore_model_state(lm, state)
    (ff, fbw), (rf, rbw) = phase_flops(shape, fb), phase_flops(shape, rb)
    tokens = {"forget": int(fb.attention_mask.sum()), "retain": int(rb.attention_mask.sum())}
    variants: dict[str, Variant] = {}
    for m, ucfg in ucfgs.items():
        flops = {"forget_forward": ff, "forget_backward": fbw}
        if ucfg.retain_mode != "none":
            flops.update(retain_forward=rf, retain_backward=rbw)
        v, c = _variants(m, records[m][cfg.warmup:], {k: times[f"{m}.{k}"] for k in ("phased", "whole")}, flops,
                         {k: n for k, n in tokens.items() if f"{k}_forward" in flops}, peak_flops)
        variants.update(v)
        checks.update(c)
    config = {"model": lm.name, "dtype": _dtype(lm), "device": str(lm.device), "train_batch": len(fb),
              "retain_batch": len(rb), "response_tokens_per_seq": cfg.train_response_tokens, "lora_rank": LORA_RANK,
              "reps": reps, "warmup": cfg.warmup, "modes": MODES, "phases": list(PHASES),
              "peak_gflops": peak_flops / 1e9}
    notes = ["fraction = a phase's median / the sum of the phase medians of its mode",
             "forward/backward FLOPs (interp.flops): forward = forward_flops + adapters 2·lora_params·tokens; backward "
             "= train_flops - forward (frozen matmuls 1× the forward: input gradient only; adapters 2×; attention 2×; "
             "unembedding 1×), so with LoRA the split is about 1/2 : 1/2, not the 1/3 : 2/3 of full fine-tuning",
             "forward phases include the loss, its diagnostics and their host reads (float()), as the step does",
             "phases: the clock argument of training.step.train_step and training.loop.optimizer_update (a lap with "
             "device synchronisation after each phase)",
             "grad_snapshot: the step's gradient snapshot before the forget forward (grads are unset after zero_grad: "
             "only the check runs) and after the forget backward; grad_cosine: the forget/retain gradient cosine",
             "adamw includes LambdaLR's step; batch collation and metric logging of the trainer loop are not timed",
             "checks <mode>_max_abs_diff_*: the clocked step vs the unclocked one on the same weights and batch"]
    return make_result("train_phases", variants, {}, config, lm.device, checks, notes)
