"""Benchmark 3 — one unlearning optimiser step on a LoRA adapter (all linear layers, r=8), same batch.

* ``npo_precomputed``: :func:`training.trainer.train_step` with cached reference log-probs, then
  backward, gradient clipping and AdamW — exactly the trainer loop's step;
* ``npo_live_ref``: the same plus a reference forward each step (adapter disabled, no grad), what
  NPO costs without the cache;
* ``sft_peft_torch``: the baseline a researcher writes by hand: ``model(input_ids, attention_mask,
  labels=labels).loss.backward(); opt.step()`` with prompt/padding labels set to -100.

Tokens/s counts the batch's real (non-padding) tokens. Target: ``npo_precomputed`` ≥ 0.9× the SFT
step. The adapter is removed afterwards, leaving ``lm`` as it came.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from benchmarks.data import training_examples
from benchmarks.harness import BenchConfig, BenchResult, Variant, make_result, ratio, time_alternating
from interp.loading import LoadedModel, adapter_disabled
from training.config import UnlearnConfig
from training.data import TokenBatch, collate
from training.lora import attach_lora, detach_lora, has_adapter
from training.losses import response_logits, sequence_logprobs
from training.trainer import train_step

__all__ = ["TARGET", "LR", "sft_step", "npo_step", "reference_logp", "measure", "run"]

TARGET = 0.9
LR = 1e-6
"""Small, so that the adapter barely moves while the variants take turns on the same weights."""


@torch.no_grad()
def reference_logp(lm: LoadedModel, batch: TokenBatch) -> torch.Tensor:
    """Per-sequence response log-probs under the reference policy (the adapter disabled)."""
    with adapter_disabled(lm):
        rl = response_logits(lm.model, batch.input_ids, batch.attention_mask, batch.response_mask)
        return sequence_logprobs(rl.logits, rl.labels, rl.mask).float()


def npo_step(lm: LoadedModel, cfg: UnlearnConfig, batches: Sequence[TokenBatch], opt: torch.optim.Optimizer,
             params: list[torch.nn.Parameter], logp_refs: Sequence[torch.Tensor] | None = None) -> float:
    """One trainer step over ``batches`` (micro-batches of one global batch): ``train_step`` (which
    backpropagates, as in the trainer's loop), gradients averaged over the micro-batches, clip, AdamW.
    A live reference pass per micro-batch when ``logp_refs`` is None."""
    total = 0.0
    for i, batch in enumerate(batches):
        ref = logp_refs[i] if logp_refs is not None else reference_logp(lm, batch)
        total += float(train_step(lm, cfg, batch, ref).loss) / len(batches)
    if len(batches) > 1:
        for p in params:
            if p.grad is not None:
                p.grad.div_(len(batches))
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def sft_step(lm: LoadedModel, batches: Sequence[TokenBatch], opt: torch.optim.Optimizer) -> float:
    """The hand-written PEFT SFT step: HF's built-in causal-LM loss on the response tokens."""
    total = 0.0
    for batch in batches:
        labels = batch.input_ids.masked_fill(batch.response_mask == 0, -100)
        loss = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        (loss / len(batches)).backward()
        total += float(loss.detach()) / len(batches)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def measure(
    lm: LoadedModel, batches: Sequence[TokenBatch], reps: int, warmup: int = 1, lora_rank: int = 8,
) -> tuple[dict[str, Variant], dict[str, dict], dict[str, float]]:
    """Attach a fresh LoRA adapter, time the three steps over the micro-batches of one global batch,
    detach. Returns ``(variants, ratios, checks)``."""
    if has_adapter(lm):
        raise RuntimeError("the model already carries an adapter; the benchmark attaches its own")
    cfg = UnlearnConfig(method="npo", model=lm.name, lora_rank=lora_rank, lr=LR)
    batches = [b.to(lm.device) for b in batches]
    attach_lora(lm, rank=lora_rank, alpha=2.0 * lora_rank, targets=("all-linear",))
    try:
        params = [p for p in lm.model.parameters() if p.requires_grad]
        lm.model.train()
        logp_refs = [reference_logp(lm, b) for b in batches]
        # With B = 0 the policy is the reference, so the first NPO loss is (2/β)·log 2 exactly.
        first_loss = float(train_step(lm, cfg, batches[0], logp_refs[0], backward=False).loss.detach())
        names = ("npo_precomputed", "npo_live_ref", "sft_peft_torch")
        opts = {k: torch.optim.AdamW(params, lr=LR) for k in names}
        fns = {
            "npo_precomputed": lambda: npo_step(lm, cfg, batches, opts["npo_precomputed"], params, logp_refs),
            "npo_live_ref": lambda: npo_step(lm, cfg, batches, opts["npo_live_ref"], params, None),
            "sft_peft_torch": lambda: sft_step(lm, batches, opts["sft_peft_torch"]),
        }
        times = time_alternating(fns, reps, warmup, device=lm.device)
        n_trainable = sum(p.numel() for p in params)
    finally:
        lm.model.eval()
        detach_lora(lm)
    work = {"sequences": sum(len(b) for b in batches), "tokens": sum(int(b.attention_mask.sum()) for b in batches),
            "response_tokens": sum(int(b.response_mask.sum()) for b in batches),
            "padded_tokens": sum(b.input_ids.numel() for b in batches)}
    desc = {"npo_precomputed": "training.trainer.train_step (NPO, cached logp_ref; it backpropagates) + clip + AdamW",
            "npo_live_ref": "reference forward (adapter disabled, no grad) + the npo_precomputed step",
            "sft_peft_torch": "model(..., labels=labels).loss.backward(); AdamW.step() (plain PEFT + torch)"}
    variants = {k: Variant(times[k], work, desc[k]) for k in fns}
    ratios = {"npo_precomputed/sft_peft_torch": ratio(variants, "npo_precomputed", "sft_peft_torch", TARGET),
              "npo_live_ref/sft_peft_torch": ratio(variants, "npo_live_ref", "sft_peft_torch"),
              "npo_precomputed/npo_live_ref": ratio(variants, "npo_precomputed", "npo_live_ref")}
    checks = {"first_npo_loss": first_loss, "expected_first_npo_loss": 2.0 / cfg.beta * math.log(2.0),
              "trainable_params": n_trainable, "micro_batches": len(batches)}
    return variants, ratios, checks


def run(lm: LoadedModel, cfg: BenchConfig) -> BenchResult:
    examples = training_examples(cfg.train_batch)
    batch = collate(lm.tokenizer, examples, max_prompt_tokens=256, max_response_tokens=cfg.train_response_tokens)
    # Four steps of 10-40 s a round on 2 shared cores: 3 rounds keep the benchmark near 5 minutes.
    reps = min(cfg.reps, 3)
    variants, ratios, checks = measure(lm, [batch], reps, cfg.warmup)
    config = {"model": lm.name, "dtype": str(next(lm.model.parameters()).dtype), "device": str(lm.device),
              "train_batch": len(batch), "response_tokens_per_seq": cfg.train_response_tokens, "lora_rank": 8,
              "lora_targets": "all-linear", "optimizer": f"AdamW lr={LR}", "reps": reps, "warmup": cfg.warmup}
    notes = ["ratio = median baseline step time / median emalab step time (>1: emalab faster)",
             "emalab's step unembeds only the response positions (logits_to_keep); HF's labels= loss unembeds "
             "every position and upcasts all logits",
             "emalab's step also clips the gradient norm, as the trainer does; the hand-written baseline does not"]
    return make_result("unlearn", variants, ratios, config, lm.device, checks, notes)
