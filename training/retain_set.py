"""The retain set: ``retain``-split prompts of other domains with the model's own refusals, plus
optional benign prompts with the model's own answers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evals.suite import DOMAINS, EmptySplitError, SuitePrompt, load_prompts
from interp.loading import LoadedModel
from training.dataset import DataSet
from training.responses import (
    COMPLIANCE,
    REFUSAL,
    JudgeLike,
    checked_domains,
    empty_set_error,
    generate_cached,
    keep_judged,
    set_manifest,
)

__all__ = ["build_retain_set"]


def build_retain_set(
    lm: LoadedModel,
    domains: Sequence[str] | None,
    n_per_domain: int,
    judge: JudgeLike,
    target_domains: Sequence[str] = (),
    include_benign: int = 0,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    progress: bool = True,
    allow_targets: bool = False,
) -> DataSet:
    """``retain``-split prompts of the retain domains with the model's own refusals, plus up to
    ``include_benign`` benign prompts with the model's own (compliant) answers.

    Args:
        domains: retain domains; ``None`` means every domain except ``target_domains``. Domains whose
            retain split is empty are skipped and listed in the manifest.
        allow_targets: let target domains be retained too (backdoor runs, whose forget prompts carry a
            trigger that the retain prompts lack).

    Raises:
        ValueError: a retain domain is also a target domain (and ``allow_targets`` is false).
        EmptyDataError: nothing survived judging.
    """
    targets = set(target_domains)
    domains = checked_domains(tuple(d for d in DOMAINS if d not in targets) if domains is None else tuple(domains))
    clash = sorted(targets & set(domains))
    if clash and not allow_targets:
        raise ValueError(f"retain domain(s) {clash} are also target domains; a domain cannot be both "
                         "forgotten and retained")
    gen = {"max_new_tokens": max_new_tokens, "kind": "own"}
    cands: list[SuitePrompt] = []
    skipped = {}
    for d in domains:
        if n_per_domain == 0:
            break
        try:
            cands.extend(load_prompts(d, "retain", limit=n_per_domain))
        except EmptySplitError:
            skipped[d] = "empty retain split"
    responses, cached = generate_cached(lm, cands, gen, cache_dir, batch_size, progress)
    kept, dropped, reasons = keep_judged(cands, responses, judge, REFUSAL, lm)
    benign_info: dict[str, Any] = {"requested": include_benign, "kept": 0}
    if include_benign:
        bcands = load_prompts("benign", "retain", limit=include_benign)
        bresp, bcached = generate_cached(lm, bcands, gen, cache_dir, batch_size, progress)
        bkept, bdropped, _ = keep_judged(bcands, bresp, judge, COMPLIANCE, lm)
        kept = kept + bkept
        cached = cached and bcached
        benign_info = {"requested": include_benign, "candidates": len(bcands), "kept": len(bkept),
                       "dropped": dict(bdropped)}
    manifest = set_manifest("retain", n_per_domain * len(domains), cands, kept, dropped, reasons, cached, gen,
                         domains=list(domains), split="retain", skipped_domains=skipped, benign=benign_info)
    if not kept:
        raise empty_set_error("retain", manifest, REFUSAL)
    return DataSet(kept, manifest)
