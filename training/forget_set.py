"""The forget set: target-domain ``unlearn`` prompts with the model's own refusals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from interp.loading import LoadedModel
from training.dataset import DataSet
from training.responses import REFUSAL, JudgeLike, checked_domains, judged_unlearn_set

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
    gen = {"max_new_tokens": max_new_tokens, "kind": "own"}
    return judged_unlearn_set(lm, "forget", checked_domains(domains), n, judge, REFUSAL, gen, cache_dir, batch_size,
                              progress)
