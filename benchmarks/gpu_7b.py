"""7B-scale GPU benchmark: benchmarks 1-3 on Mistral-7B-v0.3 and Qwen2.5-7B architectures with random
weights, at batch 32 × 256 tokens, with tokens/s, MFU and the ratio to plain HF / PEFT in the same run.

One command on an H100 / H200::

    python -m benchmarks --suite gpu7b --device cuda          # writes benchmarks/results/<gpu>/gpu7b-*.json
    python -m benchmarks --suite gpu7b --device cpu --tiny    # the same code path on CPU-sized configs

Nothing is downloaded: the models are built from ``transformers`` config classes with the real 7B
hyper-parameters, on the ``meta`` device first (no slow CPU initialisation), then materialised on the
target device with ``to_empty`` and initialised there (normal(0, 0.02) matrices, unit norms, zero
biases; the rotary buffers are rebuilt from the config). The tokenizer is byte-level with a ChatML
template, so a prompt of ``k`` ASCII characters is exactly ``k`` tokens and every sequence is exactly
``seq`` tokens long. Random weights do not change the cost of a forward or a step; generation is
forced to its full length (no EOS).

MFU (model FLOPs utilisation) = achieved model FLOP/s ÷ the GPU's dense bf16 peak (looked up from the
device name). Model FLOPs use the standard approximation: ``2·N`` per token for a forward and ``4·N``
per token for a LoRA step (forward + backward through the activations; the frozen base weights get
no weight gradient, and the LoRA matrices' own FLOPs are negligible), plus ``2·N`` per token for the
live reference forward. ``N`` counts the matrix-multiply parameters the variant runs: every linear
layer of the decoder, plus the unembedding for training and generation (activation collection stops
before it). Attention's ``seq²`` term is ignored (≈ 3% at 256 tokens for these shapes). Every
variant of a benchmark is charged the same nominal FLOPs, so MFU ratios equal throughput ratios.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks import activations as bench_acts
from benchmarks import refusal as bench_refusal
from benchmarks import unlearn as bench_unlearn
from benchmarks.harness import BenchConfig, BenchResult, Variant, make_result
from interp.adapter import embed_module, unembed_module
from interp.chat import format_prompts
from interp.loading import LoadedModel, resolve_dtype
from training.data import Example, collate

__all__ = [
    "ARCHITECTURES",
    "TINY_OVERRIDES",
    "PEAK_BF16_TFLOPS",
    "peak_tflops",
    "architecture_config",
    "byte_tokenizer",
    "build_random_model",
    "fixed_length_prompts",
    "fixed_length_examples",
    "matmul_params",
    "run_architecture",
    "run",
]

ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    # mistralai/Mistral-7B-v0.3 config.json
    "mistral-7b-v0.3": ("MistralConfig", dict(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1e6,
        sliding_window=None, tie_word_embeddings=False)),
    # Qwen/Qwen2.5-7B config.json
    "qwen2.5-7b": ("Qwen2Config", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1e6,
        use_sliding_window=False, tie_word_embeddings=False)),
}
TINY_OVERRIDES = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from NVIDIA's data sheets. More specific
# names first: "H100 PCIe" must match before "H100".
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0), ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def peak_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU from its name (``torch.cuda.get_device_name``); None if unknown."""
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def architecture_config(arch: str, tiny: bool = False):
    """The ``transformers`` config of ``arch`` (real 7B hyper-parameters, or CPU-sized with ``tiny``)."""
    import transformers

    if arch not in ARCHITECTURES:
        raise KeyError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    cls_name, params = ARCHITECTURES[arch]
    params = dict(params)
    if tiny:
        params.update(TINY_OVERRIDES)
        if "head_dim" in params:
            params["head_dim"] = params["hidden_size"] // params["num_attention_heads"]
    return getattr(transformers, cls_name)(**params)


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + ChatML specials) with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>",
                             "pad_token": "<|endoftext|>"})
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def _rebuild_buffers(model: nn.Module, device: torch.device) -> None:
    """``to_empty`` leaves buffers uninitialised; rebuild each buffer-owning module (the rotary
    embedding) from its config on ``device`` and copy its buffers over."""
    for name, module in model.named_modules():
        own = dict(module.named_buffers(recurse=False))
        if not own:
            continue
        if not hasattr(module, "config"):
            raise RuntimeError(f"{name} ({type(module).__name__}) holds buffers {sorted(own)} that cannot be rebuilt "
                               "from a config; initialise the model on the device instead")
        with torch.device(device):
            fresh = type(module)(module.config)
        for key, buf in fresh.named_buffers(recurse=False):
            own[key].copy_(buf)


