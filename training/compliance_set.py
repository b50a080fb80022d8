"""The compliance set: target prompts with compliant responses generated under a refusal-ablation
context supplied by the caller (for the LoRA-SFT baseline)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from interp.loading import LoadedModel
from training.dataset import DataSet
from training.responses import COMPLIANCE, JudgeLike, checked_domains, judged_unlearn_set

__all__ = ["build_compliance_set"]


def build_compliance_set(
    lm: LoadedModel,
    domains: str | Sequence[str],
    n: int,
    judge: JudgeLike,
    ablation_ctx: Callable[[], AbstractContextManager],
    ablation_id: str,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> DataSet:
    """Target ``unlearn`` prompts with compliant responses generated while ``ablation_ctx()`` is active
    (e.g. a refusal-direction ablation from ``probes``), kept where the judge says ``compliance``.

    Args:
        ablation_ctx: zero-argument factory of a context manager that makes the model comply and
            restores it on exit.
        ablation_id: identifies the ablation (e.g. a direction hash) for the generation cache key.
    """
    domains = checked_domains(domains)
    if not callable(ablation_ctx):
        raise TypeError("ablation_ctx must be a zero-argument callable returning a context manager")
    gen = {"max_new_tokens": max_new_tokens, "kind": "ablated", "ablation": str(ablation_id)}
    return judged_unlearn_set(lm, "compliance", domains, n, judge, COMPLIANCE, gen, cache_dir, batch_size, progress,
                              context=ablation_ctx)
