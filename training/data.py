"""Unlearning data: suite prompts paired with the model's own greedy responses, filtered by a
judge, cached on disk, and tokenised into left-padded batches with a response-only loss mask.

* forget set: target-domain ``unlearn``-split prompts with the model's own refusals
  (:mod:`training.forget_set`);
* retain set: ``retain``-split prompts of other domains with the model's own refusals, plus optional
  benign prompts with the model's own answers (:mod:`training.retain_set`);
* compliance set: target prompts with compliant responses generated under a refusal-ablation context
  supplied by the caller, for the LoRA-SFT baseline (:mod:`training.compliance_set`).

Generations are cached as JSONL under ``<cache_root>/unlearn_data/`` keyed on the model state, the
prompt ids and the generation settings, so reruns skip generation; the judge is re-run every time
(it is cheap and may change). Generated text never goes to git and is never printed
(:mod:`training.responses`). Examples and sets are :mod:`training.dataset`, tokenisation
:mod:`training.collate`. This module builds the sets a config asks for (:func:`build_data`) and
re-exports the names of all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from interp.loading import LoadedModel
from training.collate import TokenBatch, apply_trigger, batch_order, collate, epochs_seen
from training.compliance_set import build_compliance_set
from training.config import UnlearnConfig
from training.dataset import DataSet, EmptyDataError, Example, dataset_from_rows, dataset_to_rows
from training.forget_set import build_forget_set
from training.responses import JudgeLike, data_cache_dir, judge_labels, resolve_judge
from training.retain_set import build_retain_set

__all__ = [
    "Example",
    "DataSet",
    "TokenBatch",
    "EmptyDataError",
    "JudgeLike",
    "resolve_judge",
    "judge_labels",
    "build_forget_set",
    "build_retain_set",
    "build_compliance_set",
    "apply_trigger",
    "collate",
    "batch_order",
    "data_cache_dir",
    "epochs_seen",
    "dataset_to_rows",
    "dataset_from_rows",
    "UnlearnData",
    "build_data",
]


@dataclass
class UnlearnData:
    """The training sets: ``forget`` (refusals, or compliant responses for ``sft``) and ``retain``."""

    forget: DataSet
    retain: DataSet | None = None

    def manifest(self) -> dict[str, Any]:
        out = {"forget": {**self.forget.manifest, "n": len(self.forget), "fingerprint": self.forget.fingerprint()}}
        if self.retain is not None:
            out["retain"] = {**self.retain.manifest, "n": len(self.retain), "fingerprint": self.retain.fingerprint()}
        return out

    def fingerprint(self) -> str:
        return self.forget.fingerprint() + ("/" + self.retain.fingerprint() if self.retain is not None else "")


def build_data(
    lm: LoadedModel,
    cfg: UnlearnConfig,
    judge: JudgeLike | None = None,
    ablation_ctx: Callable[[], AbstractContextManager] | None = None,
    ablation_id: str | None = None,
    progress: bool = True,
) -> UnlearnData:
    """Generate (or load from cache) and judge the forget and retain sets that ``cfg`` asks for, from
    the model's current weights (call before attaching an adapter)."""
    judge = judge if judge is not None else cfg.judge
    if cfg.method == "sft":
        if ablation_ctx is None or ablation_id is None:
            raise ValueError("method 'sft' trains on compliant responses generated under a refusal ablation; "
                             "pass ablation_ctx (a context-manager factory) and ablation_id, or pass data=")
        forget = build_compliance_set(lm, cfg.target_domains, cfg.n_forget, judge, ablation_ctx, ablation_id,
                                      max_new_tokens=cfg.max_new_tokens, progress=progress)
    else:
        forget = build_forget_set(lm, cfg.target_domains, cfg.n_forget, judge,
                                  max_new_tokens=cfg.max_new_tokens, progress=progress, size=cfg.forget_size)
    retain = None
    if cfg.needs_retain_data:
        retain = build_retain_set(lm, cfg.resolved_retain_domains, cfg.n_retain_per_domain, judge,
                                  target_domains=cfg.target_domains, include_benign=cfg.include_benign,
                                  max_new_tokens=cfg.max_new_tokens, progress=progress,
                                  allow_targets=bool(cfg.trigger))
    return UnlearnData(forget, retain)