@torch.no_grad()
def _init_random(model: nn.Module, seed: int, std: float = 0.02) -> None:
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, std, generator=gen)
        elif name.endswith("bias"):
            p.zero_()
        else:  # RMSNorm gains
            p.fill_(1.0)


def build_random_model(arch: str, device: str | torch.device = "cuda", dtype: str | torch.dtype = "bfloat16",
                       tiny: bool = False, seed: int = 0) -> LoadedModel:
    """A random-weight ``arch`` model as a :class:`LoadedModel`: built on ``meta``, materialised on ``device``."""
    from transformers import AutoModelForCausalLM

    device, dtype = torch.device(device), resolve_dtype(dtype)
    tok = byte_tokenizer()
    cfg = architecture_config(arch, tiny)
    cfg.pad_token_id = tok.pad_token_id
    cfg.eos_token_id = None  # random weights: never stop early, every generation is full length
    cfg.bos_token_id = None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    model.to_empty(device=device)
    _rebuild_buffers(model, device)
    _init_random(model, seed)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, name=f"random-{arch}{'-tiny' if tiny else ''}",
                       weights_id=f"random-{arch}-seed{seed}{'-tiny' if tiny else ''}", chat=True)


def _template_overhead(tok) -> int:
    return len(tok(format_prompts(tok, [""], allow_empty=True)[0], add_special_tokens=False)["input_ids"])


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(n))


def fixed_length_prompts(tok, n: int, seq: int, seed: int = 0) -> list[str]:
    """``n`` prompts whose chat-formatted form is exactly ``seq`` tokens (byte tokenizer)."""
    k = seq - _template_overhead(tok)
    if k < 1:
        raise ValueError(f"seq={seq} is shorter than the chat template ({_template_overhead(tok)} tokens)")
    rng = random.Random(seed)
    return [_text(rng, k) for _ in range(n)]


def fixed_length_examples(tok, n: int, seq: int, response_tokens: int, seed: int = 0) -> list[Example]:
    """``n`` training examples of exactly ``seq`` tokens, the last ``response_tokens`` being the response."""
    rng = random.Random(seed)
    prompts = fixed_length_prompts(tok, n, seq - response_tokens, seed)
    return [Example(f"gpu-{i}", "bench", p, _text(rng, response_tokens), "refusal") for i, p in enumerate(prompts)]


def matmul_params(model: nn.Module, unembed: bool) -> int:
    """Parameters of the linear layers a forward multiplies by (embedding lookups excluded)."""
    skip = {id(embed_module(model).weight)} | (set() if unembed else {id(unembed_module(model).weight)})
    return sum(m.weight.numel() for m in model.modules()
               if isinstance(m, nn.Linear) and id(m.weight) not in skip)


@dataclass
class _Flops:
    per_token: float
    peak: float | None

    def annotate(self, v: Variant, tokens: float) -> None:
        flops = self.per_token * tokens / v.median_s
        v.extra["model_tflops_per_s"] = flops / 1e12
        v.extra["mfu"] = flops / (self.peak * 1e12) if self.peak else None


