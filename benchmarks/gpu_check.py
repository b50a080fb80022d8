"""The GPU check: one command that takes random-initialised 7B-architecture models (Mistral-7B-v0.3 and
Qwen2.5-7B shapes) through emalab's whole path on one GPU and prints tokens/s and MFU.

    python -m benchmarks.gpu_check --device cuda            # or: make gpucheck   (one H100/H200)
    python -m benchmarks.gpu_check --device cpu --tiny      # the same code path on CPU-sized configs

Per architecture: evaluation (logit refusal score and a short greedy generation), activation collection
at every layer, five NPO steps with the retain cross-entropy (LoRA, optional gradient checkpointing) and
re-evaluation. MFU is measured against a bf16 matmul peak *measured here* (a large square matmul), not
a data-sheet number, so it is the share of what this GPU actually delivers. The existing ``gpu7b``
benchmark (emalab vs plain HF/PEFT ratios) follows with ``--gpu7b``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.gpu_7b import (
    ARCHITECTURES,
    build_random_model,
    fixed_length_examples,
    fixed_length_prompts,
    matmul_params,
)
from benchmarks.harness import synchronize

__all__ = ["CheckConfig", "measured_peak_tflops", "check_architecture", "run_check", "main"]


@dataclass
class CheckConfig:
    """What the GPU check runs."""

    device: str = "cuda"
    """Device: cuda (the check), or cpu with ``tiny`` (the code path, in the tests)."""
    tiny: bool = False
    """CPU-sized configs of the same architectures."""
    architectures: tuple[str, ...] = tuple(ARCHITECTURES)
    """Architectures to check (random weights, real 7B shapes unless ``tiny``)."""
    eval_prompts: int = 64
    """Prompts scored, collected and generated from."""
    seq: int = 256
    """Tokens per prompt."""
    new_tokens: int = 16
    """Greedy tokens generated per prompt."""
    batch_size: int = 8
    """Training batch (forget and retain each); 8 × 512 tokens is the 80 GB LoRA target."""
    train_seq: int = 512
    """Tokens per training example."""
    steps: int = 5
    """NPO steps."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass."""
    out: str | None = None
    """Write the figures here as JSON."""

    def __post_init__(self) -> None:
        if torch.device(self.device).type == "cpu" and not self.tiny:
            raise ValueError("the GPU check needs a GPU for 7B shapes: pass --device cuda, or --tiny for the CPU code path")


@dataclass
class CheckResult:
    architecture: str
    device: str
    dtype: str
    params: int
    stages: dict[str, dict[str, float]] = field(default_factory=dict)
    peak_memory_gb: float | None = None


