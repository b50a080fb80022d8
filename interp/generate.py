"""Batched greedy generation from chat prompts (length-sorted, left-padded), with the shared-prefix
KV cache and per-sequence stopping; and seeded sampling (:func:`sample`).

Each batch is prefilled once (continuing from the shared system/template prefix's cache,
:mod:`interp.prefix`) and decoded one token a step from its KV cache. A row leaves the batch as soon
as it emits an end-of-sequence token or its ``stop`` rule fires (e.g. the judge can already decide:
:meth:`evals.judge.KeywordJudge.decided`), so later steps run on the rows still going. Prompts are
length-sorted into batches, which keeps padding small.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from interp.chat import Batch, format_prompts, iter_batches
from interp.gating import gate_active, gate_rows, select_gate_rows
from interp.loading import LoadedModel, position_ids_from_mask
from interp.prefix import build_prefix, prefix_cache_enabled, prefixed_inputs, sliding_window, split_prefix

__all__ = ["generate", "StopRule", "sample", "stop_rules"]

StopRule = Callable[[str], bool]
"""``stop(text_so_far) -> True`` once a sequence may end (decoded without special tokens)."""


def _eos_ids(lm: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(lm.model, "generation_config", None), lm.model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids |= set(eos) if isinstance(eos, (list, tuple)) else {int(eos)}
    if not ids and lm.tokenizer.eos_token_id is not None:
        ids.add(int(lm.tokenizer.eos_token_id))
    return ids


def _decode_batch(lm: LoadedModel, batch: Batch, prefix, max_new_tokens: int, stop: StopRule | None,
                  eos: set[int], first: dict[int, torch.Tensor] | None = None) -> tuple[list[list[int]], int]:
    """Greedy tokens of each row of ``batch`` (EOS excluded) and the prompt tokens prefilled; the
    prefill's next-token log-probs go to ``first[batch.index]`` when it is given."""
    with gate_rows(lm, batch.input_ids, batch.attention_mask):  # a gated adapter: each row's gate
        return _decode_rows(lm, batch, prefix, max_new_tokens, stop, eos, first)


