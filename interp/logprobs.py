"""Per-token log-probabilities of a scored span under the model: the response to a prompt, or the
user message of the prompt itself, rendered through the chat template with an exact boundary.

The pieces (template prefix, scored span, template suffix) are tokenised separately and joined, as
:func:`interp.chat.format_conversations` and the unlearning collator do, so the scored tokens are
exactly the tokens of the span. One forward per batch; only the logits of the last positions that
cover the scored span are computed. This is the model side of membership inference
(:mod:`probes.membership` holds the statistics).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.chat import format_prompts
from interp.loading import LoadedModel

__all__ = ["TokenLogprobs", "token_logprobs", "gather_logprobs", "span_ids"]


def gather_logprobs(logits: Float[Tensor, "*rows d_vocab"], target: Int[Tensor, "*rows"]) -> Float[Tensor, "*rows"]:
    """``log_softmax(logits)[target]`` along the vocabulary, in float32 via gather − logsumexp (the
    full log-softmax is never materialised). The one log-prob kernel of scoring and of the losses."""
    pred = logits.float()
    return pred.gather(-1, target.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(pred, dim=-1)


@dataclass
class TokenLogprobs:
    """Log-probabilities of each scored span, left-aligned and right-padded.

    Attributes:
        logprobs: ``logprobs[i, t]`` is ``log p(token t of span i | everything before it)``; 0 on padding.
        mask: True on real span tokens.
        texts: the scored spans (responses, or user messages), for text-based statistics such as zlib.
        scored: ``"response"`` or ``"prompt"``.
    """

    logprobs: Float[Tensor, "batch pos"]
    mask: Bool[Tensor, "batch pos"]
    texts: list[str]
    scored: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def n_tokens(self) -> Tensor:
        return self.mask.sum(-1)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def span_ids(
    tokenizer, prompt: str, response: str | None = None, system: str | None = None, raw: bool = False,
    max_prompt_tokens: int | None = 512,
) -> tuple[list[int], list[int], list[int]]:
    """``(before, span, after)`` token ids whose concatenation is the sequence to forward.

    With ``response`` the span is the response after the rendered prompt (``after`` is empty); without
    it the span is the user message inside the rendered prompt, ``after`` the template's closing tokens.

    Raises:
        ValueError: the template does not contain the user message verbatim, or a span is empty.
    """
    rendered = format_prompts(tokenizer, [prompt], system=system, raw=raw)[0]
    if response is not None:
        before, span, after = _ids(tokenizer, rendered), _ids(tokenizer, response), []
        if max_prompt_tokens is not None:
            before = before[-max_prompt_tokens:]
    else:
        k = rendered.rfind(prompt)
        if k < 0 or not prompt:
            raise ValueError("the chat template does not contain the user message verbatim; score responses "
                             "instead, or pass raw=True")
        before, span = _ids(tokenizer, rendered[:k]), _ids(tokenizer, prompt)
        after = _ids(tokenizer, rendered[k + len(prompt):])
    if not span:
        raise ValueError("a scored span tokenised to zero tokens")
    if not before:
        # Nothing would predict the span's first token; a raw prompt gets the tokenizer's BOS/EOS as context.
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise ValueError("a span at the start of the sequence needs a BOS/EOS token to be predicted from")
        before = [int(bos)]
    return before, span, after


@torch.inference_mode()
def token_logprobs(
    lm: LoadedModel,
    prompts: Sequence[str],
    responses: Sequence[str] | None = None,
    batch_size: int = 8,
    system: str | None = None,
    raw: bool = False,
    max_prompt_tokens: int | None = 512,
    progress: bool = False,
) -> TokenLogprobs:
    """Per-token log-probs of each response (or, with ``responses=None``, of each user message).

    Rows come back in input order. Batches are length-sorted and left-padded; position ids start
    at each row's first real token, so a row's log-probs do not depend on its batch-mates.
    """
    if responses is not None and len(responses) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("no prompts to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [span_ids(tok, p, None if responses is None else responses[i], system, raw, max_prompt_tokens)
            for i, p in enumerate(prompts)]
    width_span = max(len(s) for _, s, _ in rows)
    out = torch.zeros(len(rows), width_span, dtype=torch.float32)
    mask = torch.zeros(len(rows), width_span, dtype=torch.bool)
    order = sorted(range(len(rows)), key=lambda i: (sum(map(len, rows[i])), i))
    device = lm.device
    chunks = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    for idx in tqdm(chunks, desc="token log-probs", unit="batch", disable=not progress, leave=False):
        seqs = [rows[i][0] + rows[i][1] + rows[i][2] for i in idx]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(idx), width), int(pad), dtype=torch.long)
        attn = torch.zeros((len(idx), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s)
            attn[r, width - len(s):] = 1
        # Logits at position t predict token t+1: keep just enough trailing positions to cover every span.
        keep = max(len(rows[i][1]) + len(rows[i][2]) for i in idx) + 1
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        logits = lm.model(input_ids=ids.to(device), attention_mask=attn.to(device), position_ids=pos.to(device),
                          logits_to_keep=keep).logits.float().cpu()
        offset = width - logits.shape[1]
        for r, i in enumerate(idx):
            n_span, n_after = len(rows[i][1]), len(rows[i][2])
            first = width - n_after - n_span  # absolute position of the span's first token
            pred = logits[r, first - 1 - offset: first - 1 - offset + n_span]
            target = ids[r, first: first + n_span]
            out[i, :n_span] = gather_logprobs(pred, target)
            mask[i, :n_span] = True
    if not torch.isfinite(out[mask]).all():
        raise FloatingPointError("non-finite token log-probs; the weights or adapter are broken")
    texts = list(responses) if responses is not None else list(prompts)
    return TokenLogprobs(out, mask, texts, "prompt" if responses is None else "response")
