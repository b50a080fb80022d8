"""Batched generation from chat prompts (length-sorted, left-padded): greedy, or sampled with a seed."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from interp.chat import format_prompts, iter_batches
from interp.loading import LoadedModel

__all__ = ["generate", "sample", "stop_rules"]


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


def stop_rules(lm: LoadedModel, max_new_tokens: int) -> dict:
    """What ends a generation, for the record: the end-of-turn/eos tokens or the length cap."""
    tok = lm.tokenizer
    eos = getattr(lm.model.generation_config, "eos_token_id", None) or tok.eos_token_id
    eos_ids = sorted({int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]) if e is not None})
    return {"max_new_tokens": max_new_tokens, "eos_token_ids": eos_ids,
            "eos_tokens": [tok.convert_ids_to_tokens(i) for i in eos_ids]}


@torch.inference_mode()
def sample(
    lm: LoadedModel,
    prompts: Sequence[str],
    n: int = 8,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 128,
    seed: int = 0,
    batch_size: int = 16,
    system: str | None = None,
    raw: bool = False,
    max_prompt_tokens: int | None = 512,
    progress: bool = True,
) -> list[list[str]]:
    """``n`` sampled completions per prompt: ``out[i][k]`` is sample ``k`` of prompt ``i``.

    Sampling is seeded per batch (``seed`` plus the batch's first row), so the same prompts, ``n``,
    batch size and device give the same samples; changing the batch size changes which random numbers
    each row draws. A generation stops at the model's end-of-turn/eos token or after
    ``max_new_tokens`` (:func:`stop_rules`). ``temperature == 0`` is greedy: every sample is the same,
    which is warned about when ``n > 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature must be >= 0 and top_p in (0, 1]; got {temperature}, {top_p}")
    if temperature == 0 and n > 1:
        warnings.warn(f"temperature 0 is greedy decoding: all {n} samples per prompt will be identical",
                      stacklevel=2)
    if not prompts:
        return []
    tok = lm.tokenizer
    texts = format_prompts(tok, prompts, system=system, raw=raw)
    rows = [t for t in texts for _ in range(n)]  # prompt i's samples are rows i*n .. i*n+n-1
    out: list[str | None] = [None] * len(rows)
    batches = list(iter_batches(tok, rows, batch_size, max_length=max_prompt_tokens))
    greedy = temperature == 0
    for batch in tqdm(batches, desc="sample", unit="batch", disable=not progress, leave=False):
        torch.manual_seed(seed * 1_000_003 + min(batch.index))
        batch = batch.to(lm.device)
        kw = ({"do_sample": False, "temperature": None, "top_p": None, "top_k": None} if greedy else
              {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0})
        seqs = lm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
        new = seqs[:, batch.input_ids.shape[1]:]
        for row, i in enumerate(batch.index):
            out[i] = tok.decode(new[row], skip_special_tokens=True)
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]  # type: ignore[misc]
