"""The model's own responses to suite prompts, generated once and judged every time: the machinery the
forget, retain and compliance builders share.

Generations are cached as JSONL under ``<cache_root>/unlearn_data/`` keyed on the model state, the
prompt ids and the generation settings, so reruns skip generation; the judge is re-run every time
(it is cheap and may change). Generated text never goes to git and is never printed.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from evals.judge import Judge, get_judge
from evals.suite import EmptySplitError, SuitePrompt, check_domain, load_prompts
from interp.generate import generate
from interp.io import read_jsonl, write_jsonl
from interp.loading import LoadedModel, state_id
from interp.registry import cache_root
from training.dataset import DataSet, EmptyDataError, Example

__all__ = [
    "REFUSAL",
    "COMPLIANCE",
    "JudgeLike",
    "resolve_judge",
    "judge_labels",
    "data_cache_dir",
    "generate_cached",
    "interleave",
    "keep_judged",
    "set_manifest",
    "empty_set_error",
    "suite_candidates",
    "checked_domains",
    "judged_unlearn_set",
]

REFUSAL, COMPLIANCE = "refusal", "compliance"

JudgeLike = Judge | str | Callable[[list[str], list[str]], Sequence[Any]]
"""A :class:`evals.judge.Judge`, a judge name for :func:`evals.judge.get_judge`, or a plain callable
``(prompts, responses) -> labels`` (``Judgement``-like items or label strings)."""


# -- judge ------------------------------------------------------------------------------------


def resolve_judge(judge: JudgeLike | None, lm: LoadedModel | None = None) -> Judge | Callable:
    """A judge object or callable as given, or ``evals.judge.get_judge(name, lm)`` for a string (a
    ``model`` judge then reads with ``lm`` instead of loading a second model)."""
    if isinstance(judge, str):
        return get_judge(judge, lm=lm)
    if judge is None:
        raise ValueError("a judge is required to filter generated responses")
    return judge


def judge_labels(
    judge: JudgeLike, prompts: Sequence[str], responses: Sequence[str], lm: LoadedModel | None = None
) -> list[tuple[str, str]]:
    """``(label, reason)`` per response from ``judge``: an object with ``.judge(prompts, responses)`` or
    a callable; its items may be ``Judgement``-like (``.label``, ``.reason``) or plain label strings."""
    if not prompts:
        return []
    judge = resolve_judge(judge, lm)
    fn = judge.judge if hasattr(judge, "judge") else judge
    if not callable(fn):
        raise TypeError(f"judge {judge!r} is neither callable nor has a .judge method")
    raw = list(fn(list(prompts), list(responses)))
    if len(raw) != len(prompts):
        raise ValueError(f"judge returned {len(raw)} judgements for {len(prompts)} responses")
    out = []
    for item in raw:
        if isinstance(item, str):
            out.append((item, ""))
        else:
            out.append((str(item.label), str(getattr(item, "reason", "") or "")))
    return out


# -- generation cache --------------------------------------------------------------------------


def data_cache_dir() -> Path:
    """Where generated responses are cached (``<cache_root>/unlearn_data``)."""
    return cache_root() / "unlearn_data"


def _cache_key(lm: LoadedModel, prompts: Sequence[SuitePrompt], gen: dict[str, Any]) -> str:
    dtype = str(next(lm.model.parameters()).dtype)  # bf16 and fp32 greedy decodes can differ
    blob = json.dumps({"state": state_id(lm), "dtype": dtype, "ids": [p.id for p in prompts], "gen": gen},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def generate_cached(
    lm: LoadedModel,
    prompts: Sequence[SuitePrompt],
    gen: dict[str, Any],
    cache_dir: Path | None,
    batch_size: int,
    progress: bool,
    context: Callable[[], AbstractContextManager] | None = None,
) -> tuple[list[str], bool]:
    """The model's greedy responses to ``prompts`` (cached). Returns ``(responses, from_cache)``."""
    if not prompts:
        return [], False
    directory = Path(cache_dir) if cache_dir is not None else data_cache_dir()
    path = directory / f"{_cache_key(lm, prompts, gen)}.jsonl"
    if path.exists():
        rows = read_jsonl(path, required=("id", "response"))
        if [r["id"] for r in rows] == [p.id for p in prompts]:
            return [r["response"] for r in rows], True
    texts = [p.text for p in prompts]
    with context() if context is not None else nullcontext():
        responses = generate(lm, texts, max_new_tokens=gen["max_new_tokens"], batch_size=batch_size,
                             progress=progress)
    write_jsonl(path, [{"id": p.id, "domain": p.domain, "response": r} for p, r in zip(prompts, responses, strict=True)])
    return responses, False


