"""Benchmark 2 — refusal scoring: one forward per batch vs generate-then-judge.

* ``logit_score``: :func:`evals.refusal.logit_refusal_scores` (refusal-token log-odds at the last
  prompt position; ``logits_to_keep=1``);
* ``generate_judge``: greedy :func:`interp.generate.generate` (``max_new_tokens`` tokens) then
  :class:`evals.judge.KeywordJudge`, the usual way to measure refusal.

Same prompts, same batch size, alternating. Reported: prompts/s of each, the speed-up, and the
agreement rate of the two measurements (logit score > 0 vs the judge's ``refusal``); no text is
printed or stored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from benchmarks.data import varied_prompts
from benchmarks.harness import BenchConfig, BenchResult, Variant, make_result, ratio, time_alternating
from evals.judge import KeywordJudge
from evals.refusal import logit_refusal_scores
from interp.generate import generate
from interp.loading import LoadedModel

__all__ = ["measure", "run"]


def measure(
    lm: LoadedModel, prompts: Sequence[str], batch_size: int, max_new_tokens: int, reps: int, warmup: int = 1,
) -> tuple[dict[str, Variant], dict[str, dict], dict[str, float]]:
    """Time both variants; returns ``(variants, ratios, checks)``."""
    judge = KeywordJudge()
    judge_seconds: list[float] = []
    last: dict[str, list] = {}

    def logit():
        last["scores"] = logit_refusal_scores(lm, prompts, batch_size=batch_size).tolist()

    def gen_judge():
        responses = generate(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
        t0 = time.perf_counter()
        last["labels"] = [j.label for j in judge.judge(prompts, responses)]
        judge_seconds.append(time.perf_counter() - t0)

    times = time_alternating({"logit_score": logit, "generate_judge": gen_judge}, reps, warmup, device=lm.device)
    variants = {
        "logit_score": Variant(times["logit_score"], {"prompts": len(prompts)},
                               "evals.refusal.logit_refusal_scores (one forward, logits_to_keep=1)"),
        "generate_judge": Variant(times["generate_judge"], {"prompts": len(prompts)},
                                  f"interp.generate.generate ({max_new_tokens} greedy tokens) + KeywordJudge",
                                  extra={"judge_median_s": sorted(judge_seconds)[len(judge_seconds) // 2]}),
    }
    ratios = {"logit_score/generate_judge": ratio(variants, "logit_score", "generate_judge")}
    agree = [(s > 0) == (lab == "refusal") for s, lab in zip(last["scores"], last["labels"], strict=True)]
    checks = {"agreement_logit_vs_judge": sum(agree) / len(agree),
              "refusal_rate_judge": sum(lab == "refusal" for lab in last["labels"]) / len(agree),
              "refusal_rate_logit": sum(s > 0 for s in last["scores"]) / len(agree)}
    return variants, ratios, checks


def run(lm: LoadedModel, cfg: BenchConfig) -> BenchResult:
    prompts = varied_prompts(cfg.n_prompts)
    reps = min(cfg.reps, 5)
    variants, ratios, checks = measure(lm, prompts, cfg.batch_size, cfg.max_new_tokens, reps, cfg.warmup)
    config = {"model": lm.name, "dtype": str(next(lm.model.parameters()).dtype), "device": str(lm.device),
              "n_prompts": len(prompts), "batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens,
              "reps": reps, "warmup": cfg.warmup}
    notes = ["ratio = how many times faster the logit score is than generation + keyword judge",
             "the prompts are the length-varied suite set (harmful domains and benign); rates only, no text"]
    return make_result("refusal", variants, ratios, config, lm.device, checks, notes)