def measured_peak_tflops(device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 10) -> float:
    """Dense matmul throughput of ``device`` in TFLOP/s, measured on an ``n × n`` product."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def _timed(device, fn):
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return out, time.perf_counter() - t0


def check_architecture(arch: str, cfg: CheckConfig, peak: float, log=print) -> CheckResult:
    """One architecture through evaluation, activations, NPO + retain-CE and re-evaluation."""
    from evals.refusal import logit_refusal_scores
    from interp.activations import collect_activations
    from interp.generate import generate
    from interp.loading import adapter_disabled
    from training.config import UnlearnConfig
    from training.data import collate
    from training.lora import attach_lora, detach_lora, enable_gradient_checkpointing
    from training.losses import response_logits, sequence_logprobs
    from training.trainer import train_step

    device = torch.device(cfg.device)
    dtype = "bfloat16" if device.type == "cuda" or not cfg.tiny else "float32"
    lm = build_random_model(arch, device=device, dtype=dtype, tiny=cfg.tiny)
    tok = lm.tokenizer
    n_fwd, n_head = matmul_params(lm.model, unembed=False), matmul_params(lm.model, unembed=True)
    res = CheckResult(arch, str(device), dtype, sum(p.numel() for p in lm.model.parameters()))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def record(stage: str, seconds: float, tokens: float, flops_per_token: float) -> None:
        tps = tokens / seconds
        mfu = tps * flops_per_token / (peak * 1e12)
        res.stages[stage] = {"seconds": seconds, "tokens_per_s": tps, "mfu": mfu}
        log(f"  {arch:<18} {stage:<14} {seconds:7.2f} s  {tps:10.0f} tok/s  MFU {100 * mfu:5.1f}%")

    prompts = fixed_length_prompts(tok, cfg.eval_prompts, cfg.seq)
    bs = cfg.eval_prompts  # the whole set per forward: batch sizes on a GPU are set by memory, not by cores
    scores, s = _timed(device, lambda: logit_refusal_scores(lm, prompts, batch_size=bs))
    record("logit score", s, cfg.eval_prompts * cfg.seq, 2 * n_fwd)
    _, s = _timed(device, lambda: generate(lm, prompts, max_new_tokens=cfg.new_tokens, batch_size=bs, progress=False))
    record("generate", s, cfg.eval_prompts * cfg.new_tokens, 2 * n_head)
    acts, s = _timed(device, lambda: collect_activations(lm, prompts, layers=None, batch_size=bs))
    record("activations", s, cfg.eval_prompts * cfg.seq, 2 * n_fwd)
    assert torch.isfinite(acts).all() and torch.isfinite(scores).all(), "non-finite evaluation output"

    ucfg = UnlearnConfig(target_domains=("cybersecurity",), method="npo", retain_mode="ce", steps=cfg.steps,
                         batch_size=cfg.batch_size, retain_batch_size=cfg.batch_size)
    resp = max(cfg.train_seq // 4, 8)
    forget = collate(tok, fixed_length_examples(tok, cfg.batch_size, cfg.train_seq, resp, seed=1),
                     max_prompt_tokens=None).to(device)
    retain = collate(tok, fixed_length_examples(tok, cfg.batch_size, cfg.train_seq, resp, seed=2),
                     max_prompt_tokens=None).to(device)
    with torch.no_grad(), adapter_disabled(lm):
        rl = response_logits(lm.model, forget.input_ids, forget.attention_mask, forget.response_mask)
        ref = sequence_logprobs(rl.logits, rl.labels, rl.mask).float()
        del rl
    attach_lora(lm, rank=16, alpha=32.0)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(lm)
    params = [p for p in lm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    lm.model.train()

    def steps():
        losses = []
        for _ in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            out = train_step(lm, ucfg, forget, ref, retain)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            losses.append(float(out.loss))
        return losses

    losses, s = _timed(device, steps)
    lm.model.eval()
    # Forget and retain batches each cost a forward and a backward through the activations (4·N per token).
    record("npo+retain", s, 2 * cfg.steps * cfg.batch_size * cfg.train_seq, 4 * n_head)
    assert all(torch.isfinite(torch.tensor(x)) for x in losses), f"non-finite NPO loss: {losses}"
    after, s = _timed(device, lambda: logit_refusal_scores(lm, prompts, batch_size=bs))
    record("re-evaluation", s, cfg.eval_prompts * cfg.seq, 2 * n_fwd)
    res.stages["re-evaluation"]["mean_abs_score_change"] = float((after - scores).abs().mean())
    if device.type == "cuda":
        res.peak_memory_gb = torch.cuda.max_memory_allocated(device) / 2**30
        log(f"  {arch:<18} peak GPU memory {res.peak_memory_gb:.1f} GB")
    detach_lora(lm)
    return res  # the model is freed with this frame; run_check empties the CUDA cache between architectures


def run_check(cfg: CheckConfig, log=print) -> dict:
    """Every architecture of ``cfg``; returns the figures (also written to ``cfg.out``)."""
    device = torch.device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = measured_peak_tflops(device, dtype, n=8192 if device.type == "cuda" else 256, reps=10 if device.type == "cuda" else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"gpu check on {name}: measured {str(dtype).removeprefix('torch.')} matmul peak {peak:.1f} TFLOP/s")
    t0 = time.perf_counter()
    results = []
    for arch in cfg.architectures:
        results.append(asdict(check_architecture(arch, cfg, peak, log)))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = {"device": name, "measured_peak_tflops": peak, "config": asdict(cfg), "results": results,
           "seconds": time.perf_counter() - t0}
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(out, indent=2))
        log(f"wrote {cfg.out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized configs (the code path, not the figures)")
    parser.add_argument("--arch", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-seq", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--gpu7b", action="store_true", help="then run the gpu7b benchmark (emalab vs plain HF/PEFT)")
    parser.add_argument("--out", default=None, help="JSON file for the figures")
    args = parser.parse_args(argv)
    small = dict(eval_prompts=4, seq=48, new_tokens=2, train_seq=48, batch_size=2) if args.tiny else {}
    cfg = CheckConfig(device=args.device, tiny=args.tiny, architectures=tuple(args.arch), steps=args.steps,
                      gradient_checkpointing=args.gradient_checkpointing, out=args.out,
                      **{"batch_size": args.batch_size, "train_seq": args.train_seq, **small})
    run_check(cfg)
    if args.gpu7b:
        from benchmarks.cli import main as bench_main

        return bench_main(["--suite", "gpu7b", "--device", args.device] + (["--tiny"] if args.tiny else []))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
