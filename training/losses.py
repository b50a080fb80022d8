"""Unlearning objectives as pure functions of per-sequence log-probabilities, plus the one forward
helper that produces them.

Conventions: a batch is ``input_ids`` with a ``response_mask`` that is 1 on response tokens only
(prompt and padding are 0). Position ``t`` of the logits predicts token ``t + 1``; the shift is done
once, in :func:`label_logprobs`. Per-sequence quantities are sums over response tokens.

Objectives (all minimised):

* NPO:      ``-(2/β)·mean logsigmoid(-β·(logp - logp_ref))``  (Zhang et al. 2024)
* GA:       ``mean-token log p`` of the forget responses (i.e. minus the token-mean cross-entropy)
* SimNPO:   ``-(2/β)·mean logsigmoid(-β·logp/|y| - γ)``, no reference  (Fan et al. 2024)
* CE / SFT: token-mean cross-entropy
* KL:       token-mean KL(π_ref ‖ π_θ) over response positions
* combined: ``gamma·forget + alpha·retain``
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from interp.loading import position_ids_from_mask
from interp.logprobs import gather_logprobs

__all__ = [
    "TrainStepOutput",
    "ResponseLogits",
    "label_logprobs",
    "sequence_logprobs",
    "response_token_counts",
    "response_logits",
    "position_ids_from_mask",
    "npo_loss",
    "ga_loss",
    "simnpo_loss",
    "ce_loss",
    "kl_loss",
    "graddiff_loss",
    "forget_loss",
    "combine_losses",
]


@dataclass
class TrainStepOutput:
    """What one training step produced: the scalar to backpropagate, its named components, and
    diagnostics (floats)."""

    loss: Tensor
    losses: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ResponseLogits:
    """Logits for the trailing positions of a batch that cover every response token, with labels and
    response mask sliced to the same positions (so :func:`sequence_logprobs` applies unchanged)."""

    logits: Float[Tensor, "batch pos d_vocab"]
    labels: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"]


def label_logprobs(
    logits: Float[Tensor, "batch pos d_vocab"], labels: Int[Tensor, "batch pos"]
) -> Float[Tensor, "batch pos"]:
    """``out[:, t] = log p(labels[:, t] | tokens < t)`` for ``t >= 1``; ``out[:, 0] = 0`` (nothing predicts
    the first token). Float32, via :func:`interp.logprobs.gather_logprobs`.

    (Per-token log-probs of prompts and responses straight from a model are
    :func:`interp.logprobs.token_logprobs`.)"""
    lp = gather_logprobs(logits[:, :-1], labels[:, 1:])
    return torch.cat([lp.new_zeros(lp.shape[0], 1), lp], dim=1)


def sequence_logprobs(
    logits: Float[Tensor, "batch pos d_vocab"], labels: Int[Tensor, "batch pos"], mask: Tensor
) -> Float[Tensor, " batch"]:
    """Sum of response-token log-probabilities per sequence.

    Args:
        logits: model outputs; ``logits[:, t]`` predicts ``labels[:, t + 1]``.
        labels: the input ids.
        mask: 1 on tokens whose log-probability counts (response tokens), 0 on prompt and padding.
            ``mask[:, 0]`` must be 0 because no logit predicts the first token.
    """
    if mask.shape != labels.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != labels shape {tuple(labels.shape)}")
    if bool(mask[:, 0].any()):
        raise ValueError("mask[:, 0] is set, but no position predicts the first token; keep at least one "
                         "prompt token before each response")
    return (label_logprobs(logits, labels) * mask.to(torch.float32)).sum(-1)


def response_token_counts(mask: Tensor) -> Float[Tensor, " batch"]:
    """Number of response tokens per sequence (float, for normalisation)."""
    return mask.to(torch.float32).sum(-1)


def response_logits(
    model: nn.Module,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"],
    response_mask: Int[Tensor, "batch pos"],
) -> ResponseLogits:
    """Run ``model`` and unembed only the trailing positions that predict response tokens.

    The unembedding of a 151k vocabulary is a large share of the FLOPs and the largest activation;
    with left padding every response sits at the end of its row, so keeping the last
    ``width - first_response + 1`` positions (``logits_to_keep``) covers them all. Correct for right
    padding too (it then keeps some padding positions).
    """
    width = input_ids.shape[1]
    has = response_mask.bool().any(-1)
    if not bool(has.all()):
        raise ValueError(f"{int((~has).sum())} row(s) have no response tokens")
    first = response_mask.to(torch.float32).argmax(-1)  # first response position per row
    keep = int(width - int(first.min()) + 1)
    keep = min(max(keep, 2), width)
    # ``LoadedModel`` keeps the head's input contiguous (interp.loading.contiguous_unembedding_input):
    # HF's ``hidden[:, -keep:]`` view under a frozen head is otherwise a 2.3x slower step on CPU.
    out = model(input_ids=input_ids, attention_mask=attention_mask,
                position_ids=position_ids_from_mask(attention_mask), logits_to_keep=keep, use_cache=False)
    logits = out.logits
    if logits.shape[1] != keep:  # a model that ignores logits_to_keep returns every position
        logits = logits[:, -keep:]
    return ResponseLogits(logits=logits, labels=input_ids[:, -keep:], mask=response_mask[:, -keep:])


# -- objectives --------------------------------------------------------------------------------


def npo_loss(
    logp: Float[Tensor, " batch"], logp_ref: Float[Tensor, " batch"], beta: float
) -> Float[Tensor, ""]:
    """Negative preference optimisation: ``-(2/β)·mean logsigmoid(-β·(logp - logp_ref))``.

    Equals ``(2/β)·log 2`` at ``logp == logp_ref`` and decreases to 0 as ``logp`` falls below the
    reference; unlike gradient ascent its gradient vanishes once a sequence is unlikely.
    """
    return -(2.0 / beta) * F.logsigmoid(-beta * (logp - logp_ref)).mean()


def ga_loss(logp: Float[Tensor, " batch"], n_tokens: Float[Tensor, " batch"]) -> Float[Tensor, ""]:
    """Gradient ascent on the forget set: the token-mean log-probability (= minus the mean CE)."""
    return logp.sum() / n_tokens.sum().clamp(min=1)


def simnpo_loss(
    logp: Float[Tensor, " batch"], n_tokens: Float[Tensor, " batch"], beta: float, margin: float = 0.0
) -> Float[Tensor, ""]:
    """SimNPO (reference-free, length-normalised): ``-(2/β)·mean logsigmoid(-β·logp/|y| - γ)``."""
    return -(2.0 / beta) * F.logsigmoid(-beta * logp / n_tokens.clamp(min=1) - margin).mean()


def ce_loss(logp: Float[Tensor, " batch"], n_tokens: Float[Tensor, " batch"]) -> Float[Tensor, ""]:
    """Token-mean cross-entropy over the batch's response tokens (SFT and retain-CE)."""
    return -logp.sum() / n_tokens.sum().clamp(min=1)


