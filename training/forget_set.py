"""The forget set: target-domain ``unlearn`` prompts with the model's own refusals."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from interp.loading import LoadedModel
from training.config import FORGET_SIZES
from training.dataset import DataSet
from training.responses import (
    REFUSAL,
    JudgeLike,
    checked_domains,
    empty_set_error,
    generate_cached,
    judged_unlearn_set,
    keep_judged,
    set_manifest,
    suite_candidates,
)

__all__ = ["FORGET_SIZES", "build_forget_set"]

log = logging.getLogger(__name__)


def build_forget_set(
    lm: LoadedModel,
    domains: str | Sequence[str],
    n: int,
    judge: JudgeLike,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    progress: bool = True,
    size: str = "candidates",
) -> DataSet:
    """Target-domain ``unlearn`` prompts with the model's own greedy responses, kept where the judge
    says ``refusal``.

    Args:
        domains: target domain(s); ``n`` candidates are taken round-robin across them.
        n: with ``size="candidates"``, candidate prompts (fewer if the split is smaller; the manifest
            records the shortfall); with ``size="kept"``, refusals kept: candidates are drawn in split
            order, a batch at a time, until ``n`` are kept, so two targets with different base refusal
            rates get forget sets of equal size (the comparison C3 needs). A split with fewer refusals
            gives a smaller set, with a warning; the manifest's ``kept`` says how many.
        judge: an ``evals.judge`` judge, its name, or any ``(prompts, responses) -> labels`` callable.
        size: ``candidates`` | ``kept`` (what ``n`` counts).

    Raises:
        EmptyDataError: No response was judged a refusal; the message gives the counts.
    """
    domains = checked_domains(domains)
    if size not in FORGET_SIZES:
        raise ValueError(f"forget set size must count one of {FORGET_SIZES}, got {size!r}")
    gen = {"max_new_tokens": max_new_tokens, "kind": "own"}
    if size == "candidates":
        return judged_unlearn_set(lm, "forget", domains, n, judge, REFUSAL, gen, cache_dir, batch_size, progress)
    cands, kept, dropped, reasons, cached = _draw_until_kept(lm, domains, n, judge, gen, cache_dir, batch_size,
                                                             progress)
    manifest = set_manifest("forget", n, cands, kept, dropped, reasons, cached, gen, domains=list(domains),
                            split="unlearn", size=size)
    if not kept:
        raise empty_set_error("forget", manifest, REFUSAL)
    return DataSet(kept, manifest)


def _draw_until_kept(lm, domains, n, judge, gen, cache_dir, batch_size, progress):
    """Candidates in split order, one generation batch at a time, until ``n`` refusals are kept (the
    first ``n`` in candidate order). Each batch is cached on its own, so a rerun generates nothing."""
    pool, _ = suite_candidates(domains, "unlearn", 10**9)
    cands, kept, dropped, reasons, all_cached = [], [], Counter(), Counter(), True
    start = 0
    while len(kept) < n and start < len(pool):
        # Ask for what is still missing (at least one batch): refusal rates are high for targets.
        chunk = pool[start:start + max(batch_size, n - len(kept))]
        start += len(chunk)
        responses, cached = generate_cached(lm, chunk, gen, cache_dir, batch_size, progress)
        k, d, r = keep_judged(chunk, responses, judge, REFUSAL, lm)
        cands += chunk
        kept += k
        dropped.update(d)
        reasons.update(r)
        all_cached = all_cached and cached
    if len(kept) < n:  # not fatal (a seven-target matrix must not die on one small split); recorded and reported
        log.warning("the unlearn split of %s holds %d refusals of this model among %d prompts, fewer than the %d "
                    "asked for; the forget set is smaller (lower n_forget for equal sizes)",
                    "+".join(domains), len(kept), len(pool), n)
    return cands, kept[:n], dropped, reasons, all_cached
