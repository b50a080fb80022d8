"""NPO's reference policy: per-example response log-probs of the forget set under the base model
(adapter disabled), computed once and cached in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from interp.io import atomic_save_safetensors
from interp.loading import LoadedModel, adapter_disabled, state_id
from training.collate import collate_rows
from training.config import UnlearnConfig
from training.dataset import DataSet
from training.losses import response_logits, sequence_logprobs

__all__ = ["REFERENCE_FILE", "reference_logprobs", "cached_reference_logprobs"]

REFERENCE_FILE = "ref_logprobs.safetensors"
"""The cache of the forget set's reference log-probs in a run directory."""


@torch.no_grad()
def reference_logprobs(
    lm: LoadedModel, cfg: UnlearnConfig, ds: DataSet, batch_size: int | None = None
) -> torch.Tensor:
    """Per-example response log-probs under the reference policy (adapter disabled), float32."""
    out = torch.empty(len(ds), dtype=torch.float32)
    bs = batch_size or cfg.batch_size
    was_training = lm.model.training
    lm.model.eval()
    try:
        with adapter_disabled(lm):
            for start in range(0, len(ds), bs):
                idx = list(range(start, min(start + bs, len(ds))))
                b = collate_rows(lm, cfg, ds, idx, forget=True).to(lm.device)
                rl = response_logits(lm.model, b.input_ids, b.attention_mask, b.response_mask)
                out[idx] = sequence_logprobs(rl.logits, rl.labels, rl.mask).float().cpu()
    finally:
        lm.model.train(was_training)
    return out


def cached_reference_logprobs(lm: LoadedModel, cfg: UnlearnConfig, ds: DataSet, run_dir: Path,
                              write: bool = True) -> torch.Tensor:
    """:func:`reference_logprobs` of ``ds``, read from the run directory when its key (model state,
    data, trigger, prompt cap, dtype) matches, else computed and (with ``write``) cached there."""
    from safetensors import safe_open

    key = json.dumps({"state": state_id(lm), "data": ds.fingerprint(), "trigger": cfg.trigger,
                      "max_prompt_tokens": cfg.max_prompt_tokens, "dtype": cfg.dtype}, sort_keys=True)
    path = run_dir / REFERENCE_FILE
    if path.exists():
        with safe_open(str(path), framework="pt") as fh:
            if (fh.metadata() or {}).get("key") == key:
                return fh.get_tensor("logp_ref")
    ref = reference_logprobs(lm, cfg, ds)
    if write:
        atomic_save_safetensors(path, {"logp_ref": ref}, metadata={"key": key})
    return ref
