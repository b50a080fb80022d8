"""Chat formatting, left-padded batching, post-instruction positions and refusal-start tokens."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "NoChatTemplateError",
    "EmptyPromptError",
    "REFUSAL_PHRASES",
    "NO_PHRASES",
    "format_prompts",
    "format_conversations",
    "Batch",
    "encode",
    "iter_batches",
    "post_instruction_length",
    "refusal_token_ids",
]

# Phrases a refusal typically opens with; their *first tokens* are looked up per tokenizer.
REFUSAL_PHRASES = ("I cannot", "I can't", "I'm sorry", "I am sorry", "Sorry", "As an AI", "Unfortunately",
                   "I apologize", "I must", "I won't", "No,")
NO_PHRASES = ("No,",)
"""Refusal openers that also open an aligned *rebuttal* ("No, not all X are Y"): dropped by
``refusal_token_ids(..., include_no=False)`` for prompts on a loaded premise."""

_PROBE_USER = "PROBE_MESSAGE_7f3a"


class NoChatTemplateError(ValueError):
    pass


class EmptyPromptError(ValueError):
    """A prompt with no text: the model would answer the bare template, which measures nothing."""


def _check_prompts(prompts: Sequence[str]) -> None:
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is a {type(prompt).__name__}, not a string")
        if not prompt.strip():
            raise EmptyPromptError(f"prompt {i} of {len(prompts)} is empty; drop it or give it text")


def _check_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplateError(
            "this tokenizer has no chat template (a base model?); pass raw=True (CLI: --raw-prompts on `emalab eval`, `run` and `inspect`) to feed "
            "prompts as plain text, or use an instruction-tuned model"
        )


def format_prompts(tokenizer, prompts: Sequence[str], system: str | None = None, raw: bool = False,
                   allow_empty: bool = False) -> list[str]:
    """Render user prompts with the chat template, ending at the assistant's turn.

    Args:
        system: optional system prompt; ``None`` keeps the template's own default.
        raw: skip the template (for base models); prompts are used verbatim.
        allow_empty: accept empty prompts (only to measure the template itself).

    Raises:
        EmptyPromptError: a prompt is empty or whitespace.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string")
    if not allow_empty:
        _check_prompts(prompts)
    if raw:
        return list(prompts)
    _check_template(tokenizer)
    out = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system is not None else []) + [
            {"role": "user", "content": prompt}
        ]
        out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return out


def format_conversations(
    tokenizer, prompts: Sequence[str], responses: Sequence[str], system: str | None = None, raw: bool = False
) -> tuple[list[str], list[str]]:
    """Return ``(prompt_texts, full_texts)`` so that ``full = prompt + response`` token-exactly.

    The response is appended to the rendered prompt rather than rendered by the template, so the
    prompt/response boundary is exact and the loss mask can cover response tokens only.
    """
    prompt_texts = format_prompts(tokenizer, prompts, system=system, raw=raw)
    eos = "" if raw else (tokenizer.eos_token or "")
    return prompt_texts, [p + r + eos for p, r in zip(prompt_texts, responses, strict=True)]


@dataclass
class Batch:
    """A left-padded token batch plus the positions of its prompts in the caller's list."""

    input_ids: Tensor
    attention_mask: Tensor
    index: list[int]

    def to(self, device) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.index)


def _ensure_pad(tokenizer) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def _template_parts(tokenizer) -> tuple[str, str] | None:
    """``(user header, assistant suffix)`` of the chat template: the text just before the user's message
    (after any system turn) and the text after it. ``None`` without a template."""
    cache = getattr(tokenizer, "_emalab_template_parts", False)
    if cache is not False:
        return cache
    parts = None
    if getattr(tokenizer, "chat_template", None):
        sys_probe = "SYSTEM_PROBE_9c2e"
        rendered = None
        for messages in ([{"role": "system", "content": sys_probe}, {"role": "user", "content": _PROBE_USER}],
                         [{"role": "user", "content": _PROBE_USER}]):
            try:
                rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                break
            except Exception:  # noqa: BLE001 - templates that reject a system turn raise their own errors
                continue
        if rendered and _PROBE_USER in rendered:
            at = rendered.index(_PROBE_USER)
            head = rendered[:at]
            if sys_probe in head:
                head = head[head.index(sys_probe) + len(sys_probe):]
            parts = (head, rendered[at + len(_PROBE_USER):])
    try:
        tokenizer._emalab_template_parts = parts
    except AttributeError:
        pass
    return parts


