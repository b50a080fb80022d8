"""One unlearning step: forward the forget (and retain) batch, compute ``gamma·forget + alpha·retain``
and backpropagate each term as soon as it is computed, with the cosine between the two terms'
gradients; and a step's output over the global batch under data parallelism.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace

import torch

from interp.activations import stream_activations
from interp.loading import LoadedModel
from training.collate import TokenBatch
from training.config import UnlearnConfig
from training.containment import (
    ConceptGate,
    Containment,
    gated,
    last_prompt_index,
    projection_loss,
    repr_loss,
    retain_token_scale,
)
from training.distributed import DataParallel
from training.losses import (
    TrainStepOutput,
    ce_loss,
    combine_losses,
    forget_loss,
    kl_loss,
    response_logits,
    response_token_counts,
    sequence_logprobs,
)
from training.retain_reference import REFERENCE_MODES, RetainReference, batches_reference, retain_layers

__all__ = ["NonFiniteLossError", "PhaseClock", "STEP_PHASES", "train_step", "global_step_output"]

PhaseClock = Callable[[str], None]
"""Called with a phase's name right after the phase ends (a profiler's lap; see ``train_step``'s ``clock``)."""

STEP_PHASES = ("grad_snapshot", "forget_forward", "forget_backward", "retain_forward", "retain_backward",
               "grad_cosine")
"""The phases :func:`train_step` reports to its clock (``grad_snapshot`` at two points: before the forget
forward and after the forget backward)."""


class NonFiniteLossError(RuntimeError):
    """The loss or gradient became NaN/inf; the run stopped and its last good checkpoint is kept."""


def _finite(value: torch.Tensor, name: str, losses: dict[str, float]) -> None:
    if not torch.isfinite(value.detach()).all():
        raise NonFiniteLossError(f"the {name} loss became {float(value.detach())} (components so far {losses})")


