"""Select the refusal direction of a chat model (Arditi et al. 2024, "Refusal in language models is
mediated by a single direction").

Candidates are differences of means, harmful minus harmless, at each post-instruction position ×
layer. Each candidate is scored on held-out prompts:

* ``bypass_score`` — mean logit refusal score on harmful prompts with the candidate *ablated* at
  every layer (lower is better: ablation stops refusal);
* ``induce_score`` — mean refusal score on harmless prompts with the candidate *added* at its
  source layer (must exceed ``induce_threshold``: adding it induces refusal);
* ``kl`` — KL divergence of harmless next-token distributions under ablation (must stay below
  ``kl_threshold``: ablation leaves harmless behaviour alone);
* candidates in the last ``prune_layer_fraction`` of layers are excluded (too close to the
  unembedding to be a "concept").

The candidate with the lowest ``bypass_score`` among those passing the filters is the direction.
Every candidate's scores are kept and saved.

The candidates and their prompts are :mod:`probes.direction_candidates`, the selection among scored
candidates :mod:`probes.direction_selection`; this module scores them (and re-exports both).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from evals.refusal import last_token_logprobs, refusal_log_odds
from interp.adapter import n_layers
from interp.chat import format_prompts, refusal_token_ids
from interp.direction import Direction
from interp.loading import LoadedModel, state_id
from probes.direction_candidates import (
    PromptSets,
    RefusalDirectionConfig,
    candidate_directions,
    suite_prompt_sets,
)
from probes.direction_selection import (
    CandidateScore,
    NoValidCandidateError,
    RefusalDirectionResult,
    format_table,
    load_selection,
)
from probes.interventions import ablate_direction, add_activation

__all__ = [
    "RefusalDirectionConfig",
    "PromptSets",
    "CandidateScore",
    "RefusalDirectionResult",
    "NoValidCandidateError",
    "suite_prompt_sets",
    "candidate_directions",
    "select_refusal_direction",
    "load_selection",
    "format_table",
    "cached_refusal_direction",
]


_SELECTION_ONLY = ("kl_threshold", "induce_threshold")
"""Config fields that only filter stored scores; they are not part of the scoring stage's key."""


def _last_logprobs(lm: LoadedModel, prompts: Sequence[str], cfg: RefusalDirectionConfig) -> Float[Tensor, "batch d_vocab"]:
    """Next-token log-probs at the last prompt position (:func:`evals.refusal.last_token_logprobs`),
    checked finite: a candidate that breaks the model must fail loudly, not score."""
    out = last_token_logprobs(lm, prompts, cfg.batch_size, cfg.system, max_prompt_tokens=cfg.max_prompt_tokens)
    if not torch.isfinite(out).all():
        raise FloatingPointError("non-finite logits while scoring refusal-direction candidates")
    return out


def _kl(base: Tensor, new: Tensor) -> float:
    """Mean over prompts of KL(base ‖ new) of next-token distributions, in float64."""
    b, n = base.double(), new.double()
    return float((b.exp() * (b - n)).sum(-1).mean())


def _score(lm: LoadedModel, prompts: Sequence[str], cfg: RefusalDirectionConfig) -> Tensor:
    return refusal_log_odds(_last_logprobs(lm, prompts, cfg), refusal_token_ids(lm.tokenizer))


def _filter(prompts: list[str], scores: Tensor, keep_positive: bool, cap: int) -> list[str]:
    mask = scores > 0 if keep_positive else scores < 0
    return [p for p, m in zip(prompts, mask.tolist(), strict=True) if m][:cap]


