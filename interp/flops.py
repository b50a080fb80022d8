"""FLOPs of a decoder forward / training step counted from the model config, and the machine's own
matmul peak at the model's GEMM shapes: together they give MFU (achieved FLOP/s over that peak).

Counting conventions (one multiply-add = 2 FLOPs):

* **Dense matmuls**: ``2 · params · tokens`` for the decoder's linear weights (q, k, v, o, the MLP),
  counted on real (non-padding) tokens only, so padding shows up as lost MFU.
* **Attention**: ``QKᵀ`` and ``AV`` cost ``2 · 2 · n_heads · head_dim`` per (query, key) pair; a query
  at position ``p`` sees ``p + 1`` keys (causal; sliding windows are ignored, an upper bound).
* **Unembedding**: ``2 · d_model · d_vocab`` per position actually unembedded (``logits_to_keep``).
* **Training** (a LoRA step): the backward of a frozen matmul only computes the input gradient (1× its
  forward), a trained one also the weight gradient (2×); attention's backward is 2× its forward; the
  LoRA branches (``r·(d_in + d_out)`` per adapted matrix) are trained matmuls. So a LoRA step costs
  about 4× the forward's dense FLOPs, not the 6× of full fine-tuning. Gradient checkpointing adds one
  more forward.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ModelShape", "model_shape", "forward_flops", "train_flops", "generation_flops", "lora_params",
           "gemm_shapes", "matmul_peak", "mfu"]


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder config that FLOPs depend on."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_vocab: int
    gated_mlp: bool = True

    @property
    def layer_linear_params(self) -> int:
        """Weights of one layer's linear maps (q, k, v, o, and the two or three MLP matrices)."""
        attn = self.d_model * self.n_heads * self.head_dim * 2 + self.d_model * self.n_kv_heads * self.head_dim * 2
        return attn + (3 if self.gated_mlp else 2) * self.d_model * self.d_mlp

    @property
    def linear_params(self) -> int:
        """Decoder linear weights (no embedding, no unembedding)."""
        return self.n_layers * self.layer_linear_params

    def linear_shapes(self) -> list[tuple[int, int]]:
        """``(d_in, d_out)`` of one layer's linear maps (what ``all-linear`` LoRA adapts)."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        mlp = [(self.d_model, self.d_mlp)] * (2 if self.gated_mlp else 1) + [(self.d_mlp, self.d_model)]
        return [(self.d_model, q), (self.d_model, kv), (self.d_model, kv), (q, self.d_model), *mlp]


def model_shape(config: Any) -> ModelShape:
    """:class:`ModelShape` of a transformers config (or a model, whose ``.config`` is read)."""
    config = getattr(config, "config", config)
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    d_model = int(cfg.hidden_size)
    heads = int(cfg.num_attention_heads)
    act = str(getattr(cfg, "hidden_act", getattr(cfg, "hidden_activation", "silu")) or "silu")
    family = str(getattr(cfg, "model_type", ""))
    return ModelShape(
        n_layers=int(cfg.num_hidden_layers), d_model=d_model,
        d_mlp=int(getattr(cfg, "intermediate_size", None) or 4 * d_model), n_heads=heads,
        n_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(cfg, "head_dim", None) or d_model // heads), d_vocab=int(cfg.vocab_size),
        # Llama-style families gate the MLP (gate, up, down); GPT-2-style ones do not.
        gated_mlp=family not in ("gpt2", "gpt_neox", "gptj", "opt", "phi") and "gelu_new" not in act,
    )


def _rows(rows: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """``(tokens, attention pairs)`` of rows given as ``(n_new, n_past)``: ``n_new`` tokens processed
    after ``n_past`` cached ones; the query at position ``p`` attends to ``p + 1`` keys."""
    tokens = pairs = 0
    for n_new, n_past in rows:
        if n_new < 0 or n_past < 0:
            raise ValueError(f"token counts must be >= 0, got ({n_new}, {n_past})")
        tokens += n_new
        # sum over p = n_past .. n_past + n_new - 1 of (p + 1)
        pairs += n_new * n_past + n_new * (n_new + 1) // 2
    return tokens, pairs


def forward_flops(shape: ModelShape, rows: Iterable[tuple[int, int]], logits_positions: int) -> float:
    """FLOPs of one forward over ``rows`` (``(n_new, n_past)`` per row, real tokens only).

    Args:
        rows: per row, tokens processed and tokens already in the KV cache before them (0 without
            a cache); e.g. ``[(len(ids), 0) for ids in prompts]`` for an uncached forward.
        logits_positions: positions unembedded over the whole batch (``batch`` for ``logits_to_keep=1``).
    """
    tokens, pairs = _rows(rows)
    dense = 2.0 * shape.linear_params * tokens
    attn = 4.0 * shape.n_layers * shape.n_heads * shape.head_dim * pairs
    unembed = 2.0 * shape.d_model * shape.d_vocab * logits_positions
    return dense + attn + unembed


def lora_params(shape: ModelShape, rank: int) -> int:
    """Parameters of ``all-linear`` LoRA adapters of ``rank`` (``r·(d_in + d_out)`` per matrix)."""
    return shape.n_layers * sum(rank * (i + o) for i, o in shape.linear_shapes())


def train_flops(
    shape: ModelShape, rows: Iterable[tuple[int, int]], logits_positions: int, lora_rank: int | None = 8,
    gradient_checkpointing: bool = False,
) -> float:
    """FLOPs of one training forward + backward over ``rows`` (see the module docstring).

    Args:
        lora_rank: rank of ``all-linear`` LoRA adapters; ``None`` for full fine-tuning (every linear
            weight trained: the usual 6× of the dense FLOPs).
        gradient_checkpointing: the forward runs again in the backward.
    """
    rows = list(rows)
    tokens, pairs = _rows(rows)
    dense = 2.0 * shape.linear_params * tokens
    attn = 4.0 * shape.n_layers * shape.n_heads * shape.head_dim * pairs
    unembed = 2.0 * shape.d_model * shape.d_vocab * logits_positions
    if lora_rank is None:
        dense_total, lora = 3 * dense, 0.0
    else:
        dense_total, lora = 2 * dense, 3 * 2.0 * lora_params(shape, lora_rank) * tokens
    # frozen unembedding: forward + input gradient; attention: forward + 2× backward
    total = dense_total + lora + 3 * attn + 2 * unembed
    if gradient_checkpointing:
        total += dense + attn + (2.0 * lora_params(shape, lora_rank) * tokens if lora_rank else 0.0)
    return total


def generation_flops(shape: ModelShape, prompt_rows: Sequence[tuple[int, int]], new_tokens: Sequence[int]) -> float:
    """FLOPs of greedy generation with a KV cache: the prefill of each ``(n_new, n_past)`` prompt row
    (one position unembedded) and one cached decode step per generated token after the first.

    Args:
        new_tokens: tokens generated per row (same order as ``prompt_rows``).
    """
    if len(prompt_rows) != len(new_tokens):
        raise ValueError(f"{len(prompt_rows)} prompt rows but {len(new_tokens)} generation lengths")
    total = forward_flops(shape, prompt_rows, logits_positions=len(prompt_rows))
    decode = []
    for (n_new, n_past), n_gen in zip(prompt_rows, new_tokens, strict=True):
        ctx = n_new + n_past
        # the first generated token comes from the prefill; each later one is a 1-token step
        decode += [(1, ctx + i) for i in range(max(int(n_gen) - 1, 0))]
    return total + forward_flops(shape, decode, logits_positions=len(decode))


def gemm_shapes(shape: ModelShape, rows: int) -> list[tuple[int, int, int]]:
    """``(m, k, n)`` of the model's matmuls for ``rows`` tokens: q/o, k/v, MLP up and down, unembedding."""
    q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    return [(rows, shape.d_model, q), (rows, shape.d_model, kv), (rows, shape.d_model, shape.d_mlp),
            (rows, shape.d_mlp, shape.d_model), (rows, shape.d_model, min(shape.d_vocab, 32768))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    shape: ModelShape, dtypes: Sequence[str] = ("bfloat16", "float32"), rows: Sequence[int] = (16, 512, 2048),
    device: str | torch.device = "cpu", reps: int = 3, rounds: int = 2, min_seconds: float = 0.02,
) -> dict[str, dict[str, Any]]:
    """This machine's matmul FLOP/s at the model's GEMM shapes, per dtype, in this process and thread count.

    Each ``(m, k, n)`` of :func:`gemm_shapes` for each ``rows`` is timed (best of ``reps`` calls, each
    repeated until ``min_seconds``), dtypes interleaved round by round so that a load burst hits all.

    Returns:
        ``{dtype: {"peak_flops": best FLOP/s over the shapes, "at": (m, k, n) of the best,
        "by_shape": {"m×k×n": FLOP/s}}}``.
    """
    device = torch.device(device)
    shapes = sorted({s for r in rows for s in gemm_shapes(shape, r)})
    out: dict[str, dict[str, Any]] = {d: {"by_shape": {}} for d in dtypes}
    for _ in range(rounds):
        for m, k, n in shapes:
            for name in dtypes:
                dt = getattr(torch, name)
                a, b = torch.randn(m, k, device=device).to(dt), torch.randn(k, n, device=device).to(dt)
                torch.matmul(a, b)
                _sync(device)
                t0 = time.perf_counter()
                torch.matmul(a, b)
                _sync(device)
                inner = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-7)))
                best = float("inf")
                for _ in range(reps):
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        torch.matmul(a, b)
                    _sync(device)
                    best = min(best, (time.perf_counter() - t0) / inner)
                key = f"{m}x{k}x{n}"
                rate = 2.0 * m * k * n / best
                out[name]["by_shape"][key] = max(rate, out[name]["by_shape"].get(key, 0.0))
    for name in dtypes:
        key, rate = max(out[name]["by_shape"].items(), key=lambda kv: kv[1])
        out[name].update(peak_flops=rate, at=key)
    return out


def mfu(flops: float, seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: ``flops / seconds`` as a fraction of ``peak_flops``."""
    if seconds <= 0 or peak_flops <= 0:
        raise ValueError("seconds and peak_flops must be > 0")
    return flops / seconds / peak_flops
