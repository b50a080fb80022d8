"""The logit refusal score (Arditi et al.): log-odds of the refusal-start tokens at the last prompt
position. One forward per batch, no generation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.chat import format_prompts, iter_batches, refusal_token_ids
from interp.gating import gate_active, gate_rows
from interp.loading import LoadedModel, position_ids_from_mask
from interp.prefix import build_prefix, prefix_cache_enabled, prefixed_inputs, split_prefix

__all__ = [
    "score_variants","refusal_log_odds", "logit_refusal_scores", "logit_refusal_score_variants", "LOGIT_VARIANTS",
           "last_token_logprobs"]

LOGIT_VARIANTS: tuple[str, ...] = ("standard", "without_no")
"""The refusal-token sets of the logit score: all of ``REFUSAL_PHRASES``, and the same without "No"."""


def refusal_log_odds(
    logits: Float[Tensor, "batch d_vocab"], refusal_ids: Sequence[int], eps: float = 1e-8
) -> Float[Tensor, " batch"]:
    """``log p_R - log(1 - p_R)`` where ``p_R`` is the probability mass on ``refusal_ids``."""
    probs = torch.softmax(logits.double(), dim=-1)
    p = probs[:, list(refusal_ids)].sum(-1).clamp(eps, 1 - eps)
    return (torch.log(p) - torch.log1p(-p)).float()


@torch.inference_mode()
def last_token_logprobs(
    lm: LoadedModel,
    prompts: Sequence[str],
    batch_size: int = 16,
    system: str | None = None,
    raw: bool = False,
    max_prompt_tokens: int | None = 512,
    progress: bool = False,
    prefix_cache: bool | None = None,
) -> Float[Tensor, "batch d_vocab"]:
    """Next-token log-probabilities at the last prompt position (assistant turn start), input order.

    Args:
        prefix_cache: reuse the shared system/template prefix's KV cache across the call's batches
            (:mod:`interp.prefix`; exact, on by default; ``$EMALAB_PREFIX_CACHE=0`` turns it off).
    """
    tok = lm.tokenizer
    texts = format_prompts(tok, prompts, system=system, raw=raw)
    # A gated adapter gates each row by its prompt; the prefix's cache would differ per row (uncached).
    prefix = build_prefix(lm, system, raw) if prefix_cache_enabled(prefix_cache) and not gate_active(lm) else None
    out: Tensor | None = None
    for batch in tqdm(list(iter_batches(tok, texts, batch_size, max_prompt_tokens)), desc="logit score",
                      unit="batch", disable=not progress, leave=False):
        batch = batch.to(lm.device)
        pb = split_prefix(batch, prefix, lm.model)
        with gate_rows(lm, batch.input_ids, batch.attention_mask):
            if pb is not None:
                logits = lm.model(**prefixed_inputs(pb, prefix), use_cache=True, logits_to_keep=1).logits[:, -1, :]
            else:
                logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=position_ids_from_mask(batch.attention_mask),
                                  logits_to_keep=1).logits[:, -1, :]
        lp = torch.log_softmax(logits.float(), dim=-1).cpu()
        if out is None:
            out = torch.empty(len(texts), lp.shape[-1])
        out[batch.index] = lp
    if out is None:
        raise ValueError("no prompts to score")
    return out


def logit_refusal_scores(
    lm: LoadedModel,
    prompts: Sequence[str],
    batch_size: int = 16,
    system: str | None = None,
    raw: bool = False,
    max_prompt_tokens: int | None = 512,
    progress: bool = False,
    include_no: bool = True,
    prefix_cache: bool | None = None,
) -> Float[Tensor, " batch"]:
    """Refusal log-odds per prompt (positive: the model is more likely to open with a refusal).

    ``include_no=False`` leaves "No" out of the refusal tokens (see :func:`refusal_token_ids`).
    """
    logprobs = last_token_logprobs(lm, prompts, batch_size, system, raw, max_prompt_tokens, progress, prefix_cache)
    return refusal_log_odds(logprobs, refusal_token_ids(lm.tokenizer, include_no=include_no))


def logit_refusal_score_variants(
    lm: LoadedModel,
    prompts: Sequence[str],
    batch_size: int = 16,
    system: str | None = None,
    raw: bool = False,
    max_prompt_tokens: int | None = 512,
    progress: bool = False,
    prefix_cache: bool | None = None,
) -> dict[str, Float[Tensor, " batch"]]:
    """Both logit scores of :data:`LOGIT_VARIANTS` from one forward per batch: ``{variant: log-odds}``.

    ``standard`` equals :func:`logit_refusal_scores`; ``without_no`` drops "No" from the refusal
    tokens, so an aligned rebuttal ("No, not all ...") to a loaded question does not read as refusal.
    """
    logprobs = last_token_logprobs(lm, prompts, batch_size, system, raw, max_prompt_tokens, progress, prefix_cache)
    return score_variants(lm, logprobs)


def score_variants(lm: LoadedModel, logprobs: Float[Tensor, "batch d_vocab"]) -> dict[str, Float[Tensor, " batch"]]:
    """The :data:`LOGIT_VARIANTS` from next-token log-probs at the last prompt position (e.g. the
    prefill of a generation, :func:`interp.generate.generate`'s ``first_logprobs``)."""
    return {
        "standard": refusal_log_odds(logprobs, refusal_token_ids(lm.tokenizer)),
        "without_no": refusal_log_odds(logprobs, refusal_token_ids(lm.tokenizer, include_no=False)),
    }
