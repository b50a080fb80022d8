"""The forget set: target-domain ``unlearn`` prompts with the model's own refusals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from evals.suite import check_domain
from interp.loading import LoadedModel
from training.dataset import DataSet
from training.responses import (
    REFUSAL,
    JudgeLike,
    empty_set_error,
    generate_cached,
    keep_judged,
    set_manifest,
    suite_candidates,
)

__all__ = ["build_forget_set"]


def build_forget_set(
    lm: LoadedModel,
    domains: str | Sequence[str],
    n: int,
    judge: JudgeLike,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> DataSet:
    """Target-domain ``unlearn`` prompts with the model's own greedy responses, kept where the judge
    says ``refusal``.

    Args:
        domains: target domain(s); ``n`` candidates are taken round-robin across them.
        n: candidate prompts (fewer if the split is smaller; the manifest records the shortfall).
        judge: an ``evals.judge`` judge, its name, or any ``(prompts, responses) -> labels`` callable.

    Raises:
        EmptyDataError: No response was judged a refusal; the message gives the counts.
    """
    domains = (domains,) if isinstance(domains, str) else tuple(domains)
    for d in domains:
        check_domain(d, allow_extra=False)
    cands, _ = suite_candidates(domains, "unlearn", n)
    gen = {"max_new_tokens": max_new_tokens, "kind": "own"}
    responses, cached = generate_cached(lm, cands, gen, cache_dir, batch_size, progress)
    kept, dropped, reasons = keep_judged(cands, responses, judge, REFUSAL, lm)
    manifest = set_manifest("forget", n, cands, kept, dropped, reasons, cached, gen, domains=list(domains),
                         split="unlearn")
    if not kept:
        raise empty_set_error("forget", manifest, REFUSAL)
    return DataSet(kept, manifest)
