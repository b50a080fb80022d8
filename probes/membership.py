"""Membership-inference statistics on per-token log-probabilities: how familiar a text is to a model.

Pure functions of ``(logprobs, mask)`` as produced by :func:`interp.logprobs.token_logprobs`:

* :func:`loss` — mean negative log-likelihood per token (the LOSS attack, Yeom et al. 2018);
  **lower = more familiar**.
* :func:`zlib_ratio` — mean NLL divided by the zlib-compressed length of the text in bytes (Carlini
  et al. 2021), which discounts texts that are simply repetitive; **lower = more familiar**.
* :func:`min_k_percent` — mean log-prob of the ``k`` fraction of least likely tokens (Shi et al.
  2024, Min-K% Prob); **higher = more familiar** (the paper's orientation).

:func:`membership_scores` bundles the three per text; :func:`prompt_response_scores` scores a
model on prompts alone, on responses given their prompts and on the difference (the three
:data:`FORMS`); :func:`relative_to` subtracts a reference set's means (e.g. benign prompts), the base-model-adjusted variant that removes what is common
to every prompt under the template. Statistics are computed in float64.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

__all__ = [
    "STATISTICS",
    "FORMS",
    "HIGHER_IS_FAMILIAR",
    "MembershipScores",
    "loss",
    "zlib_bytes",
    "zlib_ratio",
    "min_k_percent",
    "membership_scores",
    "prompt_response_scores",
    "form_means",
    "relative_to",
]

STATISTICS = ("loss", "zlib", "min_k")
FORMS = ("prompt", "response", "response_minus_prompt")
"""What is scored: the user message alone, the response given it, and response minus prompt per text."""
HIGHER_IS_FAMILIAR = {"loss": False, "zlib": False, "min_k": True}
"""Orientation of each statistic: whether a larger value means the model finds the text more familiar."""


def _check(logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    if logprobs.shape != mask.shape or logprobs.ndim != 2:
        raise ValueError(f"logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} must both be (batch, pos)")
    m = mask.bool()
    empty = (~m.any(-1)).nonzero()[:, 0].tolist()
    if empty:
        raise ValueError(f"row(s) {empty} have no scored tokens")
    lp = logprobs.double()
    if not torch.isfinite(lp[m]).all():
        raise FloatingPointError("non-finite log-probs on scored tokens")
    if (lp[m] > 1e-6).any():
        raise ValueError("log-probabilities must be <= 0")
    return lp, m


def loss(logprobs: Float[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
    """Mean negative log-likelihood (nats per token) of each row's scored tokens."""
    lp, m = _check(logprobs, mask)
    return -(lp * m).sum(-1) / m.sum(-1)


def zlib_bytes(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text (at least 1)."""
    return max(1, len(zlib.compress(text.encode("utf-8"))))


def zlib_ratio(
    logprobs: Float[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"], texts: Sequence[str]
) -> Float[Tensor, " batch"]:
    """Mean NLL divided by the zlib-compressed length (bytes) of each row's text."""
    if len(texts) != logprobs.shape[0]:
        raise ValueError(f"{len(texts)} texts for {logprobs.shape[0]} rows")
    sizes = torch.tensor([zlib_bytes(t) for t in texts], dtype=torch.float64)
    return loss(logprobs, mask) / sizes


def min_k_percent(
    logprobs: Float[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"], k: float = 0.2
) -> Float[Tensor, " batch"]:
    """Mean log-prob of the ``max(1, floor(k·n))`` least likely scored tokens of each row."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    lp, m = _check(logprobs, mask)
    n = m.sum(-1)
    count = torch.clamp((n.double() * k).floor().long(), min=1)
    ordered = torch.where(m, lp, torch.full_like(lp, math.inf)).sort(-1).values  # padding sorts last
    take = torch.arange(lp.shape[1])[None] < count[:, None]
    return (torch.where(take, ordered, torch.zeros_like(ordered))).sum(-1) / count.double()


@dataclass
class MembershipScores:
    """The three statistics per text (float64), plus token counts."""

    loss: Float[Tensor, " batch"]
    zlib: Float[Tensor, " batch"]
    min_k: Float[Tensor, " batch"]
    n_tokens: Tensor
    k: float = 0.2

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    def get(self, name: str) -> Tensor:
        if name not in STATISTICS:
            raise KeyError(f"unknown statistic {name!r}; statistics: {', '.join(STATISTICS)}")
        return getattr(self, name)

    def means(self) -> dict[str, float]:
        return {s: float(self.get(s).mean()) for s in STATISTICS}

    def to_dict(self) -> dict:
        return {**{s: self.get(s).tolist() for s in STATISTICS}, "n_tokens": self.n_tokens.tolist(), "k": self.k}


def membership_scores(
    logprobs: Float[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"], texts: Sequence[str], k: float = 0.2
) -> MembershipScores:
    """LOSS, zlib ratio and Min-K% of every row."""
    return MembershipScores(loss(logprobs, mask), zlib_ratio(logprobs, mask, texts), min_k_percent(logprobs, mask, k),
                            mask.bool().sum(-1), k)


def prompt_response_scores(lm, prompts: Sequence[str], responses: Sequence[str], k: float = 0.2,
                           batch_size: int = 16) -> dict[str, dict[str, list[float]]]:
    """Per-text statistics of each :data:`FORMS` entry: ``{form: {statistic: [value per text]}}``.

    ``prompt`` scores the user messages alone, ``response`` each response given its prompt (under the
    chat template, via :func:`interp.logprobs.token_logprobs`), ``response_minus_prompt`` their
    per-text difference (the response's familiarity beyond the request's).
    """
    from interp.logprobs import token_logprobs

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
    tp = token_logprobs(lm, list(prompts), batch_size=batch_size)
    tr = token_logprobs(lm, list(prompts), list(responses), batch_size=batch_size)
    p, r = (membership_scores(t.logprobs, t.mask, t.texts, k) for t in (tp, tr))
    return {"prompt": {s: p.get(s).tolist() for s in STATISTICS}, "response": {s: r.get(s).tolist() for s in STATISTICS},
            "response_minus_prompt": {s: (r.get(s) - p.get(s)).tolist() for s in STATISTICS}}


def form_means(scores: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, dict[str, float]]:
    """Mean of every statistic of every form in a :func:`prompt_response_scores` result."""
    return {form: {s: float(sum(scores[form][s]) / len(scores[form][s])) for s in STATISTICS} for form in FORMS}


def relative_to(scores: MembershipScores | Mapping[str, float], reference: MembershipScores | Mapping[str, float]
                ) -> dict[str, float]:
    """Each statistic's mean minus the reference set's mean (e.g. a domain relative to benign prompts)."""
    a = scores.means() if isinstance(scores, MembershipScores) else dict(scores)
    b = reference.means() if isinstance(reference, MembershipScores) else dict(reference)
    return {s: a[s] - b[s] for s in STATISTICS}