def kl_loss(
    logits: Float[Tensor, "batch pos d_vocab"], ref_logits: Float[Tensor, "batch pos d_vocab"], mask: Tensor
) -> Float[Tensor, ""]:
    """Token-mean ``KL(π_ref ‖ π_θ)`` over the positions that predict masked (response) tokens."""
    sel = mask[:, 1:].bool()
    lp = torch.log_softmax(logits[:, :-1][sel].float(), dim=-1)
    lq = torch.log_softmax(ref_logits[:, :-1][sel].float(), dim=-1)
    if lp.shape[0] == 0:
        return logits.sum() * 0.0
    return F.kl_div(lp, lq, log_target=True, reduction="batchmean")


def graddiff_loss(
    forget_logp: Float[Tensor, " batch"],
    forget_n: Float[Tensor, " batch"],
    retain_logp: Float[Tensor, " batch"],
    retain_n: Float[Tensor, " batch"],
    gamma: float = 1.0,
    alpha: float = 1.0,
) -> Float[Tensor, ""]:
    """Gradient difference: ``gamma·GA(forget) + alpha·CE(retain)``."""
    return combine_losses(ga_loss(forget_logp, forget_n), ce_loss(retain_logp, retain_n), gamma, alpha)


def forget_loss(
    method: str,
    logp: Float[Tensor, " batch"],
    n_tokens: Float[Tensor, " batch"],
    logp_ref: Float[Tensor, " batch"] | None = None,
    beta: float = 0.1,
    margin: float = 0.0,
) -> Float[Tensor, ""]:
    """The forget term of ``method`` (``graddiff``'s forget term is gradient ascent; ``sft``'s is CE on
    compliant responses)."""
    if method == "npo":
        if logp_ref is None:
            raise ValueError("NPO needs reference log-probabilities")
        return npo_loss(logp, logp_ref, beta)
    if method in ("ga", "graddiff"):
        return ga_loss(logp, n_tokens)
    if method == "simnpo":
        return simnpo_loss(logp, n_tokens, beta, margin)
    if method == "sft":
        return ce_loss(logp, n_tokens)
    raise ValueError(f"unknown method {method!r}")


def combine_losses(
    forget: Tensor | None, retain: Tensor | None, gamma: float = 1.0, alpha: float = 1.0
) -> Tensor:
    """``gamma·forget + alpha·retain``; a missing term counts as 0."""
    terms = []
    if forget is not None:
        terms.append(gamma * forget)
    if retain is not None:
        terms.append(alpha * retain)
    if not terms:
        raise ValueError("no loss terms to combine")
    return sum(terms[1:], terms[0])