def _decode_rows(lm: LoadedModel, batch: Batch, prefix, max_new_tokens: int, stop: StopRule | None,
                 eos: set[int], first: dict[int, torch.Tensor] | None) -> tuple[list[list[int]], int]:
    tok = lm.tokenizer
    pb = split_prefix(batch, prefix, lm.model)
    if pb is not None:
        inputs = prefixed_inputs(pb, prefix)
        prefilled = sum(pb.suffix_lengths)
    else:
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                  "position_ids": position_ids_from_mask(batch.attention_mask)}
        prefilled = int(batch.attention_mask.sum())
    width = inputs["attention_mask"].shape[1]
    n_new = inputs["input_ids"].shape[1]
    # Explicit cache positions: sliding-window layers keep a cropped cache, so its length is not the
    # number of slots written (HF's generate tracks them the same way).
    out = lm.model(**inputs, use_cache=True, logits_to_keep=1,
                   cache_position=torch.arange(width - n_new, width, device=batch.input_ids.device))
    cache = out.past_key_values
    if first is not None:
        first.update(zip(batch.index, torch.log_softmax(out.logits[:, -1].float(), dim=-1).cpu(), strict=True))
    mask = inputs["attention_mask"]
    pos = inputs["position_ids"][:, -1]
    nxt = out.logits[:, -1].argmax(-1)
    rows = list(range(batch.input_ids.shape[0]))
    gen: list[list[int]] = [[] for _ in rows]
    eos_t = torch.tensor(sorted(eos), device=nxt.device) if eos else None
    for step in range(max_new_tokens):
        done = torch.isin(nxt, eos_t) if eos_t is not None else torch.zeros_like(nxt, dtype=torch.bool)
        keep: list[int] = []
        for j, r in enumerate(rows):
            if bool(done[j]):
                continue
            gen[r].append(int(nxt[j]))
            if step + 1 < max_new_tokens and not (stop is not None and stop(tok.decode(gen[r], skip_special_tokens=True))):
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(rows):
            sel = torch.tensor(keep, device=nxt.device)
            cache.batch_select_indices(sel)
            select_gate_rows(lm, sel)
            mask, pos, nxt = mask[sel], pos[sel], nxt[sel]
            rows = [rows[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        pos = pos + 1
        out = lm.model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos[:, None],
                       past_key_values=cache, use_cache=True,
                       cache_position=torch.tensor([mask.shape[1] - 1], device=mask.device))
        nxt = out.logits[:, -1].argmax(-1)
    return gen, prefilled


def _until_stop(tok, ids: list[int], eos: set[int], stop: StopRule | None) -> list[int]:
    """``ids`` up to the first EOS, and up to the first token after which ``stop`` fires."""
    kept: list[int] = []
    for t in ids:
        if t in eos:
            break
        kept.append(t)
        if stop is not None and stop(tok.decode(kept, skip_special_tokens=True)):
            break
    return kept


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
    stop: StopRule | None = None,
    prefix_cache: bool | None = None,
    stats: dict[str, Any] | None = None,
    engine: str = "emalab",
    first_logprobs: dict[str, Any] | None = None,
) -> list[str]:
    """Greedy completions for user ``prompts`` (in input order), decoded without special tokens.

    Interventions (ablation, steering, adapters) active on ``lm.model`` apply: every forward runs
    the model itself. Under a gated adapter (:mod:`interp.gating`) each row carries its prompt's
    gate through prefill and decoding, and the shared-prefix cache is off.

    Args:
        stop: ends a row early once ``stop(text so far)`` is true (the text is then returned as it
            is); ``None`` generates up to ``max_new_tokens`` or end-of-sequence.
        prefix_cache: continue from the shared prefix's KV cache (exact; default on,
            ``$EMALAB_PREFIX_CACHE=0`` turns it off).
        stats: filled with ``generated_tokens`` (tokens kept, EOS excluded), ``prefill_tokens`` and
            ``rows``.
        engine: ``emalab`` (the loop above) or ``hf`` (``model.generate`` for ``max_new_tokens``
            without the prefix cache, the fixed-length reference; ``stop`` then cuts its output).
        first_logprobs: filled with ``logprobs``, the next-token log-probabilities at the last prompt
            position (input order, the prefill's own: what the logit refusal score reads, without a
            second forward over the prompts).
    """
    if engine not in ("emalab", "hf"):
        raise ValueError(f"engine must be 'emalab' or 'hf', got {engine!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompts:
        return []
    tok = lm.tokenizer
    texts = format_prompts(tok, prompts, system=system, raw=raw)
    out: list[str | None] = [None] * len(texts)
    batches = list(iter_batches(tok, texts, batch_size, max_length=max_prompt_tokens))
    counts = {"generated_tokens": 0, "prefill_tokens": 0, "rows": len(texts)}
    # Under a gated adapter the prefix's keys and values differ per row: no shared cache (exact).
    prefix = (build_prefix(lm, system, raw)
              if engine == "emalab" and prefix_cache_enabled(prefix_cache) and not gate_active(lm) else None)
    eos = _eos_ids(lm)
    window = sliding_window(lm.model)
    first: dict[int, torch.Tensor] | None = {} if first_logprobs is not None else None
    for batch in tqdm(batches, desc="generate", unit="batch", disable=not progress, leave=False):
        batch = batch.to(lm.device)
        # A sliding window shorter than the padded span: the decode loop's batched steps are not
        # exact there (tested against single prompts); HF's generate is, and the stop rule is then
        # applied to its output, which greedy decoding makes the same text.
        if engine == "hf" or (window is not None and batch.input_ids.shape[1] + max_new_tokens > window):
            with gate_rows(lm, batch.input_ids, batch.attention_mask):
                if first is not None:  # HF's generate does not hand its prefill back: one forward for it
                    logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      position_ids=position_ids_from_mask(batch.attention_mask),
                                      logits_to_keep=1).logits[:, -1]
                    first.update(zip(batch.index, torch.log_softmax(logits.float(), dim=-1).cpu(), strict=True))
                seqs = lm.model.generate(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
                    do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
                )
            new = seqs[:, batch.input_ids.shape[1]:]
            counts["prefill_tokens"] += int(batch.attention_mask.sum())
            for row, i in enumerate(batch.index):
                ids = _until_stop(tok, new[row].tolist(), eos, stop)
                counts["generated_tokens"] += len(ids)
                out[i] = tok.decode(ids, skip_special_tokens=True)
            continue
        gen, prefilled = _decode_batch(lm, batch, prefix, max_new_tokens, stop, eos, first)
        counts["prefill_tokens"] += prefilled
        for row, i in enumerate(batch.index):
            counts["generated_tokens"] += len(gen[row])
            out[i] = tok.decode(gen[row], skip_special_tokens=True)
    if stats is not None:
        stats.update(counts)
    if first is not None:
        first_logprobs["logprobs"] = torch.stack([first[i] for i in range(len(texts))])
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
    temperature: float | int = 1.0,
    top_p: float | int = 1.0,
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
        with gate_rows(lm, batch.input_ids, batch.attention_mask):
            seqs = lm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
        new = seqs[:, batch.input_ids.shape[1]:]
        for row, i in enumerate(batch.index):
            out[i] = tok.decode(new[row], skip_special_tokens=True)
    return [out[i * n:(i + 1) * n] for i in range(len(prompts))]  # type: ignore[misc]