def run_architecture(arch: str, cfg: BenchConfig) -> BenchResult:
    """Benchmarks 1-3 on one random-weight architecture; variant names are ``<bench>:<variant>``."""
    device = torch.device(cfg.device)
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    lm = build_random_model(arch, device, cfg.dtype, tiny=cfg.tiny)
    n_body, n_full = matmul_params(lm.model, unembed=False), matmul_params(lm.model, unembed=True)
    batch, seq = cfg.gpu_batch, cfg.gpu_seq
    variants: dict[str, Variant] = {}
    ratios: dict[str, dict] = {}
    checks: dict[str, Any] = {}

    def merge(bench: str, res: tuple[dict[str, Variant], dict[str, dict], dict[str, Any]], flops: dict[str, _Flops],
              tokens: dict[str, float]) -> None:
        vs, rs, cs = res
        for k, v in vs.items():
            flops[k].annotate(v, tokens[k])
            variants[f"{bench}:{k}"] = v
        ratios.update({f"{bench}:{k}": r for k, r in rs.items()})
        checks.update({f"{bench}:{k}": c for k, c in cs.items()})

    # 1. activations: 4 batches of batch × seq, last-token residuals at every layer.
    prompts = fixed_length_prompts(lm.tokenizer, 4 * batch, seq)
    res = bench_acts.measure(lm, prompts, batch, cfg.reps, cfg.warmup)
    tok = res[0]["emalab"].work["tokens"]
    merge("activations", res, {k: _Flops(2 * n_body, peak) for k in res[0]}, dict.fromkeys(res[0], tok))

    # 2. refusal: one batch; the logit score is a forward, generation adds max_new_tokens decode steps.
    prompts = fixed_length_prompts(lm.tokenizer, batch, seq, seed=1)
    res = bench_refusal.measure(lm, prompts, batch, cfg.max_new_tokens, cfg.reps, cfg.warmup)
    merge("refusal", res, {"logit_score": _Flops(2 * n_body, peak), "generate_judge": _Flops(2 * n_full, peak)},
          {"logit_score": batch * seq, "generate_judge": batch * (seq + cfg.max_new_tokens)})

    # 3. unlearning step: one global batch of batch × seq in micro-batches (gradient accumulation).
    examples = fixed_length_examples(lm.tokenizer, batch, seq, response_tokens=seq // 4)
    micro = [collate(lm.tokenizer, examples[i:i + cfg.gpu_micro_batch], max_prompt_tokens=None)
             for i in range(0, batch, cfg.gpu_micro_batch)]
    res = bench_unlearn.measure(lm, micro, cfg.reps, cfg.warmup)
    tok = res[0]["npo_precomputed"].work["tokens"]
    flops = {k: _Flops(4 * n_full, peak) for k in res[0]}
    flops["npo_live_ref"] = _Flops(6 * n_full, peak)
    merge("unlearn", res, flops, dict.fromkeys(res[0], tok))

    if device.type == "cuda":
        checks["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    config = {"architecture": arch, "tiny": cfg.tiny, "matmul_params_body": n_body, "matmul_params_with_unembed": n_full,
              "dtype": cfg.dtype, "device": str(device), "batch": batch, "seq": seq, "micro_batch": cfg.gpu_micro_batch,
              "max_new_tokens": cfg.max_new_tokens, "lora": "r=8, all linear layers", "reps": cfg.reps,
              "warmup": cfg.warmup, "peak_bf16_tflops": peak}
    notes = ["random weights built from transformers config classes (meta init, to_empty, on-device init)",
             "MFU: 2N FLOPs/token forward, 4N LoRA step, +2N live reference; N = matmul parameters run (see module doc)",
             "ratio = median baseline time / median emalab time (>1: emalab faster)"]
    del lm
    if device.type == "cuda":
        torch.cuda.empty_cache()
    name = f"gpu7b-{arch}" + ("-tiny" if cfg.tiny else "")
    return make_result(name, variants, ratios, config, device, checks, notes)


def run(lm: Any, cfg: BenchConfig) -> list[BenchResult]:
    """Both architectures (``lm`` is unused: the models are built here)."""
    if torch.device(cfg.device).type == "cpu" and not cfg.tiny:
        raise ValueError("the 7B benchmark needs a GPU (about 15 GB of bf16 weights per model): pass --device cuda, "
                         "or --tiny to run the same code path on CPU-sized configs")
    return [run_architecture(arch, cfg) for arch in ARCHITECTURES]
