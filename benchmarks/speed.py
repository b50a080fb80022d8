"""Benchmark 6 (issue #17) — the limit and the savings: matmul peak, MFU, shared-prefix cache,
judge-aware generation, and the NPO + retain-CE step, all in one process.

Results (one file each):

* ``matmul_peak``: this machine's bf16 and fp32 matmul FLOP/s at the model's GEMM shapes
  (:func:`interp.flops.matmul_peak`), same process and threads as the timings below;
* ``scoring``: logit scoring of the eval split (every domain, benign and over-refusal; ``--eval-limit``
  prompts per set) with the shared-prefix cache against without (throughput ratio, max |Δ| of the scores);
* ``generation``: judge-aware generation (prefix cache, per-row stop once the keyword judge can decide)
  against fixed-length HF ``generate``: tokens generated, wall time, and the judge's agreement;
* ``train_step``: one NPO + retain-CE step (LoRA r=8, all linear layers) with clip and AdamW;
* ``train_phases``: that step and an NPO-only one, phase by phase (:mod:`benchmarks.train_phases`);
* ``containment_step``: that step with each containment method of H14 against retain-CE, in extra
  forwards (:mod:`benchmarks.containment_step`).

Each variant reports MFU: its FLOPs (:mod:`interp.flops`, real tokens only) per second over the
peak of the dtype it runs in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from benchmarks.data import step_batches
from benchmarks.harness import (
    SPEED_RESULTS,
    BenchConfig,
    BenchResult,
    Variant,
    make_result,
    model_state,
    ratio,
    restore_model_state,
    time_alternating,
)
from evals.judge import KeywordJudge
from evals.refusal import logit_refusal_scores
from evals.suite import DOMAINS, EmptySplitError, load_prompts
from interp.chat import format_prompts, iter_batches
from interp.flops import forward_flops, generation_flops, matmul_peak, model_shape, train_flops
from interp.generate import generate
from interp.loading import LoadedModel
from interp.prefix import shared_prefix_ids

__all__ = ["eval_prompts", "peak", "scoring", "generation", "train_step", "run"]


def eval_prompts(limit: int | None, split: str = "eval") -> list[str]:
    """The eval split of every domain, benign and over-refusal (``limit`` per set), in suite order."""
    out: list[str] = []
    for d in (*DOMAINS, "benign", "over_refusal"):
        try:
            out += [p.text for p in load_prompts(d, split, limit=limit)]
        except EmptySplitError:
            continue
    return out


def _dtype(lm: LoadedModel) -> str:
    return str(next(lm.model.parameters()).dtype).removeprefix("torch.")


def _rows(lm: LoadedModel, prompts: Sequence[str], batch_size: int, cached: bool) -> list[tuple[int, int]]:
    """``(n_new, n_past)`` per prompt: its whole length, or its suffix after the shared prefix."""
    p = len(shared_prefix_ids(lm.tokenizer)) if cached else 0
    rows = []
    for b in iter_batches(lm.tokenizer, format_prompts(lm.tokenizer, prompts), batch_size, 512):
        rows += [(int(n) - p, p) for n in b.attention_mask.sum(-1).tolist()]
    return rows


def _mfu(v: Variant, flops: float, peak_flops: float) -> None:
    v.extra.update(flops=flops, mfu=flops / v.median_s / peak_flops)


def peak(lm: LoadedModel, cfg: BenchConfig) -> tuple[BenchResult, dict]:
    shape = model_shape(lm.model)
    rows = (16, 256, 1024) if lm.device.type == "cpu" else (64, 4096, 16384)
    res = matmul_peak(shape, rows=rows, device=lm.device, reps=max(2, min(cfg.reps, 5)))
    variants = {d: Variant([1e9 / r["peak_flops"]], {"GFLOP": 1.0},
                           f"best torch.matmul over the model's GEMM shapes; best at {r['at']}",
                           extra={"peak_gflops": r["peak_flops"] / 1e9, "by_shape_gflops":
                                  {k: x / 1e9 for k, x in r["by_shape"].items()}})
                for d, r in res.items()}
    checks = {f"{d}_peak_gflops": r["peak_flops"] / 1e9 for d, r in res.items()}
    checks["bf16_over_fp32"] = res["bfloat16"]["peak_flops"] / res["float32"]["peak_flops"]
    config = {"model": lm.name, "device": str(lm.device), "rows": list(rows), "reps": cfg.reps}
    notes = ["times are seconds per GFLOP at the peak rate: the throughput column is the peak",
             "MFU in the other tables divides by the peak of the dtype the path runs in"]
    return make_result("matmul_peak", variants, {}, config, lm.device, checks, notes), res


def scoring(lm: LoadedModel, cfg: BenchConfig, peaks: dict) -> BenchResult:
    prompts = eval_prompts(cfg.eval_limit)
    last: dict[str, torch.Tensor] = {}

    def run_with(flag: bool):
        def fn():
            last[str(flag)] = logit_refusal_scores(lm, prompts, batch_size=cfg.batch_size, prefix_cache=flag)
        return fn

    reps = min(cfg.reps, 3)
    times = time_alternating({"prefix_cache": run_with(True), "no_prefix_cache": run_with(False)}, reps,
                             cfg.warmup, device=lm.device)
    shape, peak_flops = model_shape(lm.model), peaks[_dtype(lm)]["peak_flops"]
    variants = {}
    for name, cached in (("prefix_cache", True), ("no_prefix_cache", False)):
        rows = _rows(lm, prompts, cfg.batch_size, cached)
        v = Variant(times[name], {"prompts": len(prompts), "tokens": sum(n for n, _ in rows)},
                    "evals.refusal.logit_refusal_scores(prefix_cache=%s)" % cached)
        _mfu(v, forward_flops(shape, rows, len(rows)), peak_flops)
        variants[name] = v
    checks = {"max_abs_diff_log_odds": float((last["True"] - last["False"]).abs().max()),
              "prefix_tokens": len(shared_prefix_ids(lm.tokenizer))}
    config = {"model": lm.name, "dtype": _dtype(lm), "device": str(lm.device), "n_prompts": len(prompts),
              "batch_size": cfg.batch_size, "reps": reps, "eval_limit": cfg.eval_limit}
    notes = ["ratio = median uncached time / median cached time (>1: the prefix cache is faster)",
             "MFU counts each path's own FLOPs on real tokens (the cached path skips the prefix)"]
    return make_result("scoring", variants, {"prefix_cache/no_prefix_cache":
                                             ratio(variants, "prefix_cache", "no_prefix_cache")},
                       config, lm.device, checks, notes)


def generation(lm: LoadedModel, cfg: BenchConfig, peaks: dict) -> BenchResult:
    prompts = eval_prompts(cfg.eval_limit)[: cfg.gen_prompts]
    judge = KeywordJudge()
    out: dict[str, tuple[list[str], dict]] = {}

    def judge_aware():
        st: dict = {}
        out["judge_aware"] = (generate(lm, prompts, cfg.max_new_tokens, cfg.batch_size, progress=False,
                                       stop=judge.decided, stats=st), st)

    def fixed():
        st: dict = {}
        out["fixed"] = (generate(lm, prompts, cfg.max_new_tokens, cfg.batch_size, progress=False, engine="hf",
                                 stats=st), st)

    reps = min(cfg.reps, 3)
    times = time_alternating({"judge_aware": judge_aware, "fixed": fixed}, reps, cfg.warmup, device=lm.device)
    shape, peak_flops = model_shape(lm.model), peaks[_dtype(lm)]["peak_flops"]
    variants = {}
    labels = {}
    for name in ("judge_aware", "fixed"):
        texts, st = out[name]
        labels[name] = [j.label for j in judge.judge(prompts, texts)]
        n_gen = [len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        rows = _rows(lm, prompts, cfg.batch_size, name == "judge_aware")
        # rows come length-sorted; generation_flops pairs them with generation lengths in the same order
        v = Variant(times[name], {"prompts": len(prompts), "generated_tokens": st["generated_tokens"]},
                    {"judge_aware": "interp.generate.generate(stop=KeywordJudge.decided), prefix cache, "
                                    "finished rows dropped",
                     "fixed": f"HF generate, {cfg.max_new_tokens} tokens"}[name])
        _mfu(v, generation_flops(shape, rows, sorted(n_gen)), peak_flops)
        variants[name] = v
    agree = sum(a == b for a, b in zip(labels["judge_aware"], labels["fixed"], strict=True)) / len(prompts)
    checks = {"judge_agreement": agree,
              "tokens_ratio": out["judge_aware"][1]["generated_tokens"] / max(out["fixed"][1]["generated_tokens"], 1),
              "refusal_rate_judge_aware": labels["judge_aware"].count("refusal") / len(prompts),
              "refusal_rate_fixed": labels["fixed"].count("refusal") / len(prompts)}
    config = {"model": lm.name, "dtype": _dtype(lm), "device": str(lm.device), "n_prompts": len(prompts),
              "batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens, "reps": reps}
    notes = ["ratio = median fixed time / median judge-aware time (>1: judge-aware is faster)",
             "judge_agreement: fraction of prompts whose keyword-judge label is the same in both",
             "MFU is approximate for generation (lengths paired in sorted order)"]
    return make_result("generation", variants, {"judge_aware/fixed": ratio(variants, "judge_aware", "fixed")},
                       config, lm.device, checks, notes)


def train_step(lm: LoadedModel, cfg: BenchConfig, peaks: dict) -> BenchResult:
    from benchmarks.unlearn import LR, reference_logp
    from training.config import UnlearnConfig
    from training.loop import lr_schedule, optimizer_update
    from training.lora import attach_lora, detach_lora
    from training.trainer import train_step as step

    ucfg = UnlearnConfig(method="npo", model=lm.name, lora_rank=8, lr=LR, retain_mode="ce")
    fb, rb = (b.to(lm.device) for b in step_batches(lm.tokenizer, cfg.train_batch, cfg.train_response_tokens))
    state = model_state(lm)
    attach_lora(lm, rank=8, alpha=16.0, targets=("all-linear",))
    try:
        params = [p for p in lm.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=LR)
        lm.model.train()
        ref = reference_logp(lm, fb)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(ucfg))

        def npo_retain():
            step(lm, ucfg, fb, ref, rb)
            optimizer_update(params, opt, sched, ucfg.max_grad_norm)  # the trainer's clip, AdamW, zero_grad

        reps = min(cfg.reps, 3)
        times = time_alternating({"npo_retain_ce": npo_retain}, reps, cfg.warmup, device=lm.device)
    finally:
        detach_lora(lm)
        restore_model_state(lm, state)
    shape = model_shape(lm.model)
    flops = 0.0
    for b in (fb, rb):
        lengths = b.attention_mask.sum(-1).tolist()
        keep = int(b.input_ids.shape[1] - int(b.response_mask.float().argmax(-1).min()) + 1)
        flops += train_flops(shape, [(int(n), 0) for n in lengths], keep * len(lengths), lora_rank=8)
    work = {"sequences": len(fb) + len(rb), "tokens": int(fb.attention_mask.sum() + rb.attention_mask.sum())}
    v = Variant(times["npo_retain_ce"], work, "training.trainer.train_step (NPO + retain CE) + clip + AdamW")
    _mfu(v, flops, peaks[_dtype(lm)]["peak_flops"])
    config = {"model": lm.name, "dtype": _dtype(lm), "device": str(lm.device), "train_batch": len(fb),
              "retain_batch": len(rb), "lora_rank": 8, "reps": reps}
    notes = ["FLOPs: interp.flops.train_flops (LoRA: frozen matmuls 2x forward, adapters 3x, attention 3x)"]
    return make_result("train_step", {"npo_retain_ce": v}, {}, config, lm.device, {}, notes)


def run(lm: LoadedModel, cfg: BenchConfig) -> list[BenchResult]:
    """The suite's results in order; with ``cfg.only``, those named (the peak is measured whenever
    another result needs it, and returned only when named)."""
    from benchmarks.containment_step import containment_step
    from benchmarks.train_phases import train_phases

    want = set(cfg.only) if cfg.only else set(SPEED_RESULTS)
    peak_result, peaks = peak(lm, cfg)
    out = [peak_result] if "matmul_peak" in want else []
    benches = {"scoring": scoring, "generation": generation, "train_step": train_step, "train_phases": train_phases,
               "containment_step": containment_step}
    return out + [benches[name](lm, cfg, peaks) for name in SPEED_RESULTS[1:] if name in want]
