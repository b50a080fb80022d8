"""Benchmark 6b (issue #17, item 5) — where one unlearning optimiser step spends its time.

On the forget / retain batches of :func:`benchmarks.speed.train_step` (LoRA r=8 on all linear layers,
cached NPO reference), for NPO alone (``retain_mode='none'``) and NPO + retain-CE, the step the trainer
runs (:func:`training.loop.train_loop`: :func:`training.step.train_step`, clip, AdamW + schedule,
zero_grad) is run again inline from the library's pieces with a clock between its phases, in the
trainer's order (:data:`PHASES`; ``grad_snapshot`` adds the step's two snapshot points, before the
forget forward and after the forget backward).

Three totals per mode, alternating within each round: ``step`` (the library's step timed whole),
``phased_step`` (the instrumented inline step, timed whole) and ``sum_of_phases``. The inline step is
checked against :func:`training.trainer.train_step` on the same batch and weights: max |Δ| of the loss
and of the flattened LoRA gradients (``checks``), so the breakdown measures the same step.
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
from training.containment import retain_token_scale
from training.distributed import DataParallel
from training.loop import lr_schedule
from training.losses import (
    TrainStepOutput,
    ce_loss,
    combine_losses,
    forget_loss,
    response_logits,
    response_token_counts,
    sequence_logprobs,
)

# The step's own gradient bookkeeping, timed as it is (private to training.step: there is no public copy).
from training.step import NonFiniteLossError, _grad_cosine, _grad_snapshot
from training.trainer import train_step

__all__ = ["PHASES", "MODES", "LORA_RANK", "inline_step", "phased_step", "whole_step", "step_difference",
           "phase_flops", "train_phases"]

PHASES = ("forget_forward", "forget_backward", "grad_snapshot", "retain_forward", "retain_backward", "grad_cosine",
          "clip", "adamw", "zero_grad")
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


def _finite(value: torch.Tensor, name: str) -> None:
    if not torch.isfinite(value.detach()).all():
        raise NonFiniteLossError(f"the {name} loss became {float(value.detach())}")


def inline_step(lm: LoadedModel, cfg: UnlearnConfig, forget_batch: TokenBatch, logp_ref: torch.Tensor | None,
                retain_batch: TokenBatch | None, clock: _Clock) -> TrainStepOutput:
    """:func:`training.step.train_step` with ``backward=True`` in one process, no gate or containment,
    ``retain_mode`` none or ce, its statements in the same order, ``clock.lap`` after each phase."""
    if cfg.retain_mode not in ("none", "ce") or cfg.concept_gate:
        raise ValueError("the phase breakdown covers retain_mode none or ce, without a concept gate")
    params = [p for p in lm.model.parameters() if p.requires_grad] if cfg.retain_mode != "none" else []
    start = None
    if params:
        start = _grad_snapshot(params) if any(p.grad is not None for p in params) else None
        clock.lap("grad_snapshot")
    fb = forget_batch.to(lm.device)
    rl = response_logits(lm.model, fb.input_ids, fb.attention_mask, fb.response_mask)
    logp = sequence_logprobs(rl.logits, rl.labels, rl.mask)
    n = response_token_counts(rl.mask)
    ref = logp_ref.to(logp.device) if logp_ref is not None else None
    f = forget_loss(cfg.method, logp, n, ref, beta=cfg.beta, margin=cfg.simnpo_margin)
    losses = {"forget": float(f.detach())}
    metrics = {"forget_logp_tok": float(logp.detach().sum() / n.sum())}
    if ref is not None:
        metrics["forget_logratio_tok"] = float(((logp.detach() - ref) / n).mean())
    _finite(f, "forget")
    clock.lap("forget_forward")
    (cfg.gamma * f).backward()
    f = f.detach()
    del rl, logp
    clock.lap("forget_backward")
    r = None
    if cfg.retain_mode != "none":
        if retain_batch is None:
            raise ValueError(f"retain_mode={cfg.retain_mode!r} needs a retain batch")
        mid = _grad_snapshot(params)
        clock.lap("grad_snapshot")
        rb = retain_batch.to(lm.device)
        rr = response_logits(lm.model, rb.input_ids, rb.attention_mask, rb.response_mask)
        rlogp = sequence_logprobs(rr.logits, rr.labels, rr.mask)
        rn = response_token_counts(rr.mask)
        metrics["retain_logp_tok"] = float(rlogp.detach().sum() / rn.sum())
        r = ce_loss(rlogp, rn)
        if cfg.retain_weighting == "per_token":
            metrics["retain_scale"] = retain_token_scale(cfg.method, n, rn)
            r = r * metrics["retain_scale"]
        losses["retain"] = float(r.detach())
        _finite(r, "retain")
        clock.lap("retain_forward")
        (cfg.alpha * r).backward()
        r = r.detach()
        del rr, rlogp
        clock.lap("retain_backward")
        cos = _grad_cosine(params, start, mid)
        if cos is not None:
            metrics["grad_cos_forget_retain"] = cos
        clock.lap("grad_cosine")
    return TrainStepOutput(loss=combine_losses(f, r, cfg.gamma, cfg.alpha), losses=losses, metrics=metrics)


def _update(cfg: UnlearnConfig, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LRScheduler, clock: _Clock | None) -> None:
    """The trainer loop's clip, AdamW + schedule and zero_grad (one process)."""
    norm = DataParallel().clip_grad_norm_(params, cfg.max_grad_norm)
    if not math.isfinite(norm):
        raise NonFiniteLossError(f"gradient norm became {norm}")
    if clock is not None:
        clock.lap("clip")
    sched.get_last_lr()
    opt.step()
    sched.step()
    if clock is not None:
        clock.lap("adamw")
    opt.zero_grad(set_to_none=True)
    if clock is not None:
        clock.lap("zero_grad")


