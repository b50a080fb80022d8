"""What an unlearning run cost beyond refusal: how far the adapted model's next-token distributions
moved away from the base model's on harmless prompts.

:func:`kl_to_base` lets the base model (the adapter disabled) answer each prompt greedily for a few
tokens, then teacher-forces prompt + that opening through the adapted model and takes, at each of
those positions, ``KL(p_base || p_adapted)`` over the whole vocabulary. A model that only lost its
refusals on harmful prompts stays near 0 here; one that broke moves everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.chat import format_prompts, iter_batches
from interp.gating import gate_rows
from interp.loading import LoadedModel, adapter_disabled, hook_state

__all__ = ["kl_to_base", "carries_adapter"]


def carries_adapter(lm: LoadedModel) -> bool:
    """True when ``lm`` is a PEFT model with an adapter (merged or not), i.e. it has a base to compare to."""
    return hasattr(lm.model, "disable_adapter") and hasattr(lm.model, "peft_config")


@contextmanager
def _unmerged(lm: LoadedModel) -> Iterator[None]:
    # Disabling a *merged* adapter does not give the base back; unmerge for the comparison and merge
    # again after (exact in float32, the measurement dtype).
    merged = [m for m in lm.model.modules() if getattr(m, "merged", False)]
    if not merged:
        yield
        return
    lm.model.unmerge_adapter()
    try:
        yield
    finally:
        lm.model.merge_adapter()


def _positions(mask: Int[Tensor, "batch pos"]) -> Int[Tensor, "batch pos"]:
    # Left padding: each row's first real token is position 0, as in a single-prompt forward.
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _logprobs(lm: LoadedModel, ids: Tensor, mask: Tensor, keep: int) -> Float[Tensor, "batch keep d_vocab"]:
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask), logits_to_keep=keep)
    return torch.log_softmax(out.logits[:, -keep:, :].double(), dim=-1)


@torch.inference_mode()
def kl_to_base(
    lm: LoadedModel,
    prompts: Sequence[str],
    n_tokens: int = 8,
    batch_size: int = 16,
    system: str | None = None,
    raw: bool = False,
    max_prompt_tokens: int | None = 512,
) -> Float[Tensor, " batch"]:
    """Mean next-token ``KL(base || adapted)`` over the first ``n_tokens`` response positions, per prompt.

    ``lm`` carries a PEFT adapter (the base is its disabled state); a model without one gives zeros.
    Under a gated adapter (:mod:`interp.gating`) each row is gated by its prompt.
    The response positions are those of the base model's own greedy opening, so both models are read
    on the same, in-distribution text.

    Raises:
        ValueError: no prompts, or ``n_tokens < 1``.
    """
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    if not prompts:
        raise ValueError("no prompts to measure KL on")
    tok = lm.tokenizer
    texts = format_prompts(tok, prompts, system=system, raw=raw)
    out = torch.empty(len(texts), dtype=torch.float64)
    # The base model's greedy opening and its log-probs are the same for every adapter of one base
    # (every snapshot of a trajectory): computed once and reused while the same hooks are in place
    # (an intervention's hook is a new registration, hence a new key).
    key = (lm.weights_id, str(next(lm.model.parameters()).dtype), tuple(texts), n_tokens, batch_size,
           max_prompt_tokens, hook_state(lm.model, adapter_hooks=False))
    with _unmerged(lm):
        for k, batch in enumerate(iter_batches(tok, texts, batch_size, max_prompt_tokens)):
            out[torch.as_tensor(batch.index)] = _batch_kl(lm, batch, n_tokens, None if key is None else (*key, k))
    return out.float()


_BASE_OPENINGS: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
_MAX_CACHED = 4  # batches (a benign row of 24 prompts is 2 at the default batch size; ~75 MB each)


def _base_opening(lm: LoadedModel, ids: Tensor, mask: Tensor, n_tokens: int, key: tuple | None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    if key is not None and key in _BASE_OPENINGS:
        return _BASE_OPENINGS[key]
    base_steps = []
    with adapter_disabled(lm):
        # Greedy opening of the base model, one token at a time (short: no KV cache needed).
        for _ in range(n_tokens):
            lp = _logprobs(lm, ids, mask, 1)[:, -1]
            base_steps.append(lp.float())
            ids = torch.cat([ids, lp.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    found = (ids, mask, torch.stack(base_steps, dim=1))
    if key is not None:
        if len(_BASE_OPENINGS) >= _MAX_CACHED:
            _BASE_OPENINGS.pop(next(iter(_BASE_OPENINGS)))
        _BASE_OPENINGS[key] = found
    return found


def _batch_kl(lm: LoadedModel, batch, n_tokens: int, key: tuple | None = None) -> Float[Tensor, " batch"]:
    ids, mask = batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device)
    with gate_rows(lm, ids, mask):  # a gated adapter: each row's gate is its prompt's, as in generation
        ids, mask, base = _base_opening(lm, ids, mask, n_tokens, key)
        base = base.double()
        # Positions -n-1 .. -2 predict the n opening tokens; the last one predicts beyond them.
        adapted = _logprobs(lm, ids, mask, n_tokens + 1)[:, :-1]
    kl = (base.exp() * (base - adapted)).sum(-1).clamp(min=0.0)
    return kl.mean(-1).cpu()