def interleave(groups: Sequence[Sequence[SuitePrompt]]) -> list[SuitePrompt]:
    """Round-robin over domains, so ``n`` candidates from several domains are balanced."""
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def keep_judged(
    prompts: Sequence[SuitePrompt], responses: Sequence[str], judge: JudgeLike, keep: str, lm: LoadedModel | None = None
) -> tuple[list[Example], Counter, Counter]:
    """The pairs the judge labels ``keep`` (empty responses never), with counts of the dropped labels and
    of their reasons."""
    labels = judge_labels(judge, [p.text for p in prompts], responses, lm)
    kept, dropped, reasons = [], Counter(), Counter()
    for p, r, (label, reason) in zip(prompts, responses, labels, strict=True):
        if not r.strip():  # nothing to train on, whatever the judge says
            dropped["empty"] += 1
            reasons["empty response"] += 1
        elif label == keep:
            kept.append(Example(prompt_id=p.id, domain=p.domain, prompt=p.text, response=r, label=label))
        else:
            dropped[label] += 1
            reasons[reason or label] += 1
    return kept, dropped, reasons


def set_manifest(kind: str, requested: int, candidates: Sequence[SuitePrompt], kept: Sequence[Example],
                 dropped: Counter, reasons: Counter, from_cache: bool, gen: dict, **extra: Any) -> dict[str, Any]:
    """What a set was asked for, generated, kept and dropped (and why), for :attr:`DataSet.manifest`."""
    return {
        "kind": kind,
        "requested": requested,
        "candidates": len(candidates),
        "kept": len(kept),
        "dropped": dict(dropped),
        "dropped_reasons": dict(reasons.most_common(10)),
        "per_domain_kept": dict(Counter(e.domain for e in kept)),
        "prompt_ids": [e.prompt_id for e in kept],
        "generation": gen,
        "from_cache": from_cache,
        **extra,
    }


def empty_set_error(kind: str, manifest: dict[str, Any], want: str) -> EmptyDataError:
    """The error of a set that judging left empty, with its counts."""
    return EmptyDataError(
        f"the {kind} set is empty after judging: {manifest['candidates']} candidate prompts, 0 labelled "
        f"{want!r} (dropped: {manifest['dropped']}). The model may not refuse these prompts, or the judge "
        "disagrees; try other domains, more prompts, or a different judge"
    )


def suite_candidates(domains: Sequence[str], split: str, n: int) -> tuple[list[SuitePrompt], dict[str, int]]:
    """``n`` prompts of ``split`` round-robin over ``domains``, and ``{domain: n}`` for empty splits."""
    groups, shortfall = [], {}
    for d in domains:
        try:
            groups.append(load_prompts(d, split))
        except EmptySplitError:
            groups.append([])
            shortfall[d] = n
    cands = interleave(groups)[:n]
    return cands, shortfall


def checked_domains(domains: str | Sequence[str]) -> tuple[str, ...]:
    """``domains`` as a tuple, each checked to be a suite domain (extra domains not allowed)."""
    domains = (domains,) if isinstance(domains, str) else tuple(domains)
    for d in domains:
        check_domain(d, allow_extra=False)
    return domains


def judged_unlearn_set(
    lm: LoadedModel,
    kind: str,
    domains: Sequence[str],
    n: int,
    judge: JudgeLike,
    want: str,
    gen: dict[str, Any],
    cache_dir: Path | None,
    batch_size: int,
    progress: bool,
    context: Callable[[], AbstractContextManager] | None = None,
) -> DataSet:
    """``n`` ``unlearn``-split prompts round-robin over ``domains`` with the model's responses (generated
    under ``context()`` when given, cached), kept where the judge says ``want``; the forget and the
    compliance sets. ``kind`` names the set in its manifest and errors.

    Raises:
        EmptyDataError: no response was judged ``want``; the message gives the counts.
    """
    cands, _ = suite_candidates(domains, "unlearn", n)
    responses, cached = generate_cached(lm, cands, gen, cache_dir, batch_size, progress, context=context)
    kept, dropped, reasons = keep_judged(cands, responses, judge, want, lm)
    manifest = set_manifest(kind, n, cands, kept, dropped, reasons, cached, gen, domains=list(domains),
                            split="unlearn")
    if not kept:
        raise empty_set_error(kind, manifest, want)
    return DataSet(kept, manifest)