def select_refusal_direction(
    lm: LoadedModel,
    cfg: RefusalDirectionConfig | None = None,
    prompts: PromptSets | None = None,
    progress: bool = True,
) -> RefusalDirectionResult:
    """Compute the candidates, score them all, and select the refusal direction.

    Args:
        prompts: the four prompt sets; default :func:`suite_prompt_sets` of ``cfg``.

    Returns:
        The result; ``direction`` is ``None`` when no candidate passes (see :meth:`RefusalDirectionResult.require`).
    """
    cfg = cfg or RefusalDirectionConfig()
    prompts = prompts or suite_prompt_sets(cfg)
    model = lm.model
    n = n_layers(model)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    h_train, b_train = list(prompts.harmful_train), list(prompts.harmless_train)
    h_val, b_val = list(prompts.harmful_val), list(prompts.harmless_val)
    if cfg.filter_train:
        h_train = _filter(h_train, _score(lm, h_train, cfg), True, cfg.n_train)
        b_train = _filter(b_train, _score(lm, b_train, cfg), False, cfg.n_train_harmless)
    if cfg.filter_val:
        h_val = _filter(h_val, _score(lm, h_val, cfg), True, cfg.n_val)
        b_val = _filter(b_val, _score(lm, b_val, cfg), False, cfg.n_val_harmless)
    else:
        h_val, b_val = h_val[:cfg.n_val], b_val[:cfg.n_val_harmless]
    for name, got in (("harmful training", h_train), ("harmless training", b_train),
                      ("harmful validation", h_val), ("harmless validation", b_val)):
        if len(got) < 2:
            raise ValueError(f"only {len(got)} {name} prompts left after filtering; the model may not refuse these "
                             "prompts at all — pass --no-filter-train / --no-filter-val or use more prompts")
    timings["filter_s"] = time.perf_counter() - t0

    cut = int(n * (1.0 - cfg.prune_layer_fraction))
    layers = sorted(set(cfg.candidate_layers if cfg.candidate_layers is not None else range(0, n, cfg.layer_step)))
    t1 = time.perf_counter()
    vecs, offsets = candidate_directions(lm, h_train, b_train, layers, cfg, progress)
    timings["candidates_s"] = time.perf_counter() - t1

    template_ids = lm.tokenizer(format_prompts(lm.tokenizer, ["x"], system=cfg.system)[0],
                                add_special_tokens=False)["input_ids"]
    refusal_ids = refusal_token_ids(lm.tokenizer)
    val_prompts = h_val + b_val
    nh = len(h_val)
    base_lp = _last_logprobs(lm, val_prompts, cfg)
    base_scores = refusal_log_odds(base_lp, refusal_ids)
    baseline = {"harmful_val": float(base_scores[:nh].mean()), "harmless_val": float(base_scores[nh:].mean()),
                "n_harmful_train": len(h_train), "n_harmless_train": len(b_train),
                "n_harmful_val": nh, "n_harmless_val": len(b_val)}

    candidates: list[CandidateScore] = []
    t2 = time.perf_counter()
    jobs = [(i, j) for i in range(len(offsets)) for j in range(len(layers))]
    for i, j in tqdm(jobs, desc="refusal candidates", unit="cand", disable=not progress):
        layer, vec = layers[j], vecs[i, j]
        norm = float(vec.double().norm())
        c = CandidateScore(offsets[i], lm.tokenizer.decode([template_ids[offsets[i]]]), layer, norm)
        candidates.append(c)
        reasons = []
        if layer >= cut:
            reasons.append("late_layer")
        if not math.isfinite(norm) or norm < 1e-6:
            c.status = "+".join(reasons + ["zero_norm"])
            continue
        if reasons and not cfg.evaluate_pruned:
            c.status = "+".join(reasons)
            continue
        d = Direction.from_vectors(vec, [layer], name="candidate")
        with ablate_direction(lm, d):
            lp = _last_logprobs(lm, val_prompts, cfg)
        with add_activation(lm, d, layer, 1.0, site=cfg.site):
            induce = refusal_log_odds(_last_logprobs(lm, b_val, cfg), refusal_ids)
        c.bypass_score = float(refusal_log_odds(lp[:nh], refusal_ids).mean())
        c.kl = _kl(base_lp[nh:], lp[nh:])
        c.induce_score = float(induce.mean())
    timings["scoring_s"] = time.perf_counter() - t2
    timings["n_scored"] = sum(c.bypass_score is not None for c in candidates)
    timings["total_s"] = time.perf_counter() - t0
    provenance = {"model": lm.name, "state": state_id(lm), "n_layers": n}
    result = RefusalDirectionResult(None, candidates, vecs, offsets, layers, baseline, timings, cfg, provenance)
    return result.reselect(cfg)


def cached_refusal_direction(
    lm: LoadedModel,
    cfg: RefusalDirectionConfig | None = None,
    results: str | Path = "results",
    force: bool = False,
    progress: bool = True,
) -> tuple[Direction | None, Path]:
    """Score the candidates once per (model state, dtype, scoring config) and reuse the scores.

    The stage lives in ``results/stages/refusal_direction/<hash>/`` (see :class:`interp.runs.Stage`).
    Its key leaves out ``kl_threshold`` and ``induce_threshold``: changing them re-applies the
    filters to the stored scores (:meth:`RefusalDirectionResult.reselect`) without a forward pass.

    Returns:
        ``(direction or None if no candidate passed, stage directory)``.
    """
    from interp.runs import Stage

    cfg = cfg or RefusalDirectionConfig()
    dtype = str(next(lm.model.parameters()).dtype)
    scoring = {k: v for k, v in cfg.to_dict().items() if k not in _SELECTION_ONLY}
    stage = Stage(Path(results), "refusal_direction",
                  {"config": scoring, "model": lm.name, "state": state_id(lm), "dtype": dtype})
    if stage.done and not force:
        result = RefusalDirectionResult.load(stage.path).reselect(cfg)
        result.save(stage.path)
        return result.direction, stage.path
    path = stage.open()
    result = select_refusal_direction(lm, cfg, progress=progress)
    result.save(path)
    stage.complete({"timings": result.timings})
    return result.direction, path