def train_step(
    lm: LoadedModel,
    cfg: UnlearnConfig,
    forget_batch: TokenBatch,
    logp_ref: torch.Tensor | None = None,
    retain_batch: TokenBatch | None = None,
    backward: bool = True,
    model: torch.nn.Module | None = None,
    scale: tuple[float, float] = (1.0, 1.0),
    containment: Containment | None = None,
    clock: PhaseClock | None = None,
    retain_ref: RetainReference | None = None,
) -> TrainStepOutput:
    """Forward the forget (and retain) batch and compute ``gamma·forget + alpha·retain``.

    Args:
        logp_ref: reference log-probs of the forget batch's rows (NPO).
        backward: backpropagate each weighted term as soon as it is computed, so only one batch's
            activations are alive at a time (the gradient is the same as the sum's); ``loss`` is then
            returned detached, and with a retain term ``metrics["grad_cos_forget_retain"]`` is the
            cosine between the two terms' gradients over the trainable parameters.
        model: the module the trained forwards run through (a DDP wrapper of ``lm.model``); default
            ``lm.model``. The reference forwards (KL, repr, direction; only without ``retain_ref``)
            always run ``lm.model`` with its adapter disabled.
        scale: factors on the forget and retain terms' gradients only (``world_size · n_rank /
            n_global`` under DDP, which averages over ranks); the returned losses are unscaled.
        containment: the refusal direction of ``retain_mode='direction'`` and the calibrated gate
            of ``concept_gate`` (``unlearn`` resolves both).
        clock: called with each phase's name as it ends, in the order run: ``grad_snapshot`` (before
            the forget forward and after the forget backward, only when the grad cosine is kept:
            ``backward`` with a retain term), ``forget_forward``, ``forget_backward``,
            ``retain_forward`` (with the reference: KL, repr, direction), ``retain_backward``,
            ``grad_cosine``. Forward phases include the loss, its diagnostics and their host reads; the
            backward phases are reported only with ``backward``. ``None``: nothing is called.
        retain_ref: the base model's reference of the retain rows, computed once per run
            (:func:`training.retain_reference.retain_reference`; the trainer passes it), looked up by
            the retain batch's ``index``. ``None``: a ``kl`` / ``repr`` / ``direction`` step computes
            its retain batch's reference itself (:func:`training.retain_reference.batches_reference` of
            the batch, its rows keyed by position: one more no-grad forward per step, and a round trip
            of the reference through the host), then reads it as it reads the run's.

    Raises:
        NonFiniteLossError: a term is NaN/inf (checked before its backward).
    """
    model = model if model is not None else lm.model
    gate = containment.gate if containment is not None else None
    if cfg.concept_gate and gate is None:
        raise ValueError("concept_gate needs the calibrated gate: pass containment=Containment(gate=...)")
    if gate is not None and not backward and cfg.gradient_checkpointing:
        raise ValueError("under gradient checkpointing a gated step must backpropagate inside the gate (backward=True)")
    # The two terms' gradients apart, for their cosine: one copy of the gradients.
    params = [p for p in lm.model.parameters() if p.requires_grad] if backward and cfg.retain_mode != "none" else []
    start = _grad_snapshot(params) if any(p.grad is not None for p in params) else None
    if clock is not None and params:
        clock("grad_snapshot")
    fb = forget_batch.to(lm.device)
    with _gated(lm, gate, fb) as fgate:
        rl = response_logits(model, fb.input_ids, fb.attention_mask, fb.response_mask)
        logp = sequence_logprobs(rl.logits, rl.labels, rl.mask)
        n = response_token_counts(rl.mask)
        ref = logp_ref.to(logp.device) if logp_ref is not None else None
        f = forget_loss(cfg.method, logp, n, ref, beta=cfg.beta, margin=cfg.simnpo_margin)
        losses = {"forget": float(f.detach())}
        metrics = {"forget_logp_tok": float(logp.detach().sum() / n.sum())}
        if ref is not None:
            metrics["forget_logratio_tok"] = float(((logp.detach() - ref) / n).mean())
        if fgate is not None:
            metrics["gate_forget"] = float(fgate.mean())
        f = _close_term(f, "forget", cfg.gamma, scale[0], losses, backward, clock)
        if backward:
            del rl, logp
    r = None
    if cfg.retain_mode != "none":
        if retain_batch is None:
            raise ValueError(f"retain_mode={cfg.retain_mode!r} needs a retain batch")
        mid = _grad_snapshot(params) if params else None
        if clock is not None and mid is not None:
            clock("grad_snapshot")
        rb = retain_batch.to(lm.device)
        with _gated(lm, gate, rb) as rgate:
            r = _retain_term(lm, cfg, model, rb, n, metrics, containment, retain_ref)
            if rgate is not None:
                metrics["gate_retain"] = float(rgate.mean())
            losses["retain"] = float(r.detach())
            r = _close_term(r, "retain", cfg.alpha, scale[1], losses, backward, clock)
        if mid is not None:
            cos = _grad_cosine(params, start, mid)
            if cos is not None:
                metrics["grad_cos_forget_retain"] = cos
            if clock is not None:
                clock("grad_cosine")
    loss = combine_losses(f, r, cfg.gamma, cfg.alpha)
    return TrainStepOutput(loss=loss, losses=losses, metrics=metrics)


def _close_term(value: torch.Tensor, name: str, weight: float, scale: float, losses: dict[str, float],
                backward: bool, clock: PhaseClock | None) -> torch.Tensor:
    """Check a computed term, then (with ``backward``) backpropagate ``weight·value`` (times ``scale``)
    and return it detached, reporting ``<name>_forward`` and ``<name>_backward`` to ``clock``."""
    _finite(value, name, losses)
    if clock is not None:
        clock(f"{name}_forward")
    if not backward:
        return value
    (weight * value * scale if scale != 1.0 else weight * value).backward()
    if clock is not None:
        clock(f"{name}_backward")
    return value.detach()


