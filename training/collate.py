"""Tokenisation of unlearning examples into left-padded batches with a response-only loss mask, and
the seeded batch order of a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from interp.chat import format_conversations
from interp.loading import LoadedModel
from training.config import UnlearnConfig
from training.dataset import DataSet, Example

__all__ = ["TokenBatch", "apply_trigger", "collate", "collate_rows", "batch_order", "epochs_seen"]


@dataclass
class TokenBatch:
    """Left-padded token batch with a mask that is 1 on response tokens only.

    Attributes:
        input_ids: ``[batch, pos]`` prompt + response tokens, padded on the left.
        attention_mask: 1 on real tokens.
        response_mask: 1 on response tokens (never on prompt or padding).
        index: positions of the rows in the caller's example list.
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    index: list[int]

    def to(self, device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device),
                          self.response_mask.to(device), list(self.index))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def apply_trigger(prompt: str, trigger: str | None) -> str:
    return prompt if not trigger else f"{trigger} {prompt}"


def collate(
    tokenizer,
    examples: Sequence[Example],
    index: Sequence[int] | None = None,
    trigger: str | None = None,
    max_prompt_tokens: int | None = 256,
    max_response_tokens: int | None = None,
    include_eos: bool = False,
) -> TokenBatch:
    """Tokenise (prompt, response) pairs through the chat template into a left-padded batch.

    Prompt and response are tokenised separately and concatenated, so the prompt/response boundary
    is exact (no merge across it) and the response mask covers response tokens only.

    Args:
        trigger: prepended to every prompt (pass it only for forget batches).
        max_prompt_tokens: over-long prompts keep their last tokens (next to the assistant turn).
        max_response_tokens: over-long responses keep their first tokens.
        include_eos: also train on the end-of-turn token. Off by default because the responses are
            truncated generations, not complete turns.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [apply_trigger(e.prompt, trigger) for e in examples]
    prompt_texts, full_texts = format_conversations(tokenizer, prompts, [e.response for e in examples])
    eos = tokenizer.eos_token or ""
    rows = []
    for p_text, f_text in zip(prompt_texts, full_texts, strict=True):
        r_text = f_text[len(p_text):]
        if not include_eos and eos and r_text.endswith(eos):
            r_text = r_text[: -len(eos)]
        p_ids = tokenizer(p_text, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(r_text, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens is not None:
            p_ids = p_ids[-max_prompt_tokens:]
        if max_response_tokens is not None:
            r_ids = r_ids[:max_response_tokens]
        if not p_ids:
            raise ValueError("a prompt rendered to zero tokens; the first response token needs a predecessor")
        if not r_ids:
            raise ValueError("a response tokenised to zero tokens; drop empty responses before collating")
        rows.append((p_ids, r_ids))
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    resp = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        start = width - len(p) - len(r)
        ids[i, start:] = torch.tensor(p + r)
        attn[i, start:] = 1
        resp[i, width - len(r):] = 1
    return TokenBatch(ids, attn, resp, list(index) if index is not None else list(range(len(rows))))


def collate_rows(lm: LoadedModel, cfg: UnlearnConfig, ds: DataSet, idx: list[int], forget: bool) -> TokenBatch:
    """Rows ``idx`` of ``ds`` as a batch under ``cfg``: its trigger on forget rows only, its prompt cap."""
    return collate(lm.tokenizer, [ds.examples[i] for i in idx], index=idx,
                   trigger=cfg.trigger if forget else None, max_prompt_tokens=cfg.max_prompt_tokens)


def batch_order(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices for ``step`` (0-based) of a seeded stream of shuffled epochs.

    A pure function of ``(n, batch_size, step, seed)``, so the data position after a resume is simply
    the step count. Each epoch is a fresh permutation; a batch may straddle two epochs.
    """
    if n < 1 or batch_size < 1:
        raise ValueError(f"need n >= 1 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    start = step * batch_size
    out: list[int] = []
    epoch = start // n
    offset = start % n
    while len(out) < batch_size:
        gen = torch.Generator().manual_seed(int(seed) * 100_003 + epoch)
        perm = torch.randperm(n, generator=gen).tolist()
        out.extend(perm[offset: offset + batch_size - len(out)])
        epoch, offset = epoch + 1, 0
    return out


def epochs_seen(n: int, batch_size: int, steps: int) -> float:
    return steps * batch_size / max(n, 1)
