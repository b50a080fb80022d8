"""Numerics of adapter evaluation: is the model we evaluate the model we trained?

A LoRA update at the study's default regime (lr 3e-5, 10 steps) changes weights by ~1e-5 to 1e-4 per
entry, below half a bf16 step for most base weights. This script trains the default NPO adapter once
in bf16 and once in fp32 (same forget set, same seed) and measures the refusal log-odds of each on the
seven domains' eval prompts through four evaluation paths:

- ``bf16_merged``: the adapter merged into bf16 base weights (emalab's evaluation path before this
  measurement);
- ``bf16_unmerged``: the LoRA branch kept separate (computed in fp32 by PEFT, added to bf16 outputs);
- ``fp32_merged``: merged into fp32 weights;
- ``fp32_unmerged``: the reference.

It reports, per path, the mean |Δ log-odds| against the reference, both for the absolute log-odds and
for the adapter's *effect* (log-odds after − base log-odds in the same path), and the per-domain mean
log-odds of the bf16- and fp32-trained adapters under the reference path.

    python -m benchmarks.numerics --out results/numerics          # ~5-10 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np

__all__ = ["main"]

PATHS = ("bf16_merged", "bf16_unmerged", "fp32_merged", "fp32_unmerged")
REFERENCE = "fp32_unmerged"


def _scores(lm, prompts: list[str], batch_size: int) -> np.ndarray:
    from evals.refusal import logit_refusal_scores

    return logit_refusal_scores(lm, prompts, batch_size=batch_size).double().numpy()


def _score_adapter(models: dict, adapter: Path | None, prompts: list[str], batch_size: int) -> dict[str, np.ndarray]:
    from training.lora import detach_lora, load_adapter, merged_adapter

    out = {}
    for path in PATHS:
        lm = models[path.split("_")[0]]
        if adapter is None:
            out[path] = _scores(lm, prompts, batch_size)
            continue
        load_adapter(lm, adapter)
        try:
            ctx = merged_adapter(lm) if path.endswith("_merged") else contextlib.nullcontext()
            with ctx:
                out[path] = _scores(lm, prompts, batch_size)
        finally:
            detach_lora(lm)
    return out


def main(argv: list[str] | None = None) -> dict:
    from evals.suite import DOMAINS, load_prompts
    from interp.io import atomic_write_json
    from interp.loading import load_model
    from training.config import UnlearnConfig
    from training.lora import detach_lora
    from training.trainer import build_data, unlearn

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=UnlearnConfig().model)
    p.add_argument("--target", default="cybersecurity")
    p.add_argument("--limit", type=int, default=24, help="eval prompts per domain (0: whole eval split)")
    p.add_argument("--steps", type=int, default=UnlearnConfig().steps)
    p.add_argument("--lr", type=float, default=UnlearnConfig().lr)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("results/numerics"))
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    models = {"bf16": load_model(args.model, dtype="bfloat16"), "fp32": load_model(args.model, dtype="float32")}
    by_domain = {d: [q.text for q in load_prompts(d, "eval", limit=args.limit or None)] for d in DOMAINS}
    prompts = [t for d in DOMAINS for t in by_domain[d]]
    domain_of = np.array([d for d in DOMAINS for _ in by_domain[d]])

    # One forget set (built by the bf16 model, as in the study) for both trainings: only the dtype differs.
    base_cfg = UnlearnConfig(model=args.model, target_domains=(args.target,), steps=args.steps, lr=args.lr)
    data = build_data(models["bf16"], base_cfg.replace(dtype="bfloat16"))
    adapters = {}
    for dtype in ("bf16", "fp32"):
        cfg = base_cfg.replace(dtype="bfloat16" if dtype == "bf16" else "float32")
        res = unlearn(models[dtype], cfg, args.out / f"train_{dtype}", data=data, resume=True)
        detach_lora(models[dtype])
        adapters[dtype] = res.adapter_dir

    base = _score_adapter(models, None, prompts, args.batch_size)
    table: dict = {"settings": {"model": args.model, "target": args.target, "steps": args.steps, "lr": args.lr,
                                "n_prompts": len(prompts), "per_domain": args.limit or "all",
                                "method": base_cfg.method, "lora_rank": base_cfg.lora_rank}}
    table["base_abs_err"] = {k: float(np.abs(v - base[REFERENCE]).mean()) for k, v in base.items()}
    for trained, adapter in adapters.items():
        after = _score_adapter(models, adapter, prompts, args.batch_size)
        ref, ref_effect = after[REFERENCE], after[REFERENCE] - base[REFERENCE]
        rows = {}
        for path in PATHS:
            effect = after[path] - base[path]
            rows[path] = {
                "mean_abs_err_logodds": float(np.abs(after[path] - ref).mean()),
                "max_abs_err_logodds": float(np.abs(after[path] - ref).max()),
                "mean_abs_err_effect": float(np.abs(effect - ref_effect).mean()),
                # How much of the adapter's effect survives, as a slope through the origin.
                "effect_kept": float((effect * ref_effect).sum() / (ref_effect ** 2).sum()),
            }
        table[f"trained_{trained}"] = {
            "paths": rows,
            "domain_mean_logodds_ref": {d: float(ref[domain_of == d].mean()) for d in DOMAINS},
            "domain_mean_logodds_base_ref": {d: float(base[REFERENCE][domain_of == d].mean()) for d in DOMAINS},
        }
    d_bf, d_fp = (table[f"trained_{k}"]["domain_mean_logodds_ref"] for k in ("bf16", "fp32"))
    table["train_dtype_domain_diff"] = {d: d_bf[d] - d_fp[d] for d in DOMAINS}
    table["seconds"] = time.perf_counter() - t0
    atomic_write_json(args.out / "numerics.json", table)
    print(json.dumps({k: v for k, v in table.items() if k != "settings"}, indent=1))
    return table


if __name__ == "__main__":
    main()