def _retain_term(lm: LoadedModel, cfg: UnlearnConfig, model: torch.nn.Module, rb: TokenBatch,
                 forget_tokens: torch.Tensor, metrics: dict[str, float],
                 containment: Containment | None, retain_ref: RetainReference | None) -> torch.Tensor:
    """The retain term of ``cfg.retain_mode`` on the retain batch (unweighted by ``alpha``); the base
    model's side from ``retain_ref`` (by the rows' ``index``), else from this batch's own reference."""
    if retain_ref is not None and retain_ref.mode != cfg.retain_mode:
        raise ValueError(f"retain_ref was computed for retain_mode={retain_ref.mode!r}, not {cfg.retain_mode!r}")
    direction = containment.direction if containment is not None else None
    if cfg.retain_mode == "direction" and direction is None:
        raise ValueError("retain_mode='direction' needs the direction: pass containment=Containment(direction=...)")
    keys = rb.index
    if retain_ref is None and cfg.retain_mode in REFERENCE_MODES:
        # Keyed by the rows' positions in this batch, not by ``index``: a hand-made batch may repeat an
        # index on different rows. ``replace`` shares the batch's tensors (no copy).
        keys = list(range(len(rb)))
        # ``batches_reference`` runs the base model in eval mode, a training step's model is in train
        # mode: the same values, as the modes differ only in dropout and this forward has none: the
        # adapter (and so its lora_dropout) is disabled, and the one dropout of our families' base models
        # (Qwen2, Llama, Mistral, Gemma 3) is attention dropout, 0 in their configs.
        retain_ref = batches_reference(lm, cfg, [replace(rb, index=keys)], containment)
    if cfg.retain_mode in ("ce", "kl"):
        rr = response_logits(model, rb.input_ids, rb.attention_mask, rb.response_mask)
        rlogp = sequence_logprobs(rr.logits, rr.labels, rr.mask)
        rn = response_token_counts(rr.mask)
        metrics["retain_logp_tok"] = float(rlogp.detach().sum() / rn.sum())
        if cfg.retain_mode == "ce":
            r = ce_loss(rlogp, rn)
        else:
            r = kl_loss(rr.logits, retain_ref.response_logits(keys, rr.mask), rr.mask)
        if cfg.retain_weighting == "per_token":
            metrics["retain_scale"] = retain_token_scale(cfg.method, forget_tokens, rn)
            r = r * metrics["retain_scale"]
        return r
    layers = retain_layers(lm, cfg, containment)
    if list(retain_ref.layers) != layers:
        raise ValueError(f"retain_ref holds layers {list(retain_ref.layers)} but the retain term reads {layers}")
    acts = stream_activations(model, rb.input_ids, rb.attention_mask, layers)
    if cfg.retain_mode == "repr":
        return repr_loss(acts, retain_ref.stream(keys, rb.attention_mask), rb.attention_mask, cfg.repr_distance)
    rows = torch.arange(acts.shape[0], device=acts.device)
    last = last_prompt_index(rb.response_mask).to(acts.device)
    vectors = torch.stack([direction.vector_for(layer) for layer in layers]).to(acts.device)
    return projection_loss(acts[rows, last], retain_ref.last_prompt(keys, acts.device), vectors)


def _gated(lm: LoadedModel, gate: ConceptGate | None, batch: TokenBatch) -> AbstractContextManager:
    if gate is None:
        return nullcontext()
    return gated(lm, gate, batch.input_ids, batch.attention_mask, last_prompt_index(batch.response_mask))


def _grad_snapshot(params: list[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in params]


def _grad_cosine(params: list[torch.nn.Parameter], start: list[torch.Tensor | None] | None,
                 mid: list[torch.Tensor | None]) -> float | None:
    """Cosine between the gradient added from ``start`` to ``mid`` (the forget term's) and the one
    added since (the retain term's); ``None`` where either is zero."""
    def diff(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return a if a is None or b is None else a - b

    # Accumulated on the device (float64), read once: no synchronisation per parameter.
    acc = torch.zeros(3, dtype=torch.float64, device=params[0].device)
    for i, p in enumerate(params):
        gf = diff(mid[i], start[i] if start is not None else None)
        gr = diff(p.grad, mid[i])
        if gf is not None:
            acc[1] += gf.double().pow(2).sum()
        if gr is not None:
            acc[2] += gr.double().pow(2).sum()
        if gf is not None and gr is not None:
            acc[0] += (gf.double() * gr.double()).sum()
    dot, nf, nr = acc.tolist()
    if nf == 0 or nr == 0:
        return None
    return dot / math.sqrt(nf * nr)


def global_step_output(out: TrainStepOutput, cfg: UnlearnConfig, dp: DataParallel, fshare: float,
                       rshare: float) -> TrainStepOutput:
    """The step's losses over the global batch: each rank's row-mean terms weighted by its row share
    (diagnostics too, so token ratios among them are row-weighted approximations)."""
    names, mnames = sorted(out.losses), sorted(out.metrics)
    local = ([out.losses[k] * (rshare if k == "retain" else fshare) for k in names]
             + [out.metrics[k] * (rshare if k.startswith("retain") else fshare) for k in mnames])
    summed = dp.sum(local)
    losses = dict(zip(names, summed[:len(names)], strict=True))
    metrics = dict(zip(mnames, summed[len(names):], strict=True))
    loss = combine_losses(torch.tensor(losses["forget"]),
                          torch.tensor(losses["retain"]) if "retain" in losses else None, cfg.gamma, cfg.alpha)
    return TrainStepOutput(loss=loss, losses=losses, metrics=metrics)