def phased_step(lm: LoadedModel, cfg: UnlearnConfig, fb: TokenBatch, ref: torch.Tensor | None,
                rb: TokenBatch | None, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
                sched: torch.optim.lr_scheduler.LRScheduler) -> dict[str, float]:
    """One optimiser step, inline; returns seconds per phase."""
    clock = _Clock(lm.device)
    inline_step(lm, cfg, fb, ref, rb, clock)
    _update(cfg, params, opt, sched, clock)
    return clock.seconds


def whole_step(lm: LoadedModel, cfg: UnlearnConfig, fb: TokenBatch, ref: torch.Tensor | None,
               rb: TokenBatch | None, params: list[torch.nn.Parameter], opt: torch.optim.Optimizer,
               sched: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One optimiser step through the library: :func:`training.trainer.train_step`, then the update."""
    train_step(lm, cfg, fb, ref, rb)
    _update(cfg, params, opt, sched, None)


def _flat_grads(params: list[torch.nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double()
                      for p in params])


def step_difference(lm: LoadedModel, cfg: UnlearnConfig, fb: TokenBatch, ref: torch.Tensor | None,
                    rb: TokenBatch | None, params: list[torch.nn.Parameter]) -> dict[str, float]:
    """Max |Δ| between :func:`inline_step` and :func:`training.trainer.train_step` from the same weights
    and batch: of the loss, its components, the flattened gradient and the gradient cosine (``grad_max_abs``
    gives the gradient's scale). Leaves the gradients unset."""
    outs, grads = [], []
    for fn in (lambda: inline_step(lm, cfg, fb, ref, rb, _Clock(lm.device)), lambda: train_step(lm, cfg, fb, ref, rb)):
        for p in params:
            p.grad = None
        outs.append(fn())
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
                              ("phased_step", steps["phased"], "the inline step with its clock, timed whole"),
                              ("step", steps["whole"], "training.trainer.train_step + clip + AdamW + zero_grad, "
                                                       "timed whole")):
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
             "grad_snapshot: training.step._grad_snapshot before the forget forward (grads are unset after zero_grad: "
             "only the check runs) and after the forget backward; grad_cosine: training.step._grad_cosine",
             "adamw includes LambdaLR's step; batch collation and metric logging of the trainer loop are not timed",
             "checks <mode>_max_abs_diff_*: inline step vs training.trainer.train_step on the same weights and batch"]
    return make_result("train_phases", variants, {}, config, lm.device, checks, notes)
