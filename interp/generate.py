"""Batched greedy generation from chat prompts (length-sorted, left-padded)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from interp.chat import format_prompts, iter_batches
from interp.loading import LoadedModel

__all__ = ["generate"]


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompts: Sequence[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    system: str | None = None,
    raw: bool = False,
    max_prompt_tokens: int | None = 512,
    progress: bool = True,
) -> list[str]:
    """Greedy completions for user ``prompts`` (in input order), decoded without special tokens.

    Interventions (ablation, steering, adapters) active on ``lm.model`` apply, since this calls the
    model's own ``generate``.
    """
    if not prompts:
        return []
    tok = lm.tokenizer
    texts = format_prompts(tok, prompts, system=system, raw=raw)
    out: list[str | None] = [None] * len(texts)
    batches = list(iter_batches(tok, texts, batch_size, max_length=max_prompt_tokens))
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress, leave=False):
        batch = batch.to(lm.device)
        seqs = lm.model.generate(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
        )
        new = seqs[:, batch.input_ids.shape[1]:]
        for row, i in enumerate(batch.index):
            out[i] = tok.decode(new[row], skip_special_tokens=True)
    return out  # type: ignore[return-value]
