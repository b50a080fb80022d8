"""The logit refusal score (Arditi et al.): log-odds of the refusal-start tokens at the last prompt
position. One forward per batch, no generation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp.chat import format_prompts, iter_batches, refusal_token_ids
from interp.loading import LoadedModel, position_ids_from_mask

__all__ = ["refusal_log_odds", "logit_refusal_scores", "last_token_logprobs"]


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
) -> Float[Tensor, "batch d_vocab"]:
    """Next-token log-probabilities at the last prompt position (assistant turn start), input order."""
    tok = lm.tokenizer
    texts = format_prompts(tok, prompts, system=system, raw=raw)
    out: Tensor | None = None
    for batch in tqdm(list(iter_batches(tok, texts, batch_size, max_prompt_tokens)), desc="logit score",
                      unit="batch", disable=not progress, leave=False):
        batch = batch.to(lm.device)
        logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          position_ids=position_ids_from_mask(batch.attention_mask), logits_to_keep=1).logits[:, -1, :]
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
) -> Float[Tensor, " batch"]:
    """Refusal log-odds per prompt (positive: the model is more likely to open with a refusal)."""
    logprobs = last_token_logprobs(lm, prompts, batch_size, system, raw, max_prompt_tokens, progress)
    return refusal_log_odds(logprobs, refusal_token_ids(lm.tokenizer))