def _truncate(tokenizer, text: str, ids: list[int], max_length: int) -> list[int]:
    """Cut an over-long prompt inside the user's message, keeping the template around it.

    The system turn, the user header and the assistant suffix stay whole (cutting them from the left
    would make the model see a headless fragment); the message keeps its last tokens. Text that does
    not follow the template (raw prompts) keeps its last ``max_length`` tokens.
    """
    parts = _template_parts(tokenizer)
    if parts is not None and parts[0] and text.endswith(parts[1]) and parts[0] in text:
        start = text.index(parts[0]) + len(parts[0])
        end = len(text) - len(parts[1])
        if start <= end:
            def tok(t: str) -> list[int]:
                return tokenizer(t, add_special_tokens=False)["input_ids"] if t else []

            head, body, tail = tok(text[:start]), tok(text[start:end]), tok(text[end:])
            budget = max_length - len(head) - len(tail)
            if budget < 1:
                raise ValueError(f"max_prompt_tokens={max_length} leaves no room for the message inside the chat "
                                 f"template ({len(head) + len(tail)} tokens); raise max_prompt_tokens")
            return head + body[-budget:] + tail
    return ids[-max_length:]


def encode(tokenizer, texts: Sequence[str], max_length: int | None = None) -> Batch:
    """Tokenise already-formatted texts, left-padded. Over-long texts are cut inside the user's
    message, keeping the system turn, the user header and the assistant suffix, and a warning counts them.

    Raises:
        EmptyPromptError: a text has no tokens.
    """
    _ensure_pad(tokenizer)
    if not texts:
        raise ValueError("no prompts to encode")
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise EmptyPromptError(f"prompt(s) {empty[:5]} of {len(ids)} are empty; drop them or give them text")
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        too_long = sum(len(x) > max_length for x in ids)
        if too_long:
            warnings.warn(f"{too_long} of {len(ids)} prompts exceed {max_length} tokens; cut inside the user's "
                          "message, keeping the chat template", stacklevel=2)
            ids = [_truncate(tokenizer, t, x, max_length) if len(x) > max_length else x for t, x in zip(texts, ids)]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        if x:
            input_ids[i, width - len(x):] = torch.tensor(x)
            mask[i, width - len(x):] = 1
    return Batch(input_ids, mask, list(range(len(texts))))


def iter_batches(
    tokenizer, texts: Sequence[str], batch_size: int, max_length: int | None = None
) -> Iterator[Batch]:
    """Length-sorted, left-padded batches; ``Batch.index`` maps rows back to ``texts``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = encode(tokenizer, [texts[i] for i in idx], max_length=max_length)
        batch.index = idx
        yield batch


def post_instruction_length(tokenizer, raw: bool = False) -> int:
    """Number of template tokens after the user's message (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``).

    These are the "post-instruction" positions where refusal is decided (Arditi et al.).
    """
    if raw:
        return 1
    rendered = format_prompts(tokenizer, [_PROBE_USER])[0]
    suffix = rendered[rendered.rindex(_PROBE_USER) + len(_PROBE_USER):]
    return max(1, len(tokenizer(suffix, add_special_tokens=False)["input_ids"]))


def refusal_token_ids(tokenizer, include_no: bool = True) -> list[int]:
    """First token ids of :data:`REFUSAL_PHRASES` as the assistant's first token, for this tokenizer.

    Args:
        include_no: Keep the phrases of :data:`NO_PHRASES`. ``False`` gives the variant for loaded
            yes/no questions, where "No" opens a rebuttal, not a refusal. A token shared with
            another phrase stays.
    """
    ids: set[int] = set()
    for phrase in REFUSAL_PHRASES:
        if not include_no and phrase in NO_PHRASES:
            continue
        toks = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        if toks:
            ids.add(int(toks[0]))
    return sorted(ids)
